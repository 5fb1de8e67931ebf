"""Downstream evaluation of a CGNS export: the command line of the ``cgns.downstream`` protocols.

    cgns evaluate --task classification --dataset chexpert --data_dir D --data_pct 0.01 \
        --model path/to/cgns_export --init pretrained --output_dir O --seeds 0 1 2
    python -m cgns.downstream ...          # the same; `python train_downstream.py ...` in a clone

This module only parses the arguments and dispatches: ``--task NAME`` runs
``cgns.downstream.protocols.PROTOCOLS[NAME]`` (``classification``: linear probe, docs/linear_probe.md;
``detection``: YOLOv3, docs/detection.md; ``segmentation``: U-Net / SETR, docs/segmentation.md;
``retrieval``, ``zero_shot``, ``grounding``, ``visualize``: the encoder-only protocols of
docs/evaluation.md).
The options are typed dataclasses (``cgns.downstream.arguments``) read by ``transformers.HfArgumentParser``;
``--help`` lists them with their defaults. Each protocol's defaults for ``--max_epochs``,
``--batch_size``, ``--lr`` and ``--weight_decay`` come from its module's ``DEFAULTS``; an explicit value
wins. Trainer options (``--report_to``, ``--bf16``, ``--gradient_accumulation_steps``,
``--dataloader_num_workers``, ``--resume_from_checkpoint``) go to ``TrainingArguments`` unchanged.
How a task is added: see ``cgns/downstream/__init__.py``.
"""
import argparse
import logging
from typing import Dict, Optional, Sequence

from .arguments import DATASETS, parse_args, parse_option
from .common import progress_bars
from .protocols import PROTOCOLS, protocol

TASKS = tuple(PROTOCOLS)


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


__all__ = ["main", "parse_args", "check_task", "parse_option", "TASKS", "DATASETS"]
