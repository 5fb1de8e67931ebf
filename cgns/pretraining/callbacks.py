"""The callbacks of the pretraining loop: stage switch, cluster reassignment, checkpoint, logging.

Callback protocol: every callback may implement ``on_train_begin(run)``, ``on_epoch_begin(run)``,
``on_step_end(run, micro_batches)`` (after each optimiser step; ``micro_batches`` holds the detached
sentence features of every micro-batch that went into it), ``on_epoch_end(run)``,
``on_evaluate(run, metrics)``, ``on_save(run, checkpoint_dir)``, ``on_train_end(run)`` (normal end only)
and ``close(run)`` (always, also after an error). Callbacks
run on every process, in list order, because some of them use collectives (cluster update, loss
averaging) that every rank must enter; only the main process writes files or prints.
"""
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from accelerate.logging import get_logger

from modeling_cgns import cluster_metrics
from modeling_cgns.losses import text_loss_gradient_shares

from .arguments import PretrainingArguments
from .checkpointing import LOSS_CURVES_FILE, METRICS_FILE, save_checkpoint
from .optimization import prepare_stage, stage_of_epoch
from .plots import plot_loss_curves
from .state import PretrainingRun

logger = get_logger(__name__)


def notify(callbacks: Sequence["Callback"], event: str, run: PretrainingRun, **kwargs) -> None:
    """Call ``event`` (e.g. ``"on_step_end"``) on every callback, in list order."""
    for callback in callbacks:
        getattr(callback, event)(run, **kwargs)


class Callback:
    """No-op base: override the events you need."""

    def on_train_begin(self, run: PretrainingRun) -> None:
        pass

    def on_epoch_begin(self, run: PretrainingRun) -> None:
        pass

    def on_step_end(self, run: PretrainingRun, micro_batches: List[Dict[str, torch.Tensor]]) -> None:
        pass

    def on_epoch_end(self, run: PretrainingRun) -> None:
        pass

    def on_evaluate(self, run: PretrainingRun, metrics: Dict[str, float]) -> None:
        pass

    def on_save(self, run: PretrainingRun, checkpoint_dir: str) -> None:
        pass

    def on_train_end(self, run: PretrainingRun) -> None:
        pass

    def close(self, run: PretrainingRun) -> None:
        """Release resources (progress bars, files); runs after training even when it failed."""


class StageSwitchCallback(Callback):
    """At the start of epoch ``stage1_epochs`` build stage 2's fresh optimiser and schedule (C).

    Acting at epoch *begin* (not at the end of the last stage-1 epoch) makes a resume from the
    stage-1 end-of-epoch checkpoint switch exactly like an uninterrupted run.
    """

    def on_epoch_begin(self, run: PretrainingRun) -> None:
        stage = stage_of_epoch(run.progress.epoch, run.training_args.stage1_epochs)
        if stage != run.progress.stage:
            logger.info(f"epoch {run.progress.epoch}: switching from stage {run.progress.stage} "
                        f"to stage {stage}")
            prepare_stage(run, stage)


class ClusterReassignmentCallback(Callback):
    """After each optimiser step: ``model.after_optimizer_step`` (B.3, docs/deviations.md).

    That clamps the logit scale in place, applies the k-means updates of the step's micro-batches when
    ``cluster_update_timing="after_step"`` (with the default "before_loss" the forward already did them,
    one per micro-batch) and, every ``reassign_every`` steps, re-seeds dead centroids. Every rank runs
    it (the updates all-reduce, so all ranks hold the same centroids). Publishes the clustering
    diagnostics to ``run.step_logs``.
    """

    def __init__(self, reassign_every: int):
        self.reassign_every = reassign_every
        self.reassigned_total = 0

    def on_step_end(self, run: PretrainingRun, micro_batches: List[Dict[str, torch.Tensor]]) -> None:
        model = run.unwrapped_model
        reassign = self.reassign_every > 0 and run.progress.global_step % self.reassign_every == 0
        stats = model.after_optimizer_step(reassign_dead=reassign)
        if not model.config.use_clustering:
            return
        reassigned = int(stats.pop("reassigned", 0))
        self.reassigned_total += reassigned
        if reassigned:
            logger.info(f"step {run.progress.global_step}: re-seeded {reassigned} dead cluster(s)")
        stats["reassigned_total"] = float(self.reassigned_total)
        run.step_logs.update({f"cluster/{name}": float(value) for name, value in stats.items()})


class ClusterQuality:
    """Scores the local text loss's use of the clusters against the sentences' meanings, summed over
    micro-batches (and processes, in ``scores``): false-negative precision / recall / F1 of the pairs the loss
    treated as false negatives, the base rate, NMI of the anchors' clusters with their meanings and the
    hard negatives' quality (``modeling_cgns.cluster_metrics``; docs/clustering.md). Batches without
    meanings or without clustering (before initialisation) add nothing."""

    def __init__(self, num_clusters: int):
        self.num_clusters = num_clusters
        self.pairs = torch.zeros(4, dtype=torch.float64)
        self.hard = torch.zeros(3, dtype=torch.float64)
        self.assignments: List[torch.Tensor] = []
        self.meanings: List[torch.Tensor] = []

    def add(self, record: Dict[str, Any]) -> None:
        clustering, meanings = record.get("clustering"), record.get("meanings")
        if clustering is None or meanings is None:
            return
        ids, topics = meanings["sentence_meaning_ids"].cpu(), meanings["sentence_topic_ids"].cpu()
        own, hard = clustering["own_cluster"].cpu(), clustering["hard_cluster"].cpu()
        self.pairs += cluster_metrics.pair_counts(clustering["false_negative_mask"].cpu(), ids)
        self.hard += cluster_metrics.hard_negative_counts(own, hard, ids, topics, self.num_clusters)
        self.assignments.append(own)
        self.meanings.append(ids)

    def scores(self, accelerator) -> Dict[str, float]:
        """``fn_precision``, ``fn_recall``, ``fn_f1``, ``fn_base_rate``, ``nmi``, ``hard_negative_other_meaning``,
        ``hard_negative_same_topic`` over everything added (every process's counts; NMI on this process's
        sentences), then reset. ``{}`` when nothing was scored on any process."""
        counts = torch.cat([self.pairs, self.hard]).to(accelerator.device)
        counts = accelerator.reduce(counts, reduction="sum").cpu()
        out: Dict[str, float] = {}
        if float(counts[3]) > 0:
            pair = cluster_metrics.pair_scores(counts[:4])
            out.update({"fn_precision": pair["precision"], "fn_recall": pair["recall"], "fn_f1": pair["f1"],
                        "fn_base_rate": pair["base_rate"]})
            hard = cluster_metrics.hard_negative_scores(counts[4:])
            out.update({"hard_negative_other_meaning": hard["other_meaning"],
                        "hard_negative_same_topic": hard["same_topic"]})
        if self.assignments:
            out["nmi"] = cluster_metrics.normalized_mutual_information(torch.cat(self.assignments),
                                                                        torch.cat(self.meanings))
        self.__init__(self.num_clusters)
        return {k: v for k, v in out.items() if not math.isnan(v)}


class ClusterQualityCallback(Callback):
    """Logs, every ``logging_steps`` optimiser steps, ``cluster/fn_precision`` ... (``ClusterQuality`` over the
    window's micro-batches) when the data carries sentence meanings, and ``cluster/grad_share_false_negative``
    / ``cluster/grad_share_hard_negative``: the share of the local text loss's gradient on the anchors that
    the false-negative handling and the hard negatives carry, on the window's last micro-batch with the
    current centroids (``losses.text_loss_gradient_shares``). Runs on every process (collectives)."""

    def __init__(self, logging_steps: int):
        self.logging_steps = max(1, logging_steps)
        self.quality: Optional[ClusterQuality] = None

    def on_step_end(self, run: PretrainingRun, micro_batches: List[Dict[str, Any]]) -> None:
        model = run.unwrapped_model
        if not model.config.use_clustering:
            return
        if self.quality is None:
            self.quality = ClusterQuality(model.config.num_clusters)
        for record in micro_batches:
            self.quality.add(record)
        step = run.progress.global_step
        if step % self.logging_steps and not run.should_stop:
            return
        logs = {f"cluster/{k}": v for k, v in self.quality.scores(run.accelerator).items()}
        centroids = model.clustering.centroids
        if centroids is not None and micro_batches:
            last = micro_batches[-1]
            shares = text_loss_gradient_shares(last["text_sentence_features"], last["cross_sentence_features"],
                                               centroids, **model.text_loss_options())
            # every process joins the reduce, also one whose last micro-batch had fewer than two sentences
            values = torch.tensor([shares.get("false_negative", 0.0), shares.get("hard_negative", 0.0),
                                   float(bool(shares))], dtype=torch.float64, device=run.accelerator.device)
            values = run.accelerator.reduce(values, reduction="sum")
            if float(values[2]) > 0:
                logs["cluster/grad_share_false_negative"] = float(values[0] / values[2])
                logs["cluster/grad_share_hard_negative"] = float(values[1] / values[2])
        run.step_logs.update(logs)


class CheckpointCallback(Callback):
    """Saves every ``save_steps`` optimiser steps, at every epoch end and when training stops early."""

    def __init__(self, save_steps: int, callbacks: Sequence[Callback] = ()):
        self.save_steps = save_steps
        self.callbacks = callbacks        # told via on_save
        self.saved_step = -1

    def _save(self, run: PretrainingRun) -> None:
        if self.saved_step == run.progress.global_step:
            return
        path = save_checkpoint(run)
        self.saved_step = run.progress.global_step
        logger.info(f"saved checkpoint {path}")
        notify(self.callbacks, "on_save", run, checkpoint_dir=path)

    def on_train_begin(self, run: PretrainingRun) -> None:
        # a resumed run must not re-save the step it was loaded from
        self.saved_step = run.progress.global_step

    def on_step_end(self, run: PretrainingRun, micro_batches) -> None:
        if self.save_steps > 0 and run.progress.global_step % self.save_steps == 0:
            self._save(run)

    def on_epoch_end(self, run: PretrainingRun) -> None:
        self._save(run)

    def on_train_end(self, run: PretrainingRun) -> None:
        self._save(run)


class LoggingCallback(Callback):
    """What a person watches: a tqdm bar (main process), ``metrics.jsonl``, Accelerate trackers
    (TensorBoard) and, at the end, ``loss_curves.png``.

    Train losses are averaged over the ``logging_steps`` window and over processes.
    """

    def __init__(self, logging_steps: int):
        self.logging_steps = max(1, logging_steps)
        self.window: Dict[str, torch.Tensor] = {}
        self.window_counts: Dict[str, int] = {}       # steps that had the term (CM-MIR starts mid-window)
        self.window_steps = 0
        self.window_start = time.perf_counter()
        self.bar = None

    # ---------------------------------------------------------------- helpers
    def _metrics_path(self, run: PretrainingRun) -> str:
        return os.path.join(run.output_dir, METRICS_FILE)

    def _write(self, run: PretrainingRun, record: Dict[str, Any]) -> None:
        if run.accelerator.is_main_process:
            with open(self._metrics_path(run), "a") as f:
                f.write(json.dumps(record) + "\n")

    def _add_step(self, micro_batches: List[Dict[str, Any]]) -> None:
        """Adds one optimiser step's loss terms (mean over its micro-batches) to the logging window."""
        for record in micro_batches:
            for name, value in record["losses"].items():
                self.window[name] = self.window.get(name, 0.0) + value / len(micro_batches)
        for name in micro_batches[0]["losses"]:
            self.window_counts[name] = self.window_counts.get(name, 0) + 1
        self.window_steps += 1

    # ---------------------------------------------------------------- events
    def on_train_begin(self, run: PretrainingRun) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=run.total_updates, initial=min(run.progress.global_step, run.total_updates),
                        desc=f"stage {run.progress.stage}", unit="step", dynamic_ncols=True,
                        disable=not run.accelerator.is_local_main_process)
        self.window_start = time.perf_counter()

    def on_epoch_begin(self, run: PretrainingRun) -> None:
        if self.bar is not None:
            self.bar.set_description(
                f"stage {run.progress.stage} epoch {run.progress.epoch + 1}/{run.total_epochs}")

    def on_step_end(self, run: PretrainingRun, micro_batches) -> None:
        self._add_step(micro_batches)
        if self.bar is not None:
            self.bar.update(1)
        step = run.progress.global_step
        if step % self.logging_steps and not run.should_stop:
            return
        names = sorted(self.window)
        means = torch.stack([torch.as_tensor(self.window[n], dtype=torch.float32).to(run.accelerator.device)
                             for n in names])
        means = means / torch.tensor([self.window_counts[n] for n in names], dtype=torch.float32,
                                     device=means.device)
        means = run.accelerator.reduce(means, reduction="mean")
        elapsed = time.perf_counter() - self.window_start
        logs = {n: float(v) for n, v in zip(names, means.tolist())}
        logs["lr"] = float(run.scheduler.get_last_lr()[0])
        logs["samples_per_second"] = self.window_steps * run.global_batch_size / max(elapsed, 1e-9)
        logs.update(run.step_logs)
        self.window, self.window_counts, self.window_steps = {}, {}, 0
        self.window_start = time.perf_counter()
        run.last_train_logs = logs
        epoch = run.progress.epoch + run.progress.step_in_epoch / max(1, len(run.train_dataloader))
        self._write(run, {"split": "train", "step": step, "epoch": round(epoch, 4),
                          "stage": run.progress.stage, **logs})
        run.accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=step)
        if self.bar is not None:
            short = {k.replace("_loss", ""): f"{v:.3g}" for k, v in logs.items() if k.endswith("loss")}
            short.update(lr=f"{logs['lr']:.2e}", sps=f"{logs['samples_per_second']:.1f}")
            self.bar.set_postfix(short, refresh=False)

    def on_evaluate(self, run: PretrainingRun, metrics: Dict[str, float]) -> None:
        step = run.progress.global_step
        self._write(run, {"split": "eval", "step": step, "epoch": run.progress.epoch,
                          "stage": run.progress.stage, **metrics})
        run.accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
        terms = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("loss"))
        retrieval = " ".join(f"{k} {metrics[k]:.3f}" for k in ("i2t_acc1", "i2t_acc5", "t2i_acc1", "t2i_acc5")
                             if k in metrics)
        message = (f"eval after epoch {run.progress.epoch}/{run.total_epochs} (stage {run.progress.stage}, "
                   f"step {step}): {terms} | {retrieval}")
        # once: above the bar while it is shown (a log line would tear it), else through the logger
        if self.bar is not None and not self.bar.disable:
            self.bar.write(message)
        else:
            logger.info(message)

    def close(self, run: PretrainingRun) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_end(self, run: PretrainingRun) -> None:
        self.close(run)
        if run.accelerator.is_main_process and os.path.isfile(self._metrics_path(run)):
            plot_loss_curves(self._metrics_path(run), os.path.join(run.output_dir, LOSS_CURVES_FILE))


def default_callbacks(training_args: PretrainingArguments) -> list:
    """Order matters: the stage switch precedes the epoch; the cluster update precedes the checkpoint
    (its buffers are part of the saved state) and the log line (its diagnostics are logged)."""
    logging_callback = LoggingCallback(training_args.logging_steps)
    return [
        StageSwitchCallback(),
        ClusterReassignmentCallback(training_args.reassign_every),
        ClusterQualityCallback(training_args.logging_steps),
        logging_callback,
        CheckpointCallback(training_args.save_steps, callbacks=[logging_callback]),
    ]


__all__ = [
    "notify",
    "Callback",
    "StageSwitchCallback",
    "ClusterReassignmentCallback",
    "ClusterQuality",
    "ClusterQualityCallback",
    "CheckpointCallback",
    "LoggingCallback",
    "default_callbacks",
]
