"""The pretraining data: the dataset (a ``data_scripts`` name or a saved folder), a per-epoch seeded
sampler, seeded crops, and the train / validation DataLoaders (``get_dataloaders``, swappable in tests).
"""
import os
from typing import Any, Dict, List

import torch
from accelerate.logging import get_logger
from torch.utils.data import DataLoader, Sampler

from modeling_cgns import CGNSPretrainingCollator, CGNSProcessor
from modeling_cgns.collator import MEANINGS_COLUMN
from modeling_cgns.processing_cgns import default_resize_size

from .arguments import DataArguments, PretrainingConfig
from .preemption import ignore_stop_signals

logger = get_logger(__name__)


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
        if data_args.reports_path or data_args.dataset_options:
            raise ValueError("--reports_path / --dataset_options are options of a dataset builder; "
                             f"--dataset {data_args.dataset!r} is a saved folder")
        splits = datasets.load_from_disk(data_args.dataset)
        splits = data_scripts.subsample_train(splits, data_args.data_pct, data_args.data_seed)
    else:
        splits = data_scripts.load_cgns_dataset(data_args.dataset, data_args.data_dir, task="pretraining",
                                                data_pct=data_args.data_pct, seed=data_args.data_seed,
                                                cache_dir=data_args.cache_dir,
                                                **builder_options(data_args, image_size))
    for split in ("train", "validation"):
        if split not in splits:
            raise ValueError(f"dataset {data_args.dataset!r} has no {split!r} split (found {list(splits)})")
        missing = {"image", "sentences"} - set(splits[split].column_names)
        if missing:
            raise ValueError(f"{split} split of {data_args.dataset!r} lacks columns {sorted(missing)}")
    # the collator needs only these (and the sentence meanings, where the dataset has them, to score the
    # clustering: docs/clustering.md); not decoding the rest saves time per example
    columns = ["image", "sentences"]
    if (data_args.sentence_meanings == "auto" and MEANINGS_COLUMN in splits["train"].column_names
            and MEANINGS_COLUMN in splits["validation"].column_names):
        columns.append(MEANINGS_COLUMN)
    return {split: splits[split].select_columns(columns) for split in ("train", "validation")}


def builder_options(data_args: DataArguments, image_size: int) -> Dict[str, Any]:
    """The dataset builder's options: ``--dataset_options`` KEY=VALUE items, ``--reports_path`` (mimic_cxr; a path
    that exists from the working directory is made absolute, else the builder reads it relative to data_dir) and
    the synthetic generator's settings. The same options as ``cgns prepare`` gives find its preparation again."""
    from data_scripts.builder import parse_option

    options = dict(parse_option(item) for item in data_args.dataset_options)
    if data_args.reports_path:
        if "reports_path" in options:
            raise ValueError("reports_path given twice (--reports_path and --dataset_options)")
        path = data_args.reports_path
        options["reports_path"] = os.path.abspath(path) if os.path.exists(path) else path
    if data_args.dataset == "synthetic_cxr":
        synthetic = {"num_images": data_args.num_images,
                     "image_size": data_args.render_size or resize_size_for(data_args, image_size),
                     "lesion_contrast_scale": data_args.lesion_contrast_scale}
        twice = sorted(set(synthetic) & set(options))
        if twice:
            raise ValueError(f"--dataset_options {', '.join(twice)}: set these with their own arguments "
                             f"(--num_images, --render_size, --lesion_contrast_scale)")
        options.update(synthetic)
    return options


def resize_size_for(data_args: DataArguments, image_size: int) -> int:
    return data_args.resize_size or default_resize_size(image_size)


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
        # a stop signal sent to the whole process group (Ctrl-C, a scheduler) must not kill the workers while
        # the main process finishes its step and checkpoint (preemption.py)
        common.update(persistent_workers=True, prefetch_factor=data_args.dataloader_prefetch_factor,
                      worker_init_fn=ignore_stop_signals)
    # An explicit generator keeps iterator creation from drawing on the global torch RNG, whose
    # state the checkpoints restore (dropout and the CM-MIR mask use it).
    sampler = EpochSeededSampler(len(train), training_args.seed)
    # the sentence labeller's meanings when the data brings none (or when asked): docs/clustering.md
    label = data_args.sentence_meanings == "labeller" or (
        data_args.sentence_meanings == "auto" and MEANINGS_COLUMN not in train.column_names)
    train_loader = DataLoader(
        IndexedDataset(train), batch_size=training_args.per_device_train_batch_size, sampler=sampler,
        drop_last=True, collate_fn=SeededAugmentationCollator(
            CGNSPretrainingCollator(processor, train=True, label_meanings=label), sampler, training_args.seed),
        generator=torch.Generator().manual_seed(training_args.seed), **common)
    eval_loader = DataLoader(
        validation, batch_size=training_args.per_device_eval_batch_size, shuffle=False, drop_last=False,
        collate_fn=CGNSPretrainingCollator(processor, train=False, label_meanings=label), generator=torch.Generator(),
        **common)
    return train_loader, eval_loader


__all__ = [
    "EpochSeededSampler",
    "IndexedDataset",
    "SeededAugmentationCollator",
    "load_pretraining_data",
    "builder_options",
    "resize_size_for",
    "warn_if_stored_too_small",
    "get_dataloaders",
]
