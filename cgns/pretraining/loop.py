"""The training loop: both stages, accumulate -> finite checks -> backward -> (clip) -> step, callbacks
after each optimiser step, validation at each epoch end; and the checks that stop a run which would
learn nothing or write non-finite numbers.
"""
from typing import Any, Dict, Optional

import torch
from accelerate.logging import get_logger

from modeling_cgns.collator import flat_sentence_meanings, pop_sentence_meanings

from .callbacks import ClusterQuality, notify
from .preemption import stop_agreed
from .state import PretrainingRun

logger = get_logger(__name__)


def uses_reconstruction(run: PretrainingRun) -> bool:
    return run.progress.stage == 2 and run.unwrapped_model.decoder is not None


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; training stops before backward, nothing more is saved."""


def check_losses_finite(run: PretrainingRun, out) -> None:
    """Raise :class:`NonFiniteLossError` on every rank if any rank's loss terms are not finite."""
    named = out.named_losses()
    values = torch.stack([value.detach().float() for value in named.values()])
    bad = (~torch.isfinite(values)).any().float().reshape(1)
    if run.accelerator.num_processes > 1:
        bad = run.accelerator.reduce(bad, reduction="sum")   # every rank must stop, or DDP would hang
    if bad.item() > 0:
        progress = run.progress
        terms = ", ".join(f"{name}={float(value.detach()):.6g}" for name, value in named.items())
        last = run.last_checkpoint or "none"
        raise NonFiniteLossError(
            f"non-finite loss at optimiser step {progress.global_step + 1} (stage {progress.stage}, epoch "
            f"{progress.epoch}, batch {progress.step_in_epoch} of the epoch, process "
            f"{run.accelerator.process_index}): {terms}. Training stopped before backward; no checkpoint was "
            f"written for this step (last checkpoint: {last}).")


class NonFiniteGradientError(RuntimeError):
    """A gradient became NaN or infinite while the loss was finite (``--nonfinite_grad stop``)."""


class NoSentencesError(ValueError):
    """None of the first train batches holds a sentence: the dataset's reports are empty."""


def gradients_finite(run: PretrainingRun, loss: torch.Tensor) -> bool:
    """Whether every gradient is finite, agreed by all ranks. A non-finite one raises
    :class:`NonFiniteGradientError` under ``--nonfinite_grad stop``; otherwise the caller skips the update.

    Under fp16 the GradScaler owns this: an overflow there is routine, and it skips the step itself.
    """
    accelerator = run.accelerator
    if accelerator.scaler is not None:
        return True
    grads = [p.grad for p in run.model.parameters() if p.grad is not None]
    bad = torch.zeros(1, device=accelerator.device)
    if grads:
        bad = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")     # every rank must take the same branch
    if bad.item() == 0:
        return True
    progress = run.progress
    names = [n for n, p in run.unwrapped_model.named_parameters()
             if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    where = (f"optimiser step {progress.global_step + 1} (stage {progress.stage}, epoch {progress.epoch}, batch "
             f"{progress.step_in_epoch + 1} of the epoch): non-finite gradient in {len(names)} parameter(s) "
             f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) with a finite loss "
             f"{float(loss.detach()):.6g}")
    if run.training_args.nonfinite_grad == "stop":
        raise NonFiniteGradientError(f"{where}. Training stopped before the optimiser step; nothing was saved "
                                     f"for it (last checkpoint: {run.last_checkpoint or 'none'}). "
                                     f"--nonfinite_grad skip skips such steps instead")
    logger.warning(f"{where}: optimiser step skipped ({progress.skipped_steps + 1} so far)")
    return False


class SentenceCheck:
    """Stops a run whose first ``num_batches`` train batches (on every rank) hold no sentence at all: the
    local text loss then has nothing to learn and the global loss sits at chance, silently.

    The counts live in ``run.progress`` (saved in every checkpoint), so a resumed run continues the check
    where it stood instead of judging what is left of an epoch; a run that has looked at no batch yet (a
    resume from the last step of an epoch or stage, which skips the whole rest of that epoch) decides
    nothing. It passes at the first batch holding a sentence on any rank.
    """

    def __init__(self, num_batches: int, progress):
        self.num_batches = num_batches
        self.progress = progress

    @property
    def done(self) -> bool:
        p = self.progress
        return self.num_batches <= 0 or p.sentence_check_found > 0 or p.sentence_check_seen >= self.num_batches

    def add(self, run: PretrainingRun, out) -> None:
        if self.done:
            return
        found = torch.tensor([float(out.text_sentence_features.shape[0] > 0)], device=run.accelerator.device)
        if run.accelerator.num_processes > 1:
            # every rank sees the same number of batches, so all enter this reduction until it passes
            found = run.accelerator.reduce(found, reduction="sum")
        self.progress.sentence_check_seen += 1
        self.progress.sentence_check_found += int(found.item() > 0)
        if self.progress.sentence_check_seen >= self.num_batches:
            self.finish(run)

    def finish(self, run: PretrainingRun) -> None:
        """Decide now (at the N-th batch or the end of a shorter first epoch); every rank gets here together
        with the same counts."""
        p = self.progress
        if self.num_batches <= 0 or p.sentence_check_found > 0 or p.sentence_check_seen == 0:
            return
        dataset = run.config.data.dataset
        raise NoSentencesError(
            f"none of the first {p.sentence_check_seen} train batches holds a sentence: every report in them is "
            f"empty after sentence splitting, so nothing would be learnt from the text. Check the 'sentences' "
            f"column of {dataset!r} (--sentence_check_batches 0 turns this check off)")


def epoch_batches(run: PretrainingRun):
    """This epoch's train batches, skipping those a resumed run already consumed."""
    epoch = run.progress.epoch
    run.train_sampler.set_epoch(epoch)
    run.train_dataloader.set_epoch(epoch)
    if run.train_dataloader.generator is not None:
        # worker seeds of an epoch depend on (seed, epoch) only
        run.train_dataloader.generator.manual_seed(run.training_args.seed * 1_000_003 + epoch)
    skip = run.progress.step_in_epoch
    if skip:
        logger.info(f"epoch {epoch}: skipping the {skip} batches consumed before the checkpoint")
        return run.accelerator.skip_first_batches(run.train_dataloader, num_batches=skip)
    return run.train_dataloader


def micro_batch_record(out, meanings: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
    """What callbacks get from one micro-batch: the k-means inputs, the loss terms, what the local text loss
    did with the clusters (``out.clustering``) and the sentences' meanings where the data has them, detached."""
    record = {"text_sentence_features": out.text_sentence_features.detach(),
              "cross_sentence_features": out.cross_sentence_features.detach(),
              "losses": {**{k: v.detach().float() for k, v in out.named_losses().items()},
                         **{k: v.float() for k, v in out.retrieval.items()}},
              "clustering": out.clustering}
    if meanings is not None:
        record["meanings"] = flat_sentence_meanings(meanings, out.sentence_mask)
    return record


@torch.no_grad()
def evaluate(run: PretrainingRun) -> Dict[str, float]:
    """Mean named losses and batch retrieval accuracies on the validation split; eval mode (no dropout,
    no CM-MIR mask) and no k-means update. Stage 2 includes the reconstruction loss."""
    model = run.model
    model.eval()
    totals: Dict[str, torch.Tensor] = {}
    quality = ClusterQuality(run.unwrapped_model.config.num_clusters)
    batches = 0
    for batch in run.eval_dataloader:
        meanings = pop_sentence_meanings(batch)
        out = model(**batch, reconstruct=uses_reconstruction(run))
        for name, value in {**out.named_losses(), **out.retrieval}.items():
            totals[name] = totals.get(name, 0.0) + value.detach().float()
        quality.add(micro_batch_record(out, meanings))
        batches += 1
    model.train()
    if not batches:
        return {}
    names = sorted(totals)
    means = run.accelerator.reduce(torch.stack([totals[n] for n in names]) / batches, reduction="mean")
    metrics = {name: float(value) for name, value in zip(names, means.tolist())}
    metrics.update(quality.scores(run.accelerator))
    return metrics


def train(run: PretrainingRun, callbacks: list) -> None:
    """Both stages: accumulate -> finite check -> backward -> (clip) -> step; callbacks after each
    optimiser step; validation and a checkpoint at each epoch end; stop at ``max_steps``, or at the step
    boundary after a stop signal (``run.preempted`` then names it; the checkpoint of ``on_train_end`` is
    that step's)."""
    try:
        _train_loop(run, callbacks)
    finally:
        notify(callbacks, "close", run)


def _train_loop(run: PretrainingRun, callbacks: list) -> None:
    accelerator, model, progress, args = run.accelerator, run.model, run.progress, run.training_args
    notify(callbacks, "on_train_begin", run)
    model.train()
    sentence_check = SentenceCheck(args.sentence_check_batches, progress)
    while progress.epoch < run.total_epochs and not run.should_stop:
        notify(callbacks, "on_epoch_begin", run)
        micro_batches = []
        for batch in epoch_batches(run):
            meanings = pop_sentence_meanings(batch)
            with accelerator.accumulate(model):
                out = model(**batch, reconstruct=uses_reconstruction(run))
                check_losses_finite(run, out)
                sentence_check.add(run, out)
                accelerator.backward(out.loss)
                # checked before the update, so a NaN never reaches the parameters (nor a checkpoint)
                update = not accelerator.sync_gradients or gradients_finite(run, out.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0 and update:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                if update:
                    run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
            progress.step_in_epoch += 1
            micro_batches.append(micro_batch_record(out, meanings))
            if accelerator.sync_gradients:
                # a skipped update still consumed its data: the schedule and the step count move on
                run.scheduler.step()
                progress.global_step += 1
                progress.skipped_steps += int(not update)
                if progress.skipped_steps:
                    run.step_logs["nonfinite_grad_skipped_steps"] = float(progress.skipped_steps)
                run.should_stop = 0 < args.max_steps <= progress.global_step
                notify(callbacks, "on_step_end", run, micro_batches=micro_batches)
                micro_batches, run.step_logs = [], {}
                # a stop signal on any process: all stop here, at the same step boundary (preemption.py)
                run.should_stop = run.should_stop or stop_agreed(run)
                if run.should_stop:
                    break
        # an epoch that ran to its last batch ends here, also when --max_steps stopped on that batch
        if progress.step_in_epoch >= len(run.train_dataloader):
            sentence_check.finish(run)
            progress.epoch += 1
            progress.step_in_epoch = 0
            if args.do_eval:
                run.last_eval_metrics = evaluate(run)
                notify(callbacks, "on_evaluate", run, metrics=run.last_eval_metrics)
            notify(callbacks, "on_epoch_end", run)
            if progress.epoch < run.total_epochs:
                run.should_stop = run.should_stop or stop_agreed(run)     # a signal during validation
    sentence_check.finish(run)           # a run that stopped (max_steps) before the N-th batch
    notify(callbacks, "on_train_end", run)


__all__ = [
    "uses_reconstruction",
    "NonFiniteLossError",
    "check_losses_finite",
    "NonFiniteGradientError",
    "NoSentencesError",
    "gradients_finite",
    "SentenceCheck",
    "epoch_batches",
    "micro_batch_record",
    "evaluate",
    "train",
]
