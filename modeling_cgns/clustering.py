"""Cross-modal online k-means (docs/method.md B.3 a-c, docs/deviations.md).

The centroids live in the space of the *image-to-text* cross-attended sentence features (z2);
the *text* sentence features (z1) are assigned to them to pick hard negatives (the second-nearest
centroid) and false negatives (anchors that share a cluster). Every step is a small pure function
with its hyper-parameters as arguments; :class:`CrossModalKMeans` only holds the state as buffers
(saved with the model, restored on resume, identical on every rank) and drives the steps.
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed

INIT_SOURCES = ("batch", "queue")
CLUSTER_FEATURES = ("cross", "text", "both")      # what the centroids are fitted to: z2 (reference), z1, both
CENTROID_UPDATES = ("momentum", "spherical")      # reference sum-momentum, or mini-batch spherical k-means
ASSIGNMENTS = ("argmax", "sinkhorn")              # nearest centroid (reference), or balanced (Sinkhorn-Knopp)
EMPTY_CLUSTER_POLICIES = ("reseed", "split")      # dead centroid <- a queued feature, or split the largest cluster

# --------------------------------------------------------------------------------------------------
# pure steps
# --------------------------------------------------------------------------------------------------

def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D) x (M, D) -> (N, M) cosine similarities."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()


def greedy_chain_init(features: torch.Tensor, num_clusters: int, first_index: int) -> torch.Tensor:
    """Centroid initialisation of B.3 step 1: a greedy farthest-point chain.

    Starts from ``features[first_index]``; each next centroid is the not-yet-chosen point that is
    *least* cosine-similar to the previously chosen one. Returns copies of K rows, (K, D).
    """
    n = features.shape[0]
    if n < num_clusters:
        raise ValueError(f"greedy_chain_init needs at least K={num_clusters} features, got {n}")
    normed = F.normalize(features, dim=-1)
    chosen = torch.zeros(n, dtype=torch.bool, device=features.device)
    order = [int(first_index)]
    chosen[first_index] = True
    for _ in range(num_clusters - 1):
        sims = normed @ normed[order[-1]]
        sims = sims.masked_fill(chosen, float("inf"))
        nxt = int(torch.argmin(sims))
        order.append(nxt)
        chosen[nxt] = True
    return features[torch.tensor(order, device=features.device)].clone()


def assign_to_centroids(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (by cosine) for every row of ``features``: (N,) long."""
    return cosine_similarity_matrix(features, centroids).argmax(dim=1)


def cluster_sums(features: torch.Tensor, assignments: torch.Tensor, num_clusters: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums S_k (K, D) and member counts (K,) of ``features`` under ``assignments``."""
    sums = features.new_zeros(num_clusters, features.shape[1])
    sums.index_add_(0, assignments, features)
    counts = torch.bincount(assignments, minlength=num_clusters).to(features.dtype)
    return sums, counts


def momentum_update(centroids: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, momentum: float) -> torch.Tensor:
    """B.3 a: ``m_k <- eta * S_k + (1 - eta) * m_k`` for clusters with members; empty ones unchanged.

    ``S_k`` is the *sum* of the members (as in the reference), centroids are not re-normalised.
    """
    updated = momentum * sums + (1.0 - momentum) * centroids
    return torch.where((counts > 0).unsqueeze(1), updated, centroids)


def spherical_update(centroids: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, totals: torch.Tensor,
                     decay: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mini-batch spherical k-means step (Sculley, WWW 2010, on the unit sphere): per centre,
    ``N_k <- decay * N_k + n_k``, ``m_k <- normalize(m_k + (n_k / N_k) (S_k / n_k - m_k))``, i.e. the centre
    moves to the running mean of every point it was given (``decay < 1`` forgets old points, so a
    centre follows features that drift during training). Centres without members are unchanged.

    Returns (centroids (K, D), totals N (K,)).
    """
    new_totals = decay * totals + counts
    has = counts > 0
    rate = torch.where(has, counts / new_totals.clamp(min=1e-12), torch.zeros_like(counts))
    means = sums / counts.clamp(min=1.0).unsqueeze(1)
    moved = F.normalize(centroids + rate.unsqueeze(1) * (means - centroids), dim=-1)
    return torch.where(has.unsqueeze(1), moved, centroids), new_totals


@torch.no_grad()
def sinkhorn_assignments(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignment of N points to K clusters by Sinkhorn-Knopp (as SwAV and MGCA do).

    ``scores`` (N, K) are cosines; the plan ``Q = exp(scores / epsilon)`` is rescaled in turn so every cluster
    gets the same total mass (1/K) and every point a total of 1/N, over the points of every process
    (the sums are all-reduced). Returns the plan scaled so each row sums to 1: (N, K); its argmax is the
    balanced hard assignment.
    """
    n_local, k = scores.shape
    total = scores.new_tensor([float(n_local)])
    distributed.all_reduce_sum(total)
    logits = scores.float() / epsilon
    # per-row max first: only ratios within a row matter after the row step, and this keeps exp finite
    q = torch.exp(logits - logits.max(dim=1, keepdim=True).values).t()       # (K, N)
    for _ in range(iterations):
        per_cluster = q.sum(dim=1, keepdim=True)
        distributed.all_reduce_sum(per_cluster)
        q = q / per_cluster.clamp(min=1e-30) / k
        q = q / q.sum(dim=0, keepdim=True).clamp(min=1e-30) / total
    return (q / q.sum(dim=0, keepdim=True).clamp(min=1e-30)).t()


def split_largest(centroids: torch.Tensor, sizes: torch.Tensor, empty: torch.Tensor, generator: torch.Generator,
                  noise: float = 1e-3) -> Tuple[torch.Tensor, torch.Tensor]:
    """Refill each empty cluster by splitting the currently largest one (faiss's rule): both halves get the
    largest centre moved by a small random vector in opposite directions (then normalised), and share its
    size. Returns (centroids, sizes) updated; the random vectors come from ``generator``."""
    centroids, sizes = centroids.clone(), sizes.clone()
    for e in empty.tolist():
        big = int(torch.argmax(sizes))
        direction = torch.randn(centroids.shape[1], generator=generator).to(centroids)
        direction = noise * F.normalize(direction, dim=0)
        base = centroids[big].clone()
        centroids[big] = F.normalize(base + direction, dim=0)
        centroids[e] = F.normalize(base - direction, dim=0)
        sizes[big] = sizes[big] / 2
        sizes[e] = sizes[big]
    return centroids, sizes


def nearest_two_centroids(anchors: torch.Tensor, centroids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(own cluster, hard-negative cluster) per anchor: the nearest and second-nearest centroid (B.3 b, c)."""
    top2 = cosine_similarity_matrix(anchors, centroids).topk(2, dim=1).indices
    return top2[:, 0], top2[:, 1]


def false_negative_mask(assignments: torch.Tensor) -> torch.Tensor:
    """B.3 c: ``F_ij = [a_i == a_j] * [i != j]`` as a bool (N, N) matrix, symmetric with zero diagonal."""
    same = assignments.unsqueeze(0) == assignments.unsqueeze(1)
    return same & ~torch.eye(assignments.shape[0], dtype=torch.bool, device=assignments.device)


FALSE_NEGATIVE_GATES = ("cluster", "centroid", "similarity")


def gated_false_negative_mask(anchors: torch.Tensor, assignments: torch.Tensor, centroids: torch.Tensor,
                              gate: str = "cluster", threshold: float = 0.9,
                              rows: Optional[slice] = None) -> torch.Tensor:
    """Which pairs (i, j) the loss treats as false negatives, (N, N) bool with a zero diagonal.

    ``anchors`` are the text sentence features z1 (N, D) and ``assignments`` their clusters.
    * ``"cluster"`` (reference): same cluster.
    * ``"centroid"``: same cluster and ``cos(z1_i, z1_j) > cos(z1_i, m_{a_i})``: j is closer to the anchor than
      the anchor's own centroid (the test ClusterNS left commented out, on the text features).
    * ``"similarity"``: same cluster and ``cos(z1_i, z1_j) >= threshold``.

    ``rows`` (a slice of anchors) gives only those rows of the mask, (R, N), e.g. to score a whole split in chunks.
    """
    rows = rows if rows is not None else slice(0, anchors.shape[0])
    row_ids = torch.arange(anchors.shape[0], device=anchors.device)[rows]
    mask = (assignments[rows].unsqueeze(1) == assignments.unsqueeze(0)) & \
        (row_ids.unsqueeze(1) != torch.arange(anchors.shape[0], device=anchors.device).unsqueeze(0))
    if gate == "cluster":
        return mask
    sims = cosine_similarity_matrix(anchors[rows], anchors)
    if gate == "centroid":
        own = (F.normalize(anchors[rows], dim=-1) * F.normalize(centroids[assignments[rows]], dim=-1)).sum(dim=-1)
        return mask & (sims > own.unsqueeze(1))
    if gate == "similarity":
        return mask & (sims >= threshold)
    raise ValueError(f"false_negative_gate must be one of {FALSE_NEGATIVE_GATES}, got {gate!r}")


def assignment_entropy(counts: torch.Tensor) -> float:
    """Entropy (nats) of the cluster-size distribution; log K when every cluster is equally used."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * p.log()).sum())


# --------------------------------------------------------------------------------------------------
# state holder
# --------------------------------------------------------------------------------------------------

class CrossModalKMeans(nn.Module):
    """Online k-means state over cross-modal sentence features, kept in buffers.

    * ``update(text_features, cross_features)`` — one online k-means step in training (the model calls it
      inside its forward, before the loss, or the training loop after the optimiser step; see
      ``CGNSConfig.cluster_update_timing``). Every call feeds a queue of recent cross-modal features.
      Before initialisation it initialises the centroids once the mean text/cross-modal cosine is at
      most ``init_threshold``: from exactly this call's (global) batch when it holds at least K
      features (``init_source="batch"``, the reference), otherwise — or always with
      ``init_source="queue"`` — from the queue once it holds K (so small batches never crash, G.5).
      Afterwards it assigns the features and applies the momentum update from per-cluster sums and
      counts all-reduced over processes, so every rank holds identical centroids. No-op (returns stats
      only) in eval mode, and for a batch with a non-finite feature (counted in ``skipped_nonfinite``).
    * ``reassign_dead()`` — re-seeds centroids without members for ``dead_patience`` updates from
      queued features (``dead_patience = 0`` disables it, the reference behaviour).
    * ``centroids`` is read by the cluster-guided text loss; ``None`` until initialised.
    """

    def __init__(self, num_clusters: int, dim: int, init_threshold: float = 0.4, momentum: float = 0.001,
                 queue_size: Optional[int] = None, dead_patience: int = 0, seed: int = 0, init_source: str = "batch",
                 features: str = "cross", update_rule: str = "momentum", assignment: str = "argmax",
                 empty_policy: str = "reseed", warmup_updates: int = 0, count_decay: float = 1.0,
                 sinkhorn_epsilon: float = 0.05, live_window: int = 10):
        super().__init__()
        for name, value, allowed in (("init_source", init_source, INIT_SOURCES), ("features", features, CLUSTER_FEATURES),
                                     ("update_rule", update_rule, CENTROID_UPDATES),
                                     ("assignment", assignment, ASSIGNMENTS),
                                     ("empty_policy", empty_policy, EMPTY_CLUSTER_POLICIES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.num_clusters = num_clusters
        self.init_source = init_source
        self.features = features
        self.update_rule = update_rule
        self.assignment = assignment
        self.empty_policy = empty_policy
        self.warmup_updates = int(warmup_updates)
        self.count_decay = float(count_decay)
        self.sinkhorn_epsilon = float(sinkhorn_epsilon)
        self.live_window = max(1, int(live_window))
        self.skipped_nonfinite = 0           # batches left out because a feature was NaN/inf (not saved)
        self.last_stats: Dict[str, float] = {}   # diagnostics of the latest update (read by the callbacks)
        self.init_threshold = init_threshold
        self.momentum = momentum
        self.dead_patience = dead_patience
        queue_size = queue_size if queue_size is not None else 2 * num_clusters
        if queue_size < num_clusters:
            raise ValueError(f"queue_size ({queue_size}) must be >= num_clusters ({num_clusters})")
        self.register_buffer("centroid_vectors", torch.zeros(num_clusters, dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_member_update", torch.zeros(num_clusters, dtype=torch.long))
        self.register_buffer("queue", torch.zeros(queue_size, dim))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.long))
        # points each centre has absorbed (decayed): the spherical update's per-centre rate, and the size the
        # "split" policy compares. Zeros in a checkpoint written before it existed (see CGNSModel.from_pretrained).
        self.register_buffer("cluster_sizes", torch.zeros(num_clusters))

    @property
    def centroids(self) -> Optional[torch.Tensor]:
        return self.centroid_vectors if bool(self.initialized) else None

    def _generator(self) -> torch.Generator:
        # A function of the saved state only, so a resumed run draws the same numbers.
        return torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(self.num_updates))

    def _enqueue(self, features: torch.Tensor) -> None:
        size = self.queue.shape[0]
        features = features[-size:]
        n = features.shape[0]
        idx = (int(self.queue_ptr) + torch.arange(n, device=features.device)) % size
        self.queue[idx] = features.to(self.queue.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % size)
        self.queue_count.fill_(min(size, int(self.queue_count) + n))

    def _queued(self) -> torch.Tensor:
        return self.queue[: int(self.queue_count)]

    def clustered(self, text_features: torch.Tensor, cross_features: torch.Tensor) -> torch.Tensor:
        """The features the centroids are fitted to: z2 ("cross", reference), z1 ("text") or both, stacked."""
        if self.features == "cross":
            return cross_features
        if self.features == "text":
            return text_features
        return torch.cat([text_features, cross_features])

    def _assign(self, features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        scores = cosine_similarity_matrix(features, centroids)
        if self.assignment == "sinkhorn":
            # every rank runs Sinkhorn (it all-reduces), also with no rows of its own
            return sinkhorn_assignments(scores, self.sinkhorn_epsilon).argmax(dim=1)
        return scores.argmax(dim=1)

    @torch.no_grad()
    def update(self, text_features: torch.Tensor, cross_features: torch.Tensor) -> Dict[str, float]:
        """One online k-means step on this rank's (N, D) sentence features; returns diagnostics."""
        text_features = F.normalize(text_features.detach().float(), dim=-1)
        cross_features = F.normalize(cross_features.detach().float(), dim=-1)
        if not self.training:
            return self.diagnostics(text_features, cross_features)

        # B.3 step 1 trigger: mean of cos(z1_i, z2_j) over all N^2 pairs of the global batch (every rank's
        # rows, cross-rank pairs included). For unit rows sum_ij z1_i.z2_j = (sum_i z1_i).(sum_j z2_j), so
        # all-reducing the two column sums gives the exact global mean, as on one process, in O(N D).
        # The last entry counts non-finite rows on every rank, so all ranks skip a bad batch together.
        nonfinite = (~torch.isfinite(text_features).all(dim=1)) | (~torch.isfinite(cross_features).all(dim=1))
        sim_stats = torch.cat([text_features.sum(dim=0), cross_features.sum(dim=0),
                               text_features.new_tensor([float(text_features.shape[0]), float(nonfinite.sum())])])
        distributed.all_reduce_sum(sim_stats)
        if float(sim_stats[-1]) > 0 or not bool(torch.isfinite(sim_stats).all()):
            # A NaN batch must not poison the centroids; the training loop stops on the NaN loss anyway.
            self.skipped_nonfinite += 1
            stats = {"initialized": float(bool(self.initialized)), "num_updates": float(self.num_updates),
                     "skipped_nonfinite": float(self.skipped_nonfinite)}
            self.last_stats = stats
            return stats
        dim = text_features.shape[1]
        total = float(sim_stats[-2])
        mean_similarity = (float(sim_stats[:dim] @ sim_stats[dim:2 * dim]) / total ** 2) if total > 0 else math.inf

        points = self.clustered(text_features, cross_features)
        if self.features == "both":
            # every rank's text rows, then every rank's cross-modal rows: the same order as on one process
            everyone = torch.cat([distributed.all_gather_variable(text_features),
                                  distributed.all_gather_variable(cross_features)])
        else:
            everyone = distributed.all_gather_variable(points)
        if bool(self.initialized):
            # k-means arithmetic in float32 whatever the buffers' dtype (a model cast to bf16 keeps working)
            centroids = self.centroid_vectors.float()
            assignments = self._assign(points, centroids)
            sums, counts = cluster_sums(points, assignments, self.num_clusters)
            distributed.all_reduce_sum(sums)
            distributed.all_reduce_sum(counts)
            if self.update_rule == "spherical":
                updated, sizes = spherical_update(centroids, sums, counts, self.cluster_sizes.float(), self.count_decay)
                self.centroid_vectors.copy_(updated)
                self.cluster_sizes.copy_(sizes)
            else:
                self.centroid_vectors.copy_(momentum_update(centroids, sums, counts, self.momentum))
                self.cluster_sizes.mul_(self.count_decay).add_(counts)
            self.last_member_update[counts > 0] = int(self.num_updates) + 1
        if everyone.shape[0]:
            self._enqueue(everyone)
        if (not bool(self.initialized) and mean_similarity <= self.init_threshold
                and int(self.num_updates) >= self.warmup_updates):
            # B.3 step 1: the reference chains over the triggering batch itself; a batch with fewer than
            # K features (an assertion in the reference, G.5) falls back to the queue, which ends with it.
            if self.init_source == "batch" and everyone.shape[0] >= self.num_clusters:
                pool = everyone
            elif int(self.queue_count) >= self.num_clusters:
                pool = self._queued()
            else:
                pool = None
            if pool is not None:
                first = int(torch.randint(pool.shape[0], (1,), generator=self._generator()))
                initial = greedy_chain_init(pool, self.num_clusters, first)
                if self.update_rule == "spherical":
                    initial = F.normalize(initial, dim=-1)
                self.centroid_vectors.copy_(initial)
                distributed.broadcast(self.centroid_vectors, src=0)
                self.cluster_sizes.fill_(1.0 if self.update_rule == "spherical" else 0.0)
                self.initialized.fill_(True)
                self.last_member_update.fill_(int(self.num_updates) + 1)
        self.num_updates += 1
        stats = self.diagnostics(text_features, cross_features)
        stats["mean_text_cross_similarity"] = mean_similarity
        if self.skipped_nonfinite:
            stats["skipped_nonfinite"] = float(self.skipped_nonfinite)
        self.last_stats = stats
        return stats

    @torch.no_grad()
    def dead_clusters(self) -> torch.Tensor:
        """Indices of centroids without members for at least ``dead_patience`` updates."""
        if self.dead_patience <= 0 or not bool(self.initialized):
            return torch.zeros(0, dtype=torch.long, device=self.centroid_vectors.device)
        idle = self.num_updates - self.last_member_update
        return torch.nonzero(idle >= self.dead_patience).flatten()

    @torch.no_grad()
    def reassign_dead(self) -> int:
        """Re-seed dead centroids (identical on every rank); returns how many. ``empty_policy="reseed"``: from
        random queued features; ``"split"``: split the largest clusters (``split_largest``)."""
        if not self.training:
            return 0
        dead = self.dead_clusters()
        if dead.numel() == 0:
            return 0
        if self.empty_policy == "split":
            sizes = self.cluster_sizes.float().clone()
            sizes[dead] = 0.0
            if float(sizes.max()) <= 0:
                return 0
            centroids, sizes = split_largest(self.centroid_vectors.float(), sizes, dead, self._generator())
            self.centroid_vectors.copy_(centroids)
            self.cluster_sizes.copy_(sizes)
            distributed.broadcast(self.centroid_vectors, src=0)
            self.last_member_update[dead] = self.num_updates
            return int(dead.numel())
        if int(self.queue_count) == 0:
            return 0
        queued = self._queued()
        # Distinct queued rows where possible: two centroids seeded with the same vector tie in every argmax,
        # so one of them could never win a member and would die again.
        generator = self._generator()
        if queued.shape[0] >= dead.numel():
            picks = torch.randperm(queued.shape[0], generator=generator)[: dead.numel()]
        else:
            picks = torch.randint(queued.shape[0], (dead.numel(),), generator=generator)
        picks = picks.to(queued.device)
        self.centroid_vectors[dead] = queued[picks]
        self.cluster_sizes[dead] = 1.0 if self.update_rule == "spherical" else 0.0
        distributed.broadcast(self.centroid_vectors, src=0)
        self.last_member_update[dead] = self.num_updates
        return int(dead.numel())

    @torch.no_grad()
    def diagnostics(self, text_features: torch.Tensor, cross_features: torch.Tensor) -> Dict[str, float]:
        """Empty clusters, assignment entropy, mean intra-cluster cosine, anchor/positive cluster agreement."""
        stats = {"initialized": float(bool(self.initialized)), "num_updates": float(self.num_updates)}
        # A rank without sentences must still join the all-reduces below (an early return would hang the
        # others), so only the global member count decides whether there is anything to report.
        if not bool(self.initialized):
            return stats
        centroids = self.centroid_vectors.float()
        points = self.clustered(text_features, cross_features)
        sims = cosine_similarity_matrix(points, centroids)
        assignments = sims.argmax(dim=1)
        counts = torch.bincount(assignments, minlength=self.num_clusters).float()
        distributed.all_reduce_sum(counts)
        text_assignments = assign_to_centroids(text_features, centroids)
        cross_assignments = assign_to_centroids(cross_features, centroids)
        agree = torch.stack([(text_assignments == cross_assignments).float().sum(),
                             counts.new_tensor(float(len(text_assignments)))])
        intra = torch.stack([sims.gather(1, assignments[:, None]).sum(), counts.new_tensor(float(len(assignments)))])
        distributed.all_reduce_sum(agree)
        distributed.all_reduce_sum(intra)
        if intra[1] == 0:
            return stats
        idle = self.num_updates - self.last_member_update
        stats.update({
            "empty_clusters": float((counts == 0).sum()),
            # a centre with a member in one of the last ``live_window`` updates
            "live_clusters": float((idle < self.live_window).sum()),
            "largest_cluster_share": float(counts.max() / counts.sum().clamp(min=1.0)),
            "assignment_entropy": assignment_entropy(counts),
            "intra_cluster_cosine": float(intra[0] / intra[1]),
            "anchor_positive_same_cluster": float(agree[0] / agree[1]),
        })
        return stats


__all__ = [
    "CrossModalKMeans",
    "INIT_SOURCES",
    "CLUSTER_FEATURES",
    "CENTROID_UPDATES",
    "ASSIGNMENTS",
    "EMPTY_CLUSTER_POLICIES",
    "FALSE_NEGATIVE_GATES",
    "spherical_update",
    "sinkhorn_assignments",
    "split_largest",
    "gated_false_negative_mask",
    "cosine_similarity_matrix",
    "greedy_chain_init",
    "assign_to_centroids",
    "cluster_sums",
    "momentum_update",
    "nearest_two_centroids",
    "false_negative_mask",
    "assignment_entropy",
]
