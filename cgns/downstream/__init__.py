"""Downstream evaluation protocols of a CGNS export, one module per protocol.

``train_downstream.py --task NAME`` parses the command line and calls ``PROTOCOLS[NAME]``'s ``run``.

How a task is added (one module, one line):

1. Write ``downstream/<name>.py`` with

   - ``run(args) -> dict``: the whole protocol; ``args`` is the parsed command line (every option
     of ``train_downstream.py``, with the task's ``DEFAULTS`` filled in). It writes its files under
     ``args.output_dir`` (``downstream.common.write_results`` writes ``results.json`` / ``results.md``)
     and returns the results dict;
   - ``DEFAULTS``: the protocol's defaults for the shared hyperparameters that it uses (``max_epochs``,
     ``batch_size``, ``lr``, ``weight_decay``); ``{}`` when it trains nothing;
   - optionally ``check_arguments(args)``: raise ``ValueError`` (one line) for arguments the protocol
     cannot run with, before any data is loaded.

   Shared helpers (splits, image processor, the frozen-tower Trainer, seeds, mean ± std, results
   files) come from ``downstream.common``; a protocol module never imports ``train_downstream``.
2. Add one line ``"<name>": "downstream.<name>",`` to :data:`PROTOCOLS` below. The module is imported
   only when its task runs or its defaults are needed.
"""
import importlib
from types import ModuleType

# task name -> module with run(args) and DEFAULTS (see the module docstring)
PROTOCOLS = {
    "classification": "downstream.classification",  # linear probe, ALGORITHM.md E.1
    "detection": "downstream.detection",  # YOLOv3 head, E.2
    "segmentation": "downstream.segmentation",  # U-Net / SETR decoder, E.3
    "retrieval": "downstream.retrieval",  # image <-> report Recall@k, docs/evaluation.md
    "zero_shot": "downstream.zero_shot",  # prompt classification, AUROC
    "grounding": "downstream.grounding",  # pointing game of the local cross-attention
    "visualize": "downstream.visualize",  # attention overlays, cluster report and plot
}


def protocol(task: str) -> ModuleType:
    """The module of ``task``; ``ValueError`` naming the known tasks otherwise."""
    if task not in PROTOCOLS:
        raise ValueError(f"unknown downstream task {task!r}; known: {', '.join(PROTOCOLS)}")
    return importlib.import_module(PROTOCOLS[task])


__all__ = ["PROTOCOLS", "protocol"]
