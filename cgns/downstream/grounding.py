"""Grounding of report sentences in the image by CGNS's local cross-attention (docs/evaluation.md).

    cgns evaluate --task grounding --dataset synthetic_cxr --dataset_task grounding \
        --model path/to/cgns_export --output_dir O
    cgns evaluate --task grounding --dataset rsna --dataset_task detection --data_dir D \
        --model path/to/cgns_export --output_dir O      # queries: the label's positive prompts
    cgns evaluate --task grounding --dataset ms_cxr --data_dir MS_CXR \
        --dataset_options mimic_cxr_dir=MIMIC_CXR_JPG --model path/to/cgns_export --random_init_baseline --output_dir O

A query is a sentence with the boxes of what it names: on the synthetic ``grounding`` task every
report sentence that names a drawn finding with a box (consolidation, multifocal opacity, nodule),
read in the context of its whole report; on a detection task (RSNA, or synthetic ``detection``)
every positive prompt of the task's label (``--prompts``) against each image with boxes. For each
query the sentence's attention over the ``g x g`` image grid (``CGNSModel.get_sentence_attention``,
``--attention_direction``) is compared with the boxes mapped into the evaluated crop:

* pointing game: the arg-max cell intersects a box (a cell is a square of the grid; a tie between
  cells counts the fraction of tied cells that intersect a box);
* attention mass in the box: ``sum_c a_c * coverage_c / sum_c a_c``, ``coverage_c`` the fraction of
  cell c inside the union of the boxes (rasterised at about the crop's pixel resolution);
* uniform baseline: the same two numbers for constant attention (fraction of cells intersecting a
  box; mean coverage);
* sentence specificity (report-sentence queries only): on images with two findings in different
  cells, how much more a sentence's map points at its own finding than the other sentence's map does
  (0 for any map that does not depend on the sentence, e.g. a saliency peak);
* CNR (BioViL) and mIoU over thresholds (BioViL-T) of the same map at the crop's pixels, per finding
  (``sentence_findings`` of MS-CXR rows; the label for prompts) and averaged, with the uniform map and,
  with ``--random_init_baseline``, the export's architecture with fresh weights
  (``modeling_cgns.grounding_metrics``, docs/evaluation.md "Phrase grounding on MS-CXR").
"""
import logging
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

import data_scripts
from modeling_cgns.grounding_metrics import phrase_grounding_scores

from .common import format_number, percent, write_results
from .embeddings import (EncoderEvaluationArguments, image_batch, load_model_and_processor, pick_split, require_dataset,
                         text_batch)
from .prompts import DEFAULT_PROMPTS, load_prompts, prompt_sentences
from .specs import TASK_DEFAULTS

logger = logging.getLogger("downstream.grounding")

#: The options of the encoder-only protocols (`cgns evaluate` adds them to the command line).
ARGUMENTS = EncoderEvaluationArguments
DEFAULTS = TASK_DEFAULTS["grounding"]
#: synthetic_cxr's task with per-sentence boxes; give --dataset_task detection for RSNA.
DATASET_TASK = "grounding"

RESULTS_HEADER = ("| model | dataset | split | queries | attention | pointing game (%) | uniform (%) | "
                  "gain (points, 95 % CI) | mass in box (%) | uniform (%) | sentence specificity (points, 95 % CI) | "
                  "CNR | uniform CNR | mIoU | uniform mIoU | random init: pointing game (%) / CNR / mIoU |\n"
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
PER_FINDING_HEADER = ("| finding | queries | CNR | mIoU | uniform mIoU | random init CNR | random init mIoU |\n"
                      "|---|---|---|---|---|---|---|\n")


# --------------------------------------------------------------------------------------------------
# geometry and scores (pure functions)
# --------------------------------------------------------------------------------------------------

def box_to_crop(box: Sequence[float], width: int, height: int, image_size: int, resize_size: int
                ) -> Optional[List[float]]:
    """A box normalised to the original image -> normalised to the evaluation crop, or ``None`` when
    nothing of it is left in the crop.

    Follows ``CGNSImageProcessor.transform(train=False)``: longest side -> ``resize_size``, centred
    zero padding to a square, centre crop ``image_size``.
    """
    scale = resize_size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    top, left = (resize_size - new_h) // 2, (resize_size - new_w) // 2
    margin = (resize_size - image_size) // 2
    x0, y0, x1, y1 = (float(v) for v in box)
    mapped = [(left + x0 * new_w - margin) / image_size, (top + y0 * new_h - margin) / image_size,
              (left + x1 * new_w - margin) / image_size, (top + y1 * new_h - margin) / image_size]
    mapped = [min(max(v, 0.0), 1.0) for v in mapped]
    if mapped[2] <= mapped[0] or mapped[3] <= mapped[1]:
        return None
    return mapped


def cell_intersects(boxes: np.ndarray, grid: int) -> np.ndarray:
    """(g, g) bool: cell (row, col) shares a positive area with at least one box of ``boxes`` (K, 4)."""
    edges = np.arange(grid + 1) / grid
    lo, hi = edges[:-1], edges[1:]
    hit = np.zeros((grid, grid), dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        cols = (lo < x1) & (hi > x0)
        rows = (lo < y1) & (hi > y0)
        hit |= rows[:, None] & cols[None, :]
    return hit


def cell_coverage(boxes: np.ndarray, grid: int, resolution: int = 224) -> np.ndarray:
    """(g, g) fraction of each cell inside the union of ``boxes`` (K, 4), from sample points at the
    centres of a ``grid * ceil(resolution / grid)`` raster (the crop's pixels when ``resolution`` is
    the crop size and a multiple of the grid)."""
    sub = max(1, math.ceil(resolution / grid))
    n = grid * sub
    centres = (np.arange(n) + 0.5) / n
    inside = np.zeros((n, n), dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        inside |= ((centres >= y0) & (centres <= y1))[:, None] & ((centres >= x0) & (centres <= x1))[None, :]
    return inside.reshape(grid, sub, grid, sub).mean(axis=(1, 3))


def pointing_hit(attention: np.ndarray, intersects: np.ndarray) -> float:
    """Pointing game for one (g, g) map: 1 when the arg-max cell intersects a box, 0 when not; with tied
    maxima the fraction of tied cells that do (the expected hit of a random tie-break)."""
    attention = np.asarray(attention, dtype=np.float64)
    top = attention == attention.max()
    return float(intersects[top].mean())


def attention_mass(attention: np.ndarray, coverage: np.ndarray) -> float:
    """Fraction of a non-negative (g, g) map's total inside the boxes; constant attention when the total is 0."""
    attention = np.asarray(attention, dtype=np.float64)
    total = attention.sum()
    if total <= 0:
        return float(coverage.mean())
    return float((attention * coverage).sum() / total)


def grounding_scores(maps: Sequence[np.ndarray], boxes: Sequence[np.ndarray], resolution: int = 224
                     ) -> Dict[str, float]:
    """Mean pointing game and attention mass over queries, with the uniform-attention baseline.

    ``pointing_game_gain`` is the mean per-query difference pointing game - uniform, with the half-width
    ``pointing_game_gain_ci95`` of its 95 % interval (:func:`paired_ci95`).

    Args:
        maps: one (g, g) non-negative attention map per query.
        boxes: one (K, 4) array per query, normalised ``[x_min, y_min, x_max, y_max]`` in the map's frame.
    """
    if len(maps) != len(boxes):
        raise ValueError(f"{len(maps)} attention maps for {len(boxes)} box sets")
    if not maps:
        raise ValueError("grounding needs at least one query (a sentence with a box)")
    hits, masses, uniform_hits, uniform_masses = [], [], [], []
    for attention, query_boxes in zip(maps, boxes):
        grid = np.asarray(attention).shape[0]
        intersects = cell_intersects(query_boxes, grid)
        coverage = cell_coverage(query_boxes, grid, resolution)
        hits.append(pointing_hit(attention, intersects))
        masses.append(attention_mass(attention, coverage))
        uniform_hits.append(float(intersects.mean()))
        uniform_masses.append(float(coverage.mean()))
    gain = np.asarray(hits) - np.asarray(uniform_hits)
    return {"pointing_game": float(np.mean(hits)), "uniform_pointing_game": float(np.mean(uniform_hits)),
            "pointing_game_gain": float(gain.mean()), "pointing_game_gain_ci95": paired_ci95(gain),
            "attention_mass_in_box": float(np.mean(masses)),
            "uniform_attention_mass_in_box": float(np.mean(uniform_masses)), "num_queries": len(maps)}


def sentence_specificity(maps: Sequence[np.ndarray], boxes: Sequence[np.ndarray], image_ids: Sequence[int]
                         ) -> Dict[str, Optional[float]]:
    """Does a sentence's map point at its own finding rather than at another finding of the same image?

    For every ordered pair (q, r) of queries of one image whose boxes share no grid cell (two different
    findings), ``d = hit(map_q, boxes_q) - hit(map_r, boxes_q)`` (``hit`` the pointing game). A map that
    does not depend on the sentence (the same map for q and r) gives d = 0 on every pair; a map that
    points at each sentence's own finding gives 1. ``d`` is averaged over each image's pairs, then over
    images; the 95 % interval is over images (:func:`paired_ci95`).

    Returns ``{"sentence_specificity", "sentence_specificity_ci95", "specificity_images",
    "specificity_pairs"}``; the first two are None when no image has such a pair.
    """
    if not len(maps) == len(boxes) == len(image_ids):
        raise ValueError(f"{len(maps)} maps, {len(boxes)} box sets and {len(image_ids)} image ids")
    by_image: Dict[int, List[int]] = {}
    for q, image in enumerate(image_ids):
        by_image.setdefault(int(image), []).append(q)
    per_image, pairs = [], 0
    for queries in by_image.values():
        cells = {q: cell_intersects(boxes[q], np.asarray(maps[q]).shape[0]) for q in queries}
        diffs = [pointing_hit(maps[q], cells[q]) - pointing_hit(maps[r], cells[q])
                 for q in queries for r in queries if q != r and not (cells[q] & cells[r]).any()]
        if diffs:
            per_image.append(float(np.mean(diffs)))
            pairs += len(diffs)
    if not per_image:
        return {"sentence_specificity": None, "sentence_specificity_ci95": None, "specificity_images": 0,
                "specificity_pairs": 0}
    return {"sentence_specificity": float(np.mean(per_image)), "sentence_specificity_ci95": paired_ci95(per_image),
            "specificity_images": len(per_image), "specificity_pairs": pairs}


def format_specificity(scores: Dict) -> str:
    """``+d ± ci`` in points, or ``n/a`` where no image has two findings in different cells (or prompt queries)."""
    if scores.get("sentence_specificity") is None:
        return "n/a"
    return f"{100 * scores['sentence_specificity']:+.1f} ± {100 * scores['sentence_specificity_ci95']:.1f}"


def paired_ci95(differences: np.ndarray) -> float:
    """Half-width of the normal-approximation 95 % interval of a mean of independent differences (per query
    for the pointing-game gain, per image for sentence specificity): ``1.96 * sd / sqrt(n)``, sample sd; 0 for
    a single value. The pointing game beats the uniform baseline where ``gain - gain_ci95 > 0``."""
    differences = np.asarray(differences, dtype=np.float64)
    if differences.size < 2:
        return 0.0
    return float(1.96 * differences.std(ddof=1) / np.sqrt(differences.size))


# --------------------------------------------------------------------------------------------------
# queries from a split
# --------------------------------------------------------------------------------------------------

def _crop_boxes(boxes, image, image_processor) -> np.ndarray:
    width, height = image.size
    mapped = [box_to_crop(b, width, height, image_processor.image_size, image_processor.resize_size)
              for b in boxes]
    return np.array([b for b in mapped if b is not None], dtype=np.float64).reshape(-1, 4)


def _query_info(image, finding: Optional[str], image_processor) -> Dict:
    """What CNR and mIoU need besides the map and boxes: the part of the crop that shows the image (not the
    padding of a non-square image, nothing the crop cut away) and the finding the query names."""
    width, height = image.size
    region = box_to_crop([0.0, 0.0, 1.0, 1.0], width, height, image_processor.image_size, image_processor.resize_size)
    return {"image_region": region, "finding": finding}


def new_query_counts() -> Dict[str, int]:
    """The counters the query builders fill (reported in the results file)."""
    return {"sentences_with_boxes": 0, "truncated_sentences": 0, "boxes_outside_crop": 0,
            "images_without_boxes": 0}


@torch.no_grad()
def report_sentence_queries(model, processor, split, batch_size: int, direction: str, counts: Dict[str, int],
                            image_ids: Optional[List[int]] = None, query_info: Optional[List[Dict]] = None):
    """(map (g, g), boxes) for every sentence with a box, read with its whole report (``sentence_boxes`` rows);
    with ``image_ids`` given, each query's row index in the split is appended to it; with ``query_info``, its
    image region in the crop and finding (``sentence_findings`` when the split has it, else None)."""
    device = next(model.parameters()).device
    grid = model.grid_size
    maps, boxes = [], []
    row = 0
    for chunk in split.iter(batch_size=batch_size):
        pixel_values = image_batch(processor, chunk["image"], device)
        attention, sentence_mask = model.get_sentence_attention(
            pixel_values, **text_batch(processor, chunk["sentences"], device), direction=direction)
        attention = attention.float().cpu().numpy()
        for b, (image, sentence_boxes) in enumerate(zip(chunk["image"], chunk["sentence_boxes"])):
            for s, query_boxes in enumerate(sentence_boxes):
                if not query_boxes:
                    continue
                counts["sentences_with_boxes"] += 1
                if s >= sentence_mask.shape[1] or not bool(sentence_mask[b, s]):
                    counts["truncated_sentences"] += 1       # cut by the tokenizer's max_length
                    continue
                cropped = _crop_boxes(query_boxes, image, processor.image_processor)
                if not len(cropped):
                    counts["boxes_outside_crop"] += 1
                    continue
                maps.append(attention[b, s].reshape(grid, grid))
                boxes.append(cropped)
                if image_ids is not None:
                    image_ids.append(row + b)
                if query_info is not None:
                    findings = chunk.get("sentence_findings")
                    query_info.append(_query_info(image, findings[b][s] if findings else None,
                                                  processor.image_processor))
        row += len(chunk["image"])
    return maps, boxes


@torch.no_grad()
def prompt_queries(model, processor, split, prompts: List[str], batch_size: int, direction: str,
                   counts: Dict[str, int], query_info: Optional[List[Dict]] = None, finding: Optional[str] = None):
    """(map, boxes) for every prompt sentence against every image that has boxes (detection rows); with
    ``query_info``, each query's image region in the crop and ``finding``."""
    device = next(model.parameters()).device
    grid = model.grid_size
    sentences = [s for p in prompts for s in prompt_sentences(p)]
    prompt_features, prompt_mask = model.get_sentence_features(**text_batch(processor, [[s] for s in sentences],
                                                                            device))
    prompt_features = prompt_features[prompt_mask]                       # (K, D): one row per prompt sentence
    maps, boxes = [], []
    for chunk in split.iter(batch_size=batch_size):
        keep = [i for i, b in enumerate(chunk["boxes"]) if b]
        counts["images_without_boxes"] += len(chunk["boxes"]) - len(keep)
        if not keep:
            continue
        images = [chunk["image"][i] for i in keep]
        local = model.get_local_image_features(image_batch(processor, images, device))
        queries = prompt_features.unsqueeze(0).expand(len(images), -1, -1)
        mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=device)
        text_to_image, image_to_text = model.cross_attention.attention_weights(local, queries, mask)
        attention = (text_to_image.transpose(1, 2) if direction == "text_to_image" else image_to_text)
        attention = attention.float().cpu().numpy()
        for b, i in enumerate(keep):
            cropped = _crop_boxes(chunk["boxes"][i], images[b], processor.image_processor)
            if not len(cropped):
                counts["boxes_outside_crop"] += 1
                continue
            for k in range(len(sentences)):
                maps.append(attention[b, k].reshape(grid, grid))
                boxes.append(cropped)
                if query_info is not None:
                    query_info.append(_query_info(images[b], finding, processor.image_processor))
    return maps, boxes, sentences


def check_arguments(args) -> None:
    require_dataset(args, "grounding")
    if args.prompts and not os.path.isfile(args.prompts):
        raise ValueError(f"--prompts {args.prompts}: no such file")


def collect_queries(model, processor, split, spec, args, direction: str, counts: Dict[str, int]) -> Dict:
    """The queries of a split with their maps: ``{"maps", "boxes", "image_ids" (None for prompts), "query_info",
    "source", "query_sentences"}`` (report sentences on grounding rows, the label's prompts on detection rows)."""
    columns = set(split.features)
    query_info: List[Dict] = []
    if {"image", "sentences", "sentence_boxes"} <= columns:
        image_ids: Optional[List[int]] = []
        maps, boxes = report_sentence_queries(model, processor, split, args.batch_size, direction, counts, image_ids,
                                              query_info)
        return {"maps": maps, "boxes": boxes, "image_ids": image_ids, "query_info": query_info,
                "source": "report sentences", "query_sentences": None}
    if {"image", "boxes"} <= columns:
        if spec.num_labels != 1:
            raise ValueError(f"prompt queries need a one-label detection task; {args.dataset}/{args.dataset_task} "
                             f"has labels {list(spec.label_names)}")
        prompt_path = args.prompts or DEFAULT_PROMPTS
        label = spec.label_names[0]
        positive = load_prompts(prompt_path, [label])[label]["positive"]
        maps, boxes, sentences = prompt_queries(model, processor, split, positive, args.batch_size, direction,
                                                counts, query_info, label)
        return {"maps": maps, "boxes": boxes, "image_ids": None, "query_info": query_info,
                "source": f"positive prompts of {label!r} from {prompt_path}", "query_sentences": sentences}
    raise ValueError(f"grounding needs rows with 'image', 'sentences' and 'sentence_boxes' (synthetic_cxr or ms_cxr "
                     f"task grounding) or 'image' and 'boxes' (a detection task); {args.dataset}/{args.dataset_task} "
                     f"has {sorted(columns)}")


def score_queries(queries: Dict, size: int) -> Dict:
    """Pointing game, mass in box, sentence specificity (report sentences), CNR and mIoU (per finding too)."""
    maps, boxes, info = queries["maps"], queries["boxes"], queries["query_info"]
    scores = grounding_scores(maps, boxes, resolution=size)
    if queries["image_ids"] is not None:        # prompts share one box set per image: no specificity to measure
        scores.update(sentence_specificity(maps, boxes, queries["image_ids"]))
    scores.update(phrase_grounding_scores(maps, boxes, size, [q["image_region"] for q in info],
                                          [q["finding"] for q in info]))
    return scores


@torch.no_grad()
def random_init_model(model, seed: int = 0):
    """The export's architecture with fresh weights (``torch.manual_seed(seed)``): the random-init baseline."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    return type(model)(model.config).to(device).eval()


def _format_random(scores: Optional[Dict]) -> str:
    if scores is None:
        return "not run"
    return f"{100 * scores['pointing_game']:.1f} / {scores['cnr']:.3f} / {scores['miou']:.3f}"


def per_finding_table(scores: Dict, random_scores: Optional[Dict]) -> str:
    """The per-finding CNR / mIoU markdown table (written to ``phrase_grounding.md``)."""
    lines = [PER_FINDING_HEADER.rstrip("\n")]
    for name, f in scores["per_finding"].items():
        r = random_scores["per_finding"].get(name) if random_scores else None
        lines.append(f"| {name} | {f['num_queries']} | {f['cnr']:.3f} | {f['miou']:.3f} | {f['uniform_miou']:.3f} | "
                     + (f"{r['cnr']:.3f} | {r['miou']:.3f} |" if r else "not run | not run |"))
    lines.append(f"| mean over queries | {scores['cnr_queries']} | {scores['cnr']:.3f} | {scores['miou']:.3f} | "
                 f"{scores['uniform_miou']:.3f} | "
                 + (f"{random_scores['cnr']:.3f} | {random_scores['miou']:.3f} |" if random_scores
                    else "not run | not run |"))
    lines.append(f"| mean over findings | | {scores['cnr_macro']:.3f} | {scores['miou_macro']:.3f} | | "
                 + (f"{random_scores['cnr_macro']:.3f} | {random_scores['miou_macro']:.3f} |" if random_scores
                    else "not run | not run |"))
    return "\n".join(lines) + "\n"


def run(args) -> Dict:
    """Queries of the split -> maps -> pointing game, mass in box, CNR and mIoU vs uniform (and random init)
    -> results files."""
    spec = data_scripts.get_task_spec(args.dataset, args.dataset_task)
    dataset_dict = data_scripts.load_cgns_dataset(
        args.dataset, data_dir=args.data_dir, task=args.dataset_task, cache_dir=args.cache_dir,
        **args.dataset_options)
    split_name = pick_split(dataset_dict, args.split)
    split = dataset_dict[split_name]
    direction = args.attention_direction
    model, processor = load_model_and_processor(args.model)
    size = processor.image_processor.image_size
    counts = new_query_counts()
    queries = collect_queries(model, processor, split, spec, args, direction, counts)
    for reason, n in counts.items():
        if n and reason != "sentences_with_boxes":
            logger.warning("grounding: %d %s left out", n, reason.replace("_", " "))
    scores = score_queries(queries, size)
    random_scores = None
    if args.random_init_baseline:
        untrained = random_init_model(model)
        random_scores = score_queries(collect_queries(untrained, processor, split, spec, args, direction,
                                                      new_query_counts()), size)
    results = {
        "task": "grounding", "dataset": args.dataset, "dataset_task": args.dataset_task, "split": split_name,
        "model": args.model, "attention_direction": direction, "queries": queries["source"],
        "query_sentences": queries["query_sentences"], "grid_size": model.grid_size, "counts": counts, "test": scores,
        "random_init": None if random_scores is None else {"seed": 0, "test": random_scores},
    }
    row = (f"| {args.model} | {args.dataset}/{args.dataset_task} | {split_name} | {scores['num_queries']} | "
           f"{direction} | {100 * scores['pointing_game']:.1f} | {100 * scores['uniform_pointing_game']:.1f} | "
           f"{100 * scores['pointing_game_gain']:+.1f} ± {100 * scores['pointing_game_gain_ci95']:.1f} | "
           f"{100 * scores['attention_mass_in_box']:.1f} | {100 * scores['uniform_attention_mass_in_box']:.1f} | "
           f"{format_specificity(scores)} | {scores['cnr']:.3f} | {scores['uniform_cnr']:.3f} | "
           f"{scores['miou']:.3f} | {scores['uniform_miou']:.3f} | {_format_random(random_scores)} |")
    write_results(results, args.output_dir, RESULTS_HEADER, row)
    with open(os.path.join(args.output_dir, "phrase_grounding.md"), "w") as f:
        f.write(per_finding_table(scores, random_scores))
    logger.info("grounding on %d queries: pointing game %s (uniform map %s), attention mass in the box %s, CNR %s, "
                "mIoU %s", scores["num_queries"], percent(scores["pointing_game"]),
                percent(scores["uniform_pointing_game"]), percent(scores["attention_mass_in_box"]),
                format_number(scores["cnr"], 3), format_number(scores["miou"], 3))
    return results

__all__ = [
    "run", "ARGUMENTS", "DEFAULTS", "DATASET_TASK", "check_arguments", "grounding_scores", "new_query_counts",
    "pointing_hit", "paired_ci95", "sentence_specificity", "format_specificity", "attention_mass", "cell_coverage",
    "cell_intersects", "box_to_crop", "report_sentence_queries", "prompt_queries", "RESULTS_HEADER",
    "PER_FINDING_HEADER", "collect_queries", "score_queries", "random_init_model", "per_finding_table",
]
