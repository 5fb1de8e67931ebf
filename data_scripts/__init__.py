"""Dataset builders for CGNS: raw published files -> ``datasets.DatasetDict`` (docs/data_contract.md)."""
from . import chexpert, covidx, iu_xray, mimic_cxr, ms_cxr, object_cxr, rsna, siim, synthetic_cxr
from .builder import (  # noqa: F401
    DatasetFormatError,
    Manifest,
    TaskSpec,
    check_data_pct,
    subsample_indices,
    subsample_train,
)

# dataset name -> its builder module (TASKS, load, main)
MODULES = {"synthetic_cxr": synthetic_cxr, "mimic_cxr": mimic_cxr, "chexpert": chexpert, "rsna": rsna,
           "covidx": covidx, "siim": siim, "object_cxr": object_cxr, "ms_cxr": ms_cxr, "iu_xray": iu_xray}
DATASETS = tuple(MODULES)


def dataset_module(name: str):
    """The builder module of dataset ``name``; ``ValueError`` naming the known datasets otherwise."""
    if name not in MODULES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return MODULES[name]


def get_task_spec(name: str, task: str) -> TaskSpec:
    tasks = dataset_module(name).TASKS
    if task not in tasks:
        raise ValueError(f"dataset {name!r} has no task {task!r}; it provides: {', '.join(tasks)}")
    return tasks[task]


def load_cgns_dataset(name: str, data_dir=None, task: str = "classification", data_pct: float = 1.0,
                      seed: int = 0, cache_dir=None, **options):
    """Load dataset ``name`` for ``task`` as a DatasetDict; ``data_pct`` subsamples train only."""
    get_task_spec(name, task)
    check_data_pct(data_pct)
    return dataset_module(name).load(data_dir=data_dir, task=task, data_pct=data_pct, seed=seed,
                              cache_dir=cache_dir, **options)


__all__ = ["DATASETS", "MODULES", "dataset_module", "DatasetFormatError", "Manifest", "TaskSpec", "get_task_spec", "load_cgns_dataset",
           "subsample_indices", "subsample_train", "check_data_pct"]
