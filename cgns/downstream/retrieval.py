"""Image-report retrieval of a CGNS export (docs/evaluation.md).

    cgns evaluate --task retrieval --dataset synthetic_cxr --dataset_task pretraining \
        --split validation --model path/to/cgns_export --output_dir O

Recipe: load the split (rows with an ``image`` and a ``sentences`` or ``report`` column) -> embed
every image with ``get_image_features`` and every report with ``get_text_features``, once, in
batches, cached in a safetensors file keyed by the model and the split -> image->report and
report->image Recall@1/5/10 and median rank (``modeling_cgns.metrics.retrieval_metrics``; ties
count against the true pair) -> ``results.json`` / ``results.md``.

Rows whose report has no usable sentence cannot be ranked; they are counted, reported and left out.
"""
import logging
import os
from typing import Dict, List, Tuple

import torch

import data_scripts
from modeling_cgns.metrics import RETRIEVAL_KS, retrieval_metrics

from .common import percent, write_results
from .embeddings import (EncoderEvaluationArguments, cache_key, cached_tensors, embedding_cache_dir, encode_images,
                         encode_reports, load_model_and_processor, model_identity, pick_split, report_sentences,
                         require_dataset)
from .specs import TASK_DEFAULTS

logger = logging.getLogger("downstream.retrieval")

#: Nothing is trained; the batch size is the embedding batch.
#: The options of the encoder-only protocols (`cgns evaluate` adds them to the command line).
ARGUMENTS = EncoderEvaluationArguments
DEFAULTS = TASK_DEFAULTS["retrieval"]
#: The dataset task used when --dataset_task is not given: image-report pairs; for MIMIC-CXR its
#: official test split (the pretraining task's validation merges the official validate and test splits).
DATASET_TASK = "pretraining"
DATASET_TASKS = {"mimic_cxr": "retrieval"}

RESULTS_HEADER = ("| model | dataset | split | pairs | i2t R@1 | i2t R@5 | i2t R@10 | i2t median rank | "
                  "t2i R@1 | t2i R@5 | t2i R@10 | t2i median rank |\n"
                  "|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def embedding_cache_path(args, split_name: str, split, processor) -> str:
    """``<embedding_cache_dir>/retrieval-<hash>.safetensors``; the hash covers model, data and preprocessing."""
    key = cache_key(kind="retrieval", model=model_identity(args.model), dataset=args.dataset,
                    dataset_task=args.dataset_task, split=split_name, fingerprint=split._fingerprint,
                    rows=len(split), image_size=processor.image_processor.image_size,
                    resize_size=processor.image_processor.resize_size, max_length=processor.max_length)
    return os.path.join(embedding_cache_dir(args), f"retrieval-{key}.safetensors")


def usable_pairs(split) -> Tuple[List[int], List[List[str]]]:
    """Indices of the rows whose report has at least one sentence, and those sentence lists."""
    columns = [c for c in ("sentences", "report") if c in split.features]
    text_rows = split.select_columns(columns)
    indices, sentences = [], []
    for index, row in enumerate(text_rows):
        found = report_sentences(row)
        if found:
            indices.append(index)
            sentences.append(found)
    return indices, sentences


def compute_embeddings(model, processor, split, indices: List[int], sentences: List[List[str]],
                       batch_size: int, quiet: bool) -> Dict[str, torch.Tensor]:
    """(N, D) image and report embeddings of the usable rows, row i of each the same pair."""
    images = split.select(indices).select_columns(["image"])
    return {"image_embeds": encode_images(model, processor, images, batch_size, quiet, "retrieval images"),
            "text_embeds": encode_reports(model, processor, sentences, batch_size, quiet, "retrieval reports")}


def check_arguments(args) -> None:
    require_dataset(args, "retrieval")


def run(args) -> Dict:
    """Load split -> embeddings (cached) -> Recall@k and median rank -> results files."""
    dataset_dict = data_scripts.load_cgns_dataset(
        args.dataset, data_dir=args.data_dir, task=args.dataset_task, cache_dir=args.cache_dir,
        **args.dataset_options)
    split_name = pick_split(dataset_dict, args.split)
    split = dataset_dict[split_name]
    if "image" not in split.features or not {"sentences", "report"} & set(split.features):
        raise ValueError(f"retrieval needs rows with an 'image' and a 'sentences' or 'report' column; "
                         f"{args.dataset}/{args.dataset_task} split {split_name!r} has {sorted(split.features)}")
    indices, sentences = usable_pairs(split)
    skipped = len(split) - len(indices)
    if skipped:
        logger.warning("%d of %d rows have no usable report sentence and are left out of retrieval", skipped,
                       len(split))
    if not indices:
        raise ValueError(f"no row of {args.dataset}/{args.dataset_task} split {split_name!r} has a report sentence")

    model, processor = load_model_and_processor(args.model)
    cache_path = None if args.no_embedding_cache else \
        embedding_cache_path(args, split_name, split, processor)
    embeds = cached_tensors(cache_path, lambda: compute_embeddings(model, processor, split, indices, sentences,
                                                                    args.batch_size, args.quiet),
                            f"retrieval embeddings of {split_name}")
    metrics = retrieval_metrics(embeds["image_embeds"], embeds["text_embeds"])
    results = {
        "task": "retrieval", "dataset": args.dataset, "dataset_task": args.dataset_task, "split": split_name,
        "model": args.model, "num_pairs": len(indices), "skipped_rows_without_report": skipped,
        "ks": list(RETRIEVAL_KS), "tie_rule": "ties ranked ahead of the true pair",
        "embedding_cache": cache_path, "test": metrics,
    }
    row = (f"| {args.model} | {args.dataset}/{args.dataset_task} | {split_name} | {len(indices)} | "
           + " | ".join(_cell(metrics, f"{d}_{m}") for d in ("i2t", "t2i")
                        for m in ("R@1", "R@5", "R@10", "median_rank")) + " |")
    write_results(results, args.output_dir, RESULTS_HEADER, row)
    logger.info("retrieval on %d pairs (%s): %s", len(indices), split_name, "; ".join(
        f"{d} R@1 {percent(metrics[f'{d}_R@1'])}, R@5 {percent(metrics[f'{d}_R@5'])}, R@10 "
        f"{percent(metrics[f'{d}_R@10'])}, median rank {metrics[f'{d}_median_rank']:g}" for d in ("i2t", "t2i")))
    return results


def _cell(metrics: Dict[str, float], key: str) -> str:
    value = metrics[key]
    return f"{value:g}" if key.endswith("median_rank") else f"{100 * value:.1f}"


__all__ = [
    "run", "ARGUMENTS", "DEFAULTS", "DATASET_TASK", "DATASET_TASKS", "check_arguments", "compute_embeddings", "usable_pairs",
    "embedding_cache_path", "RESULTS_HEADER",
]
