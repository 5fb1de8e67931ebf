"""Downstream metrics: AUROC per class and macro, top-1 accuracy (docs/method.md E.1), and the
image-report retrieval metrics (Recall@k, median rank; docs/evaluation.md).

One implementation for every caller (the Trainer's ``compute_metrics``, the final test report,
the benchmark), built on scikit-learn so it runs offline (``evaluate.load("roc_auc")`` needs the Hub).

A class with no positive (or no negative) example in a split has no AUROC. It is reported as
``None`` with a warning that names the class, and the macro average runs over the classes that do
have one. Nothing here raises on such a split: with 1 % of the labels it is a normal event.
"""
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from sklearn.metrics import accuracy_score, roc_auc_score

MULTI_LABEL = "multi_label_classification"
SINGLE_LABEL = "single_label_classification"


class UndefinedMetricWarning(UserWarning):
    """A metric could not be computed on this split (e.g. a class without positives)."""


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def per_class_auroc(targets: np.ndarray, scores: np.ndarray, label_names: Optional[Sequence[str]] = None,
                    split: str = "evaluation") -> List[Optional[float]]:
    """AUROC of each column of ``scores`` (N, C) against binary ``targets`` (N, C).

    Returns C values; ``None`` (with an :class:`UndefinedMetricWarning`) for a class whose targets
    are all 0 or all 1 in this split.
    """
    targets = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
    scores = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    if targets.shape != scores.shape:
        raise ValueError(f"targets {targets.shape} and scores {scores.shape} must have the same shape (N, C)")
    names = list(label_names) if label_names is not None else [str(c) for c in range(targets.shape[1])]
    values: List[Optional[float]] = []
    for column, name in enumerate(names):
        positives = int(targets[:, column].sum())
        if positives == 0 or positives == len(targets):
            kind = "positive" if positives == 0 else "negative"
            warnings.warn(f"AUROC undefined for class {name!r} on the {split} split ({len(targets)} "
                          f"examples): no {kind} example; it is reported as None and left out of the "
                          f"macro average",
                          UndefinedMetricWarning, stacklevel=2)
            values.append(None)
        else:
            values.append(float(roc_auc_score(targets[:, column], scores[:, column])))
    return values


def macro_mean(values: Sequence[Optional[float]]) -> Optional[float]:
    """Mean over the defined values; ``None`` when none is defined."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def classification_metrics(logits: np.ndarray, labels: np.ndarray, problem_type: str,
                           label_names: Optional[Sequence[str]] = None, split: str = "evaluation") -> Dict:
    """All metrics of one split from raw logits.

    Args:
        logits: (N, C) head outputs.
        labels: (N, C) binary targets (multi-label / binary) or (N,) class indices (single-label).
        problem_type: ``"multi_label_classification"`` or ``"single_label_classification"``.
        label_names: C class names (keys of ``auroc_per_class``).

    Returns a dict with ``auroc`` (macro over the defined classes, or ``None``), ``auroc_per_class``
    (name -> value or ``None``), ``num_examples`` and, for single-label, ``accuracy`` (top-1) — there
    the per-class AUROC is one-vs-rest on the softmax probabilities.
    """
    logits = np.asarray(logits, dtype=np.float64)
    logits = logits.reshape(len(logits), -1)
    names = list(label_names) if label_names is not None else [str(c) for c in range(logits.shape[1])]
    if len(names) != logits.shape[1]:
        raise ValueError(f"{len(names)} label names for {logits.shape[1]} logit columns")
    result: Dict = {"num_examples": int(len(logits))}
    if problem_type == MULTI_LABEL:
        targets = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
        scores = sigmoid(logits)
    elif problem_type == SINGLE_LABEL:
        classes = np.asarray(labels).reshape(-1).astype(np.int64)
        targets = np.eye(logits.shape[1])[classes]
        scores = softmax(logits)
        result["accuracy"] = float(accuracy_score(classes, logits.argmax(axis=-1))) if len(classes) else None
    else:
        raise ValueError(f"problem_type must be {MULTI_LABEL!r} or {SINGLE_LABEL!r}, got {problem_type!r}")
    per_class = per_class_auroc(targets, scores, names, split=split)
    result["auroc"] = macro_mean(per_class)
    result["auroc_per_class"] = dict(zip(names, per_class))
    return result


def flat_numeric_metrics(metrics: Dict) -> Dict[str, float]:
    """``classification_metrics`` output -> the flat ``{name: float}`` a Trainer logs (``None`` left out)."""
    flat: Dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{name}": v for name, v in value.items() if v is not None})
        elif value is not None:
            flat[key] = float(value)
    return flat


RETRIEVAL_KS = (1, 5, 10)


def _as_float_tensor(embeds, name: str) -> torch.Tensor:
    embeds = torch.as_tensor(np.asarray(embeds) if not torch.is_tensor(embeds) else embeds).detach()
    if embeds.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {tuple(embeds.shape)}")
    embeds = embeds.to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(embeds).all():
        raise ValueError(f"{name} holds {int((~torch.isfinite(embeds)).sum())} non-finite values")
    return embeds


def ranks_of_true_pairs(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """1-based rank of key i among all keys for query i, by dot product: (N,) long.

    ``rank_i = 1 + #{j != i : s_ij >= s_ii}``: a key that ties the true pair counts as ranked ahead
    of it (ties broken against the true pair), so a constant similarity gives rank N, never 1.
    Computed in row chunks: memory ``chunk_size x N``, not ``N x N``.
    """
    n = len(queries)
    ranks = torch.empty(n, dtype=torch.long)
    for start in range(0, n, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, n))
        scores = queries[rows] @ keys.t()                                   # (c, N)
        true = scores[torch.arange(len(rows)), rows].unsqueeze(1)
        at_or_above = (scores >= true).sum(dim=1)                           # counts the true pair itself
        ranks[rows] = at_or_above
    return ranks


def retrieval_metrics(image_embeds, text_embeds, ks: Sequence[int] = RETRIEVAL_KS) -> Dict[str, float]:
    """Image->report and report->image retrieval over N pairs (row i of each input is one pair).

    Args:
        image_embeds: (N, D) image embeddings; text_embeds: (N, D) report embeddings (tensors or
            arrays). Similarity is the dot product, i.e. the cosine for L2-normalised inputs such as
            the ``pooler_output`` of ``CGNSModel.get_image_features`` / ``get_text_features``.
        ks: the cut-offs k of Recall@k.

    Returns ``{"i2t_R@k": ..., "t2i_R@k": ..., "i2t_median_rank": ..., "t2i_median_rank": ...}``:
    Recall@k is the fraction of queries whose true pair ranks within the top k; the median rank is
    the median (``numpy.median``, so the mean of the two middle ranks for even N) of the 1-based
    ranks. Ties are broken against the true pair (see :func:`ranks_of_true_pairs`).
    """
    images = _as_float_tensor(image_embeds, "image_embeds")
    texts = _as_float_tensor(text_embeds, "text_embeds")
    if images.shape != texts.shape:
        raise ValueError(f"image_embeds {tuple(images.shape)} and text_embeds {tuple(texts.shape)} must both be "
                         f"(N, D) with row i the same pair")
    if len(images) == 0:
        raise ValueError("retrieval needs at least one image-report pair, got 0")
    result: Dict[str, float] = {}
    for direction, queries, keys in (("i2t", images, texts), ("t2i", texts, images)):
        ranks = ranks_of_true_pairs(queries, keys).numpy()
        for k in ks:
            result[f"{direction}_R@{k}"] = float(np.mean(ranks <= k))
        result[f"{direction}_median_rank"] = float(np.median(ranks))
    return result


__all__ = [
    "UndefinedMetricWarning",
    "classification_metrics",
    "flat_numeric_metrics",
    "macro_mean",
    "per_class_auroc",
    "ranks_of_true_pairs",
    "retrieval_metrics",
    "RETRIEVAL_KS",
    "sigmoid",
    "softmax",
    "MULTI_LABEL",
    "SINGLE_LABEL",
]
