"""Phrase-grounding metrics of a similarity map against boxes: CNR (BioViL) and mIoU over thresholds (BioViL-T).

Pure numpy functions; the definitions, their sources and how the grounding task applies them are in
docs/evaluation.md ("Phrase grounding: CNR and mIoU").

A map is a (g, g) array over the model's image grid (one value per image token, row-major, the frame of
the evaluated crop). It is compared with boxes at pixel resolution: :func:`upsample_map` spreads each cell
over the ``size x size`` pixels it covers (nearest neighbour, as the BioViL reference upsamples by
default) and :func:`box_mask` rasterises the boxes (normalised ``[x_min, y_min, x_max, y_max]`` in the
same frame) at the pixel centres. ``valid`` marks the pixels that show the original image (not padding,
not cut away by the crop); only those enter the statistics, as the reference leaves the pixels outside
the crop out (NaN).

* **CNR** (contrast-to-noise ratio, Boecking et al., ECCV 2022):
  ``|mean_in - mean_out| / sqrt(var_in + var_out)`` over the map's pixels inside / outside the union of
  the boxes; population variances (``ddof=0``). With both variances 0 it is 0 for equal means (a uniform
  map: no contrast) and ``inf`` otherwise (a map that is exactly 1 in the box and 0 elsewhere).
* **mIoU** (Bannur et al., CVPR 2023): the map is rescaled to [0, 1] by its minimum and maximum over the
  valid pixels (a constant map becomes 1 everywhere: every pixel ties for the maximum), binarised at each
  threshold t (``map > t``), and the IoU of that region with the union of the boxes is averaged over the
  thresholds ``MIOU_THRESHOLDS``.
"""
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

#: Thresholds of the mIoU, applied to the map rescaled to [0, 1] (docs/evaluation.md).
MIOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)


def upsample_map(grid_map: np.ndarray, size: int) -> np.ndarray:
    """(g, g) map -> (size, size): pixel (i, j) takes the value of the cell that holds its centre."""
    grid_map = np.asarray(grid_map, dtype=np.float64)
    if grid_map.ndim != 2 or grid_map.shape[0] != grid_map.shape[1]:
        raise ValueError(f"a similarity map is a square (g, g) array, got shape {grid_map.shape}")
    cells = np.minimum(((np.arange(size) + 0.5) * grid_map.shape[0] / size).astype(np.int64), grid_map.shape[0] - 1)
    return grid_map[np.ix_(cells, cells)]


def box_mask(boxes: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool: the pixel centre lies in at least one of ``boxes`` (K, 4), normalised
    ``[x_min, y_min, x_max, y_max]`` (a union, not a sum)."""
    centres = (np.arange(size) + 0.5) / size
    inside = np.zeros((size, size), dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        inside |= ((centres >= y0) & (centres <= y1))[:, None] & ((centres >= x0) & (centres <= x1))[None, :]
    return inside


def _regions(similarity: np.ndarray, inside: np.ndarray, valid: Optional[np.ndarray]):
    similarity = np.asarray(similarity, dtype=np.float64)
    inside = np.asarray(inside, dtype=bool)
    if similarity.shape != inside.shape:
        raise ValueError(f"map {similarity.shape} and box mask {inside.shape} must have the same shape")
    valid = np.ones_like(inside) if valid is None else np.asarray(valid, dtype=bool)
    if not np.isfinite(similarity[valid]).all():
        raise ValueError("the similarity map holds non-finite values")
    box, rest = inside & valid, ~inside & valid
    if not box.any():
        raise ValueError("no pixel of the image lies inside the boxes")
    if not rest.any():
        raise ValueError("the boxes cover the whole image: nothing lies outside them")
    return similarity, box, rest, valid


def contrast_to_noise_ratio(similarity: np.ndarray, inside: np.ndarray, valid: Optional[np.ndarray] = None) -> float:
    """CNR of one map: ``|mean_in - mean_out| / sqrt(var_in + var_out)`` over the valid pixels.

    Args:
        similarity: (H, W) map; inside: (H, W) bool, the union of the boxes; valid: (H, W) bool, the pixels
            that count (default: all).
    """
    similarity, box, rest, valid = _regions(similarity, inside, valid)
    # CNR does not change with an offset; shifting by the minimum makes a constant map exactly 0, so rounding in
    # the means cannot turn "no contrast" into 1e-17 / 1e-17
    similarity = similarity - similarity[valid].min()
    contrast = abs(similarity[box].mean() - similarity[rest].mean())
    noise = math.sqrt(similarity[box].var() + similarity[rest].var())
    if noise == 0.0:
        return 0.0 if contrast == 0.0 else math.inf
    return float(contrast / noise)


def rescale_to_unit(similarity: np.ndarray, valid: Optional[np.ndarray] = None) -> np.ndarray:
    """``(s - min) / (max - min)`` with min / max over the valid pixels; 1 everywhere for a constant map."""
    similarity = np.asarray(similarity, dtype=np.float64)
    values = similarity if valid is None else similarity[np.asarray(valid, dtype=bool)]
    low, high = values.min(), values.max()
    if high == low:
        return np.ones_like(similarity)
    return (similarity - low) / (high - low)


def threshold_miou(similarity: np.ndarray, inside: np.ndarray, valid: Optional[np.ndarray] = None,
                   thresholds: Sequence[float] = MIOU_THRESHOLDS) -> float:
    """Mean over ``thresholds`` of IoU({rescaled map > t}, boxes) on the valid pixels (see the module doc)."""
    similarity, box, _, valid = _regions(similarity, inside, valid)
    if not len(thresholds):
        raise ValueError("mIoU needs at least one threshold")
    scaled = rescale_to_unit(similarity, valid)
    ious = []
    for t in thresholds:
        predicted = (scaled > t) & valid
        ious.append((predicted & box).sum() / (predicted | box).sum())   # the union holds the box: never empty
    return float(np.mean(ious))


def phrase_grounding_scores(maps: Sequence[np.ndarray], boxes: Sequence[np.ndarray], size: int,
                            image_regions: Optional[Sequence[Sequence[float]]] = None,
                            findings: Optional[Sequence[Optional[str]]] = None,
                            thresholds: Sequence[float] = MIOU_THRESHOLDS) -> Dict:
    """CNR and mIoU of every query, averaged over queries, per finding and over findings, with the uniform map.

    Args:
        maps: one (g, g) map per query; boxes: one (K, 4) array per query, normalised in the map's frame.
        size: pixel resolution of the comparison (the crop size).
        image_regions: per query, the normalised box of the crop that shows the original image (padding and
            cropped-away parts left out); default: the whole crop.
        findings: per query, the finding it names (grouping of ``per_finding``); ``None`` entries are grouped
            as ``"all"``.

    Returns ``{"cnr", "miou", "uniform_cnr", "uniform_miou", "cnr_macro", "miou_macro", "per_finding",
    "cnr_queries", "boxes_cover_image", "miou_thresholds"}``: means over the ``cnr_queries`` scored queries;
    ``*_macro`` the mean of the per-finding means; ``per_finding`` maps each finding to its ``cnr``, ``miou``,
    ``uniform_miou`` and ``num_queries``. A query whose boxes cover the whole image region (nothing outside
    to contrast with) has neither number: it is counted in ``boxes_cover_image`` and left out. The uniform
    map's CNR is 0 by definition; its mIoU is the boxes' share of the image (the whole image is predicted at
    every threshold).
    """
    if len(maps) != len(boxes):
        raise ValueError(f"{len(maps)} maps for {len(boxes)} box sets")
    if not maps:
        raise ValueError("phrase grounding needs at least one query (a phrase with a box)")
    regions = image_regions if image_regions is not None else [None] * len(maps)
    names = [f if f is not None else "all" for f in (findings if findings is not None else [None] * len(maps))]
    if not len(regions) == len(names) == len(maps):
        raise ValueError(f"{len(maps)} maps, {len(regions)} image regions and {len(names)} findings")
    per_query: List[Dict[str, float]] = []
    scored_names: List[str] = []
    for grid_map, query_boxes, region, name in zip(maps, boxes, regions, names):
        similarity = upsample_map(grid_map, size)
        inside = box_mask(query_boxes, size)
        valid = np.ones_like(inside) if region is None else box_mask(np.asarray(region, dtype=np.float64)[None], size)
        if not (inside & valid).any() or not (~inside & valid).any():
            continue
        scored_names.append(name)
        constant = np.zeros_like(similarity)
        per_query.append({
            "cnr": contrast_to_noise_ratio(similarity, inside, valid),
            "miou": threshold_miou(similarity, inside, valid, thresholds),
            "uniform_cnr": contrast_to_noise_ratio(constant, inside, valid),
            "uniform_miou": threshold_miou(constant, inside, valid, thresholds),
        })
    if not per_query:
        raise ValueError(f"none of the {len(maps)} queries has image pixels both inside and outside its boxes")
    per_finding: Dict[str, Dict] = {}
    for name in sorted(set(scored_names)):
        rows = [q for q, n in zip(per_query, scored_names) if n == name]
        per_finding[name] = {key: float(np.mean([r[key] for r in rows])) for key in ("cnr", "miou", "uniform_miou")}
        per_finding[name]["num_queries"] = len(rows)
    scores = {key: float(np.mean([q[key] for q in per_query])) for key in per_query[0]}
    scores.update({
        "cnr_macro": float(np.mean([f["cnr"] for f in per_finding.values()])),
        "miou_macro": float(np.mean([f["miou"] for f in per_finding.values()])),
        "per_finding": per_finding, "cnr_queries": len(per_query), "boxes_cover_image": len(maps) - len(per_query),
        "miou_thresholds": list(thresholds),
    })
    return scores


__all__ = [
    "MIOU_THRESHOLDS", "upsample_map", "box_mask", "contrast_to_noise_ratio", "rescale_to_unit", "threshold_miou",
    "phrase_grounding_scores",
]
