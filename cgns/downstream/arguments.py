"""The typed arguments of ``cgns evaluate`` (parsed by ``transformers.HfArgumentParser``).

* :class:`DownstreamArguments`: what to evaluate, on which data, with which shared hyperparameters.
  ``max_epochs``, ``batch_size``, ``lr`` and ``weight_decay`` default to ``None`` = the protocol's own
  default (``DEFAULTS`` of the task's module: E.1 / E.2 / E.3); an explicit value wins.
* :class:`TrainerPassThroughArguments`: options handed to the Hugging Face ``TrainingArguments`` of the
  Trainer-based protocols unchanged (same names, same meaning); the other Trainer settings are fixed by
  the protocol (``cgns.downstream.common.training_arguments``).
* A protocol module may add its own options as a dataclass ``ARGUMENTS`` (e.g.
  ``cgns.downstream.detection.DetectionArguments``); every registered protocol's options are on the command
  line, and field names must be unique across all of them.

:func:`build_parser` / :func:`parse_args` turn them into one :class:`EvaluationArguments` (every field of
every dataclass, plus ``mode``), which is what each protocol's ``run(args)`` receives: a protocol reads
``args.<field>`` and never restates a default.
"""
import argparse
import ast
import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from transformers import HfArgumentParser

from .protocols import PROTOCOLS, protocol
from .specs import INITS, TASK_ARGUMENTS, TASK_DEFAULTS

DATASETS = ("chexpert", "rsna", "covidx", "siim", "object_cxr", "synthetic_cxr", "ms_cxr", "iu_xray", "mimic_cxr")
# the shared hyperparameters whose default belongs to the protocol (the module's DEFAULTS)
PER_TASK = ("max_epochs", "batch_size", "lr", "weight_decay")
CHECKPOINT_MODES = ("augment", "uncached")


def per_task_help(name: str) -> str:
    """``"default per task: classification 100, detection 50, ..."`` from the protocols' DEFAULTS."""
    values = []
    for task in PROTOCOLS:
        default = TASK_DEFAULTS[task].get(name)
        if default is not None:
            values.append(f"{task} {default:g}")
    return "default per task: " + ", ".join(values)


@dataclass(kw_only=True)
class DownstreamArguments:
    """What to evaluate and how (every option of every protocol that is not a Trainer pass-through)."""

    task: str = field(default="classification", metadata={
        "choices": tuple(PROTOCOLS),
        "help": "downstream protocol: linear probe (E.1), YOLOv3 detection (E.2), U-Net/SETR segmentation (E.3), "
                "retrieval, zero_shot, grounding, visualize, clustering (docs/evaluation.md, docs/clustering.md)"})
    dataset: Optional[str] = field(default=None, metadata={
        "choices": DATASETS, "help": "dataset builder (data_scripts); required except for --task visualize with "
                                     "--images / --reports"})
    dataset_task: Optional[str] = field(default=None, metadata={
        "help": "the dataset's task name; default: the protocol's DATASET_TASK (retrieval / visualize: "
                "pretraining, mimic_cxr retrieval: retrieval, the official test split; zero_shot: classification), "
                "else the --task name (synthetic_cxr also has classification_binary, classification_multiclass, "
                "segmentation_opacity and grounding; chexpert and mimic_cxr 5x200)"})
    data_dir: Optional[str] = field(default=None, metadata={
        "help": "raw dataset folder (not needed for synthetic_cxr)"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "where prepared datasets are cached"})
    dataset_options: List[str] = field(default_factory=list, metadata={
        "metavar": "KEY=VALUE",
        "help": "extra options for the dataset loader, e.g. num_images=2000 image_size=224 (values are read "
                "as Python literals when they are one: ints, floats, true / false / none)"})
    data_pct: float = field(default=1.0, metadata={
        "help": "fraction in (0, 1] of the training labels used (0.01 = 1 %%); validation and test are complete"})
    data_seed: int = field(default=42, metadata={"help": "seed of the data_pct subsample (E.1: 42)"})
    model: str = field(metadata={
        "help": "CGNS export: local folder or hub id (its config also defines the tower for --init random / "
                "imagenet)"})
    init: str = field(default="pretrained", metadata={
        "choices": INITS, "help": "tower weights: the export's, timm's random initialisation, or ImageNet"})
    output_dir: str = field(metadata={"help": "results.json, results.md and seed_<s>/ go here"})
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2], metadata={
        "help": "one training run per seed (head initialisation and data order); mean and std over them"})
    augment: bool = field(default=False, metadata={
        "help": "classification: recompute training features every step with random crop + MoCo-v2 "
                "augmentation"})
    no_cache: bool = field(default=False, metadata={
        "help": "classification: run the tower every step without augmentation (reference for the cached "
                "mode)"})
    max_epochs: Optional[int] = field(default=None, metadata={"help": per_task_help("max_epochs")})
    patience: int = field(default=10, metadata={
        "help": "early stopping: epochs without a better validation score (loss for classification and "
                "segmentation, see docs/detection.md for detection)"})
    batch_size: Optional[int] = field(default=None, metadata={"help": per_task_help("batch_size")})
    lr: Optional[float] = field(default=None, metadata={"help": "AdamW learning rate; " + per_task_help("lr")})
    weight_decay: Optional[float] = field(default=None, metadata={
        "help": "AdamW weight decay; " + per_task_help("weight_decay")})
    save_model: bool = field(default=False, metadata={
        "help": "also save each seed's best model (tower + head) with save_pretrained"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})
    standardize_features: bool = field(default=False, metadata={
        "help": "z-score the cached features with the training split's mean/std (not part of E.1: a "
                "scale-free comparison of towers whose features differ in scale; folded into the saved "
                "head, so --save_model still works on raw features)"})


@dataclass(kw_only=True)
class TrainerPassThroughArguments:
    """Hugging Face ``TrainingArguments`` fields passed to the Trainer unchanged (classification, segmentation).

    Detection trains with its own loop: there only ``--dataloader_num_workers`` applies, and a non-default
    value of the others is refused.
    """

    _argument_group_name = "Trainer options (passed to transformers.TrainingArguments)"

    report_to: List[str] = field(default_factory=lambda: ["none"], metadata={
        "help": "TrainingArguments.report_to: where the Trainer logs (none, tensorboard, wandb, all, ...)"})
    bf16: bool = field(default=False, metadata={
        "help": "TrainingArguments.bf16: bfloat16 mixed precision (GPU, or CPU autocast)"})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "TrainingArguments.gradient_accumulation_steps: optimiser step every N batches (the batch "
                "seen by the optimiser is N x --batch_size)"})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "TrainingArguments.max_grad_norm: gradient-norm clipping of the Trainer (its default, 1.0); "
                "E.1 / E.3 do not clip: 0 turns clipping off, as the reference"})
    num_workers: int = field(default=0, metadata={
        "aliases": ["--dataloader_num_workers"],
        "help": "TrainingArguments.dataloader_num_workers: DataLoader workers for image decoding (the "
                "cached-features mode always uses 0)"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "Trainer.train(resume_from_checkpoint=...): 'true' resumes each seed from the last checkpoint "
                "in <output_dir>/seed_<s>/checkpoints (a seed without one starts afresh), or a checkpoint "
                "folder (one seed only). Modes that train on images only: --augment / --no_cache "
                "classification and segmentation"})


def parse_option(item: str):
    """``key=value`` -> (key, value) with value read as a Python literal when it is one (int, float, bool)."""
    if "=" not in item:
        raise ValueError(f"dataset options are key=value, got {item!r}")
    key, raw = item.split("=", 1)
    spelled = {"true": True, "false": False, "none": None}
    if raw.lower() in spelled:
        return key, spelled[raw.lower()]
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def argument_dataclasses() -> List[type]:
    """The shared dataclasses, then each registered protocol's ``ARGUMENTS`` (``specs.TASK_ARGUMENTS``, which
    each protocol module names as its ``ARGUMENTS``; read from ``specs`` so that parsing imports no protocol)."""
    classes = [DownstreamArguments, TrainerPassThroughArguments]
    for task in PROTOCOLS:
        extra = TASK_ARGUMENTS.get(task)
        if extra is not None and extra not in classes:
            classes.append(extra)
    return classes


@dataclass(kw_only=True)
class EvaluationArguments(*argument_dataclasses()):
    """The parsed command line: every field of every argument dataclass above (the shared ones and each
    protocol's ``ARGUMENTS``), with the task's ``DEFAULTS`` filled in, plus the derived ``mode``."""

    mode: str = field(default="cached", metadata={"help": "derived from --augment / --no_cache, not an option"})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` except where the help already gives the per-task defaults."""

    def _get_help_string(self, action):
        if "default per task" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> HfArgumentParser:
    return HfArgumentParser(argument_dataclasses(), formatter_class=HelpFormatter,
                            description="Downstream evaluation of a CGNS export (docs/method.md E): "
                                        + ", ".join(PROTOCOLS) + ".")


def parse_args(argv: Optional[Sequence[str]] = None) -> EvaluationArguments:
    """Command line -> :class:`EvaluationArguments` (all dataclass fields + ``mode``), protocol defaults filled in.

    Inconsistent or out-of-range values exit through ``parser.error`` (status 2, one line naming the option).
    """
    parser = build_parser()
    namespace = parser.parse_args(argv)
    # build each dataclass once so that its own checks (__post_init__, if any) run on the parsed values
    for dtype in argument_dataclasses():
        dtype(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(dtype) if f.init})
    args = namespace
    if not 0.0 < args.data_pct <= 1.0:  # also refuses NaN
        parser.error(f"argument --data_pct: must be in (0, 1] (a fraction: 0.01 = 1 %), got {args.data_pct}")
    try:
        args.dataset_options = dict(parse_option(item) for item in args.dataset_options)
    except ValueError as error:
        parser.error(f"argument --dataset_options: {error}")
    if args.augment and args.no_cache:
        parser.error("argument --no_cache: not allowed with argument --augment")
    args.mode = "augment" if args.augment else "uncached" if args.no_cache else "cached"
    if args.standardize_features and args.mode != "cached":
        parser.error("--standardize_features needs the cached-features mode (no --augment / --no_cache)")
    task_module = protocol(args.task)
    if args.dataset is None and not getattr(task_module, "DATASET_OPTIONAL", False):
        parser.error(f"the following arguments are required for --task {args.task}: --dataset")
    if args.dataset_task is None:
        # a protocol may name another task for some datasets (DATASET_TASKS: mimic_cxr's official test split)
        args.dataset_task = getattr(task_module, "DATASET_TASKS", {}).get(
            args.dataset, getattr(task_module, "DATASET_TASK", args.task))
    for key, value in task_module.DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_ranges(parser, args)
    args.resume_from_checkpoint = resume_value(parser, args)
    return EvaluationArguments(**vars(args))


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse values with which a protocol would train nothing or crash later."""
    if args.max_epochs is not None and args.max_epochs < 1:
        parser.error(f"argument --max_epochs: must be >= 1, got {args.max_epochs} (with 0 the head would be "
                     f"evaluated untrained)")
    for name in ("batch_size", "patience", "gradient_accumulation_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"argument --{name}: must be >= 1, got {value}")
    if args.num_workers < 0:
        parser.error(f"argument --num_workers: must be >= 0, got {args.num_workers}")
    if not args.max_grad_norm >= 0:
        parser.error(f"argument --max_grad_norm: must be >= 0, got {args.max_grad_norm}")
    for name in ("lr", "weight_decay"):
        value = getattr(args, name)
        if value is not None and not value >= (0.0 if name == "weight_decay" else 1e-300):
            parser.error(f"argument --{name}: must be {'>= 0' if name == 'weight_decay' else '> 0'}, got {value}")
    if not args.seeds:
        parser.error("argument --seeds: give at least one seed")


def resume_value(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """``--resume_from_checkpoint`` -> None, True (each seed's last checkpoint) or a checkpoint folder."""
    value = args.resume_from_checkpoint
    if value is None or value.lower() in ("false", "no", "none"):
        return None
    if args.task == "classification" and args.mode not in CHECKPOINT_MODES:
        parser.error("argument --resume_from_checkpoint: the cached-features mode keeps no checkpoint to resume "
                     "(training the head takes seconds); use it with --augment or --no_cache")
    if value.lower() in ("true", "yes", "last"):
        return True
    if len(args.seeds) != 1:
        parser.error("argument --resume_from_checkpoint: a checkpoint folder belongs to one seed; pass one "
                     "--seeds value or 'true' (each seed's last checkpoint)")
    return value


__all__ = ["DownstreamArguments", "TrainerPassThroughArguments", "EvaluationArguments", "DATASETS",
           "argument_dataclasses",
           "build_parser", "parse_args", "parse_option", "check_ranges", "resume_value",
           "HelpFormatter"]
