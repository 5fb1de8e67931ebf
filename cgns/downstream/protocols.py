"""The registry of downstream protocols: task name -> module with ``run(args)`` and ``DEFAULTS``
(see :mod:`cgns.downstream` for how a task is added)."""
from types import ModuleType

from . import classification, clustering, detection, grounding, retrieval, segmentation, visualize, zero_shot

PROTOCOLS = {
    "classification": classification,  # linear probe, docs/linear_probe.md
    "detection": detection,  # YOLOv3 head, docs/detection.md
    "segmentation": segmentation,  # U-Net / SETR decoder, docs/segmentation.md
    "retrieval": retrieval,  # image <-> report Recall@k, docs/evaluation.md
    "zero_shot": zero_shot,  # prompt classification, AUROC
    "grounding": grounding,  # pointing game of the local cross-attention
    "visualize": visualize,  # attention overlays, cluster report and plot
    "clustering": clustering,  # false negatives found by the clustering, against sentence meanings
}


def protocol(task: str) -> ModuleType:
    """The module of ``task``; ``ValueError`` naming the known tasks otherwise."""
    if task not in PROTOCOLS:
        raise ValueError(f"unknown downstream task {task!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[task]


__all__ = ["PROTOCOLS", "protocol"]
