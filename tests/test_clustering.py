"""Cross-modal online k-means (docs/method.md B.3 a-c, docs/deviations.md): known answers on
constructed inputs, the state holder's life cycle (deferred initialisation, checkpoint round trip,
eval mode, no gradient, dead clusters, diagnostics) and two real gloo processes."""
import math

import pytest
import torch
import torch.nn.functional as F
from gloo import run_on_ranks

from modeling_cgns.clustering import (
    CrossModalKMeans,
    assign_to_centroids,
    assignment_entropy,
    cluster_sums,
    false_negative_mask,
    greedy_chain_init,
    momentum_update,
    nearest_two_centroids,
)
from modeling_cgns.losses import cluster_guided_text_loss


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def _blobs(num_blobs=8, dim=32, per_blob=20, noise=0.05, seed=0):
    """Points around ``num_blobs`` fixed orthonormal directions (``seed`` only draws the points);
    returns (points, blob labels, directions)."""
    fixed = torch.Generator().manual_seed(1234)
    directions = torch.linalg.qr(torch.randn(dim, num_blobs, generator=fixed))[0].t()  # (K, D) orthonormal
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_blobs).repeat_interleave(per_blob)
    points = directions[labels] + noise * torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return points[perm], labels[perm], directions


def _buffers(module):
    return {name: buf.clone() for name, buf in module.named_buffers()}


def _initialised_on(rows, **kwargs):
    """A module whose K centroids are exactly ``rows`` (one batch of N = K rows: the chain takes them all)."""
    module = CrossModalKMeans(rows.shape[0], rows.shape[1], init_threshold=1.0, **kwargs)
    module.update(rows, rows)
    assert bool(module.initialized)
    return module


# --------------------------------------------------------------------------------------------------
# pure steps, known answers
# --------------------------------------------------------------------------------------------------

def test_greedy_chain_init_hand_example():
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.1], [0.1, -1.0], [0.7, 0.7]])
    # from p0=(1,0): cosines p1 0, p2 -0.995, p3 0.0995, p4 0.707 -> p2;
    # from p2: p1 0.0995, p3 -0.198, p4 -0.633 -> p4;  from p4: p1 0.707, p3 -0.633 -> p3;  then p1.
    centroids = greedy_chain_init(points, 5, first_index=0)
    assert torch.equal(centroids, points[[0, 2, 4, 3, 1]])
    assert torch.equal(greedy_chain_init(points, 3, first_index=1), points[[1, 3, 4]])
    centroids[0, 0] = 42.0                                    # copies, not views
    assert points[0, 0] == 1.0
    with pytest.raises(ValueError, match="at least K=6"):
        greedy_chain_init(points, 6, first_index=0)


def test_momentum_update_hand_example():
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    assignments = assign_to_centroids(features, centroids)
    assert assignments.tolist() == [0, 0, 1]            # (0.9, 0.1): cos 0.994 with m0, 0.781 with m2
    assert assign_to_centroids(torch.tensor([[0.8, 0.6]]), centroids).tolist() == [2]  # by cosine: 0.99 > 0.8
    sums, counts = cluster_sums(features, assignments, 3)
    assert torch.allclose(sums, torch.tensor([[1.9, 0.1], [0.0, 1.0], [0.0, 0.0]]))
    assert counts.tolist() == [2.0, 1.0, 0.0]
    updated = momentum_update(centroids, sums, counts, 0.1)
    # eta * S_k + (1 - eta) * m_k with the SUM S_k; the empty cluster 2 keeps its exact value
    assert torch.allclose(updated, torch.tensor([[1.09, 0.01], [0.0, 1.0], [1.0, 1.0]]))
    assert torch.equal(updated[2], centroids[2])


def test_momentum_update_through_module_matches_formula():
    g = torch.Generator().manual_seed(3)
    module = _initialised_on(F.normalize(torch.randn(6, 5, generator=g), dim=-1), momentum=0.25)
    before = module.centroid_vectors.clone()
    cross = torch.randn(4, 5, generator=g)              # 4 points, 6 clusters: at least 2 stay empty
    module.update(torch.randn(4, 5, generator=g), cross)
    unit = F.normalize(cross, dim=-1)
    own = (unit @ F.normalize(before, dim=-1).t()).argmax(dim=1)
    expected = before.clone()
    for k in range(6):
        members = unit[own == k]
        if len(members):
            expected[k] = 0.25 * members.sum(dim=0) + 0.75 * before[k]
    assert (torch.bincount(own, minlength=6) == 0).sum() >= 2
    assert torch.allclose(module.centroid_vectors, expected, atol=1e-6)
    empty = torch.bincount(own, minlength=6) == 0
    assert torch.equal(module.centroid_vectors[empty], before[empty])


def test_false_negative_mask_hand_example():
    mask = false_negative_mask(torch.tensor([2, 0, 2, 1, 0]))
    expected = torch.zeros(5, 5, dtype=torch.bool)
    for i, j in [(0, 2), (2, 0), (1, 4), (4, 1)]:
        expected[i, j] = True
    assert torch.equal(mask, expected)


def test_assignment_entropy_known_values():
    assert assignment_entropy(torch.full((16,), 3.0)) == pytest.approx(math.log(16))
    assert assignment_entropy(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(0.0)
    assert assignment_entropy(torch.tensor([1.0, 3.0, 0.0])) == pytest.approx(
        -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert assignment_entropy(torch.zeros(4)) == 0.0


def test_blobs_recovered_one_centroid_per_blob():
    """K = 8 orthonormal blobs, D = 32: after initialisation and a few updates the assignment is a bijection.

    The greedy chain only looks at the *previous* centroid, so on many points per blob it can pick
    two centroids in one blob; the initial batch here holds one point per blob (N = K), which the
    chain takes whole, and the momentum updates must then keep one centroid per blob.
    """
    points, labels, directions = _blobs()
    first = torch.stack([points[labels == k][0] for k in range(8)])
    module = CrossModalKMeans(8, 32, momentum=0.05)                  # reference threshold 0.4
    stats = module.update(first, first)
    assert stats["mean_text_cross_similarity"] == pytest.approx(1 / 8, abs=0.03)
    assert bool(module.initialized)
    for step in range(5):
        batch, _, _ = _blobs(seed=10 + step)
        module.update(batch, batch)
    text, text_labels, _ = _blobs(seed=99)
    own = assign_to_centroids(text, module.centroids)
    blob_to_centroid = {}
    for k in range(8):
        owners = own[text_labels == k].unique()
        assert owners.numel() == 1, f"blob {k} split over centroids {owners.tolist()}"
        blob_to_centroid[k] = int(owners)
    assert sorted(blob_to_centroid.values()) == list(range(8))          # bijection
    # the centroids moved to (the sum of) their blob's members: aligned with the blob direction
    aligned = F.normalize(module.centroids, dim=-1)[[blob_to_centroid[k] for k in range(8)]]
    assert (aligned * directions).sum(dim=1).min() > 0.99

    own_cluster, hard_cluster = nearest_two_centroids(text, module.centroids)
    assert torch.equal(own_cluster, own)
    assert (hard_cluster != own_cluster).all()
    expected_own = torch.tensor([blob_to_centroid[int(k)] for k in text_labels])
    assert torch.equal(own_cluster, expected_own)
    mask = false_negative_mask(own_cluster)
    assert torch.equal(mask, mask.t())
    assert not mask.diagonal().any()
    same_blob = text_labels[:, None] == text_labels[None, :]
    assert torch.equal(mask, same_blob & ~torch.eye(len(text_labels), dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# CrossModalKMeans life cycle
# --------------------------------------------------------------------------------------------------

def test_fewer_points_than_clusters_defers_initialisation():
    g = torch.Generator().manual_seed(0)
    module = CrossModalKMeans(8, 16, init_threshold=1.0)              # threshold always met
    seen = []
    for step in range(3):
        cross = torch.randn(3, 16, generator=g)
        seen.append(F.normalize(cross, dim=-1))
        stats = module.update(torch.randn(3, 16, generator=g), cross)
        assert stats["initialized"] == float(step == 2)                    # 3, 6 queued: wait; 9 >= K: start
        assert int(module.queue_count) == 3 * (step + 1)
    assert module.centroids is not None
    seen = torch.cat(seen)
    # every centroid is one of the queued features, all distinct
    distances = torch.cdist(module.centroids, seen)
    assert distances.min(dim=1).values.max() < 1e-6
    assert distances.argmin(dim=1).unique().numel() == 8


@pytest.mark.parametrize("threshold,initialises", [(0.25, False), (0.35, True)])
def test_initialisation_threshold(threshold, initialises):
    # every pair has cos(text_i, cross_j) = 0.3 exactly, so the mean is 0.3
    text = torch.zeros(5, 4)
    text[:, 0] = 1.0
    cross = torch.zeros(5, 4)
    cross[:, 0], cross[:, 1] = 0.3, math.sqrt(1 - 0.09)
    module = CrossModalKMeans(4, 4, init_threshold=threshold)
    stats = module.update(text, cross)
    assert stats["mean_text_cross_similarity"] == pytest.approx(0.3, abs=1e-6)
    assert bool(module.initialized) is initialises
    assert int(module.queue_count) == 5                                      # queued either way


def test_initialisation_waits_for_low_similarity():
    g = torch.Generator().manual_seed(1)
    e = torch.eye(8)
    module = CrossModalKMeans(4, 8)                                          # reference threshold 0.4
    same = e[0] + 0.01 * torch.randn(6, 8, generator=g)
    stats = module.update(same, same)                                        # mean cos ~ 1 > 0.4
    assert stats["mean_text_cross_similarity"] > 0.99 and not bool(module.initialized)
    text, cross = e[0] + 0.01 * torch.randn(6, 8, generator=g), e[1] + 0.01 * torch.randn(6, 8, generator=g)
    stats = module.update(text, cross)
    oracle = (F.normalize(text, dim=-1) @ F.normalize(cross, dim=-1).t()).mean()
    assert stats["mean_text_cross_similarity"] == pytest.approx(float(oracle), abs=1e-6)
    assert bool(module.initialized)


def _feature_stream(seed, steps=6, n=7, dim=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)) for _ in range(steps)]


def test_state_dict_round_trip_continues_identically():
    kwargs = dict(num_clusters=4, dim=8, init_threshold=1.0, momentum=0.2, dead_patience=1, seed=5)
    original = CrossModalKMeans(**kwargs)
    stream = _feature_stream(0)
    for text, cross in stream[:3]:
        original.update(text, cross)
        original.reassign_dead()
    restored = CrossModalKMeans(**kwargs)
    assert restored.centroids is None
    restored.load_state_dict(original.state_dict())
    for text, cross in stream[3:]:
        loss_a, parts_a = cluster_guided_text_loss(text, cross, original.centroids)
        loss_b, parts_b = cluster_guided_text_loss(text, cross, restored.centroids)
        assert torch.equal(loss_a, loss_b) and torch.equal(parts_a["bml"], parts_b["bml"])
        assert original.update(text, cross) == restored.update(text, cross)
        assert original.reassign_dead() == restored.reassign_dead()
        for (name, a), (_, b) in zip(original.named_buffers(), restored.named_buffers()):
            assert torch.equal(a, b), name
    # the comparison is not vacuous: the state moved during the continued updates
    assert int(original.num_updates) == 6


@pytest.mark.parametrize("initialise_first", [False, True])
def test_eval_mode_leaves_every_buffer_bit_identical(initialise_first):
    module = CrossModalKMeans(4, 8, init_threshold=1.0, dead_patience=1)
    if initialise_first:
        for text, cross in _feature_stream(1, steps=2):
            module.update(text, cross)
    module.eval()
    before = _buffers(module)
    for text, cross in _feature_stream(2, steps=3):
        stats = module.update(text, cross)
        assert module.reassign_dead() == 0
    assert stats["initialized"] == float(initialise_first)
    for name, buf in module.named_buffers():
        assert torch.equal(buf, before[name]), name
    module.train()
    module.update(*_feature_stream(3, steps=1)[0])
    assert not torch.equal(module.num_updates, before["num_updates"])      # training mode does update


def test_updates_carry_no_gradient():
    module = CrossModalKMeans(4, 8, init_threshold=1.0, dead_patience=1)
    projection = torch.nn.Linear(8, 8)
    for text, cross in _feature_stream(4, steps=4):
        module.update(projection(text), projection(cross))                  # inputs require grad
        module.reassign_dead()
    assert bool(module.initialized)
    for name, buf in module.named_buffers():
        assert buf.grad_fn is None and not buf.requires_grad, name
    assert projection.weight.grad is None


# --------------------------------------------------------------------------------------------------
# dead clusters
# --------------------------------------------------------------------------------------------------

def _starve_last_axis(module, updates):
    """Feed points around e0, e1, e2 only, so the centroid at e3 never gets a member."""
    g = torch.Generator().manual_seed(7)
    e = torch.eye(8)
    for _ in range(updates):
        batch = e[:3] + 0.01 * torch.randn(3, 8, generator=g)
        module.update(batch, batch)


def test_dead_cluster_reseeded_after_patience():
    module = _initialised_on(torch.eye(8)[:4], dead_patience=2, momentum=0.5)
    starved = int(assign_to_centroids(torch.eye(8)[3:4], module.centroids))
    _starve_last_axis(module, 1)
    assert module.dead_clusters().numel() == 0 and module.reassign_dead() == 0
    _starve_last_axis(module, 1)                                             # two updates without members
    assert module.dead_clusters().tolist() == [starved]
    before = module.centroid_vectors.clone()
    assert module.reassign_dead() == 1
    reseeded = module.centroid_vectors[starved]
    queued = module.queue[: int(module.queue_count)]
    assert (queued == reseeded).all(dim=1).any()                            # a queued feature
    others = torch.arange(4) != starved
    assert torch.equal(module.centroid_vectors[others], before[others])
    assert int(module.last_member_update[starved]) == int(module.num_updates)
    assert module.dead_clusters().numel() == 0                               # patience restarts


def test_dead_cluster_patience_zero_changes_nothing():
    module = _initialised_on(torch.eye(8)[:4], dead_patience=0, momentum=0.5)
    starved = int(assign_to_centroids(torch.eye(8)[3:4], module.centroids))
    _starve_last_axis(module, 5)
    before = _buffers(module)
    assert module.dead_clusters().numel() == 0
    assert module.reassign_dead() == 0
    for name, buf in module.named_buffers():
        assert torch.equal(buf, before[name]), name
    assert torch.equal(module.centroid_vectors[starved], torch.eye(8)[3])    # empty cluster never moved


def test_reassign_dead_picks_distinct_features():
    # seed 2: three independent draws from the 8 queued rows would repeat one (rows 1, 6, 6)
    module = _initialised_on(torch.eye(8)[:4], dead_patience=1, momentum=0.5, seed=2)
    g = torch.Generator().manual_seed(8)
    batch = torch.eye(8)[0] + 0.01 * torch.randn(5, 8, generator=g)          # only cluster e0 gets members
    module.update(batch, batch)
    assert module.dead_clusters().numel() == 3
    assert module.reassign_dead() == 3
    # three distinct queued rows: duplicates would tie in every argmax and one of them could never win
    assert torch.unique(module.centroid_vectors, dim=0).shape[0] == 4


# --------------------------------------------------------------------------------------------------
# diagnostics
# --------------------------------------------------------------------------------------------------

def test_diagnostics_uniform_use():
    e = torch.eye(6)[:4]
    module = _initialised_on(e)
    stats = module.diagnostics(e, e)
    assert stats["empty_clusters"] == 0.0
    assert stats["assignment_entropy"] == pytest.approx(math.log(4))
    assert stats["intra_cluster_cosine"] == pytest.approx(1.0)
    assert stats["anchor_positive_same_cluster"] == pytest.approx(1.0)


def test_diagnostics_constructed_example():
    e = torch.eye(6)
    module = _initialised_on(e[:4])
    tilted = F.normalize(e[1] + 0.5 * e[0], dim=0)          # cos 0.894 with e1, 0.447 with e0 -> cluster e1
    cross = torch.stack([e[0], e[0], tilted])               # clusters e0, e0, e1; e2 and e3 empty
    text = torch.stack([e[0], e[1], e[1]])                  # clusters e0, e1, e1: agree with cross on 0 and 2
    module.eval()                                            # diagnostics only, no update
    stats = module.update(text, cross)
    assert stats["empty_clusters"] == 2.0
    assert stats["assignment_entropy"] == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert stats["intra_cluster_cosine"] == pytest.approx((1 + 1 + 2 / math.sqrt(5)) / 3, abs=1e-6)
    assert stats["anchor_positive_same_cluster"] == pytest.approx(2 / 3)
    module.train()
    stats = module.update(text, cross)
    # mean over all 9 pairs: row e0 -> 1 + 1 + 0.447, rows e1 -> 0.894 each
    expected = (2 + 1 / math.sqrt(5) + 2 * 2 / math.sqrt(5)) / 9
    assert stats["mean_text_cross_similarity"] == pytest.approx(expected, abs=1e-6)


def test_diagnostics_before_initialisation():
    module = CrossModalKMeans(4, 8)
    stats = module.update(torch.randn(2, 8), torch.randn(2, 8))
    assert stats["initialized"] == 0.0 and "empty_clusters" not in stats
    assert "mean_text_cross_similarity" in stats


# --------------------------------------------------------------------------------------------------
# two gloo processes
# --------------------------------------------------------------------------------------------------

# per-step (rank 0 rows, rank 1 rows): uneven, one rank empty once, initialisation after step 2
RANK_SIZES = [(2, 1), (3, 2), (1, 4), (0, 3), (5, 2), (2, 6), (4, 4)]


def _kmeans_stream():
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(a + b, 8, generator=g), torch.randn(a + b, 8, generator=g)) for a, b in RANK_SIZES]


def _kmeans_module():
    return CrossModalKMeans(4, 8, init_threshold=0.5, momentum=0.3, queue_size=6, dead_patience=1, seed=2)


def _run_kmeans(module, stream, rank=0, world=1):
    """Update + reassign_dead on each step; returns per-step (buffers, stats)."""
    history = []
    for (text, cross), sizes in zip(stream, RANK_SIZES):
        lo = sum(sizes[:rank]) if world > 1 else 0
        hi = lo + sizes[rank] if world > 1 else sum(sizes)
        stats = module.update(text[lo:hi], cross[lo:hi])
        stats["reassigned"] = module.reassign_dead()
        history.append((_buffers(module), stats))
    return history


def _kmeans_on_rank(rank, world):
    return _run_kmeans(_kmeans_module(), _kmeans_stream(), rank, world)


@pytest.mark.distributed
def test_two_process_kmeans_matches_single_process():
    ranks = run_on_ranks(_kmeans_on_rank, 2)
    single = _run_kmeans(_kmeans_module(), _kmeans_stream())
    assert [s["initialized"] for _, s in single] == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert sum(s["reassigned"] for _, s in single) > 0                     # the re-seeding path ran too
    for step, ((buf0, stats0), (buf1, stats1), (buf_single, stats_single)) in enumerate(zip(*ranks, single)):
        for name in buf_single:
            assert torch.equal(buf0[name], buf1[name]), (step, name)      # identical on both ranks
            assert torch.allclose(buf0[name].double(), buf_single[name].double(), atol=1e-6), (step, name)
        for key in ("initialized", "mean_text_cross_similarity", "empty_clusters", "assignment_entropy",
                    "reassigned"):
            if key in stats_single:
                assert stats0[key] == stats1[key] == pytest.approx(stats_single[key], abs=1e-6), (step, key)


def test_module_cast_to_bfloat16_keeps_working():
    """A model cast with ``.to(torch.bfloat16)`` casts these buffers too; the k-means math stays float32."""
    module = CrossModalKMeans(4, 8, init_threshold=1.0).to(torch.bfloat16)
    for text, cross in _feature_stream(5, steps=3):
        stats = module.update(text.bfloat16(), cross.bfloat16())
    assert stats["initialized"] == 1.0 and module.centroids.dtype == torch.bfloat16
    text, cross = _feature_stream(6, steps=1)[0]
    loss, _ = cluster_guided_text_loss(text, cross, module.centroids)      # float32 features, bf16 centroids
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
