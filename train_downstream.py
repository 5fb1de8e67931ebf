"""Downstream evaluation of a CGNS export: frozen-encoder linear classification (ALGORITHM.md E.1).

    python train_downstream.py --task classification --dataset chexpert --data_dir D --data_pct 0.01 \
        --model path/to/cgns_export --init pretrained --output_dir O --seeds 0 1 2

Recipe: parse arguments -> load the dataset (``data_scripts``; ``data_pct`` subsamples train only)
-> build the probe (:class:`CGNSForImageClassification`: frozen tower + linear head) -> compute the
frozen features of every split once -> for each seed train the head with the Hugging Face
``Trainer`` (AdamW, cosine, early stopping on validation loss, best checkpoint) -> evaluate on test
-> write ``results.json`` (per seed, mean and std) and ``results.md`` (one table row).

Modes: the default caches the features (the tower is frozen and the evaluation transform is
deterministic, so recomputing them every epoch gives the same numbers at many times the cost);
``--augment`` recomputes the training features every step with the training transform (random
crop and the MoCo-v2-style augmentation of E.1); ``--no_cache`` runs the tower every step without
augmentation (the reference the cached mode is checked against).

The dataset's TaskSpec (``data_scripts.get_task_spec``) decides the loss and the metric: macro
AUROC for multi-label / binary tasks (CheXpert, RSNA, synthetic), top-1 accuracy for single-label
multi-class (COVIDx). Per-class AUROC is always reported.

Deviations from the reference, on purpose: the cosine schedule is stepped per optimiser step
rather than per epoch; the train subset for ``data_pct`` is drawn by ``data_scripts`` from
``--data_seed`` (default 42, E.1's random_state) and is the same for every training seed; several
seeds share one tower (for ``--init random`` the tower drawn with the first seed) and differ in the
head's initialisation and the data order.
"""
import argparse
import ast
import contextlib
import json
import logging
import os
import shutil
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import (EarlyStoppingCallback, EvalPrediction, PrinterCallback, Trainer, TrainingArguments,
                          set_seed)
from transformers.utils import logging as hf_logging

import data_scripts
from modeling_cgns import CGNSForImageClassification, CGNSImageProcessor
from modeling_cgns.metrics import MULTI_LABEL, SINGLE_LABEL, classification_metrics, flat_numeric_metrics
from modeling_cgns.modeling_classification import INITS

logger = logging.getLogger("train_downstream")

TASKS = ("classification", "detection", "segmentation")
DATASETS = ("chexpert", "rsna", "covidx", "siim", "object_cxr", "synthetic_cxr")
# Protocol defaults per task (ALGORITHM.md E.1-E.3); an explicit command-line value wins.
TASK_DEFAULTS = {
    "classification": {"max_epochs": 100, "batch_size": 48, "lr": 5e-4, "weight_decay": 1e-6},
    "detection": {"max_epochs": 50, "batch_size": 16, "lr": 5e-4, "weight_decay": 1e-6},
    "segmentation": {"max_epochs": 50, "batch_size": 16, "lr": 5e-4, "weight_decay": 0.05},
}
IMPLEMENTED_TASKS = TASKS
SPLITS = ("train", "validation", "test")
MODES = ("cached", "augment", "uncached")
# The reference resizes the longest side to 256 before cropping 224 (E.1); other sizes keep the ratio.
RESIZE_RATIO = 256 / 224


# --------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------

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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="classification",
                   help="downstream protocol: linear probe (E.1), YOLOv3 detection (E.2), U-Net/SETR segmentation (E.3)")
    p.add_argument("--dataset", choices=DATASETS, required=True)
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
    if args.dataset_task is None:
        args.dataset_task = args.task
    for key, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_task(args: argparse.Namespace) -> None:
    if args.task not in IMPLEMENTED_TASKS:
        raise NotImplementedError(
            f"--task {args.task} is not implemented in this release; available: {', '.join(IMPLEMENTED_TASKS)}.")
    if not args.dataset_task.startswith(args.task):
        raise ValueError(f"--dataset_task {args.dataset_task!r} is not a {args.task} task")


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------

def load_data(args: argparse.Namespace, spec: data_scripts.TaskSpec):
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
                   quiet: bool = False) -> Dict[str, Dataset]:
    """The train / validation / test datasets the Trainer sees in ``mode`` (cached, augment, uncached).

    Validation and test use the evaluation transform in every mode, so ``augment`` caches them too.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    images = {split: ImageDataset(dataset_dict[split], image_processor, problem_type) for split in SPLITS}
    if mode == "uncached":
        return images
    cached_splits = SPLITS if mode == "cached" else ("validation", "test")
    out = {split: extract_features(model, images[split], batch_size, num_workers, f"features {split}", quiet)
           for split in cached_splits}
    if mode == "augment":
        out["train"] = ImageDataset(dataset_dict["train"], image_processor, problem_type, train=True,
                                    augmentation=moco_augmentation(image_processor.image_size))
    return out


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------

def build_model(args: argparse.Namespace, spec: data_scripts.TaskSpec) -> CGNSForImageClassification:
    label_names = list(spec.label_names)
    return CGNSForImageClassification.from_pretrained(
        args.model, init=args.init, num_labels=len(label_names), problem_type=spec.problem_type,
        id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)})


def load_image_processor(model_name_or_path: str, config) -> CGNSImageProcessor:
    """The export's image processor (processor_config.json), else one built from ``config.image_size``."""
    try:
        return CGNSImageProcessor.from_pretrained(model_name_or_path)
    except OSError:
        size = config.image_size
        logger.info("no image processor saved with %s; using image_size %d", model_name_or_path, size)
        return CGNSImageProcessor(image_size=size, resize_size=round(size * RESIZE_RATIO))


# --------------------------------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------------------------------

class LinearProbeTrainer(Trainer):
    """Trainer whose checkpoints hold only the trainable parameters (the head).

    The frozen tower never changes, so writing it at every epoch (up to 100 times per seed) would
    cost more than training the head on cached features. Loading the best checkpoint is non-strict
    in the Trainer, so the head is restored and the tower left as it is.
    """

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        if state_dict is None:
            state_dict = {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}
        super()._save(output_dir, state_dict=state_dict)

    def _issue_warnings_after_load(self, load_result) -> None:
        # The frozen tower is absent from the checkpoints by design (see _save); only report other keys.
        frozen = {name for name, p in self.model.named_parameters() if not p.requires_grad}
        frozen |= {name for name, _ in self.model.named_buffers()}
        missing = [k for k in load_result.missing_keys if k not in frozen]
        super()._issue_warnings_after_load(type(load_result)(missing, load_result.unexpected_keys))


def make_compute_metrics(spec: data_scripts.TaskSpec) -> Callable[[EvalPrediction], Dict[str, float]]:
    def compute_metrics(prediction: EvalPrediction) -> Dict[str, float]:
        metrics = classification_metrics(prediction.predictions, prediction.label_ids, spec.problem_type,
                                         spec.label_names, split="validation")
        return flat_numeric_metrics(metrics)
    return compute_metrics


def training_arguments(args: argparse.Namespace, output_dir: str, seed: int) -> TrainingArguments:
    cached_inputs = args.mode == "cached"
    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=args.max_epochs,
        per_device_train_batch_size=args.batch_size,
        # evaluation batch size does not change results; cached features are tiny
        per_device_eval_batch_size=max(args.batch_size, 512) if cached_inputs else args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        optim="adamw_torch",
        lr_scheduler_type="cosine",
        warmup_steps=0,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        save_total_limit=1,
        save_only_model=True,
        seed=seed,
        data_seed=seed,
        use_cpu=not on_gpu,
        dataloader_num_workers=0 if cached_inputs else args.num_workers,
        dataloader_pin_memory=on_gpu,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=args.quiet,
    )


def train_probe(model: CGNSForImageClassification, datasets_by_split: Dict[str, Dataset], spec, args,
                seed: int, output_dir: str) -> LinearProbeTrainer:
    """Fresh head for ``seed``, trained with early stopping; the trainer holds the best head at the end."""
    set_seed(seed)
    model.reset_classifier()
    trainer = LinearProbeTrainer(
        model=model,
        args=training_arguments(args, os.path.join(output_dir, "checkpoints"), seed),
        train_dataset=datasets_by_split["train"],
        eval_dataset=datasets_by_split["validation"],
        compute_metrics=make_compute_metrics(spec),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=args.patience)],
    )
    if args.quiet:
        trainer.remove_callback(PrinterCallback)
    with single_cpu_thread(args.mode == "cached" and not torch.cuda.is_available()):
        trainer.train()
    return trainer


@contextlib.contextmanager
def single_cpu_thread(enabled: bool):
    """Run torch on one CPU thread inside the block when ``enabled``.

    On cached features a step is a (B, F) x (F, C) product: intra-op threads only add
    synchronisation, which on a busy 2-core machine made each step about 10x slower.
    """
    previous = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def evaluate_probe(trainer: Trainer, test_dataset: Dataset, spec) -> Dict:
    """Test-split metrics of the trainer's (best) model plus the training summary."""
    prediction = trainer.predict(test_dataset)
    metrics = classification_metrics(prediction.predictions, prediction.label_ids, spec.problem_type,
                                     spec.label_names, split="test")
    history = [log for log in trainer.state.log_history if "eval_loss" in log]
    best = min(history, key=lambda log: log["eval_loss"]) if history else {}
    return {
        "test": metrics,
        "test_loss": float(prediction.metrics["test_loss"]),
        "best_epoch": best.get("epoch"),
        "best_validation_loss": best.get("eval_loss"),
        "epochs_trained": trainer.state.epoch,
    }


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------

def mean_std(values: List[Optional[float]]) -> Dict:
    """Mean and sample std (ddof 1; 0 for one seed) over the defined values."""
    defined = [v for v in values if v is not None]
    if not defined:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(defined, ddof=1)) if len(defined) > 1 else 0.0
    return {"mean": float(np.mean(defined)), "std": std, "n": len(defined)}


def summarise(per_seed: Dict[int, Dict], spec) -> Dict:
    runs = list(per_seed.values())
    summary = {"auroc": mean_std([r["test"]["auroc"] for r in runs]),
               "auroc_per_class": {name: mean_std([r["test"]["auroc_per_class"][name] for r in runs])
                                   for name in spec.label_names}}
    if spec.problem_type == SINGLE_LABEL:
        summary["accuracy"] = mean_std([r["test"]["accuracy"] for r in runs])
    return summary


def format_mean_std(stat: Dict) -> str:
    """``{"mean": 0.761, "std": 0.012}`` -> ``"76.1 ± 1.2"`` (percent); ``"undefined"`` when there is no mean."""
    return "undefined" if stat["mean"] is None else f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


RESULTS_HEADER = ("| model | init | dataset | task | labels | mode | metric | test (mean ± std, %) | seeds |\n"
                  "|---|---|---|---|---|---|---|---|---|\n")


def markdown_row(results: Dict) -> str:
    score = format_mean_std(results["summary"][results["metric"]])
    return (f"| {results['model']} | {results['init']} | {results['dataset']} | {results['dataset_task']} | "
            f"{100 * results['data_pct']:g} % | {results['mode']} | {results['metric']} | {score} | "
            f"{len(results['seeds'])} |")


def write_results(results: Dict, output_dir: str, header: str = RESULTS_HEADER, row: Optional[str] = None) -> None:
    """``results.json`` and a one-row ``results.md`` table (``row`` defaults to :func:`markdown_row`)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(header + (row if row is not None else markdown_row(results)) + "\n")


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the protocol; returns the results dict also written to ``<output_dir>/results.json``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    check_task(args)
    bars_enabled = hf_logging.is_progress_bar_enabled()
    if args.quiet:
        hf_logging.disable_progress_bar()
    try:
        if args.task == "segmentation":
            from downstream_segmentation import run_segmentation

            return run_segmentation(args)
        if args.task == "detection":
            from downstream_detection import run_detection

            return run_detection(args)
        return run_protocol(args)
    finally:
        if bars_enabled:
            hf_logging.enable_progress_bar()


def run_protocol(args: argparse.Namespace) -> Dict:
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
                                       args.batch_size, args.num_workers, args.quiet)
    standardization = standardize_features(datasets_by_split) if args.standardize_features else None

    per_seed = {}
    for seed in args.seeds:
        seed_dir = os.path.join(args.output_dir, f"seed_{seed}")
        trainer = train_probe(model, datasets_by_split, spec, args, seed, seed_dir)
        per_seed[seed] = evaluate_probe(trainer, datasets_by_split["test"], spec)
        with open(os.path.join(seed_dir, "metrics.json"), "w") as f:
            json.dump(per_seed[seed], f, indent=2)
        if args.save_model:
            if standardization is not None:
                fold_standardization(model, *standardization)
            model.save_pretrained(os.path.join(seed_dir, "model"))
        # the checkpoints only served to restore the best head, which is evaluated now
        shutil.rmtree(os.path.join(seed_dir, "checkpoints"), ignore_errors=True)
        main_value = per_seed[seed]["test"][spec.metric]
        logger.info("seed %d: test %s = %s (best epoch %s)", seed, spec.metric,
                    "undefined" if main_value is None else f"{main_value:.4f}", per_seed[seed]["best_epoch"])

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


if __name__ == "__main__":
    main()

__all__ = [
    "main", "run_protocol", "parse_args", "format_mean_std", "check_task", "load_data", "check_classification_data", "build_model",
    "load_image_processor", "build_datasets", "extract_features", "ImageDataset", "FeatureDataset",
    "moco_augmentation", "LinearProbeTrainer", "train_probe", "evaluate_probe", "summarise", "write_results",
]
