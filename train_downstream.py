"""Downstream evaluation of a CGNS export: the command line of the ``downstream`` protocols.

    python train_downstream.py --task classification --dataset chexpert --data_dir D --data_pct 0.01 \
        --model path/to/cgns_export --init pretrained --output_dir O --seeds 0 1 2

This script only parses the arguments and dispatches: ``--task NAME`` runs
``downstream.PROTOCOLS[NAME]`` (``downstream/classification.py``: linear probe, ALGORITHM.md E.1;
``downstream/detection.py``: YOLOv3, E.2; ``downstream/segmentation.py``: U-Net / SETR, E.3; ``retrieval``, ``zero_shot``, ``grounding`` and
``visualize``: the encoder-only protocols of docs/evaluation.md, whose options are the fields of
``downstream.encoding.EncoderEvaluationArguments``). Each
protocol's defaults for ``--max_epochs``, ``--batch_size``, ``--lr`` and ``--weight_decay`` come from
its module's ``DEFAULTS``; an explicit value wins. How a task is added: see ``downstream/__init__.py``.
"""
import argparse
import ast
import logging
from typing import Dict, Optional, Sequence

from transformers import HfArgumentParser

from downstream import PROTOCOLS, protocol
from downstream.common import progress_bars
from downstream.encoding import EncoderEvaluationArguments
from modeling_cgns.modeling_classification import INITS

logger = logging.getLogger("train_downstream")

TASKS = tuple(PROTOCOLS)
DATASETS = ("chexpert", "rsna", "covidx", "siim", "object_cxr", "synthetic_cxr")


def data_pct_type(value: str) -> float:
    try:
        pct = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {value!r}")
    if not 0.0 < pct <= 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (a fraction: 0.01 = 1 %), got {value}")
    return pct


def parse_option(item: str):
    """``key=value`` -> (key, value) with value read as a Python literal when it is one (int, float, bool)."""
    if "=" not in item:
        raise argparse.ArgumentTypeError(f"dataset options are key=value, got {item!r}")
    key, raw = item.split("=", 1)
    spelled = {"true": True, "false": False, "none": None}
    if raw.lower() in spelled:
        return key, spelled[raw.lower()]
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    # HfArgumentParser is an ArgumentParser that also adds the fields of the options dataclasses
    p = HfArgumentParser([EncoderEvaluationArguments], description=__doc__.splitlines()[0],
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=tuple(PROTOCOLS), default="classification",
                   help="downstream protocol: linear probe (E.1), YOLOv3 detection (E.2), U-Net/SETR segmentation "
                        "(E.3), retrieval, zero_shot, grounding, visualize (docs/evaluation.md)")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="required, except for --task visualize with --images / --reports")
    p.add_argument("--dataset_task", default=None,
                   help="the dataset's task name; default: the --task name (synthetic_cxr also has "
                        "classification_binary, classification_multiclass and segmentation_opacity)")
    p.add_argument("--data_dir", default=None, help="raw dataset folder (not needed for synthetic_cxr)")
    p.add_argument("--cache_dir", default=None, help="where prepared datasets are cached")
    p.add_argument("--dataset_options", nargs="*", type=parse_option, default=[], metavar="KEY=VALUE",
                   help="extra options for the dataset loader, e.g. num_images=2000 image_size=224")
    p.add_argument("--data_pct", type=data_pct_type, default=1.0, help="fraction of the training labels used")
    p.add_argument("--data_seed", type=int, default=42, help="seed of the data_pct subsample (E.1: 42)")
    p.add_argument("--model", required=True, help="CGNS export: local folder or hub id (its config "
                                                  "also defines the tower for --init random / imagenet)")
    p.add_argument("--init", choices=INITS, default="pretrained")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--augment", action="store_true",
                       help="recompute training features every step with random crop + MoCo-v2 augmentation")
    cache.add_argument("--no_cache", action="store_true",
                       help="run the tower every step without augmentation (reference for the cached mode)")
    p.add_argument("--max_epochs", type=int, default=None, help="default per task: 100 / 50 / 50")
    p.add_argument("--patience", type=int, default=10, help="early stopping on validation loss")
    p.add_argument("--batch_size", type=int, default=None, help="default per task: 48 / 16 / 16")
    p.add_argument("--lr", type=float, default=None, help="default 5e-4 (AdamW)")
    p.add_argument("--weight_decay", type=float, default=None,
                   help="default per task: 1e-6 / 1e-6 / 0.05")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers for image decoding")
    p.add_argument("--save_model", action="store_true",
                   help="also save each seed's best probe (tower + head) with save_pretrained")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--standardize_features", action="store_true",
                   help="z-score the cached features with the training split's mean/std (not part of E.1: "
                        "a scale-free comparison of towers whose features differ in scale; folded into the "
                        "saved head, so --save_model still works on raw features)")
    args = p.parse_args(argv)
    args.mode = "augment" if args.augment else "uncached" if args.no_cache else "cached"
    if args.standardize_features and args.mode != "cached":
        p.error("--standardize_features needs the cached-features mode (no --augment / --no_cache)")
    args.dataset_options = dict(args.dataset_options)
    task_module = protocol(args.task)
    if args.dataset is None and not getattr(task_module, "DATASET_OPTIONAL", False):
        p.error(f"--dataset is required for --task {args.task}")
    if args.dataset_task is None:
        args.dataset_task = getattr(task_module, "DATASET_TASK", args.task)
    for key, value in protocol(args.task).DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_task(args: argparse.Namespace) -> None:
    """The task's own argument checks (``check_arguments`` of its module), before any data is loaded."""
    check = getattr(protocol(args.task), "check_arguments", None)
    if check is not None:
        check(args)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Parse, check and run the task's protocol; returns its results dict (also in ``<output_dir>/results.json``)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    check_task(args)
    with progress_bars(not args.quiet):
        return protocol(args.task).run(args)


if __name__ == "__main__":
    main()

__all__ = ["main", "parse_args", "check_task", "parse_option", "data_pct_type", "TASKS", "DATASETS"]
