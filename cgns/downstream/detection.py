"""Downstream object detection of a CGNS export (docs/method.md E.2, MGCA's YOLOv3 protocol).

Run as ``cgns evaluate --task detection`` (:func:`run`):

    cgns evaluate --task detection --dataset rsna --dataset_task detection --data_dir D \
        --data_pct 0.01 --model path/to/cgns_export --init pretrained --output_dir O --seeds 0 1 2 \
        --lr 5e-4 --batch_size 16 --max_epochs 50 --patience 10

Recipe: load the dataset's ``detection`` task (``data_scripts``; ``data_pct`` subsamples train only) ->
build :class:`~modeling_cgns.CGNSForObjectDetection` (frozen ResNet tower + YOLOv3 head) -> cache the frozen
C3 / C4 / C5 of every split when they fit in ``--feature_cache_gb`` -> for each seed: fresh head, AdamW on the
head, cosine schedule per epoch, validation scores after every epoch, early stopping on the selection score
(``--selection_metric``, ``patience``, never before ``--min_epochs``), the best epoch's head restored -> test
mAP, correct and with the MGCA quirks -> ``results.json`` (per seed, mean and std) and ``results.md``.

Images are resized to the model's ``image_size`` square (aspect ratio not preserved, as E.2) and
normalised with mean = std = 0.5; boxes stay normalised, so they need no change. No augmentation (E.2).

Why a plain PyTorch loop rather than the ``Trainer``: the targets are ragged box lists, the validation
metric needs decoding + NMS over the whole split, and only the head's state (not the frozen tower) has to
be kept for the best epoch. A Trainer would need a custom collator, ``prediction_step`` and
``compute_metrics`` over ragged outputs and checkpoint filtering; the loop below is shorter and says
exactly what happens.

Deviations from the reference, on purpose: the tower's BatchNorm stays in eval mode (G.26); model
selection and early stopping use the threshold-free validation mAP (``map_all_scores``: E.2's mAP at
confidence 0.5 stays 0, and ties, until the first confident box), a tie goes to the later epoch and there is
no stop before ``--min_epochs``; the shape IoU of the anchor assignment has no "+1 pixel" term (see
``modeling_cgns.modeling_detection``). The class BCE is averaged over every anchor as in the reference
(``--class_loss_normalization``).
"""
import copy
import logging
import math
import os
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import set_seed

import data_scripts
from .common import (SPLITS, format_epoch, format_mean_std, format_number, mean_std, percent, seed_dir,
                     write_results, write_seed_metrics)
from modeling_cgns.detection_metrics import (IOU_THRESHOLDS, MAX_DETECTIONS, average_precision_per_threshold,
                                             mean_average_precision)
from modeling_cgns.model_card import save_export
from modeling_cgns.modeling_detection import CLASS_LOSS_NORMALIZATIONS, CGNSForObjectDetection
from modeling_cgns.processing_cgns import to_unit_range
from .specs import SELECTION_METRICS, TASK_DEFAULTS, DetectionArguments

if TYPE_CHECKING:      # the parsed command line (cgns/downstream/arguments.py)
    from .arguments import EvaluationArguments

logger = logging.getLogger("downstream.detection")

# Protocol defaults (docs/method.md E.2); an explicit command-line value wins.
DEFAULTS = TASK_DEFAULTS["detection"]
CONF_THRESHOLD = 0.5  # E.2 inference
NMS_IOU = 0.5



ARGUMENTS = DetectionArguments


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------

def load_detection_data(args: "EvaluationArguments"):
    """DatasetDict (train subsampled to ``data_pct``, validation, test) checked for ``image`` + ``boxes``."""
    spec = data_scripts.get_task_spec(args.dataset, args.dataset_task)
    name = f"{args.dataset}/{args.dataset_task}"
    if spec.problem_type != "detection":
        raise ValueError(f"{name} is a {spec.problem_type!r} task, not a detection task")
    dataset_dict = data_scripts.load_cgns_dataset(
        args.dataset, data_dir=args.data_dir, task=args.dataset_task, data_pct=args.data_pct,
        seed=args.data_seed, cache_dir=args.cache_dir, **(args.dataset_options or {}))
    for split in SPLITS:
        if split not in dataset_dict:
            raise ValueError(f"{name} lacks the split {split!r}; detection needs {list(SPLITS)}")
        columns = dataset_dict[split].column_names
        if "image" not in columns or "boxes" not in columns:
            raise ValueError(f"{name} split {split!r} needs 'image' and 'boxes' columns, found {columns}")
        if len(dataset_dict[split]) == 0:
            raise ValueError(f"{name} split {split!r} is empty")
    return dataset_dict


class DetectionDataset(Dataset):
    """Rows of a detection split -> ``{"pixel_values": (3, S, S), "boxes": (n, 4) normalised xyxy}``."""

    def __init__(self, split, image_size: int, image_mean: float = 0.5, image_std: float = 0.5):
        self.split = split
        self.image_size = image_size
        self.image_mean = image_mean
        self.image_std = image_std

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        row = self.split[index]
        gray = to_unit_range(row["image"])
        resized = F.interpolate(gray[None, None], size=(self.image_size, self.image_size), mode="bilinear",
                                align_corners=False, antialias=True)[0].clamp(0.0, 1.0)
        pixel_values = ((resized - self.image_mean) / self.image_std).expand(3, -1, -1).contiguous()
        boxes = torch.tensor(row["boxes"] or [], dtype=torch.float32).reshape(-1, 4)
        return {"pixel_values": pixel_values, "boxes": boxes}


class FeatureDetectionDataset(Dataset):
    """Cached frozen features: ``{"features": [C3 (c3, g3, g3), C4, C5], "boxes": (n, 4)}`` per image."""

    def __init__(self, features: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]):
        if any(len(f) != len(boxes) for f in features):
            raise ValueError(f"feature rows {[len(f) for f in features]} for {len(boxes)} box lists")
        self.features = list(features)
        self.boxes = list(boxes)

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> Dict:
        return {"features": [f[index] for f in self.features], "boxes": self.boxes[index]}


def collate_detection(rows: List[Dict]) -> Dict:
    """Stack the images (or each cached feature level); keep the boxes as a list of (n_i, 4) tensors."""
    batch = {"labels": [r["boxes"] for r in rows]}
    if "features" in rows[0]:
        batch["features"] = [torch.stack([r["features"][level] for r in rows])
                             for level in range(len(rows[0]["features"]))]
    else:
        batch["pixel_values"] = torch.stack([r["pixel_values"] for r in rows])
    return batch


def model_inputs(batch: Dict, device) -> Dict:
    """The model's input of a collated batch, on ``device``: ``pixel_values`` or cached ``features``."""
    if "features" in batch:
        return {"features": [f.to(device) for f in batch["features"]]}
    return {"pixel_values": batch["pixel_values"].to(device)}


def feature_gib(model: CGNSForObjectDetection, num_images: int) -> float:
    """Memory (GiB, float32) of the cached C3 / C4 / C5 of ``num_images`` images at the model's image size."""
    info = model.vision_model.timm_model.feature_info
    size = model.config.image_size
    per_image = sum(info[i]["num_chs"] * (size // info[i]["reduction"]) ** 2 for i in model.feature_indices)
    return 4.0 * per_image * num_images / 2 ** 30


@torch.no_grad()
def cache_features(model: CGNSForObjectDetection, images: DetectionDataset, batch_size: int,
                   num_workers: int = 0, quiet: bool = True, desc: str = "features") -> FeatureDetectionDataset:
    """Run the frozen tower once over ``images`` -> a FeatureDetectionDataset (features on the CPU)."""
    device = next(model.detection_head.parameters()).device
    model.eval()
    levels, boxes = None, []
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, collate_fn=collate_detection,
                        num_workers=num_workers)
    for batch in tqdm(loader, desc=desc, disable=quiet, unit="batch", leave=False):
        features = [f.float().cpu() for f in model.extract_features(batch["pixel_values"].to(device))]
        levels = [[f] for f in features] if levels is None else [lv + [f] for lv, f in zip(levels, features)]
        boxes.extend(batch["labels"])
    return FeatureDetectionDataset([torch.cat(level) for level in levels], boxes)


# --------------------------------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: CGNSForObjectDetection, loader: DataLoader, quiet: bool = True, desc: str = "predict",
            conf_threshold: float = CONF_THRESHOLD) -> Tuple[List, List, float]:
    """Detections (boxes, scores), ground-truth boxes of every image in ``loader`` (on the CPU), mean loss.

    Detections with objectness >= ``conf_threshold`` after NMS, at most MAX_DETECTIONS per image (the
    metric's cap). With ``conf_threshold=0`` the E.2 detections are the ones scoring >= 0.5
    (:func:`above`): a box below the threshold never suppresses a higher-scored one in greedy NMS.
    """
    device = next(model.detection_head.parameters()).device
    model.eval()
    predictions, targets, losses, sizes = [], [], [], []
    for batch in tqdm(loader, desc=desc, disable=quiet, unit="batch", leave=False):
        outputs = model(**model_inputs(batch, device), labels=[b.to(device) for b in batch["labels"]])
        for boxes, scores in model.decode(outputs, conf_threshold=conf_threshold, nms_iou=NMS_IOU):
            predictions.append((boxes[:MAX_DETECTIONS].cpu(), scores[:MAX_DETECTIONS].cpu()))
        targets.extend(batch["labels"])
        losses.append(float(outputs.loss))
        sizes.append(len(batch["labels"]))
    loss = float(np.average(losses, weights=sizes)) if losses else float("nan")
    return predictions, targets, loss


def above(predictions: Sequence, conf_threshold: float = CONF_THRESHOLD) -> List:
    """The detections scoring >= ``conf_threshold`` (E.2's inference threshold by default)."""
    return [(boxes[scores >= conf_threshold], scores[scores >= conf_threshold]) for boxes, scores in predictions]


def detection_metrics(predictions: Sequence, targets: Sequence) -> Dict:
    """Correct mAP and mAP with the MGCA quirks (E.2), with the AP per IoU threshold of each.

    ``predictions`` are the detections at any confidence (``predict(..., conf_threshold=0)``): ``map`` and
    ``map_mgca`` use those >= 0.5 (E.2); ``map_all_scores`` ranks them all (threshold-free, not in E.2).
    """
    thresholded = above(predictions)
    return {
        "map": mean_average_precision(thresholded, targets),
        "map_mgca": mean_average_precision(thresholded, targets, mgca_quirks=True),
        "map_all_scores": mean_average_precision(predictions, targets),
        "ap_per_threshold": {f"{t:.2f}": ap for t, ap in average_precision_per_threshold(
            thresholded, targets).items()},
        "ap_per_threshold_mgca": {f"{t:.2f}": ap for t, ap in average_precision_per_threshold(
            thresholded, targets, mgca_quirks=True).items()},
        "iou_thresholds": list(IOU_THRESHOLDS),
        "num_images": len(targets),
        "num_gt_boxes": int(sum(len(t) for t in targets)),
        "num_detections": int(sum(len(p[0]) for p in thresholded)),
    }


def head_state(model: CGNSForObjectDetection) -> Dict[str, torch.Tensor]:
    """A copy of the head's parameters and BatchNorm buffers (the tower never changes)."""
    return copy.deepcopy(model.detection_head.state_dict())


def selection_score(metric: str, validation: Dict) -> float:
    """Higher is better: the validation value of ``metric`` (loss negated); undefined -> -inf."""
    value = -validation["loss"] if metric == "loss" else validation[metric]
    return float("-inf") if value is None or math.isnan(value) else float(value)


class EpochSelector:
    """Best epoch and early stopping from one validation score per epoch (higher is better).

    ``update(epoch, score)`` -> (is_best, stop). A tie with the best score so far makes the later epoch the
    best (an undertrained head often ties a trained one at mAP 0); patience counts epochs without a strict
    improvement, and ``stop`` is never true before ``min_epochs``.
    """

    def __init__(self, patience: int, min_epochs: int = 0):
        self.patience, self.min_epochs = patience, min_epochs
        self.best_score, self.best_epoch, self.stale = float("-inf"), None, 0

    def update(self, epoch: int, score: float) -> Tuple[bool, bool]:
        improved = score > self.best_score
        is_best = score >= self.best_score
        if is_best:
            self.best_score, self.best_epoch = score, epoch
        self.stale = 0 if improved else self.stale + 1
        return is_best, self.stale >= self.patience and epoch >= self.min_epochs


def train_detector(model: CGNSForObjectDetection, loaders: Dict[str, DataLoader], args: "EvaluationArguments",
                   seed: int) -> Dict:
    """Fresh head for ``seed``; AdamW, cosine per epoch, early stopping on the selection score, best head kept.

    The best epoch is the one of highest ``args.selection_metric`` on validation, a tie going to the later
    epoch (an undertrained head often ties a trained one at mAP 0); early stopping fires after
    ``args.patience`` epochs without a strict improvement, but never before ``args.min_epochs``.
    """
    set_seed(seed)
    model.reset_head()
    model.class_loss_normalization = args.class_loss_normalization
    metric = args.selection_metric
    min_epochs = args.min_epochs
    device = next(model.detection_head.parameters()).device
    optimizer = torch.optim.AdamW(model.detection_head.parameters(), lr=args.lr, betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.max_epochs, eta_min=0.0)
    selector, best_state, history = EpochSelector(args.patience, min_epochs), None, []
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(loaders["train"].dataset, batch_size=args.batch_size, shuffle=True,
                              generator=generator, collate_fn=collate_detection,
                              num_workers=loaders["train"].num_workers)
    for epoch in range(1, args.max_epochs + 1):
        model.train()
        losses = []
        for batch in tqdm(train_loader, desc=f"seed {seed} epoch {epoch}", disable=args.quiet, unit="batch",
                          leave=False):
            outputs = model(**model_inputs(batch, device), labels=[b.to(device) for b in batch["labels"]])
            optimizer.zero_grad(set_to_none=True)
            outputs.loss.backward()
            optimizer.step()
            losses.append(outputs.loss.item())
        scheduler.step()
        predictions, targets, validation_loss = predict(model, loaders["validation"], conf_threshold=0.0)
        validation = {"loss": validation_loss, "map": mean_average_precision(above(predictions), targets),
                      "map_all_scores": mean_average_precision(predictions, targets)}
        score = selection_score(metric, validation)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "validation_loss": validation_loss,
                        "validation_map": validation["map"],
                        "validation_map_all_scores": validation["map_all_scores"]})
        logger.info("seed %d epoch %d: train loss %s, validation loss %s, mAP %s, mAP all scores %s", seed,
                    epoch, format_number(history[-1]["train_loss"]), format_number(validation_loss),
                    percent(validation["map"]), percent(validation["map_all_scores"]))
        is_best, stop = selector.update(epoch, score)
        if is_best:
            best_state = head_state(model)
        if stop:
            break
    if best_state is not None:
        model.detection_head.load_state_dict(best_state)
    best_epoch = selector.best_epoch
    best = history[best_epoch - 1] if best_epoch is not None else {}
    return {"best_epoch": best_epoch, "selection_metric": metric,
            "best_validation_map": best.get("validation_map"),
            "best_validation_map_all_scores": best.get("validation_map_all_scores"),
            "best_validation_loss": best.get("validation_loss"),
            "epochs_trained": len(history), "history": history}


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------

RESULTS_HEADER = ("| model | init | dataset | task | labels | test mAP (mean ± std, %) | "
                  "test mAP, MGCA quirks (%) | seeds |\n|---|---|---|---|---|---|---|---|\n")


def markdown_row(results: Dict) -> str:
    summary = results["summary"]
    return (f"| {results['model']} | {results['init']} | {results['dataset']} | {results['dataset_task']} | "
            f"{100 * results['data_pct']:g} % | {format_mean_std(summary['map'])} | "
            f"{format_mean_std(summary['map_mgca'])} | {len(results['seeds'])} |")


def write_detection_results(results: Dict, output_dir: str) -> None:
    write_results(results, output_dir, header=RESULTS_HEADER, row=markdown_row(results))


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------

def check_arguments(args: "EvaluationArguments") -> None:
    """Refuse a ``--dataset_task`` that is not a detection task."""
    if not args.dataset_task.startswith("detection"):
        raise ValueError(f"--dataset_task {args.dataset_task!r} is not a detection task")
    # detection trains with its own loop (see the module docstring): Trainer-only options cannot apply
    trainer_only = {"--bf16": args.bf16,
                    "--gradient_accumulation_steps": args.gradient_accumulation_steps != 1,
                    "--report_to": list(args.report_to) != ["none"],
                    "--max_grad_norm": args.max_grad_norm != 1.0,
                    "--resume_from_checkpoint": args.resume_from_checkpoint is not None}
    refused = [name for name, given in trainer_only.items() if given]
    if refused:
        raise ValueError(f"{', '.join(refused)}: Trainer option(s) that detection does not use (it trains "
                         f"with its own loop; only --dataloader_num_workers applies)")
    if args.min_epochs < 0:
        raise ValueError(f"--min_epochs must be >= 0, got {args.min_epochs}")


def run(args: "EvaluationArguments") -> Dict:
    """data -> detector -> a training run per seed -> test mAP -> results files; returns the results dict."""
    dataset_dict = load_detection_data(args)
    num_examples = {s: len(dataset_dict[s]) for s in SPLITS}
    logger.info("%s/%s: %s rows (train at %g %% of the labels)", args.dataset, args.dataset_task,
                num_examples, 100 * args.data_pct)
    set_seed(args.seeds[0])
    model = CGNSForObjectDetection.from_pretrained(args.model, init=args.init)
    if torch.cuda.is_available():
        model.to("cuda")
    image_size = model.config.image_size
    num_workers = args.num_workers
    splits = {split: DetectionDataset(dataset_dict[split], image_size) for split in SPLITS}
    cache_gib = feature_gib(model, sum(num_examples.values()))
    cached = cache_gib <= args.feature_cache_gb
    if cached:
        logger.info("caching the frozen features of every split (%.2f GiB)", cache_gib)
        splits = {split: cache_features(model, images, args.batch_size, num_workers, args.quiet,
                                        desc=f"features {split}") for split, images in splits.items()}
    loaders = {split: DataLoader(dataset, batch_size=args.batch_size, shuffle=False, collate_fn=collate_detection,
                                 num_workers=0 if cached else num_workers)
               for split, dataset in splits.items()}

    per_seed = {}
    for seed in args.seeds:
        training = train_detector(model, loaders, args, seed)
        predictions, targets, test_loss = predict(model, loaders["test"], args.quiet, desc="test",
                                                  conf_threshold=0.0)
        test = {**detection_metrics(predictions, targets), "loss": test_loss}
        per_seed[seed] = {"test": test, **training}
        write_seed_metrics(per_seed[seed], args.output_dir, seed)
        if args.save_model:
            save_export(model, os.path.join(seed_dir(args.output_dir, seed), "model"), base_model=args.model,
                        data=f"{args.dataset}/{args.dataset_task} ({100 * args.data_pct:g} % of the train labels)",
                        training={"seed": seed, "init": args.init}, metrics={"test": test})
        logger.info("seed %d: test mAP %s, with MGCA quirks %s (best epoch %s)", seed, percent(test["map"]),
                    percent(test["map_mgca"]), format_epoch(training["best_epoch"]))

    runs = list(per_seed.values())
    results = {
        "task": "detection", "dataset": args.dataset, "dataset_task": args.dataset_task, "metric": "map",
        "model": args.model, "init": args.init, "data_pct": args.data_pct,
        "mode": "cached features" if cached else "tower every step",
        "data_seed": args.data_seed, "image_size": image_size, "num_examples": num_examples,
        "hyperparameters": {"max_epochs": args.max_epochs, "patience": args.patience,
                            "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
                            "scheduler": "cosine per epoch",
                            "conf_threshold": CONF_THRESHOLD, "nms_iou": NMS_IOU,
                            "iou_thresholds": list(IOU_THRESHOLDS),
                            "selection": f"validation {args.selection_metric}",
                            "min_epochs": args.min_epochs,
                            "class_loss_normalization": args.class_loss_normalization},
        "seeds": {str(seed): result for seed, result in per_seed.items()},
        "summary": {"map": mean_std([r["test"]["map"] for r in runs]),
                    "map_mgca": mean_std([r["test"]["map_mgca"] for r in runs]),
                    "map_all_scores": mean_std([r["test"]["map_all_scores"] for r in runs])},
    }
    write_detection_results(results, args.output_dir)
    logger.info("results: %s", markdown_row(results))
    return results



__all__ = ["DEFAULTS", "ARGUMENTS", "DetectionArguments", "SELECTION_METRICS", "run",
           "check_arguments", "load_detection_data", "above", "selection_score", "EpochSelector",
           "FeatureDetectionDataset", "cache_features", "feature_gib", "model_inputs", "DetectionDataset", "collate_detection", "predict",
           "detection_metrics", "train_detector", "markdown_row", "write_detection_results"]
