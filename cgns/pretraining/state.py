"""What one pretraining run shares between the loop, the callbacks and the checkpoints.

:class:`TrainingProgress` is the position in training (saved in every checkpoint); :class:`PretrainingRun`
holds the prepared model, data loaders, optimiser and bookkeeping of one run.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch


class TrainingProgress:
    """Where training stands. Saved as ``trainer_state.json`` inside every checkpoint (beside the
    model, optimiser, scheduler and RNG states of ``accelerator.save_state``) and read back on resume.

    ``stage`` is the stage whose optimiser is live (and saved); ``epoch`` counts epochs over both
    stages; ``step_in_epoch`` counts the micro-batches of ``epoch`` already consumed (what
    ``skip_first_batches`` skips on resume); ``global_step`` counts optimiser steps;
    ``skipped_steps`` counts the steps whose optimiser update was skipped for a non-finite gradient;
    ``sentence_check_seen`` / ``sentence_check_found`` are the sentence check's count of train batches looked
    at (per process) and of those holding a sentence (on any process), so that a resumed run continues the
    check instead of starting it again on what is left of an epoch (``loop.SentenceCheck``).
    """

    def __init__(self):
        self.stage = 1
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.skipped_steps = 0
        self.sentence_check_seen = 0
        self.sentence_check_found = 0

    def state_dict(self) -> Dict[str, int]:
        return {"stage": self.stage, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "skipped_steps": self.skipped_steps,
                "sentence_check_seen": self.sentence_check_seen, "sentence_check_found": self.sentence_check_found}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.stage = int(state["stage"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        # absent in older checkpoints
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.sentence_check_seen = int(state.get("sentence_check_seen", 0))
        self.sentence_check_found = int(state.get("sentence_check_found", 0))

    def __repr__(self) -> str:
        return f"TrainingProgress({self.state_dict()})"


@dataclass
class PretrainingRun:
    """Everything the loop and the callbacks share for one run."""

    config: Any                                # arguments.PretrainingConfig (model, data, training)
    accelerator: Any
    model: torch.nn.Module                     # prepared (possibly DDP-wrapped)
    processor: Any
    train_dataloader: Any
    eval_dataloader: Any
    train_sampler: Any                         # the per-epoch seeded sampler behind train_dataloader
    output_dir: str
    progress: TrainingProgress = field(default_factory=TrainingProgress)
    optimizer: Any = None
    scheduler: Any = None
    should_stop: bool = False
    step_logs: Dict[str, float] = field(default_factory=dict)   # extra per-step metrics from callbacks
    last_checkpoint: Optional[str] = None
    # (step, path) of the checkpoints of this run's own history in output_dir, oldest first: rotation
    # deletes only these, never a checkpoint some other run left there
    checkpoint_history: List[Tuple[int, str]] = field(default_factory=list)
    last_train_logs: Dict[str, float] = field(default_factory=dict)
    last_eval_metrics: Dict[str, float] = field(default_factory=dict)
    text_cache: Any = None                     # modeling_cgns.text_cache.FrozenTextFeatureCache when enabled
    stop_request: Any = None                   # preemption.StopRequest while signal handlers are installed
    preempted: Optional[str] = None            # the signal that stopped training early ("SIGTERM"), if any

    @property
    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def training_args(self):
        return self.config.training

    @property
    def total_epochs(self) -> int:
        return self.training_args.stage1_epochs + self.training_args.stage2_epochs

    @property
    def updates_per_epoch(self) -> int:
        # accelerate syncs at the end of the dataloader, so a partial accumulation window still steps
        return math.ceil(len(self.train_dataloader) / self.training_args.gradient_accumulation_steps)

    @property
    def total_updates(self) -> int:
        total = self.total_epochs * self.updates_per_epoch
        max_steps = self.training_args.max_steps
        return min(total, max_steps) if max_steps > 0 else total

    @property
    def global_batch_size(self) -> int:
        t = self.training_args
        return t.per_device_train_batch_size * t.gradient_accumulation_steps * self.accelerator.num_processes


__all__ = [
    "TrainingProgress",
    "PretrainingRun",
]
