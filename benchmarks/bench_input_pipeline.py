"""Input-pipeline throughput: an Arrow ``datasets`` Dataset of PNG bytes vs plain PIL files.

Both pipelines apply the same training transform (decode -> resize longest side to 256 -> zero-pad
to 256x256 -> RandomCrop 224 -> ToTensor -> Normalize(0.5, 0.5)) and are read through a torch
DataLoader (2 workers, batch 32). The ``datasets`` side stores the images as ``Image()`` PNG bytes
(as the CGNS builders do) and transforms with ``with_transform``; the baseline is a torch
``Dataset`` opening the same PNG files with PIL.

    python benchmarks/bench_input_pipeline.py [--n 500] [--size 512] [--repeats 3] [--workers 2]

Prints images/s for both and the ratio datasets / PIL (target >= 0.8).
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T


def resize_longest_and_pad(img: Image.Image, size: int = 256) -> Image.Image:
    """Resize so the longest side is ``size`` (aspect kept), then zero-pad to ``size`` x ``size``."""
    w, h = img.size
    s = size / max(w, h)
    img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    if img.size == (size, size):
        return img
    canvas = Image.new(img.mode, (size, size))
    canvas.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
    return canvas


def make_transform(crop: int = 224):
    return T.Compose([T.Lambda(resize_longest_and_pad), T.RandomCrop(crop), T.ToTensor(),
                      T.Normalize([0.5], [0.5])])


class PILFiles(Dataset):
    """Baseline: PNG files opened with PIL."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return {"pixel_values": self.transform(im.convert("L"))}


def build_hf_dataset(paths, transform):
    import datasets

    def read(p):
        with open(p, "rb") as f:
            return {"bytes": f.read(), "path": None}

    ds = datasets.Dataset.from_dict({"image": [read(p) for p in paths]},
                                    features=datasets.Features({"image": datasets.Image()}))

    def apply(batch):
        return {"pixel_values": [transform(im.convert("L")) for im in batch["image"]]}

    return ds.with_transform(apply)


def throughput(dataset, workers: int, batch_size: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=True,
                        persistent_workers=False)
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        n += batch["pixel_values"].shape[0]
    return n / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=32)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        yy, xx = np.mgrid[0:args.size, 0:args.size]
        for i in range(args.n):  # smooth image + noise, so PNG sizes are realistic (not all-noise)
            px = (128 + 60 * np.sin(xx / (20 + i % 7)) * np.cos(yy / 31) + rng.normal(0, 8, xx.shape))
            p = os.path.join(tmp, f"{i:04d}.png")
            Image.fromarray(np.clip(px, 0, 255).astype(np.uint8), mode="L").save(p)
            paths.append(p)
        tf = make_transform()
        hf, pil = build_hf_dataset(paths, tf), PILFiles(paths, tf)
        assert hf[0]["pixel_values"].shape == pil[0]["pixel_values"].shape == (1, 224, 224)
        throughput(hf, args.workers, args.batch_size)  # warm-up (page cache, worker start)
        throughput(pil, args.workers, args.batch_size)
        res = {"datasets": [], "pil": []}
        for _ in range(args.repeats):  # interleaved, so drift hits both equally
            res["datasets"].append(throughput(hf, args.workers, args.batch_size))
            res["pil"].append(throughput(pil, args.workers, args.batch_size))
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"images: {args.n} x {args.size}x{args.size} PNG (L) -> 224 crops; workers {args.workers}, "
          f"batch {args.batch_size}, repeats {args.repeats}, torch threads {torch.get_num_threads()}")
    for k in ("datasets", "pil"):
        print(f"{k:>9}: median {med[k]:8.1f} img/s  (runs: {', '.join(f'{v:.1f}' for v in res[k])})")
    ratio = med["datasets"] / med["pil"]
    print(f"ratio datasets/PIL: {ratio:.2f}x (target >= 0.8x)")
    return ratio


if __name__ == "__main__":
    main()

__all__ = ["main", "make_transform", "resize_longest_and_pad", "build_hf_dataset", "PILFiles", "throughput"]
