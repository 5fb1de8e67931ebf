"""Frozen-encoder linear classification of a CGNS export (docs/method.md E.1).

    cgns evaluate --task classification --dataset chexpert --data_dir D --data_pct 0.01 \
        --model path/to/cgns_export --init pretrained --output_dir O --seeds 0 1 2

Recipe (:func:`run`): load the dataset (``data_scripts``; ``data_pct`` subsamples train only)
-> build the probe (:class:`CGNSForImageClassification`: frozen tower + linear head) -> compute the
frozen features of every split once -> for each seed train the head with the Hugging Face
``Trainer`` (AdamW, cosine, early stopping on validation loss, best checkpoint) -> evaluate on test
-> write ``results.json`` (per seed, mean and std) and ``results.md`` (one table row).

Modes: the default caches the features (the tower is frozen and the evaluation transform is
deterministic, so recomputing them every epoch gives the same numbers at many times the cost);
``--augment`` recomputes the training features every step with the training transform (random
crop and the MoCo-v2-style augmentation of E.1); ``--no_cache`` runs the tower every step without
augmentation (the reference the cached mode is checked against). The extracted features are kept
on disk (``--feature_cache_dir``, one safetensors file per model, init, split and transform), so a
later run on the same export (other seeds or ``--data_pct``, ``--standardize_features``) reads them
instead of running the tower again; ``--no_feature_cache`` turns that off.

The dataset's TaskSpec (``data_scripts.get_task_spec``) decides the loss and the metric: macro
AUROC for multi-label / binary tasks (CheXpert, RSNA, synthetic), top-1 accuracy for single-label
multi-class (COVIDx). Per-class AUROC is always reported.

Deviations from the reference, on purpose: the cosine schedule is stepped per optimiser step
rather than per epoch; the train subset for ``data_pct`` is drawn by ``data_scripts`` from
``--data_seed`` (default 42, E.1's random_state) and is the same for every training seed; several
seeds share one tower (for ``--init random`` the tower drawn with the first seed) and differ in the
head's initialisation and the data order.
"""
import logging
import shutil
import os
import warnings
from typing import TYPE_CHECKING, Callable, Dict, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import EarlyStoppingCallback, EvalPrediction, Trainer, set_seed

import data_scripts
from .common import (SPLITS, FrozenTowerTrainer, best_by_eval_loss, console_trainer, format_epoch,
                     load_image_processor, markdown_row, mean_std, percent, resume_checkpoint, seed_dir,
                     single_cpu_thread, training_arguments, write_results, write_seed_metrics)
from .embeddings import cache_key, cache_subdir, cached_tensors, model_identity
from modeling_cgns import CGNSForImageClassification, CGNSImageProcessor
from modeling_cgns.model_card import save_export
from modeling_cgns.metrics import MULTI_LABEL, SINGLE_LABEL, classification_metrics, flat_numeric_metrics
from .specs import TASK_DEFAULTS, ClassificationArguments

if TYPE_CHECKING:      # the parsed command line (cgns/downstream/arguments.py)
    from .arguments import EvaluationArguments

logger = logging.getLogger("downstream.classification")

# Protocol defaults (docs/method.md E.1); an explicit command-line value wins.
DEFAULTS = TASK_DEFAULTS["classification"]
MODES = ("cached", "augment", "uncached")



ARGUMENTS = ClassificationArguments


def check_arguments(args: "EvaluationArguments") -> None:
    """Refuse a ``--dataset_task`` that is not a classification task."""
    if not args.dataset_task.startswith("classification"):
        raise ValueError(f"--dataset_task {args.dataset_task!r} is not a classification task")


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------

def load_data(args: "EvaluationArguments", spec: data_scripts.TaskSpec):
    """DatasetDict with train (subsampled to ``data_pct``), validation and test, checked against ``spec``."""
    dataset_dict = data_scripts.load_cgns_dataset(
        args.dataset, data_dir=args.data_dir, task=args.dataset_task, data_pct=args.data_pct,
        seed=args.data_seed, cache_dir=args.cache_dir, **args.dataset_options)
    check_classification_data(dataset_dict, spec, f"{args.dataset}/{args.dataset_task}")
    return dataset_dict


def check_classification_data(dataset_dict, spec: data_scripts.TaskSpec, name: str) -> None:
    """Raise ``ValueError`` when the splits lack the task's labels; warn about classes without positives."""
    import datasets

    if spec.problem_type not in (MULTI_LABEL, SINGLE_LABEL):
        raise ValueError(f"{name} is a {spec.problem_type!r} task, not a classification task")
    missing = [s for s in SPLITS if s not in dataset_dict]
    if missing:
        raise ValueError(f"{name} lacks the split(s) {missing}; a linear probe needs {list(SPLITS)}")
    num_labels = spec.num_labels
    for split in SPLITS:
        features = dataset_dict[split].features
        where = f"{name} split {split!r} (columns {sorted(features)})"
        if "image" not in features:
            raise ValueError(f"{where} has no 'image' column")
        if "labels" not in features:
            raise ValueError(f"{where} has no 'labels' column: the task needs labels for "
                             f"{list(spec.label_names)}")
        labels = features["labels"]
        if spec.problem_type == SINGLE_LABEL:
            if not isinstance(labels, datasets.ClassLabel) or labels.num_classes != num_labels:
                raise ValueError(f"{where}: 'labels' must be ClassLabel with {num_labels} classes "
                                 f"{list(spec.label_names)}, found {labels}")
        else:
            length = getattr(labels, "length", None)
            if not isinstance(labels, datasets.List) or length not in (num_labels, -1):
                raise ValueError(f"{where}: 'labels' must be a list of {num_labels} floats "
                                 f"{list(spec.label_names)}, found {labels}")
        if len(dataset_dict[split]) == 0:
            raise ValueError(f"{where} is empty")
    if spec.problem_type == MULTI_LABEL:
        train = np.asarray(dataset_dict["train"]["labels"], dtype=np.float32).reshape(-1, num_labels)
        counts = train.sum(axis=0)
    else:
        counts = np.bincount(np.asarray(dataset_dict["train"]["labels"]), minlength=num_labels)
    for label, count in zip(spec.label_names, counts):
        if count == 0:
            warnings.warn(f"{name}: class {label!r} has no positive example in the train split "
                          f"({len(dataset_dict['train'])} rows); the probe cannot learn it", stacklevel=2)


def label_tensor(value, problem_type: str) -> torch.Tensor:
    if problem_type == SINGLE_LABEL:
        return torch.tensor(int(value), dtype=torch.long)
    return torch.tensor(value, dtype=torch.float32)


def moco_augmentation(image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """E.1's train-time augmentation after the random crop, on (3, S, S) pixels in [0, 1].

    ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, RandomGrayscale p 0.2, Gaussian blur sigma in [0.1, 2]
    p 0.5, horizontal flip (kept as in the reference although it swaps the patient's sides).
    """
    from torchvision.transforms import v2

    kernel = 2 * max(1, round(0.05 * image_size)) + 1
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel_size=kernel, sigma=(0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(),
    ])


class ImageDataset(Dataset):
    """Rows of a classification split -> ``{"pixel_values": (3, S, S), "labels": ...}``.

    ``train=True`` takes a random crop (and, with ``augmentation``, the E.1 colour/blur/flip
    augmentation); ``train=False`` is the deterministic evaluation transform (centre crop).
    """

    def __init__(self, split, image_processor: CGNSImageProcessor, problem_type: str, train: bool = False,
                 augmentation: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.split = split
        self.image_processor = image_processor
        self.problem_type = problem_type
        self.train = train
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        row = self.split[index]
        pixel_values = self.image_processor.transform(row["image"], train=self.train)
        if self.augmentation is not None:
            mean, std = self.image_processor.image_mean, self.image_processor.image_std
            pixel_values = (self.augmentation(pixel_values * std + mean).clamp(0.0, 1.0) - mean) / std
        return {"pixel_values": pixel_values, "labels": label_tensor(row["labels"], self.problem_type)}


class FeatureDataset(Dataset):
    """Cached frozen features: ``{"features": (F,), "labels": ...}`` per row."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {"features": self.features[index], "labels": self.labels[index]}


@torch.no_grad()
def extract_features(model: CGNSForImageClassification, images: ImageDataset, batch_size: int = 48,
                     num_workers: int = 0, desc: str = "features", quiet: bool = False) -> FeatureDataset:
    """Run the frozen tower once over ``images`` (batched, on the model's device) -> a FeatureDataset."""
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    device = model.classifier.weight.device
    model.eval()
    features, labels = [], []
    for batch in tqdm(loader, desc=desc, disable=quiet, unit="batch"):
        features.append(model.extract_features(batch["pixel_values"].to(device)).float().cpu())
        labels.append(batch["labels"])
    return FeatureDataset(torch.cat(features), torch.cat(labels))


def feature_cache_dir(args) -> str:
    return cache_subdir(args, "feature_cache_dir", "features")


def feature_cache_paths(args, dataset_dict, image_processor: CGNSImageProcessor) -> Dict[str, Optional[str]]:
    """Per split, ``<feature_cache_dir>/probe-<hash>.safetensors`` (None with ``--no_feature_cache``).

    The hash covers the export's files (path, size, modification time), ``init`` (with the seed that
    draws a random tower), the split's rows (dataset fingerprint and length, so a ``data_pct`` subset
    is its own entry while validation and test are shared) and the evaluation transform.
    """
    if args.no_feature_cache:
        return {split: None for split in SPLITS}
    tower = {"init": args.init} if args.init == "pretrained" else {"init": args.init, "seed": args.seeds[0]}
    paths = {}
    for split in SPLITS:
        key = cache_key(kind="probe-features", model=model_identity(args.model), tower=tower,
                        dataset=args.dataset, dataset_task=args.dataset_task, split=split,
                        fingerprint=dataset_dict[split]._fingerprint, rows=len(dataset_dict[split]),
                        image_size=image_processor.image_size, resize_size=image_processor.resize_size,
                        image_mean=image_processor.image_mean, image_std=image_processor.image_std)
        paths[split] = os.path.join(feature_cache_dir(args), f"probe-{key}.safetensors")
    return paths


def standardize_features(datasets_by_split: Dict[str, "FeatureDataset"], eps: float = 1e-6):
    """Z-score every split's cached features with the train split's per-dimension mean and std (in place)."""
    train = datasets_by_split["train"].features
    mean, std = train.mean(dim=0), train.std(dim=0, unbiased=False).clamp(min=eps)
    for dataset in datasets_by_split.values():
        dataset.features = (dataset.features - mean) / std
    return mean, std


@torch.no_grad()
def fold_standardization(model: CGNSForImageClassification, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Rewrite the head so it takes raw features: W (f - mu) / sigma + b = (W / sigma) f + (b - (W / sigma) mu)."""
    weight = model.classifier.weight / std.to(model.classifier.weight)
    model.classifier.bias -= weight @ mean.to(weight)
    model.classifier.weight.copy_(weight)


def build_datasets(model: CGNSForImageClassification, dataset_dict, image_processor: CGNSImageProcessor,
                   problem_type: str, mode: str, batch_size: int = 48, num_workers: int = 0,
                   quiet: bool = False, cache_paths: Optional[Dict[str, Optional[str]]] = None
                   ) -> Dict[str, Dataset]:
    """The train / validation / test datasets the Trainer sees in ``mode`` (cached, augment, uncached).

    Validation and test use the evaluation transform in every mode, so ``augment`` caches them too.
    ``cache_paths`` (per split, see :func:`feature_cache_paths`) keeps the extracted features on disk.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    images = {split: ImageDataset(dataset_dict[split], image_processor, problem_type) for split in SPLITS}
    if mode == "uncached":
        return images
    cached_splits = SPLITS if mode == "cached" else ("validation", "test")
    cache_paths = cache_paths or {}

    def features(split: str) -> FeatureDataset:
        def compute():
            extracted = extract_features(model, images[split], batch_size, num_workers, f"features {split}", quiet)
            return {"features": extracted.features, "labels": extracted.labels}
        tensors = cached_tensors(cache_paths.get(split), compute, f"features {split}")
        return FeatureDataset(tensors["features"], tensors["labels"])

    out = {split: features(split) for split in cached_splits}
    if mode == "augment":
        out["train"] = ImageDataset(dataset_dict["train"], image_processor, problem_type, train=True,
                                    augmentation=moco_augmentation(image_processor.image_size))
    return out


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------

def build_model(args: "EvaluationArguments", spec: data_scripts.TaskSpec) -> CGNSForImageClassification:
    label_names = list(spec.label_names)
    return CGNSForImageClassification.from_pretrained(
        args.model, init=args.init, num_labels=len(label_names), problem_type=spec.problem_type,
        id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)})


# --------------------------------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------------------------------

def make_compute_metrics(spec: data_scripts.TaskSpec) -> Callable[[EvalPrediction], Dict[str, float]]:
    def compute_metrics(prediction: EvalPrediction) -> Dict[str, float]:
        metrics = classification_metrics(prediction.predictions, prediction.label_ids, spec.problem_type,
                                         spec.label_names, split="validation")
        return flat_numeric_metrics(metrics)
    return compute_metrics


def train_probe(model: CGNSForImageClassification, datasets_by_split: Dict[str, Dataset], spec, args,
                seed: int, output_dir: str) -> FrozenTowerTrainer:
    """Fresh head for ``seed``, trained with early stopping; the trainer holds the best head at the end."""
    set_seed(seed)
    model.reset_classifier()
    trainer = FrozenTowerTrainer(
        model=model,
        args=training_arguments(args, os.path.join(output_dir, "checkpoints"), seed),
        train_dataset=datasets_by_split["train"],
        eval_dataset=datasets_by_split["validation"],
        compute_metrics=make_compute_metrics(spec),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=args.patience)],
    )
    console_trainer(trainer, args.quiet, f"seed {seed} probe")
    resume = resume_checkpoint(args, trainer.args.output_dir)
    with single_cpu_thread(args.mode == "cached" and not torch.cuda.is_available()):
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def evaluate_probe(trainer: Trainer, test_dataset: Dataset, spec) -> Dict:
    """Test-split metrics of the trainer's (best) model plus the training summary."""
    prediction = trainer.predict(test_dataset)
    metrics = classification_metrics(prediction.predictions, prediction.label_ids, spec.problem_type,
                                     spec.label_names, split="test")
    return {"test": metrics, "test_loss": float(prediction.metrics["test_loss"]), **best_by_eval_loss(trainer)}


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------

def summarise(per_seed: Dict[int, Dict], spec) -> Dict:
    runs = list(per_seed.values())
    summary = {"auroc": mean_std([r["test"]["auroc"] for r in runs]),
               "auroc_per_class": {name: mean_std([r["test"]["auroc_per_class"][name] for r in runs])
                                   for name in spec.label_names}}
    if spec.problem_type == SINGLE_LABEL:
        summary["accuracy"] = mean_std([r["test"]["accuracy"] for r in runs])
    return summary


# --------------------------------------------------------------------------------------------------
# protocol
# --------------------------------------------------------------------------------------------------

def run(args: "EvaluationArguments") -> Dict:
    """data -> probe -> features -> one Trainer run per seed -> test metrics -> results files."""
    spec = data_scripts.get_task_spec(args.dataset, args.dataset_task)
    dataset_dict = load_data(args, spec)
    logger.info("%s/%s: %s rows (train at %g %% of the labels)", args.dataset, args.dataset_task,
                {s: len(dataset_dict[s]) for s in SPLITS}, 100 * args.data_pct)

    set_seed(args.seeds[0])
    model = build_model(args, spec)
    if torch.cuda.is_available():
        model.to("cuda")
    image_processor = load_image_processor(args.model, model.config)
    datasets_by_split = build_datasets(model, dataset_dict, image_processor, spec.problem_type, args.mode,
                                       args.batch_size, args.num_workers, args.quiet,
                                       feature_cache_paths(args, dataset_dict, image_processor))
    standardization = standardize_features(datasets_by_split) if args.standardize_features else None

    per_seed = {}
    for seed in args.seeds:
        directory = seed_dir(args.output_dir, seed)
        trainer = train_probe(model, datasets_by_split, spec, args, seed, directory)
        per_seed[seed] = evaluate_probe(trainer, datasets_by_split["test"], spec)
        write_seed_metrics(per_seed[seed], args.output_dir, seed)
        if args.save_model:
            if standardization is not None:
                fold_standardization(model, *standardization)
            # with its image processor (pipeline("image-classification") works on it) and model card
            save_export(model, os.path.join(directory, "model"), image_processor, base_model=args.model,
                        data=f"{args.dataset}/{args.dataset_task} ({100 * args.data_pct:g} % of the train labels)",
                        training={"seed": seed, "init": args.init, "mode": args.mode}, metrics=per_seed[seed])
        # the checkpoints only served to restore the best head, which is evaluated now
        shutil.rmtree(os.path.join(directory, "checkpoints"), ignore_errors=True)
        main_value = per_seed[seed]["test"][spec.metric]
        logger.info("seed %d: test %s %s (best epoch %s)", seed, spec.metric, percent(main_value),
                    format_epoch(per_seed[seed]["best_epoch"]))

    results = {
        "task": args.task, "dataset": args.dataset, "dataset_task": args.dataset_task,
        "problem_type": spec.problem_type, "metric": spec.metric, "label_names": list(spec.label_names),
        "model": args.model, "init": args.init, "mode": args.mode, "data_pct": args.data_pct,
        "standardize_features": args.standardize_features,
        "data_seed": args.data_seed, "num_examples": {s: len(dataset_dict[s]) for s in SPLITS},
        "hyperparameters": {"max_epochs": args.max_epochs, "patience": args.patience,
                            "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
                            "scheduler": "cosine"},
        "seeds": {str(seed): result for seed, result in per_seed.items()},
        "summary": summarise(per_seed, spec),
    }
    write_results(results, args.output_dir)
    logger.info("results: %s", markdown_row(results))
    return results



__all__ = [
    "DEFAULTS", "MODES", "ARGUMENTS", "ClassificationArguments", "feature_cache_dir", "feature_cache_paths",
    "run", "check_arguments", "load_data", "check_classification_data",
    "build_model", "build_datasets", "extract_features", "standardize_features", "fold_standardization",
    "ImageDataset", "FeatureDataset", "moco_augmentation", "make_compute_metrics",
    "train_probe", "evaluate_probe", "summarise",
]
