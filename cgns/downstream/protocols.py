"""The registry of downstream protocols: task name -> module with ``run(args)`` and ``DEFAULTS``
(see :mod:`cgns.downstream` for how a task is added).

``PROTOCOLS`` maps each task of ``cgns.downstream.specs.MODULES`` to its module, imported when it is first
looked up: the command line's parser and ``--help`` need only ``specs`` (no torch, no Trainer)."""
from collections.abc import Mapping
from types import ModuleType
from typing import Callable, Dict, Iterator

from .specs import MODULES


# one explicit import per protocol, run when the task is first looked up (the import graph stays visible to
# static tools: no import by string)
def _classification():
    from . import classification
    return classification


def _detection():
    from . import detection
    return detection


def _segmentation():
    from . import segmentation
    return segmentation


def _retrieval():
    from . import retrieval
    return retrieval


def _zero_shot():
    from . import zero_shot
    return zero_shot


def _grounding():
    from . import grounding
    return grounding


def _visualize():
    from . import visualize
    return visualize


def _clustering():
    from . import clustering
    return clustering


_LOADERS: Dict[str, Callable[[], ModuleType]] = {
    "classification": _classification, "detection": _detection, "segmentation": _segmentation,
    "retrieval": _retrieval, "zero_shot": _zero_shot, "grounding": _grounding, "visualize": _visualize,
    "clustering": _clustering,
}
assert tuple(_LOADERS) == tuple(MODULES), "cgns.downstream.specs.MODULES and the loaders must name the same tasks"


class _Protocols(Mapping):
    """task -> protocol module, imported on first access (in the registry's order)."""

    def __getitem__(self, task: str) -> ModuleType:
        return _LOADERS[task]()

    def __iter__(self) -> Iterator[str]:
        return iter(_LOADERS)

    def __len__(self) -> int:
        return len(_LOADERS)


PROTOCOLS = _Protocols()


def protocol(task: str) -> ModuleType:
    """The module of ``task``; ``ValueError`` naming the known tasks otherwise."""
    if task not in PROTOCOLS:
        raise ValueError(f"unknown downstream task {task!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[task]


__all__ = ["PROTOCOLS", "protocol"]
