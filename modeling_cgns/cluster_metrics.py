"""How well the clustering finds false negatives, scored against sentence meanings (docs/clustering.md).

A *meaning* is what a sentence states, phrasing aside: for the synthetic data the generator's own tag
(finding(s) and polarity, e.g. ``"pleural_effusion+"``), for real reports the sentence labeller's
observations. Two different sentences with the same meaning are a *true false negative* pair: the
contrastive loss should not push them apart. The loss treats the pairs of its false-negative mask as
false negatives; these functions count how many of those pairs really share a meaning (precision), how
many same-meaning pairs the mask finds (recall), the base rate a random pair shares a meaning, and the
NMI of cluster assignments with meanings, in the manner of GloFND (Cai et al., ICML 2025), which scores
detected false negatives against labels.

Pairs are ordered ``(i, j)`` with ``i != j``; a sentence whose meaning is unknown (id ``-1``) takes
part in no pair. Everything is pure tensor arithmetic, so counts from several batches or processes add up.
"""
import hashlib
import math
from typing import Dict, Optional, Sequence

import torch

UNKNOWN = -1
PAIR_COUNT_NAMES = ("true_positive", "predicted", "actual", "total")


def meaning_id(meaning: Optional[str]) -> int:
    """A stable non-negative 62-bit id of a meaning string (the same on every machine and process);
    ``UNKNOWN`` (-1) for ``None`` or an empty string."""
    if not meaning:
        return UNKNOWN
    return int.from_bytes(hashlib.blake2b(meaning.encode("utf-8"), digest_size=8).digest(), "big") >> 2


def meaning_topic(meaning: Optional[str]) -> Optional[str]:
    """The finding(s) a meaning is about, polarity aside: ``"pneumothorax+"`` and ``"pneumothorax-"`` share
    the topic ``"pneumothorax"``; a meaning without a polarity mark (a statement such as ``"lungs_clear"``,
    or a sentence's normalised text) is its own topic. Side / zone / size suffixes (``"|left|..."``) are dropped."""
    if not meaning:
        return None
    items = [item.split("|")[0] for item in meaning.split(",")]
    return ",".join(sorted(item.rstrip("+-?") for item in items))


def pair_counts(mask: torch.Tensor, meanings: torch.Tensor, rows: Optional[slice] = None) -> torch.Tensor:
    """Counts (true positive, predicted, actual, total) of ordered pairs ``i != j`` between known meanings.

    Args:
        mask: (N, N) bool, the pairs treated as false negatives (the diagonal is ignored); with ``rows``, only
            those rows, (R, N), so a large split can be counted in chunks that add up.
        meanings: (N,) long meaning ids, ``UNKNOWN`` for none.
    Returns:
        float64 tensor (4,): pairs in the mask that share a meaning, pairs in the mask, pairs that share a
        meaning, all pairs.
    """
    n = meanings.shape[0]
    rows = rows if rows is not None else slice(0, n)
    row_ids = torch.arange(n, device=meanings.device)[rows]
    known = meanings != UNKNOWN
    not_self = row_ids.unsqueeze(1) != torch.arange(n, device=meanings.device).unsqueeze(0)
    valid = known[rows].unsqueeze(1) & known.unsqueeze(0) & not_self
    same = (meanings[rows].unsqueeze(1) == meanings.unsqueeze(0)) & valid
    predicted = mask.bool() & valid
    return torch.stack([(predicted & same).sum(), predicted.sum(), same.sum(), valid.sum()]).to(torch.float64)


def pair_counts_from_assignments(assignments: torch.Tensor, meanings: torch.Tensor) -> torch.Tensor:
    """``pair_counts`` of the mask "same cluster" without building the N x N mask (a contingency table):
    for a large split. ``assignments`` (N,) cluster ids >= 0."""
    known = meanings != UNKNOWN
    a, m = assignments[known].long(), meanings[known]
    n = a.shape[0]
    if n == 0:
        return torch.zeros(4, dtype=torch.float64)
    _, m_idx = torch.unique(m, return_inverse=True)
    _, a_idx = torch.unique(a, return_inverse=True)
    width = int(m_idx.max()) + 1
    joint = torch.bincount(a_idx * width + m_idx).to(torch.float64)
    by_cluster = torch.bincount(a_idx).to(torch.float64)
    by_meaning = torch.bincount(m_idx).to(torch.float64)

    def ordered(c):
        return (c * (c - 1)).sum()

    return torch.stack([ordered(joint), ordered(by_cluster), ordered(by_meaning),
                        torch.tensor(float(n * (n - 1)), dtype=torch.float64)])


def pair_scores(counts: torch.Tensor) -> Dict[str, float]:
    """Precision, recall, F1 and base rate from ``pair_counts`` (NaN where undefined: no predicted or no
    actual pairs); ``lift`` is precision over the base rate (1 = no better than chance)."""
    tp, predicted, actual, total = (float(c) for c in counts)
    precision = tp / predicted if predicted > 0 else math.nan
    recall = tp / actual if actual > 0 else math.nan
    if math.isnan(precision) or math.isnan(recall) or precision + recall == 0:
        f1 = 0.0 if (precision == 0 or recall == 0) else math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall)
    base_rate = actual / total if total > 0 else math.nan
    lift = precision / base_rate if base_rate and not math.isnan(precision) and base_rate > 0 else math.nan
    return {"precision": precision, "recall": recall, "f1": f1, "base_rate": base_rate, "lift": lift,
            "predicted_pairs": predicted, "actual_pairs": actual}


def normalized_mutual_information(labels_a: torch.Tensor, labels_b: torch.Tensor) -> float:
    """NMI of two labellings of the same items, normalised by the arithmetic mean of their entropies
    (scikit-learn's default); 1 for identical partitions, 0 for independent ones. Items with an
    ``UNKNOWN`` label in either are left out."""
    keep = (labels_a != UNKNOWN) & (labels_b != UNKNOWN)
    a, b = labels_a[keep], labels_b[keep]
    n = a.shape[0]
    if n == 0:
        return math.nan
    _, ai = torch.unique(a, return_inverse=True)
    _, bi = torch.unique(b, return_inverse=True)
    ka, kb = int(ai.max()) + 1, int(bi.max()) + 1
    joint = torch.bincount(ai * kb + bi, minlength=ka * kb).to(torch.float64).view(ka, kb) / n
    pa, pb = joint.sum(1), joint.sum(0)

    def entropy(p):
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    ha, hb = entropy(pa), entropy(pb)
    nz = joint > 0
    mi = float((joint[nz] * (joint[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum())
    if ha == 0 and hb == 0:
        return 1.0
    denom = (ha + hb) / 2
    return max(0.0, mi / denom) if denom > 0 else 0.0


def cluster_majority(assignments: torch.Tensor, meanings: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """(K,) the most frequent known meaning among each cluster's members (``UNKNOWN`` for a cluster
    without known members); ties go to the smallest meaning id."""
    majority = torch.full((num_clusters,), UNKNOWN, dtype=torch.long, device=meanings.device)
    known = meanings != UNKNOWN
    if not bool(known.any()):
        return majority
    a, m = assignments[known].long(), meanings[known]
    values, m_idx = torch.unique(m, return_inverse=True)
    width = values.shape[0]
    table = torch.bincount(a * width + m_idx, minlength=num_clusters * width).view(num_clusters, width)
    best = table.argmax(dim=1)        # first maximum = smallest meaning id among ties (values are sorted)
    has = table.sum(dim=1) > 0
    majority[has] = values[best[has]]
    return majority


def hard_negative_counts(own_cluster: torch.Tensor, hard_cluster: torch.Tensor, meanings: torch.Tensor,
                         topics: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Counts (scored anchors, hard negative of another meaning, ... of another meaning on the same topic).

    The hard negative of anchor i is the centroid of cluster ``hard_cluster[i]``; what it stands for is the
    majority meaning of that cluster's members (by ``own_cluster``) in the same batch. An anchor is scored
    when its meaning is known and its hard cluster has known members. "Same topic" (same finding, other
    polarity: ``meaning_topic``) is what a hard negative should be; another meaning on another topic is an
    easy, unrelated negative.
    """
    majority = cluster_majority(own_cluster, meanings, num_clusters)
    topic_majority = torch.full_like(majority, UNKNOWN)
    known = meanings != UNKNOWN
    if bool(known.any()):
        # the topic of a majority meaning, looked up through any member that carries that meaning
        for k in torch.nonzero(majority != UNKNOWN).flatten().tolist():
            member = torch.nonzero(meanings == majority[k]).flatten()[0]
            topic_majority[k] = topics[member]
    hm = majority[hard_cluster]
    scored = known & (hm != UNKNOWN)
    other = scored & (hm != meanings)
    related = other & (topic_majority[hard_cluster] == topics)
    return torch.stack([scored.sum(), other.sum(), related.sum()]).to(torch.float64)


def hard_negative_scores(counts: torch.Tensor) -> Dict[str, float]:
    """Shares from ``hard_negative_counts``: ``other_meaning`` (the hard negative means something else:
    it is a true negative) and ``same_topic`` (it is a true negative on the anchor's own finding)."""
    scored, other, related = (float(c) for c in counts)
    if scored <= 0:
        return {"other_meaning": math.nan, "same_topic": math.nan}
    return {"other_meaning": other / scored, "same_topic": related / scored}


__all__ = [
    "UNKNOWN",
    "PAIR_COUNT_NAMES",
    "meaning_id",
    "meaning_topic",
    "pair_counts",
    "pair_counts_from_assignments",
    "pair_scores",
    "normalized_mutual_information",
    "cluster_majority",
    "hard_negative_counts",
    "hard_negative_scores",
]
