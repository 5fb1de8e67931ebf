"""CGNS pretraining with a stock ``transformers.Trainer``: the per-step model hooks as a ``TrainerCallback``.

The Accelerate recipe (``cgns.pretraining``) keeps its own loop and calls the same hook through
``cgns.pretraining.callbacks.ClusterReassignmentCallback``; this callback is for users of ``Trainer``::

    trainer = Trainer(model=model, args=args, train_dataset=..., data_collator=...,
                      callbacks=[CGNSClusterCallback(reassign_every=100)])

After every optimiser step it calls ``model.after_optimizer_step`` (logit-scale clamp, the k-means
updates when ``cluster_update_timing="after_step"``, dead-cluster re-seeding every ``reassign_every``
steps) and adds the clustering diagnostics to the Trainer's logs as ``cluster/<name>``.
"""
from typing import Dict, Optional

from transformers import TrainerCallback


class CGNSClusterCallback(TrainerCallback):
    """Runs ``CGNSModel.after_optimizer_step`` after each optimiser step of a ``Trainer``.

    Args:
        reassign_every: re-seed dead centroids every this many optimiser steps (needs
            ``dead_cluster_patience > 0`` in the config); 0 never re-seeds.
    """

    def __init__(self, reassign_every: int = 0):
        if reassign_every < 0:
            raise ValueError(f"reassign_every must be >= 0, got {reassign_every}")
        self.reassign_every = reassign_every
        self.reassigned_total = 0
        self.last_stats: Dict[str, float] = {}

    @staticmethod
    def _cgns_model(model):
        # Trainer passes its own (unwrapped) model; unwrap DDP-style wrappers defensively anyway.
        while hasattr(model, "module") and not hasattr(model, "after_optimizer_step"):
            model = model.module
        if not hasattr(model, "after_optimizer_step"):
            raise TypeError(f"CGNSClusterCallback needs a CGNSModel, got {type(model).__name__}")
        return model

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("CGNSClusterCallback got no model from the Trainer")
        model = self._cgns_model(model)
        reassign = self.reassign_every > 0 and state.global_step % self.reassign_every == 0
        stats = model.after_optimizer_step(reassign_dead=reassign)
        self.reassigned_total += int(stats.pop("reassigned", 0))
        if stats:
            stats["reassigned_total"] = float(self.reassigned_total)
        self.last_stats = {f"cluster/{name}": float(value) for name, value in stats.items()}
        return control

    def on_log(self, args, state, control, logs: Optional[dict] = None, **kwargs):
        # Only training logs (they carry "loss"); evaluation logs are about the eval split.
        if logs is not None and "loss" in logs and self.last_stats:
            logs.update(self.last_stats)
            if state.log_history and state.log_history[-1].get("step") == state.global_step \
                    and "loss" in state.log_history[-1]:
                state.log_history[-1].update(self.last_stats)
        return control


__all__ = ["CGNSClusterCallback"]
