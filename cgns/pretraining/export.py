"""The exported model: ``output_dir/final`` (``save_pretrained`` of the unwrapped model, its processor and the
model card).
"""
import os
from typing import Any, Dict, Optional

from accelerate.logging import get_logger
from transformers.utils import logging as hf_logging

from modeling_cgns.model_card import public_name

from .state import PretrainingRun

logger = get_logger(__name__)


def epochs_trained(run: PretrainingRun) -> float:
    """Epochs of data the optimiser has stepped through: ``global_step / updates_per_epoch``, rounded to 0.01.

    Not ``progress.epoch``, the epoch counter of the loop: a run that ``--max_steps`` stops exactly on an epoch
    boundary leaves that counter one short (the loop breaks before the epoch-end bookkeeping), so a 5-epoch
    run read "epochs 4"."""
    return round(run.progress.global_step / max(run.updates_per_epoch, 1), 2)


def pretraining_card_info(run: PretrainingRun, training_time_s: Optional[float] = None) -> Dict[str, Any]:
    """What the model card of ``final/`` reports: data, training time and facts, last metrics. A dataset given
    as a local folder is named by the folder's name (an export names no path of the machine that made it)."""
    data, training = run.config.data, run.config.training
    return {"data": {"dataset": public_name(data.dataset), "share of train split used": data.data_pct},
            "training_time_s": training_time_s,
            "training": {"optimiser steps": run.progress.global_step, "epochs": epochs_trained(run),
                         "stage 1 / stage 2 epochs": f"{training.stage1_epochs} / {training.stage2_epochs}",
                         "global batch": run.global_batch_size, "learning rate": training.learning_rate,
                         "processes": run.accelerator.num_processes, "seed": training.seed},
            "metrics": {"validation": run.last_eval_metrics, "last training window": run.last_train_logs}}


def export_model(run: PretrainingRun) -> str:
    """``output_dir/final``: ``save_pretrained`` of the unwrapped model (cluster state included), the
    processor and the model card (README.md), loadable with ``CGNSModel.from_pretrained`` /
    ``AutoModel.from_pretrained`` after ``import modeling_cgns``."""
    accelerator = run.accelerator
    final_dir = os.path.join(run.output_dir, "final")
    accelerator.wait_for_everyone()
    card_info = run.unwrapped_model.model_card_info
    card_info.update(pretraining_card_info(run, card_info.get("training_time_s")))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()      # a "Writing model shards" bar for one file says nothing
    try:
        run.unwrapped_model.save_pretrained(final_dir, is_main_process=accelerator.is_main_process,
                                            save_function=accelerator.save)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if accelerator.is_main_process:
        run.processor.save_pretrained(final_dir)
        logger.info(f"exported the model and processor to {final_dir}")
    accelerator.wait_for_everyone()
    return final_dir


__all__ = [
    "epochs_trained",
    "pretraining_card_info",
    "export_model",
]
