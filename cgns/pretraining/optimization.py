"""The two-stage optimisation (docs/method.md, "Two-stage training"): which parameters each stage trains, a
fresh Adam per stage and its linear warm-up + cosine learning-rate schedule in optimiser steps.
"""
import math
from typing import List, Tuple

import torch
from accelerate.logging import get_logger

from .state import PretrainingRun

logger = get_logger(__name__)


def stage_of_epoch(epoch: int, stage1_epochs: int) -> int:
    """Stage 1 (no reconstruction) for epochs 0 .. stage1_epochs - 1, stage 2 (CM-MIR) afterwards."""
    return 1 if epoch < stage1_epochs else 2


def stage_parameters(model: torch.nn.Module, stage: int) -> List[torch.nn.Parameter]:
    """Trainable parameters of a stage: stage 1 leaves out the CM-MIR decoder and the image mask token
    (they get no gradient in stage 1, and Adam's weight decay must not shrink them); stage 2 trains all."""
    excluded = set()
    if stage == 1 and getattr(model, "decoder", None) is not None:
        excluded = {id(p) for p in model.decoder.parameters()} | {id(model.image_mask_token)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in excluded]


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, start_factor: float) -> float:
    """LR multiplier of pl_bolts' LinearWarmupCosineAnnealingLR stepped per iteration (C): linear from
    ``start_factor`` to 1 over ``warmup_steps``, then cosine from 1 to 0 at ``total_steps``."""
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """LR lambda as a callable object rather than a closure, so LambdaLR's state_dict saves and restores
    its three numbers with the checkpoint."""

    def __init__(self, warmup_steps: int, total_steps: int, start_factor: float):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.start_factor = start_factor

    def __call__(self, step: int) -> float:
        return warmup_cosine_factor(step, self.warmup_steps, self.total_steps, self.start_factor)


def build_stage_optimization(model: torch.nn.Module, stage: int, training_args, updates_per_epoch: int
                             ) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Fresh Adam (not AdamW, C) over the stage's parameters + its own warm-up/cosine schedule."""
    t = training_args
    optimizer = torch.optim.Adam(stage_parameters(model, stage), lr=stage_learning_rate(t, stage),
                                 weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, stage_schedule(t, stage, updates_per_epoch))
    return optimizer, scheduler


def stage_learning_rate(training_args, stage: int) -> float:
    """The stage's peak learning rate: ``stage2_learning_rate`` in stage 2 when set, else ``learning_rate``."""
    override = getattr(training_args, "stage2_learning_rate", None)
    return float(override) if stage == 2 and override is not None else float(training_args.learning_rate)


def stage_schedule(training_args, stage: int, updates_per_epoch: int) -> WarmupCosine:
    """The stage's warm-up + cosine LR multiplier, in optimiser steps of ``updates_per_epoch`` per epoch."""
    t = training_args
    stage_epochs = t.stage1_epochs if stage == 1 else t.stage2_epochs
    total_steps = max(1, stage_epochs * updates_per_epoch)
    warmup_steps = min(total_steps, max(0, round(t.warmup_epochs * updates_per_epoch)))
    return WarmupCosine(warmup_steps, total_steps, t.warmup_start_factor)


def _unregister(registry: list, obj) -> None:
    # Accelerate has no public call to drop one prepared optimizer/scheduler (free_memory drops the
    # model and dataloaders too). Without this, save_state would also save the previous stage's
    # optimiser, and a resumed run (which only builds the current one) could not load the checkpoint.
    for i, item in enumerate(registry):
        if item is obj:
            del registry[i]
            return


def prepare_stage(run: PretrainingRun, stage: int) -> None:
    """Build and ``accelerator.prepare`` the optimiser and scheduler of ``stage``, replacing the old ones."""
    accelerator = run.accelerator
    if run.optimizer is not None:
        _unregister(accelerator._optimizers, run.optimizer)
        _unregister(accelerator._schedulers, run.scheduler)
        run.model.zero_grad(set_to_none=True)
    optimizer, scheduler = build_stage_optimization(run.unwrapped_model, stage, run.training_args,
                                                    run.updates_per_epoch)
    run.optimizer, run.scheduler = accelerator.prepare(optimizer, scheduler)
    run.progress.stage = stage
    num_params = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    logger.info(f"stage {stage}: fresh Adam over {num_params:,} parameters, "
                f"{'with' if stage == 2 and run.unwrapped_model.decoder is not None else 'without'} CM-MIR "
                f"reconstruction, "
                f"warm-up {run.training_args.warmup_epochs:g} epoch(s) then cosine to 0")


__all__ = [
    "stage_of_epoch",
    "stage_parameters",
    "warmup_cosine_factor",
    "WarmupCosine",
    "build_stage_optimization",
    "stage_learning_rate",
    "stage_schedule",
    "prepare_stage",
]
