"""Downstream object detection of a CGNS export (ALGORITHM.md E.2, MGCA's YOLOv3 protocol).

Run as ``train_downstream.py --task detection`` (:func:`run`):

    python train_downstream.py --task detection --dataset rsna --dataset_task detection --data_dir D \
        --data_pct 0.01 --model path/to/cgns_export --init pretrained --output_dir O --seeds 0 1 2 \
        --lr 5e-4 --batch_size 16 --max_epochs 50 --patience 10

Recipe: load the dataset's ``detection`` task (``data_scripts``; ``data_pct`` subsamples train only) ->
build :class:`~modeling_cgns.CGNSForObjectDetection` (frozen ResNet tower + YOLOv3 head) -> for each
seed: fresh head, AdamW on the head, cosine schedule per epoch, validation mAP after every epoch, early
stopping on it (``patience``), the best epoch's head restored -> test mAP, correct and with the MGCA
quirks -> ``results.json`` (per seed, mean and std) and ``results.md`` (one table row).

Images are resized to the model's ``image_size`` square (aspect ratio not preserved, as E.2) and
normalised with mean = std = 0.5; boxes stay normalised, so they need no change. No augmentation (E.2).

Why a plain PyTorch loop rather than the ``Trainer``: the targets are ragged box lists, the validation
metric needs decoding + NMS over the whole split, and only the head's state (not the frozen tower) has to
be kept for the best epoch. A Trainer would need a custom collator, ``prediction_step`` and
``compute_metrics`` over ragged outputs and checkpoint filtering; the loop below is shorter and says
exactly what happens.

Deviations from the reference, on purpose: the tower's BatchNorm stays in eval mode (G.26); model
selection and early stopping use the correct validation mAP, not the quirked one; the shape IoU of the
anchor assignment has no "+1 pixel" term (see ``modeling_cgns.modeling_detection``).
"""
import argparse
import copy
import logging
import math
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import set_seed

import data_scripts
from downstream.common import SPLITS, format_mean_std, mean_std, seed_dir, write_results, write_seed_metrics
from modeling_cgns.detection_metrics import (IOU_THRESHOLDS, average_precision_per_threshold,
                                             mean_average_precision)
from modeling_cgns.model_card import save_export
from modeling_cgns.modeling_detection import CGNSForObjectDetection
from modeling_cgns.processing_cgns import to_unit_range

logger = logging.getLogger("downstream.detection")

# Protocol defaults (ALGORITHM.md E.2); an explicit command-line value wins.
DEFAULTS = {"max_epochs": 50, "batch_size": 16, "lr": 5e-4, "weight_decay": 1e-6}
CONF_THRESHOLD = 0.5  # E.2 inference
NMS_IOU = 0.5


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------

def load_detection_data(args: argparse.Namespace):
    """DatasetDict (train subsampled to ``data_pct``, validation, test) checked for ``image`` + ``boxes``."""
    spec = data_scripts.get_task_spec(args.dataset, args.dataset_task)
    name = f"{args.dataset}/{args.dataset_task}"
    if spec.problem_type != "detection":
        raise ValueError(f"{name} is a {spec.problem_type!r} task, not a detection task")
    dataset_dict = data_scripts.load_cgns_dataset(
        args.dataset, data_dir=args.data_dir, task=args.dataset_task, data_pct=args.data_pct,
        seed=getattr(args, "data_seed", 42), cache_dir=args.cache_dir, **(args.dataset_options or {}))
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


def collate_detection(rows: List[Dict[str, torch.Tensor]]) -> Dict:
    """Stack the images; keep the boxes as a list of (n_i, 4) tensors."""
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "labels": [r["boxes"] for r in rows]}


# --------------------------------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: CGNSForObjectDetection, loader: DataLoader, quiet: bool = True, desc: str = "predict"
            ) -> Tuple[List, List]:
    """Detections (boxes, scores) and ground-truth boxes of every image in ``loader``, on the CPU."""
    device = next(model.detection_head.parameters()).device
    model.eval()
    predictions, targets = [], []
    for batch in tqdm(loader, desc=desc, disable=quiet, unit="batch", leave=False):
        outputs = model(pixel_values=batch["pixel_values"].to(device))
        for boxes, scores in model.decode(outputs, conf_threshold=CONF_THRESHOLD, nms_iou=NMS_IOU):
            predictions.append((boxes.cpu(), scores.cpu()))
        targets.extend(batch["labels"])
    return predictions, targets


def detection_metrics(predictions: Sequence, targets: Sequence) -> Dict:
    """Correct mAP and mAP with the MGCA quirks (E.2), with the AP per IoU threshold of each."""
    return {
        "map": mean_average_precision(predictions, targets),
        "map_mgca": mean_average_precision(predictions, targets, mgca_quirks=True),
        "ap_per_threshold": {f"{t:.2f}": ap for t, ap in average_precision_per_threshold(
            predictions, targets).items()},
        "ap_per_threshold_mgca": {f"{t:.2f}": ap for t, ap in average_precision_per_threshold(
            predictions, targets, mgca_quirks=True).items()},
        "iou_thresholds": list(IOU_THRESHOLDS),
        "num_images": len(targets),
        "num_gt_boxes": int(sum(len(t) for t in targets)),
        "num_detections": int(sum(len(p[0]) for p in predictions)),
    }


def head_state(model: CGNSForObjectDetection) -> Dict[str, torch.Tensor]:
    """A copy of the head's parameters and BatchNorm buffers (the tower never changes)."""
    return copy.deepcopy(model.detection_head.state_dict())


def train_detector(model: CGNSForObjectDetection, loaders: Dict[str, DataLoader], args: argparse.Namespace,
                   seed: int) -> Dict:
    """Fresh head for ``seed``; AdamW, cosine per epoch, early stopping on validation mAP, best head kept."""
    set_seed(seed)
    model.reset_head()
    device = next(model.detection_head.parameters()).device
    optimizer = torch.optim.AdamW(model.detection_head.parameters(), lr=args.lr, betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.max_epochs, eta_min=0.0)
    # an undefined validation mAP scores -1, below any real one; the first epoch is always kept
    best_map, best_epoch, best_state, stale, history = float("-inf"), None, None, 0, []
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(loaders["train"].dataset, batch_size=args.batch_size, shuffle=True,
                              generator=generator, collate_fn=collate_detection,
                              num_workers=getattr(args, "num_workers", 0))
    for epoch in range(1, args.max_epochs + 1):
        model.train()
        losses = []
        for batch in tqdm(train_loader, desc=f"seed {seed} epoch {epoch}", disable=args.quiet, unit="batch",
                          leave=False):
            outputs = model(pixel_values=batch["pixel_values"].to(device),
                            labels=[b.to(device) for b in batch["labels"]])
            optimizer.zero_grad(set_to_none=True)
            outputs.loss.backward()
            optimizer.step()
            losses.append(outputs.loss.item())
        scheduler.step()
        validation_map = mean_average_precision(*predict(model, loaders["validation"]))
        score = -1.0 if validation_map is None or math.isnan(validation_map) else validation_map
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)),
                        "validation_map": validation_map})
        logger.info("seed %d epoch %d: train loss %.4f, validation mAP %s", seed, epoch,
                    history[-1]["train_loss"],
                    "undefined" if validation_map is None else f"{validation_map:.4f}")
        if score > best_map:  # strict improvement, as the reference's early stopping: ties keep the earlier
            best_map, best_epoch, best_state, stale = score, epoch, head_state(model), 0
        else:
            stale += 1
            if stale >= args.patience:
                break
    if best_state is not None:  # max_epochs 0 leaves the fresh head
        model.detection_head.load_state_dict(best_state)
    return {"best_epoch": best_epoch, "best_validation_map": None if best_map < 0 else best_map,
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

def check_arguments(args: argparse.Namespace) -> None:
    """Refuse a ``--dataset_task`` that is not a detection task."""
    if not args.dataset_task.startswith("detection"):
        raise ValueError(f"--dataset_task {args.dataset_task!r} is not a detection task")
    # detection trains with its own loop (see the module docstring): Trainer-only options cannot apply
    trainer_only = {"--bf16": getattr(args, "bf16", False),
                    "--gradient_accumulation_steps": getattr(args, "gradient_accumulation_steps", 1) != 1,
                    "--report_to": list(getattr(args, "report_to", ["none"])) != ["none"],
                    "--resume_from_checkpoint": getattr(args, "resume_from_checkpoint", None) is not None}
    refused = [name for name, given in trainer_only.items() if given]
    if refused:
        raise ValueError(f"{', '.join(refused)}: Trainer option(s) that detection does not use (it trains "
                         f"with its own loop; only --dataloader_num_workers applies)")


def run(args: argparse.Namespace) -> Dict:
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
    loaders = {split: DataLoader(DetectionDataset(dataset_dict[split], image_size),
                                 batch_size=args.batch_size, shuffle=False, collate_fn=collate_detection,
                                 num_workers=getattr(args, "num_workers", 0))
               for split in SPLITS}

    per_seed = {}
    for seed in args.seeds:
        training = train_detector(model, loaders, args, seed)
        test = detection_metrics(*predict(model, loaders["test"], args.quiet, desc="test"))
        per_seed[seed] = {"test": test, **training}
        write_seed_metrics(per_seed[seed], args.output_dir, seed)
        if getattr(args, "save_model", False):
            save_export(model, os.path.join(seed_dir(args.output_dir, seed), "model"), base_model=args.model,
                        data=f"{args.dataset}/{args.dataset_task} ({100 * args.data_pct:g} % of the train labels)",
                        training={"seed": seed, "init": args.init}, metrics={"test": test})
        logger.info("seed %d: test mAP %s, with MGCA quirks %s (best epoch %s)", seed, test["map"],
                    test["map_mgca"], training["best_epoch"])

    runs = list(per_seed.values())
    results = {
        "task": "detection", "dataset": args.dataset, "dataset_task": args.dataset_task, "metric": "map",
        "model": args.model, "init": args.init, "data_pct": args.data_pct,
        "data_seed": getattr(args, "data_seed", 42), "image_size": image_size, "num_examples": num_examples,
        "hyperparameters": {"max_epochs": args.max_epochs, "patience": args.patience,
                            "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
                            "scheduler": "cosine per epoch",
                            "conf_threshold": CONF_THRESHOLD, "nms_iou": NMS_IOU,
                            "iou_thresholds": list(IOU_THRESHOLDS), "selection": "validation map"},
        "seeds": {str(seed): result for seed, result in per_seed.items()},
        "summary": {"map": mean_std([r["test"]["map"] for r in runs]),
                    "map_mgca": mean_std([r["test"]["map_mgca"] for r in runs])},
    }
    write_detection_results(results, args.output_dir)
    logger.info("results: %s", markdown_row(results))
    return results


run_detection = run  # the name before the downstream/ package

__all__ = ["DEFAULTS", "run", "run_detection", "check_arguments", "load_detection_data", "DetectionDataset", "collate_detection", "predict",
           "detection_metrics", "train_detector", "markdown_row", "write_detection_results"]
