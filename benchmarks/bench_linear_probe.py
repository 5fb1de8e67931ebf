"""Linear probe: cached frozen features vs recomputing them every epoch (cgns evaluate).

Both modes train the same head with the same Trainer settings on synthetic_cxr (multi-label,
5 CheXpert tasks) with a frozen resnet18 CGNS tower, no augmentation and early stopping disabled
(patience above the epoch count) so every run trains exactly the epochs asked for. Times are
end-to-end ``cgns.downstream.cli.main`` calls (dataset from the prepared cache, model load, feature
extraction, training, test evaluation, results files), after one untimed warm-up call.

The uncached mode is too slow to run for 100 epochs on two cores, so it runs ``--uncached_epochs``
E1 and E2 epochs and is extrapolated linearly: time(N) = time(E1) + (N - E1) * per-epoch, with
per-epoch = (time(E2) - time(E1)) / (E2 - E1). The test metric is compared between the two modes at
E2 epochs (same seed: they should agree to float rounding), and the cached 100-epoch metric is
reported beside it.

    python benchmarks/bench_linear_probe.py [--num_images 600] [--image_size 128] [--epochs 100] \
        [--uncached_epochs 1 3] [--init random] [--workdir DIR]
"""
import argparse
import os
import tempfile
import time
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import BertConfig, TimmWrapperConfig

import data_scripts
from cgns.downstream.cli import main as evaluate
from modeling_cgns import CGNSConfig, CGNSModel


def make_export(path: str, arch: str, image_size: int) -> str:
    """A CGNS export with a random ``arch`` tower and a tiny text tower (only the image tower is used)."""
    torch.manual_seed(0)
    config = CGNSConfig(
        vision_config=TimmWrapperConfig(architecture=arch), image_size=image_size,
        text_config=BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, vocab_size=100),
        projection_dim=32, attention_pool_heads=4, sentence_pool_heads=4, decoder_channels=[16, 8])
    CGNSModel(config).save_pretrained(path)
    return path


def timed_run(argv: List[str]) -> Dict:
    start = time.perf_counter()
    results = evaluate(argv)
    seconds = time.perf_counter() - start
    run = results["seeds"][next(iter(results["seeds"]))]
    return {"seconds": seconds, "auroc": run["test"]["auroc"], "test_loss": run["test_loss"]}


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_images", type=int, default=600)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--uncached_epochs", type=int, nargs=2, default=[1, 3], metavar=("E1", "E2"))
    p.add_argument("--init", default="random", choices=("pretrained", "random"),
                   help="tower weights: the export's (CGNSModel's generic init) or timm's own "
                        "initialisation, whose features carry more signal for a random tower")
    p.add_argument("--batch_size", type=int, default=48)
    p.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = p.parse_args(argv)
    e1, e2 = args.uncached_epochs
    if not 0 < e1 < e2:
        p.error("--uncached_epochs needs 0 < E1 < E2")
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_linear_probe_")
    export = make_export(os.path.join(workdir, "export"), args.arch, args.image_size)
    cache_dir = os.path.join(workdir, "data")
    options = [f"num_images={args.num_images}", f"image_size={args.image_size}"]
    data_scripts.load_cgns_dataset("synthetic_cxr", task="classification", cache_dir=cache_dir,
                                   num_images=args.num_images, image_size=args.image_size)

    def argv_for(name: str, epochs: int, *extra: str) -> List[str]:
        return ["--dataset", "synthetic_cxr", "--cache_dir", cache_dir, "--dataset_options", *options,
                "--model", export, "--output_dir", os.path.join(workdir, name), "--seeds", "0",
                "--max_epochs", str(epochs), "--patience", str(args.epochs + 1),
                "--batch_size", str(args.batch_size), "--init", args.init, "--quiet", *extra]

    timed_run(argv_for("warmup", 1))
    cached = timed_run(argv_for("cached", args.epochs))
    cached_short = timed_run(argv_for("cached_short", e2))
    uncached_e1 = timed_run(argv_for("uncached_e1", e1, "--no_cache"))
    uncached_e2 = timed_run(argv_for("uncached_e2", e2, "--no_cache"))
    per_epoch = (uncached_e2["seconds"] - uncached_e1["seconds"]) / (e2 - e1)
    uncached_full = uncached_e1["seconds"] + (args.epochs - e1) * per_epoch
    report = {
        "setup": f"{args.arch} ({args.init} init) @ {args.image_size} px, synthetic_cxr {args.num_images} "
                 f"images, batch {args.batch_size}, torch threads {torch.get_num_threads()}",
        "cached_seconds": cached["seconds"],
        "uncached_seconds_measured": {e1: uncached_e1["seconds"], e2: uncached_e2["seconds"]},
        "uncached_seconds_per_epoch": per_epoch,
        "uncached_seconds_extrapolated": uncached_full,
        "speedup": uncached_full / cached["seconds"],
        "test_auroc": {f"cached_{args.epochs}ep": cached["auroc"], f"cached_{e2}ep": cached_short["auroc"],
                       f"uncached_{e2}ep": uncached_e2["auroc"]},
        "test_loss": {f"cached_{e2}ep": cached_short["test_loss"],
                      f"uncached_{e2}ep": uncached_e2["test_loss"]},
    }
    print("\nLinear probe benchmark:", report["setup"])
    print(f"  cached, {args.epochs} epochs (measured):        {cached['seconds']:8.1f} s")
    print(f"  uncached, {e1} / {e2} epochs (measured):        {uncached_e1['seconds']:8.1f} / "
          f"{uncached_e2['seconds']:.1f} s ({per_epoch:.1f} s per epoch)")
    print(f"  uncached, {args.epochs} epochs (extrapolated):  {uncached_full:8.1f} s")
    print(f"  speed-up: {report['speedup']:.1f}x (target >= 10x)")
    print(f"  test macro AUROC: {report['test_auroc']}")
    print(f"  test loss at {e2} epochs: {report['test_loss']}")
    return report


if __name__ == "__main__":
    main()

__all__ = ["main", "make_export"]
