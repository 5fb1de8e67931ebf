"""A small end-to-end run of the detection and segmentation protocols on synthetic_cxr (2 CPU cores, minutes).

Makes a CGNS export with a random resnet18 tower (a random tower is what a new user without a
pretrained model has; ``--init random`` would draw the same architecture), then runs
``cgns evaluate --task detection`` and ``--task segmentation`` with the protocol's defaults
except the size of the data (``--num_images``, ``--image_size``) and ``--max_epochs``. Prints the
test mAP (detection) and the Dice, Dice on positive images and Dice of an empty prediction
(segmentation): the numbers recorded in docs/detection.md and docs/segmentation.md.

    python benchmarks/run_synthetic_protocols.py [--tasks detection segmentation] [--num_images 300] \
        [--image_size 64] [--lesion_contrast_scale 1] [--max_epochs 50] [--workdir DIR]
"""
import argparse
import json
import os
import tempfile
import time
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import BertConfig, TimmWrapperConfig

from cgns.downstream.cli import main as evaluate
from modeling_cgns import CGNSConfig, CGNSModel


def make_export(path: str, image_size: int) -> str:
    """A CGNS export with a random resnet18 tower and a tiny text tower (only the image tower is used)."""
    torch.manual_seed(0)
    config = CGNSConfig(
        vision_config=TimmWrapperConfig(architecture="resnet18"), image_size=image_size,
        text_config=BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, vocab_size=100),
        projection_dim=32, attention_pool_heads=4, sentence_pool_heads=4, decoder_channels=[16, 8])
    CGNSModel(config).save_pretrained(path)
    return path


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["detection", "segmentation"],
                   choices=["detection", "segmentation"], help="protocols to run")
    p.add_argument("--num_images", type=int, default=300, help="synthetic studies (80/10/10 split)")
    p.add_argument("--image_size", type=int, default=64, help="image and model input size")
    p.add_argument("--lesion_contrast_scale", type=float, default=1.0,
                   help="synthetic_cxr option: multiplies every lesion contrast (3: the detection run of "
                        "docs/detection.md, whose test mAP is above 0)")
    p.add_argument("--max_epochs", type=int, default=50, help="the protocols' default is 50")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument("--workdir", default=None, help="default: a temporary folder")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (on a busy 2-core machine one thread is several times faster)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further `cgns evaluate` options (after everything else)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="synthetic_protocols_")
    export = make_export(os.path.join(workdir, "export"), args.image_size)
    summary = {}
    for task in args.tasks:
        command = ["--task", task, "--dataset", "synthetic_cxr", "--model", export,
                   "--output_dir", os.path.join(workdir, task), "--cache_dir", os.path.join(workdir, "data"),
                   "--dataset_options", f"num_images={args.num_images}", f"image_size={args.image_size}",
                   *([f"lesion_contrast_scale={args.lesion_contrast_scale:g}"]
                     if args.lesion_contrast_scale != 1 else []),
                   "--max_epochs", str(args.max_epochs), "--seeds", *map(str, args.seeds), "--quiet",
                   *args.extra]
        print("$ cgns evaluate " + " ".join(command), flush=True)
        start = time.perf_counter()
        results = evaluate(command)
        seconds = time.perf_counter() - start
        runs = results["seeds"].values()
        if task == "detection":
            summary[task] = {"map": results["summary"]["map"], "map_mgca": results["summary"]["map_mgca"],
                             "map_all_scores": [r["test"]["map_all_scores"] for r in runs],
                             "best_epochs": [r["best_epoch"] for r in runs],
                             "epochs_trained": [r["epochs_trained"] for r in runs]}
        else:
            summary[task] = {key: results["summary"][key] for key in results["summary"]}
            summary[task]["best_epochs"] = [r["best_epoch"] for r in runs]
        summary[task]["seconds"] = round(seconds, 1)
        print(json.dumps({task: summary[task]}, indent=1), flush=True)
    return summary


if __name__ == "__main__":
    main()

__all__ = ["main", "make_export"]
