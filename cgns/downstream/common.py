"""Helpers shared by every downstream protocol: splits, image processor, the frozen-tower Trainer,
Trainer arguments, thread control, seeds, mean ± std and the results files.

Nothing here knows about a particular protocol; ``cgns.downstream.classification``, ``.detection`` and
``.segmentation`` (and any protocol added later) import from this module and never from
``cgns evaluate``, which only parses the command line and dispatches.
"""
import contextlib
import json
import logging
import math
import os
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

from modeling_cgns import CGNSImageProcessor

logger = logging.getLogger("downstream")

SPLITS = ("train", "validation", "test")


# --------------------------------------------------------------------------------------------------
# model inputs
# --------------------------------------------------------------------------------------------------

def load_image_processor(model_name_or_path: str, config) -> CGNSImageProcessor:
    """The export's image processor (processor_config.json), else one built from ``config.image_size``."""
    try:
        return CGNSImageProcessor.from_pretrained(model_name_or_path)
    except OSError:
        size = config.image_size
        logger.info("no image processor saved with %s; using image_size %d", model_name_or_path, size)
        return CGNSImageProcessor(image_size=size)     # the processor's default resize (256 for 224)


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------

class FrozenTowerTrainer(Trainer):
    """Trainer whose checkpoints hold only the trainable parameters (the head).

    The frozen tower never changes, so writing it at every epoch (up to 100 times per seed) would
    cost more than training the head on cached features. Loading the best checkpoint is non-strict
    in the Trainer, so the head is restored and the tower left as it is.
    """

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        if state_dict is None:
            state_dict = {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}
        with progress_bars(False):         # no "Writing model shards" bar at every epoch's checkpoint
            super()._save(output_dir, state_dict=state_dict)

    def _save_checkpoint(self, model, trial) -> None:
        # Head checkpoints on cached features come less than a second apart; transformers' checkpoint rotation
        # then takes the file times for an unreliable filesystem clock, says so, and orders by step, which is
        # what is wanted here: its warning is silenced for this call only.
        rotation_logger = logging.getLogger("transformers.trainer_utils")
        level = rotation_logger.level
        rotation_logger.setLevel(logging.ERROR)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            rotation_logger.setLevel(level)

    def _issue_warnings_after_load(self, load_result) -> None:
        # The frozen tower is absent from the checkpoints by design (see _save); only report other keys.
        frozen = {name for name, p in self.model.named_parameters() if not p.requires_grad}
        frozen |= {name for name, _ in self.model.named_buffers()}
        missing = [k for k in load_result.missing_keys if k not in frozen]
        super()._issue_warnings_after_load(type(load_result)(missing, load_result.unexpected_keys))


def training_arguments(args, output_dir: str, seed: int) -> TrainingArguments:
    """The protocols' TrainingArguments: AdamW, cosine, epoch-wise eval + save, best ``eval_loss`` restored.

    ``args.mode == "cached"`` means the inputs are cached feature vectors (bigger eval batches, no
    DataLoader workers, checkpoints without optimiser state); any other mode feeds images and keeps the
    optimiser / scheduler / RNG state in its checkpoints so that ``--resume_from_checkpoint`` can continue.
    The Trainer pass-through options (``--report_to``, ``--bf16``, ``--gradient_accumulation_steps``,
    ``--max_grad_norm``, ``--dataloader_num_workers``) are read from ``args`` when present. The Trainer's
    AdamW leaves biases and LayerNorm weights out of weight decay (the reference decays every parameter).
    """
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
        save_only_model=cached_inputs,
        seed=seed,
        data_seed=seed,
        use_cpu=not on_gpu,
        dataloader_num_workers=0 if cached_inputs else args.num_workers,
        dataloader_pin_memory=on_gpu,
        remove_unused_columns=False,
        report_to=list(args.report_to),
        bf16=args.bf16,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        # the Trainer's bars nest (a prediction bar inside the training bar: cursor escape codes in a log
        # file) and its printer writes raw dicts: EpochProgressCallback shows one bar instead (console_trainer)
        disable_tqdm=True,
    )


def format_number(value, digits: int = 4) -> str:
    """A loss or other unbounded number to ``digits`` significant digits; ``undefined`` for None / NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "undefined"
    return f"{value:.{digits}g}"


def percent(value) -> str:
    """A share in [0, 1] as the results tables show it: ``0.4476789`` -> ``"44.8 %"``; ``undefined`` for None / NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "undefined"
    return f"{100 * value:.1f} %"


def format_epoch(epoch) -> str:
    """The Trainer's float epoch (``2.0``) as a person counts it."""
    if epoch is None:
        return "none"
    return f"{epoch:g}"


class EpochProgressCallback(TrainerCallback):
    """One progress bar per training run, in epochs, with the last train and validation loss beside it (rounded),
    in place of the Trainer's nested bars and raw log dicts. Nothing is shown on a non-main process."""

    def __init__(self, description: str):
        self.description = description
        self.bar = None
        self.postfix: Dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(total=int(math.ceil(args.num_train_epochs)), desc=self.description, unit="epoch",
                            initial=int(state.epoch or 0), dynamic_ncols=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        for key, name in (("loss", "loss"), ("eval_loss", "validation loss")):
            if key in logs:
                self.postfix[name] = format_number(logs[key])
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(int(state.epoch or 0) - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.close()
            self.bar = None


def console_trainer(trainer: Trainer, quiet: bool, description: str) -> Trainer:
    """The Trainer's console: no printer of raw log dicts, no Trainer bars, one :class:`EpochProgressCallback`
    bar unless ``quiet``. Returns ``trainer``."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not quiet:
        trainer.add_callback(EpochProgressCallback(description))
    return trainer


def resume_checkpoint(args, checkpoints_dir: str):
    """What ``Trainer.train(resume_from_checkpoint=...)`` gets for ``args.resume_from_checkpoint``.

    ``True``: the last checkpoint in ``checkpoints_dir`` (None when there is none: the seed starts
    afresh); a folder: that folder; None: None.
    """
    value = args.resume_from_checkpoint
    if value is True:
        if not os.path.isdir(checkpoints_dir):
            return None
        last = get_last_checkpoint(checkpoints_dir)
        if last is None:
            logger.info("no checkpoint in %s: this seed starts afresh", checkpoints_dir)
        return last
    if value is not None and not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    return value


def best_by_eval_loss(trainer: Trainer) -> Dict:
    """The training summary of a Trainer run selected on ``eval_loss``: best epoch and loss, epochs run."""
    history = [log for log in trainer.state.log_history if "eval_loss" in log]
    best = min(history, key=lambda log: log["eval_loss"]) if history else {}
    return {"best_epoch": best.get("epoch"), "best_validation_loss": best.get("eval_loss"),
            "epochs_trained": trainer.state.epoch}


@contextlib.contextmanager
def single_cpu_thread(enabled: bool) -> Iterator[None]:
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


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Hugging Face progress bars off inside the block unless ``enabled``; the previous state comes back."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------------
# seeds and results
# --------------------------------------------------------------------------------------------------

def seed_dir(output_dir: str, seed: int) -> str:
    """``<output_dir>/seed_<seed>``: where one seed's metrics.json (and model / checkpoints) go."""
    return os.path.join(output_dir, f"seed_{seed}")


def write_seed_metrics(metrics: Dict, output_dir: str, seed: int) -> None:
    """``<output_dir>/seed_<seed>/metrics.json``."""
    directory = seed_dir(output_dir, seed)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)


def mean_std(values: List[Optional[float]]) -> Dict:
    """Mean and sample std (ddof 1; 0 for one seed) over the defined values."""
    defined = [v for v in values if v is not None]
    if not defined:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(defined, ddof=1)) if len(defined) > 1 else 0.0
    return {"mean": float(np.mean(defined)), "std": std, "n": len(defined)}


def format_mean_std(stat: Dict) -> str:
    """``{"mean": 0.761, "std": 0.012}`` -> ``"76.1 ± 1.2"`` (percent); ``"undefined"`` when there is no mean."""
    return "undefined" if stat["mean"] is None else f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


RESULTS_HEADER = ("| model | init | dataset | task | labels | mode | metric | test (mean ± std, %) | seeds |\n"
                  "|---|---|---|---|---|---|---|---|---|\n")


def markdown_row(results: Dict) -> str:
    """One :data:`RESULTS_HEADER` row: ``results["summary"][results["metric"]]`` as mean ± std."""
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


__all__ = [
    "SPLITS", "load_image_processor", "FrozenTowerTrainer", "training_arguments", "format_number", "percent",
    "format_epoch", "EpochProgressCallback", "console_trainer", "resume_checkpoint",
    "best_by_eval_loss", "single_cpu_thread", "progress_bars", "seed_dir", "write_seed_metrics", "mean_std",
    "format_mean_std", "RESULTS_HEADER", "markdown_row", "write_results",
]
