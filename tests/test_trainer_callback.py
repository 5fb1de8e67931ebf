"""CGNS pretraining with a stock transformers.Trainer: CGNSClusterCallback runs the per-step model hooks
(k-means updates with the "after_step" timing, dead-cluster re-seeding, logit-scale clamp)."""
import math

import torch
from transformers import Trainer, TrainingArguments

from modeling_cgns import CGNSClusterCallback, CGNSModel
from tiny import tiny_batch, tiny_config


class _Pairs(torch.utils.data.Dataset):
    """Per-sample dicts of pixel_values / input_ids / attention_mask / sentence_index (stacked by the
    Trainer's default collator)."""

    def __init__(self, n=8):
        batch = tiny_batch(batch=n)
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _train(tmp_path, callbacks, max_steps=3, accumulation=1, logit_scale=None, **config):
    torch.manual_seed(0)
    model = CGNSModel(tiny_config(cluster_init_threshold=1.0, **config))
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-3, report_to="none",
                             save_strategy="no", logging_steps=1, use_cpu=True, remove_unused_columns=False,
                             dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Pairs(), callbacks=callbacks)
    trainer.train()
    return model, trainer


def test_after_step_timing_updates_through_the_callback(tmp_path):
    """(Without the callback nothing would apply the pending updates: test_reference_fidelity checks that.)"""
    callback = CGNSClusterCallback()
    model, trainer = _train(tmp_path, [callback], max_steps=2, accumulation=2, cluster_update_timing="after_step")
    # 2 optimiser steps x 2 micro-batches: one k-means update per forward, applied after each step
    assert int(model.clustering.num_updates) == 4 and bool(model.clustering.initialized)
    assert model._pending_cluster_features == []
    train_logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(train_logs) == 2 and train_logs[-1]["cluster/initialized"] == 1.0
    assert train_logs[-1]["cluster/num_updates"] == 4.0


def test_default_timing_updates_in_forward_and_the_callback_reseeds_and_clamps(tmp_path):
    callback = CGNSClusterCallback(reassign_every=1)
    torch.manual_seed(0)
    # a parameter beyond ln 100 (a checkpoint of the former code): Adam at lr 1e-3 alone would leave it there
    model, _ = _train(tmp_path, [callback], max_steps=3, dead_cluster_patience=1, logit_scale=math.log(150.0))
    assert model.config.cluster_update_timing == "before_loss"
    assert int(model.clustering.num_updates) == 3 and bool(model.clustering.initialized)
    assert float(model.logit_scale.detach()) <= math.log(100.0) + 1e-6
    assert "cluster/assignment_entropy" in callback.last_stats
    assert callback.last_stats["cluster/reassigned_total"] == float(callback.reassigned_total)


__all__ = []
