"""Zero-shot classification of a CGNS export from prompts (docs/evaluation.md).

    cgns evaluate --task zero_shot --dataset chexpert --dataset_task 5x200 --data_dir D \
        --model path/to/cgns_export --output_dir O [--prompts my_prompts.json]

Recipe: embed each prompt as a one-report text (``get_text_features``) -> per label the mean
embedding of its positive prompts and of its negative prompts -> embed every image of the split
once (``get_image_features``, batched, cached) -> score of label c for image i =
``logit_scale * (cos(image_i, positive_c) - cos(image_i, negative_c))`` -> per-label and macro
AUROC through ``modeling_cgns.metrics.classification_metrics``, the linear probe's metric code
(single-label datasets also get top-1 accuracy; multi-label data whose rows each have exactly one
positive label, such as CheXpert 5x200, also get the top-1 accuracy of the arg-max label).

Prompt file: JSON ``{"<label name>": {"positive": [str, ...], "negative": [str, ...]}, ...}`` with
an entry for every label of the dataset's task (other entries are ignored); the default is
``cgns/downstream/zero_shot_prompts.json`` (package data).
"""
import json
import logging
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import data_scripts
from modeling_cgns.metrics import SINGLE_LABEL, classification_metrics

from .common import percent, write_results
from .embeddings import (EncoderEvaluationArguments, cache_key, cached_tensors, embedding_cache_dir, encode_images,
                         encode_reports, load_model_and_processor, model_identity, pick_split, require_columns,
                         require_dataset)
from .prompts import DEFAULT_PROMPTS, POLARITIES, load_prompts, prompt_sentences
from .specs import TASK_DEFAULTS

logger = logging.getLogger("downstream.zero_shot")

#: The options of the encoder-only protocols (`cgns evaluate` adds them to the command line).
ARGUMENTS = EncoderEvaluationArguments
DEFAULTS = TASK_DEFAULTS["zero_shot"]
DATASET_TASK = "classification"

RESULTS_HEADER = ("| model | dataset | split | images | prompts | macro AUROC (%) | per label AUROC (%) |\n"
                  "|---|---|---|---|---|---|---|\n")


@torch.no_grad()
def class_embeddings(model, processor, prompts: Dict[str, Dict[str, List[str]]], label_names: Sequence[str],
                     batch_size: int = 64, quiet: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(positive (C, D), negative (C, D)): the normalised mean prompt embedding per label and polarity.

    Every prompt is embedded in one batched pass, then averaged per (label, polarity).
    """
    groups = [(polarity, name) for polarity in POLARITIES for name in label_names]
    texts = [prompt_sentences(p) for polarity, name in groups for p in prompts[name][polarity]]
    embeds = encode_reports(model, processor, texts, batch_size, quiet, "prompts")
    sizes = [len(prompts[name][polarity]) for polarity, name in groups]
    means = torch.stack([F.normalize(chunk.mean(dim=0), dim=-1) for chunk in torch.split(embeds, sizes)])
    return means[:len(label_names)], means[len(label_names):]


def zero_shot_logits(image_embeds: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                     logit_scale: float = 1.0) -> torch.Tensor:
    """``logit_scale * (cos(image, positive_c) - cos(image, negative_c))``: (N, D), (C, D), (C, D) -> (N, C)."""
    images = F.normalize(image_embeds.float(), dim=-1)
    return logit_scale * (images @ positive.float().t() - images @ negative.float().t())


def single_positive_accuracy(logits: np.ndarray, labels: np.ndarray):
    """Top-1 accuracy of the arg-max label when every row has exactly one positive, else ``None``."""
    labels = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
    if labels.shape[1] < 2 or not np.all(labels.sum(axis=1) == 1):
        return None
    return float(np.mean(np.asarray(logits).argmax(axis=1) == labels.argmax(axis=1)))


def check_arguments(args) -> None:
    require_dataset(args, "zero_shot")
    if args.prompts and not os.path.isfile(args.prompts):
        raise ValueError(f"--prompts {args.prompts}: no such file")


def run(args) -> Dict:
    """Prompts -> class embeddings; split -> image embeddings (cached) -> logits -> the probe's metrics."""
    spec = data_scripts.get_task_spec(args.dataset, args.dataset_task)
    if spec.problem_type not in ("multi_label_classification", SINGLE_LABEL):
        raise ValueError(f"zero-shot classification needs a classification task; {args.dataset}/"
                         f"{args.dataset_task} is {spec.problem_type!r}")
    label_names = list(spec.label_names)
    prompt_path = args.prompts or DEFAULT_PROMPTS
    prompts = load_prompts(prompt_path, label_names)
    dataset_dict = data_scripts.load_cgns_dataset(
        args.dataset, data_dir=args.data_dir, task=args.dataset_task, cache_dir=args.cache_dir,
        **args.dataset_options)
    split_name = pick_split(dataset_dict, args.split)
    split = dataset_dict[split_name]
    require_columns(split, ("image", "labels"), "zero-shot classification")

    model, processor = load_model_and_processor(args.model)
    key = cache_key(kind="images", model=model_identity(args.model), dataset=args.dataset,
                    dataset_task=args.dataset_task, split=split_name, fingerprint=split._fingerprint, rows=len(split),
                    image_size=processor.image_processor.image_size, resize_size=processor.image_processor.resize_size)
    cache_path = None if args.no_embedding_cache else \
        os.path.join(embedding_cache_dir(args), f"images-{key}.safetensors")
    image_embeds = cached_tensors(
        cache_path, lambda: {"image_embeds": encode_images(model, processor, split, args.batch_size, args.quiet,
                                                           "zero-shot images")},
        f"image embeddings of {split_name}")["image_embeds"]
    positive, negative = class_embeddings(model, processor, prompts, label_names, args.batch_size, args.quiet)
    logits = zero_shot_logits(image_embeds, positive, negative, float(model.scaled_logit_scale().detach())).numpy()
    labels = np.asarray(list(split["labels"]))
    metrics = classification_metrics(logits, labels, spec.problem_type, label_names, split=split_name)
    if spec.problem_type != SINGLE_LABEL:
        metrics["single_positive_accuracy"] = single_positive_accuracy(logits, labels)
    results = {
        "task": "zero_shot", "dataset": args.dataset, "dataset_task": args.dataset_task, "split": split_name,
        "model": args.model, "problem_type": spec.problem_type, "label_names": label_names,
        "prompts_file": os.path.abspath(prompt_path), "prompts": prompts, "num_examples": len(split),
        "score": "logit_scale * (cos(image, mean positive prompt) - cos(image, mean negative prompt))",
        "embedding_cache": cache_path, "test": metrics,
    }
    per_label = ", ".join(f"{name} {_percent(metrics['auroc_per_class'][name])}" for name in label_names)
    row = (f"| {args.model} | {args.dataset}/{args.dataset_task} | {split_name} | {len(split)} | "
           f"{os.path.basename(prompt_path)} | {_percent(metrics['auroc'])} | {per_label} |")
    write_results(results, args.output_dir, RESULTS_HEADER, row)
    logger.info("zero-shot on %d images (%s/%s %s): macro AUROC %s", len(split), args.dataset, args.dataset_task,
                split_name, percent(metrics["auroc"]))
    return results


def _percent(value) -> str:
    return "undefined" if value is None else f"{100 * value:.1f}"


__all__ = [
    "run", "ARGUMENTS", "DEFAULTS", "DATASET_TASK", "check_arguments", "class_embeddings",
    "zero_shot_logits", "single_positive_accuracy", "RESULTS_HEADER",
]
