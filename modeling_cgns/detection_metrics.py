"""Detection metric of docs/method.md E.2: mean average precision over IoU thresholds 0.40:0.05:0.75.

The reference used torchmetrics' ``MeanAveragePrecision`` (COCO evaluation) with those thresholds and
reported its ``map`` field. This module re-implements the same computation for one class without
torchmetrics / pycocotools:

* per image, detections are sorted by score (at most ``max_detections`` = 100 kept, COCO's maxDets) and
  matched greedily, highest score first, to the unmatched ground-truth box of largest IoU, if that IoU is
  >= the threshold;
* over the whole set, detections are ranked by score; precision is made monotone (the running max from
  the right) and read at the 101 recall points 0, 0.01, ..., 1 (0 past the highest recall); AP is their
  mean; mAP is the mean of the per-threshold APs.

``mgca_quirks=True`` reproduces how MGCA fed the metric (E.2, G.26): images without ground-truth boxes
are skipped (their false positives are ignored) and images without predictions are skipped (their
ground truth does not count as missed). Report both numbers; the quirk-free one is the correct mAP.
"""
from typing import Dict, Optional, Sequence

import numpy as np
import torch

IOU_THRESHOLDS = tuple(round(0.40 + 0.05 * i, 2) for i in range(8))
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETECTIONS = 100


def _as_array(value, columns: Optional[int] = None) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=np.float64)
    return array.reshape(-1, columns) if columns else array.reshape(-1)


def _prediction_arrays(prediction):
    """A (boxes, scores) pair or a dict with "boxes" and "scores" -> float64 arrays (n, 4), (n,)."""
    if isinstance(prediction, dict):
        prediction = (prediction["boxes"], prediction["scores"])
    boxes, scores = prediction
    boxes, scores = _as_array(boxes, 4), _as_array(scores)
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} predicted boxes for {len(scores)} scores")
    return boxes, scores


def _target_array(target) -> np.ndarray:
    return _as_array(target["boxes"] if isinstance(target, dict) else target, 4)


def box_iou_xyxy(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: (n, 4), (m, 4) -> (n, m), float64 (exact for dyadic coordinates)."""
    lt = np.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    rb = np.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    inter = np.clip(rb - lt, 0.0, None).prod(-1)
    area_a = np.clip(boxes_a[:, 2:] - boxes_a[:, :2], 0.0, None).prod(-1)
    area_b = np.clip(boxes_b[:, 2:] - boxes_b[:, :2], 0.0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_image(boxes: np.ndarray, gt_boxes: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Greedy COCO matching of one image's detections (n, 4), by descending score -> TP flags (T, n)."""
    is_tp = np.zeros((len(thresholds), len(boxes)), dtype=bool)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return is_tp
    ious = box_iou_xyxy(boxes, gt_boxes)
    matched = np.zeros((len(thresholds), len(gt_boxes)), dtype=bool)
    rows = np.arange(len(thresholds))
    for d in range(len(boxes)):
        candidates = np.where(~matched & (ious[d][None, :] >= thresholds[:, None]), ious[d][None, :], -1.0)
        best = candidates.argmax(axis=1)
        hit = candidates[rows, best] >= 0.0
        is_tp[hit, d] = True
        matched[rows[hit], best[hit]] = True
    return is_tp


def interpolated_ap(is_tp: np.ndarray, scores: np.ndarray, num_gt: int) -> float:
    """COCO 101-point interpolated AP from TP flags (n,) and scores (n,) of all images; -1 without GT."""
    if num_gt == 0:
        return -1.0
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(is_tp[order])
    fp = np.cumsum(~is_tp[order])
    recall = tp / num_gt
    precision = tp / (tp + fp)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    # precision at the first rank reaching each recall point; 0 for recall points never reached
    index = np.searchsorted(recall, RECALL_POINTS, side="left")
    sampled = np.append(precision, 0.0)[np.minimum(index, len(precision))]
    return float(np.mean(sampled))


def average_precision_per_threshold(predictions: Sequence, targets: Sequence,
                                    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
                                    mgca_quirks: bool = False, max_detections: int = MAX_DETECTIONS
                                    ) -> Dict[float, Optional[float]]:
    """AP per IoU threshold (None where no ground-truth box is evaluated); arguments as below."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    all_tp, all_scores, num_gt = [], [], 0
    for prediction, target in zip(predictions, targets):
        boxes, scores = _prediction_arrays(prediction)
        gt_boxes = _target_array(target)
        if mgca_quirks and (len(gt_boxes) == 0 or len(boxes) == 0):
            continue
        order = np.argsort(-scores, kind="mergesort")[:max_detections]
        boxes, scores = boxes[order], scores[order]
        all_tp.append(match_image(boxes, gt_boxes, thresholds))
        all_scores.append(scores)
        num_gt += len(gt_boxes)
    is_tp = np.concatenate(all_tp, axis=1) if all_tp else np.zeros((len(thresholds), 0), dtype=bool)
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    aps = {}
    for t, threshold in enumerate(iou_thresholds):
        ap = interpolated_ap(is_tp[t], scores, num_gt)
        aps[float(threshold)] = None if ap < 0 else ap
    return aps


def mean_average_precision(predictions: Sequence, targets: Sequence,
                           iou_thresholds: Sequence[float] = IOU_THRESHOLDS, mgca_quirks: bool = False,
                           max_detections: int = MAX_DETECTIONS) -> Optional[float]:
    """Mean over ``iou_thresholds`` of the COCO-style AP of one class (E.2).

    Args:
        predictions: per image a (boxes (n, 4) xyxy, scores (n,)) pair or a dict with "boxes" and "scores"
            (tensors or arrays; as returned by ``CGNSForObjectDetection.decode``).
        targets: per image the ground-truth boxes (m, 4) xyxy, or a dict with "boxes"; m may be 0.
        mgca_quirks: skip images without ground truth and images without predictions (MGCA, E.2).
    Returns:
        mAP in [0, 1], or None when no ground-truth box is evaluated (undefined).
    """
    aps = average_precision_per_threshold(predictions, targets, iou_thresholds, mgca_quirks, max_detections)
    defined = [ap for ap in aps.values() if ap is not None]
    return float(np.mean(defined)) if defined else None


__all__ = ["IOU_THRESHOLDS", "mean_average_precision", "average_precision_per_threshold", "box_iou_xyxy",
           "match_image", "interpolated_ap"]
