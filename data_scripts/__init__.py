"""Dataset builders for CGNS: raw published files -> ``datasets.DatasetDict`` (docs/data_contract.md)."""
import importlib

from ._common import (  # noqa: F401
    DatasetFormatError,
    Manifest,
    TaskSpec,
    check_data_pct,
    subsample_indices,
    subsample_train,
)

DATASETS = ("synthetic_cxr", "mimic_cxr", "chexpert", "rsna", "covidx", "siim", "object_cxr", "ms_cxr", "iu_xray")


def _module(name: str):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return importlib.import_module(f"data_scripts.{name}")


def get_task_spec(name: str, task: str) -> TaskSpec:
    tasks = _module(name).TASKS
    if task not in tasks:
        raise ValueError(f"dataset {name!r} has no task {task!r}; it provides: {', '.join(tasks)}")
    return tasks[task]


def load_cgns_dataset(name: str, data_dir=None, task: str = "classification", data_pct: float = 1.0,
                      seed: int = 0, cache_dir=None, **options):
    """Load dataset ``name`` for ``task`` as a DatasetDict; ``data_pct`` subsamples train only."""
    get_task_spec(name, task)
    check_data_pct(data_pct)
    return _module(name).load(data_dir=data_dir, task=task, data_pct=data_pct, seed=seed,
                              cache_dir=cache_dir, **options)


__all__ = ["DATASETS", "DatasetFormatError", "Manifest", "TaskSpec", "get_task_spec", "load_cgns_dataset",
           "subsample_indices", "subsample_train", "check_data_pct"]
