"""Downstream semantic segmentation of a CGNS export with a frozen encoder (docs/method.md E.3).

Run as ``cgns evaluate --task segmentation`` (:func:`run`, with that script's arguments), e.g.

    cgns evaluate --task segmentation --dataset synthetic_cxr --dataset_task segmentation \
        --model path/to/cgns_export --init pretrained --output_dir O --seeds 42 \
        --lr 5e-4 --weight_decay 0.05 --max_epochs 50 --batch_size 16

Recipe: load the dataset's segmentation task (``data_scripts``; ``data_pct`` subsamples train only)
-> build :class:`CGNSForSemanticSegmentation` (frozen tower, U-Net or SETR-naive decoder) -> for each
seed redraw the decoder and train it with the Hugging Face ``Trainer`` (AdamW, cosine, early stopping
on validation loss, best checkpoint) -> mean per-image Dice on test -> ``results.json`` (per seed,
mean and std) and ``results.md`` (one table row), written by ``cgns.downstream.common``'s writers.

Input pipeline (E.3): the image is resized to the model's ``image_size`` (no crop: the mask must keep
covering the same pixels), normalised with the export's mean / std (0.5); the mask (0 / 255) is
area-resized to the same size and kept soft, as the reference does for SIIM (the loss takes the soft
values; the Dice binarises the ground truth at 0.5). Training adds E.3's ShiftScaleRotate (p 0.5,
scale +-10 %, rotation +-10 degrees, no shift, black border) applied jointly to image and mask.

Deviations from the reference, on purpose: the tower's BatchNorm stays in eval mode (G.26, see
``modeling_segmentation``); the cosine schedule is stepped per optimiser step, not per epoch; the test
Dice is the mean over images, not the mean of per-batch means (the two differ only by the weight of
the last, smaller batch); several seeds share one tower (for ``--init random`` the one drawn with the
first seed) and differ in the decoder's initialisation and the data order.
"""
import dataclasses
import logging
import os
import shutil
from typing import TYPE_CHECKING, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import EarlyStoppingCallback, EvalPrediction, TrainingArguments, set_seed

import data_scripts
from .common import (SPLITS, FrozenTowerTrainer, best_by_eval_loss, console_trainer, format_epoch,
                     load_image_processor, markdown_row, mean_std, percent, resume_checkpoint, seed_dir,
                     training_arguments, write_results, write_seed_metrics)
from modeling_cgns import CGNSImageProcessor
from modeling_cgns.model_card import save_export
from modeling_cgns.modeling_segmentation import CGNSForSemanticSegmentation, dice_per_image
from modeling_cgns.processing_cgns import to_unit_range
from .specs import TASK_DEFAULTS, SegmentationArguments

if TYPE_CHECKING:      # the parsed command line (cgns/downstream/arguments.py)
    from .arguments import EvaluationArguments

logger = logging.getLogger("downstream.segmentation")

# Protocol defaults (docs/method.md E.3); an explicit command-line value wins.
DEFAULTS = TASK_DEFAULTS["segmentation"]

SEGMENTATION = "segmentation"
METRIC = "dice"
# E.3's ShiftScaleRotate: shift 0, scale +-0.1, rotate +-10 degrees, p 0.5, constant (black) border
AUGMENT_PROBABILITY = 0.5
AUGMENT_DEGREES = 10.0
AUGMENT_SCALE = (0.9, 1.1)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


ARGUMENTS = SegmentationArguments


def load_segmentation_data(args: "EvaluationArguments", spec: data_scripts.TaskSpec):
    """DatasetDict with train (balanced, then subsampled to ``data_pct``), validation and test, checked.

    The split is loaded complete, balanced (``balance_train``), then subsampled with
    ``data_scripts.subsample_train`` from ``data_seed`` -- the order of E.3 (SIIM's balanced train csv is
    what ``data_pct`` samples from) and the same function the loaders use.
    """
    dataset_dict = data_scripts.load_cgns_dataset(
        args.dataset, data_dir=args.data_dir, task=args.dataset_task, data_pct=1.0,
        seed=args.data_seed, cache_dir=args.cache_dir, **(args.dataset_options or {}))
    check_segmentation_data(dataset_dict, spec, f"{args.dataset}/{args.dataset_task}")
    if args.balance_train:
        dataset_dict["train"] = balance_positives(dataset_dict["train"], args.balance_seed)
    return data_scripts.subsample_train(dataset_dict, args.data_pct, args.data_seed)


def positive_images(split) -> np.ndarray:
    """(N,) bool: whether each row's mask is non-empty (SIIM's label: EncodedPixels != -1)."""
    return np.array([bool((mask_to_unit_range(mask) > 0).any()) for mask in split["mask"]], dtype=bool)


def balance_positives(split, seed: int = 42):
    """Every positive row plus ``min(#positives, #negatives)`` negatives drawn with ``RandomState(seed)``.

    Rows keep their order. A split that is already balanced (or has more positives) comes back unchanged.
    """
    positive = positive_images(split)
    if not positive.any():
        raise ValueError(f"the train split has no image with a non-empty mask ({len(split)} rows): balancing would "
                         f"leave nothing to train on; pass --no_balance_train to train on it as it is")
    negatives = np.flatnonzero(~positive)
    keep_negatives = min(int(positive.sum()), len(negatives))
    if keep_negatives == len(negatives):
        return split
    chosen = np.random.RandomState(seed).choice(negatives, size=keep_negatives, replace=False)
    kept = np.sort(np.concatenate([np.flatnonzero(positive), chosen]))
    logger.info("train split balanced: %d positive + %d of %d negative images", int(positive.sum()),
                keep_negatives, len(negatives))
    return split.select(kept.tolist())


def check_segmentation_data(dataset_dict, spec: data_scripts.TaskSpec, name: str) -> None:
    """Raise ``ValueError`` unless every split exists, is non-empty and has ``image`` and ``mask`` columns."""
    if spec.problem_type != SEGMENTATION:
        raise ValueError(f"{name} is a {spec.problem_type!r} task, not a segmentation task "
                         f"(pass the dataset's segmentation task with --dataset_task)")
    missing = [s for s in SPLITS if s not in dataset_dict]
    if missing:
        raise ValueError(f"{name} lacks the split(s) {missing}; segmentation needs {list(SPLITS)}")
    for split in SPLITS:
        columns = sorted(dataset_dict[split].features)
        for column in ("image", "mask"):
            if column not in columns:
                raise ValueError(f"{name} split {split!r} has no {column!r} column (columns {columns})")
        if len(dataset_dict[split]) == 0:
            raise ValueError(f"{name} split {split!r} is empty")


def mask_to_unit_range(mask) -> torch.Tensor:
    """A contract mask (PIL "L", 0 / 255) or array -> float32 (H, W) in [0, 1]."""
    array = np.asarray(mask.convert("L") if hasattr(mask, "convert") else mask, dtype=np.float32)
    return torch.from_numpy(array / 255.0 if array.max(initial=0.0) > 1.0 else array)


def joint_augmentation():
    """E.3's train-time ShiftScaleRotate as one random affine map shared by image and mask channels."""
    from torchvision.transforms import v2

    return v2.RandomApply([v2.RandomAffine(degrees=AUGMENT_DEGREES, scale=AUGMENT_SCALE,
                                           interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)],
                          p=AUGMENT_PROBABILITY)


class SegmentationDataset(Dataset):
    """Rows of a segmentation split -> ``{"pixel_values": (C, S, S), "labels": (1, S, S) in [0, 1]}``.

    Image: gray in [0, 1] -> resize to S x S (bilinear, antialiased) -> ``(x - mean) / std`` -> C channels.
    Mask: area-resized to S x S, soft. ``train=True`` adds the joint random affine of E.3.
    """

    def __init__(self, split, image_processor: CGNSImageProcessor, train: bool = False):
        self.split = split
        self.image_size = image_processor.image_size
        self.image_mean = image_processor.image_mean
        self.image_std = image_processor.image_std
        self.num_channels = image_processor.num_channels
        self.augmentation = joint_augmentation() if train else None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        row = self.split[index]
        size = (self.image_size, self.image_size)
        gray = F.interpolate(to_unit_range(row["image"])[None, None], size=size, mode="bilinear",
                             align_corners=False, antialias=True)[0].clamp_(0.0, 1.0)
        mask = F.interpolate(mask_to_unit_range(row["mask"])[None, None], size=size, mode="area")[0]
        if self.augmentation is not None:
            gray, mask = self.augmentation(torch.cat([gray, mask])).split(1)
        pixel_values = ((gray - self.image_mean) / self.image_std).expand(self.num_channels, -1, -1)
        return {"pixel_values": pixel_values.contiguous(), "labels": mask.clamp(0.0, 1.0).contiguous()}


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------

def build_segmentation_model(args: "EvaluationArguments",
                             spec: data_scripts.TaskSpec) -> CGNSForSemanticSegmentation:
    label_names = list(spec.label_names)
    return CGNSForSemanticSegmentation.from_pretrained(
        args.model, init=args.init, num_labels=1, id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)})


# --------------------------------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------------------------------

class SegmentationTrainer(FrozenTowerTrainer):
    """Trainer whose checkpoints hold the decoder and head, buffers included, and never the frozen tower.

    Unlike the linear head, the decoder has BatchNorm running statistics (buffers, not trainable
    parameters) that the best checkpoint must restore with its weights.
    """

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        if state_dict is None:
            state_dict = {name: tensor.detach() for name, tensor in self.model.state_dict().items()
                          if not name.startswith("vision_model.")}
        super()._save(output_dir, state_dict=state_dict)


class DiceAccumulator:
    """``compute_metrics`` for ``batch_eval_metrics``: collects per-image Dice batch by batch.

    Keeping only one number per image (not every (S, S) logit map) bounds evaluation memory. On the
    last batch it returns and starts over:

    * ``dice``: the protocol's number, mean over all images (an empty ground truth scores 1 when the
      prediction is empty too);
    * ``dice_positive``: mean over the images with a non-empty ground truth (-1 when there are none: the
      Trainer logs numbers only), the part that shows whether anything is segmented;
    * ``dice_empty_prediction``: the ``dice`` of predicting nothing anywhere (the fraction of empty
      ground truths), the baseline ``dice`` must beat.
    """

    def __init__(self):
        self.scores: List[torch.Tensor] = []
        self.positive: List[torch.Tensor] = []

    def __call__(self, prediction: EvalPrediction, compute_result: bool) -> Dict[str, float]:
        probs = torch.sigmoid(torch.as_tensor(prediction.predictions).float())
        labels = torch.as_tensor(prediction.label_ids)
        self.scores.append(dice_per_image(probs, labels).cpu())
        self.positive.append((labels.reshape(labels.shape[0], -1) > 0.5).any(dim=1).cpu())
        if not compute_result:
            return {}
        scores, positive = torch.cat(self.scores), torch.cat(self.positive)
        self.scores, self.positive = [], []
        return {METRIC: float(scores.mean()),
                "dice_positive": float(scores[positive].mean()) if positive.any() else -1.0,
                "dice_empty_prediction": float((~positive).float().mean()),
                "num_positive": int(positive.sum())}


def segmentation_training_arguments(args: "EvaluationArguments", output_dir: str,
                                    seed: int) -> TrainingArguments:
    """The shared TrainingArguments (AdamW, cosine, epoch-wise eval, best eval_loss) on images."""
    image_args = dataclasses.replace(args, mode="uncached")
    training_args = training_arguments(image_args, output_dir, seed)
    training_args.batch_eval_metrics = True
    return training_args


def train_segmenter(model: CGNSForSemanticSegmentation, datasets_by_split: Dict[str, Dataset],
                    args: "EvaluationArguments", seed: int, output_dir: str) -> SegmentationTrainer:
    """Fresh decoder for ``seed``, trained with early stopping; the trainer then holds the best decoder."""
    set_seed(seed)
    model.reset_decoder()
    trainer = SegmentationTrainer(
        model=model,
        args=segmentation_training_arguments(args, os.path.join(output_dir, "checkpoints"), seed),
        train_dataset=datasets_by_split["train"],
        eval_dataset=datasets_by_split["validation"],
        compute_metrics=DiceAccumulator(),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=args.patience)],
    )
    console_trainer(trainer, args.quiet, f"seed {seed} segmentation")
    trainer.train(resume_from_checkpoint=resume_checkpoint(args, trainer.args.output_dir))
    return trainer


def evaluate_segmenter(trainer: SegmentationTrainer, test_dataset: Dataset) -> Dict:
    """Test Dice and loss of the trainer's (best) model plus the training summary."""
    # training is over: early stopping would only complain that a test evaluation has no eval_loss
    trainer.remove_callback(EarlyStoppingCallback)
    metrics = trainer.evaluate(test_dataset, metric_key_prefix="test")
    positive = metrics["test_dice_positive"]
    test = {METRIC: metrics[f"test_{METRIC}"], "dice_positive": None if positive < 0 else positive,
            "dice_empty_prediction": metrics["test_dice_empty_prediction"],
            "num_positive": int(metrics["test_num_positive"]), "num_images": len(test_dataset)}
    return {"test": test, "test_loss": float(metrics["test_loss"]), **best_by_eval_loss(trainer)}


# --------------------------------------------------------------------------------------------------
# protocol
# --------------------------------------------------------------------------------------------------

def check_arguments(args: "EvaluationArguments") -> None:
    """Refuse a ``--dataset_task`` that is not a segmentation task."""
    if not args.dataset_task.startswith("segmentation"):
        raise ValueError(f"--dataset_task {args.dataset_task!r} is not a segmentation task")


def run(args: "EvaluationArguments") -> Dict:
    """data -> segmenter -> one Trainer run per seed -> test Dice -> results files; returns the results dict.

    ``args`` holds the parsed `cgns evaluate` arguments; read here: dataset, dataset_task, data_dir, cache_dir,
    dataset_options, data_pct, data_seed (default 42), model, init, output_dir, seeds, max_epochs,
    patience, batch_size, lr, weight_decay, num_workers (default 0), save_model (default False), quiet.
    """
    spec = data_scripts.get_task_spec(args.dataset, args.dataset_task)
    dataset_dict = load_segmentation_data(args, spec)
    num_examples = {s: len(dataset_dict[s]) for s in SPLITS}
    logger.info("%s/%s: %s rows (train at %g %% of the labels)", args.dataset, args.dataset_task,
                num_examples, 100 * args.data_pct)

    set_seed(args.seeds[0])
    model = build_segmentation_model(args, spec)
    if torch.cuda.is_available():
        model.to("cuda")
    image_processor = load_image_processor(args.model, model.config)
    datasets_by_split = {split: SegmentationDataset(dataset_dict[split], image_processor,
                                                    train=split == "train")
                         for split in SPLITS}

    per_seed = {}
    for seed in args.seeds:
        directory = seed_dir(args.output_dir, seed)
        trainer = train_segmenter(model, datasets_by_split, args, seed, directory)
        per_seed[seed] = evaluate_segmenter(trainer, datasets_by_split["test"])
        write_seed_metrics(per_seed[seed], args.output_dir, seed)
        if args.save_model:
            save_export(model, os.path.join(directory, "model"), image_processor, base_model=args.model,
                        data=f"{args.dataset}/{args.dataset_task} ({100 * args.data_pct:g} % of the train labels)",
                        training={"seed": seed, "init": args.init}, metrics=per_seed[seed])
        # the checkpoints only served to restore the best decoder, which is evaluated now
        shutil.rmtree(os.path.join(directory, "checkpoints"), ignore_errors=True)
        test = per_seed[seed]["test"]
        logger.info("seed %d: test Dice %s, on positive images %s, of an empty prediction %s (best epoch %s)",
                    seed, percent(test[METRIC]), percent(test["dice_positive"]), percent(test["dice_empty_prediction"]),
                    format_epoch(per_seed[seed]["best_epoch"]))

    results = {
        "task": SEGMENTATION, "dataset": args.dataset, "dataset_task": args.dataset_task,
        "problem_type": spec.problem_type, "metric": METRIC, "label_names": list(spec.label_names),
        "model": args.model, "init": args.init, "mode": f"frozen {model.config.vision_kind} tower",
        "decoder": "unet" if model.config.vision_kind == "grid" else "setr_naive",
        "data_pct": args.data_pct, "data_seed": args.data_seed,
        "image_size": image_processor.image_size, "num_examples": num_examples,
        "hyperparameters": {"max_epochs": args.max_epochs, "patience": args.patience,
                            "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
                            "scheduler": "cosine", "loss": "10 * focal(gamma=2) - log(soft dice, smooth 1)",
                            "balance_train": args.balance_train,
                            "balance_seed": args.balance_seed},
        "seeds": {str(seed): result for seed, result in per_seed.items()},
        "summary": {key: mean_std([r["test"][key] for r in per_seed.values()])
                    for key in (METRIC, "dice_positive", "dice_empty_prediction")},
    }
    write_results(results, args.output_dir)
    logger.info("results: %s", markdown_row(results))
    return results



__all__ = [
    "DEFAULTS", "ARGUMENTS", "SegmentationArguments", "positive_images", "balance_positives",
    "run", "check_arguments", "load_segmentation_data", "check_segmentation_data", "SegmentationDataset",
    "joint_augmentation", "build_segmentation_model", "SegmentationTrainer", "DiceAccumulator",
    "segmentation_training_arguments", "train_segmenter", "evaluate_segmenter",
]
