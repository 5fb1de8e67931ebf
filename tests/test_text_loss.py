"""Cluster-guided local text loss L_lt (docs/method.md B.3 b-f, docs/deviations.md) and the global
InfoNCE across two gloo processes (B.1): hand-computed known answers, parity of the vectorised loss
with a per-anchor loop oracle in value and gradient, and the DDP gradient convention."""

import pytest
import torch
import torch.nn.functional as F
from gloo import run_on_ranks

from modeling_cgns.losses import (
    bidirectional_margin_loss,
    cluster_guided_text_loss,
    global_contrastive_loss,
    hard_negative_logits,
    sentence_infonce,
)


# --------------------------------------------------------------------------------------------------
# known answers
# --------------------------------------------------------------------------------------------------

def test_bml_hand_computed_4x4():
    similarity = torch.tensor([[0.9, 0.8, 0.1, 0.3],
                               [0.2, 0.5, 0.6, 0.0],
                               [0.4, 0.1, 0.7, 0.9],
                               [0.0, 0.3, 0.0, 0.6]], requires_grad=True)
    mask = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    # alpha 0.2, beta 0.5; D_ij = C_ij - C_ii on the four masked pairs:
    #   (0,1): -0.1 -> relu(0.1) + relu(-0.4) = 0.1      (too close to the positive)
    #   (1,0): -0.3 -> relu(-0.1) + relu(-0.2) = 0       (inside the band)
    #   (2,3): +0.2 -> relu(0.4) + relu(-0.7) = 0.4      (above the positive)
    #   (3,2): -0.6 -> relu(-0.4) + relu(0.1) = 0.1      (too far below)
    # the 12 unmasked entries add alpha = 0.2 each: (0.6 + 2.4) / 16 = 0.1875
    loss = bidirectional_margin_loss(similarity, mask, alpha=0.2, beta=0.5)
    assert loss.item() == pytest.approx(0.1875, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, similarity)
    expected = torch.zeros(4, 4)
    expected[0, 1], expected[0, 0] = 1 / 16, -1 / 16       # relu(D + alpha) active: +dC_ij, -dC_ii
    expected[2, 3], expected[2, 2] = 1 / 16, -1 / 16
    expected[3, 2], expected[3, 3] = -1 / 16, 1 / 16       # relu(-D - beta) active: -dC_ij, +dC_ii
    assert torch.allclose(grad, expected)


COS_POS = [[0.5, 0.1, -0.2], [0.3, 0.6, 0.0], [-0.1, 0.2, 0.4]]
COS_HARD = [[0.2, 0.1, 0.3], [0.0, 0.4, -0.3], [0.5, -0.2, 0.1]]


def test_additive_hard_negative_logits_hand_built():
    logits = hard_negative_logits(torch.tensor(COS_POS), torch.tensor(COS_HARD), temperature=0.5,
                                  mode="additive", weight=3.0)
    # [C | G] / 0.5, plus w = 3 on the anchor's own hard negative (column N + i)
    expected = torch.tensor([[1.0, 0.2, -0.4, 3.4, 0.2, 0.6],
                             [0.6, 1.2, 0.0, 0.0, 3.8, -0.6],
                             [-0.2, 0.4, 0.8, 1.0, -0.4, 3.2]])
    assert torch.allclose(logits, expected, atol=1e-6)


def test_reference_hard_negative_logits_hand_built():
    logits = hard_negative_logits(torch.tensor(COS_POS), torch.tensor(COS_HARD), temperature=0.5,
                                  mode="reference", weight=3.0)
    # [C | G] * W / 0.5 with W = 1 on C, 3 on diag(G), 0 elsewhere: the zeros stay in the softmax
    expected = torch.tensor([[1.0, 0.2, -0.4, 1.2, 0.0, 0.0],
                             [0.6, 1.2, 0.0, 0.0, 2.4, 0.0],
                             [-0.2, 0.4, 0.8, 0.0, 0.0, 0.6]])
    assert torch.allclose(logits, expected, atol=1e-6)
    with pytest.raises(ValueError, match="hard_negative_mode"):
        hard_negative_logits(torch.tensor(COS_POS), torch.tensor(COS_HARD), 1.0, "multiplicative", 3.0)


@pytest.mark.parametrize("temperature", [1.0, 0.07])
def test_without_centroids_the_loss_is_plain_infonce(temperature):
    g = torch.Generator().manual_seed(0)
    text, cross = torch.randn(9, 16, generator=g), torch.randn(9, 16, generator=g)
    loss, parts = cluster_guided_text_loss(text, cross, None, temperature=temperature)
    logits = F.normalize(text, dim=-1) @ F.normalize(cross, dim=-1).t() / temperature
    expected = F.cross_entropy(logits, torch.arange(9))
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(sentence_infonce(text, cross, temperature), expected, atol=1e-6)
    assert parts["bml"].item() == 0.0
    # and clustering changes it: the comparison above is not vacuous
    centroids = torch.randn(4, 16, generator=g)
    clustered, _ = cluster_guided_text_loss(text, cross, centroids, temperature=temperature)
    assert not torch.allclose(clustered, expected)


def test_identity_similarity_gives_small_loss():
    anchors = torch.eye(6) * 5.0
    loss, _ = cluster_guided_text_loss(anchors, anchors, None, temperature=0.05)
    assert loss.item() < 1e-6


def _false_negative_example():
    """4 anchors near centroids e0, e0, e1, e2 (K = 3, D = 4): one false-negative pair (0, 1)."""
    e = torch.eye(4)
    centroids = e[:3] * torch.tensor([[2.0], [0.5], [1.0]])          # norms do not matter, only cosines
    text = torch.stack([e[0] + 0.2 * e[3] + 0.1 * e[2], e[0] - 0.1 * e[1],
                        e[1] + 0.3 * e[2], e[2] + 0.1 * e[0]])
    cross = torch.stack([e[0] + 0.5 * e[1], e[3] + 0.4 * e[0], e[1] - 0.5 * e[3], e[2] + 0.2 * e[1]])
    return text, cross, centroids


@pytest.mark.parametrize("mode", ["additive", "reference"])
def test_remove_false_negatives_drops_exactly_the_masked_logits(mode):
    text, cross, centroids = _false_negative_example()
    z1, z2 = F.normalize(text, dim=-1), F.normalize(cross, dim=-1)
    # own clusters [0, 0, 1, 2]; second-nearest centroids (hard negatives) [2, 2, 2, 0]
    unit_centroids = F.normalize(centroids, dim=-1)
    hard = torch.tensor([2, 2, 2, 0])
    top2 = (z1 @ unit_centroids.t()).topk(2, dim=1).indices
    assert torch.equal(top2, torch.tensor([[0, 2], [0, 2], [1, 2], [2, 0]]))
    logits = hard_negative_logits(z1 @ z2.t(), z1 @ unit_centroids[hard].t(), 0.5, mode, 3.0)
    kept = torch.ones_like(logits, dtype=torch.bool)
    kept[0, 1] = kept[1, 0] = False                                  # the only same-cluster pairs
    if mode == "additive":
        # a hard-negative column whose centroid is the row's own cluster is no negative: anchors 0-2's hard negative
        # is centroid 2 (anchor 3's cluster), anchor 3's is centroid 0 (anchors 0 and 1's)
        kept[3, 4:7] = False
        kept[0, 7] = kept[1, 7] = False
    expected = torch.stack([torch.logsumexp(logits[i][kept[i]], 0) - logits[i, i] for i in range(4)]).mean()
    kwargs = dict(temperature=0.5, hard_negative_mode=mode, bml_weight=0.0)
    loss, _ = cluster_guided_text_loss(text, cross, centroids, remove_false_negatives=True, **kwargs)
    assert torch.allclose(loss, expected, atol=1e-6)
    kept_all = torch.stack([torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(4)]).mean()
    loss_all, _ = cluster_guided_text_loss(text, cross, centroids, remove_false_negatives=False, **kwargs)
    assert torch.allclose(loss_all, kept_all, atol=1e-6)
    assert loss.item() < loss_all.item()                             # fewer terms in two denominators


def test_bml_weight_and_parts():
    text, cross, centroids = _false_negative_example()
    loss, parts = cluster_guided_text_loss(text, cross, centroids, bml_weight=0.5)
    assert torch.allclose(loss, parts["infonce"] + 0.5 * parts["bml"])
    z1, z2 = F.normalize(text, dim=-1), F.normalize(cross, dim=-1)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = True
    assert torch.allclose(parts["bml"], bidirectional_margin_loss(z1 @ z2.t(), mask, 0.2, 0.5))


def test_hard_negatives_carry_no_gradient_into_centroids():
    text, cross, centroids = _false_negative_example()
    centroids = centroids.clone().requires_grad_(True)
    text.requires_grad_(True)
    loss, _ = cluster_guided_text_loss(text, cross, centroids)
    loss.backward()
    assert centroids.grad is None and text.grad is not None


# --------------------------------------------------------------------------------------------------
# parity with a per-anchor loop oracle
# --------------------------------------------------------------------------------------------------

def loop_cluster_guided_text_loss(text, cross, centroids, temperature, mode, weight, remove_false_negatives,
                                  alpha, beta, bml_weight):
    """B.3 b-f literally, one anchor and one scalar at a time."""
    n = text.shape[0]
    z1 = [text[i] / text[i].norm() for i in range(n)]
    z2 = [cross[j] / cross[j].norm() for j in range(n)]
    unit_centroids = [c / c.norm() for c in centroids.detach()]
    own, hard = [], []
    for i in range(n):
        scores = [float(z1[i].detach() @ c) for c in unit_centroids]
        ranked = sorted(range(len(scores)), key=lambda k: -scores[k])
        own.append(ranked[0])
        hard.append(ranked[1])
    cos = [[z1[i] @ z2[j] for j in range(n)] for i in range(n)]
    cos_hard = [[z1[i] @ unit_centroids[hard[j]] for j in range(n)] for i in range(n)]
    zero = text.new_zeros(())
    terms = []
    for i in range(n):
        row = []
        for j in range(n):
            if remove_false_negatives and i != j and own[i] == own[j]:
                continue
            row.append(cos[i][j] / temperature)
        for j in range(n):
            if mode == "additive":
                if remove_false_negatives and hard[j] == own[i]:
                    continue                                   # the row's own centroid is no negative
                row.append(cos_hard[i][j] / temperature + (weight if j == i else 0.0))
            else:
                row.append(weight * cos_hard[i][i] / temperature if j == i else zero)
        log_softmax_positive = cos[i][i] / temperature - torch.logsumexp(torch.stack(row), dim=0)
        terms.append(-log_softmax_positive)
    infonce = torch.stack(terms).mean()
    bml = zero
    for i in range(n):
        for j in range(n):
            delta = cos[i][j] - cos[i][i] if (i != j and own[i] == own[j]) else zero
            bml = bml + torch.relu(delta + alpha) + torch.relu(-delta - beta)
    bml = bml / (n * n)
    return infonce + bml_weight * bml, bml


@pytest.mark.parametrize("mode", ["additive", "reference"])
@pytest.mark.parametrize("remove_false_negatives", [False, True])
def test_vectorised_loss_matches_loop_oracle(mode, remove_false_negatives):
    g = torch.Generator().manual_seed(1 + 2 * remove_false_negatives + (mode == "reference"))
    n, dim, k = 12, 16, 4
    text = torch.randn(n, dim, generator=g, dtype=torch.float64, requires_grad=True)
    cross = (text.detach() + torch.randn(n, dim, generator=g, dtype=torch.float64)).requires_grad_(True)
    centroids = torch.randn(k, dim, generator=g, dtype=torch.float64)
    # a large BML weight so its gradient is visible next to the InfoNCE one
    kwargs = dict(temperature=0.3, hard_negative_weight=3.0, remove_false_negatives=remove_false_negatives,
                  bml_alpha=0.2, bml_beta=0.5, bml_weight=0.7)
    loss, parts = cluster_guided_text_loss(text, cross, centroids, hard_negative_mode=mode, **kwargs)
    oracle, oracle_bml = loop_cluster_guided_text_loss(
        text, cross, centroids, 0.3, mode, 3.0, remove_false_negatives, 0.2, 0.5, 0.7)
    own = (F.normalize(text, dim=-1) @ F.normalize(centroids, dim=-1).t()).argmax(dim=1)
    assert (own[:, None] == own[None, :]).sum() > n                  # false negatives exist
    assert abs(parts["bml"].item() - 0.2) > 1e-4                      # some masked pair is off its band edge
    assert torch.allclose(loss, oracle, atol=1e-10, rtol=1e-10)
    assert torch.allclose(parts["bml"], oracle_bml, atol=1e-10, rtol=1e-10)
    grads = torch.autograd.grad(loss, (text, cross))
    oracle_grads = torch.autograd.grad(oracle, (text, cross))
    for grad, oracle_grad in zip(grads, oracle_grads):
        assert grad.abs().max() > 0
        assert torch.allclose(grad, oracle_grad, atol=1e-10, rtol=1e-8)


# --------------------------------------------------------------------------------------------------
# global InfoNCE on two gloo processes
# --------------------------------------------------------------------------------------------------

WORLD, PER_RANK, DIM = 2, 4, 8


def _global_inputs():
    g = torch.Generator().manual_seed(21)
    image = F.normalize(torch.randn(WORLD * PER_RANK, DIM, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(image + torch.randn(WORLD * PER_RANK, DIM, generator=g, dtype=torch.float64), dim=-1)
    return image, text


def _global_loss_and_grads(image, text, scale):
    """Leaves requiring grad -> (loss, d loss / d image, d loss / d text, d loss / d scale)."""
    image, text = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    scale = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    loss, _, _, labels = global_contrastive_loss(image, text, scale)
    return (loss.detach(), *torch.autograd.grad(loss, (image, text, scale)), labels)


def _global_loss_on_rank(rank, world):
    import warnings

    image, text = _global_inputs()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _global_loss_and_grads(image[rows], text[rows], 10.0)
    # the gather uses torch's current collective, not a deprecated alias (a FutureWarning on every rank)
    future = sum(issubclass(w.category, FutureWarning) for w in caught)
    return (*result, torch.tensor(future))


@pytest.mark.distributed
def test_two_process_global_loss_matches_full_batch():
    """DDP convention with gather-with-grad (B.1).

    Rank r's loss L_r is the mean over its own B rows against all W*B columns, so the full-batch loss
    is L = (1/W) sum_r L_r. In rank r's backward the gather routes every rank's d L_r' / d x_r back to
    rank r and sums them (reduce-scatter), so the gradient on rank r's rows is
    sum_r' d L_r' / d x_r = W * d L / d x_r: W times the full-batch gradient slice. The logit scale is
    replicated, not gathered, so each rank sees only d L_r / d s, and DDP's *average* over ranks gives
    d L / d s. Parameters upstream of the embeddings are likewise averaged by DDP, which turns the
    per-rank W * dL/dx_r into exactly the full-batch parameter gradient.
    """
    ranks = run_on_ranks(_global_loss_on_rank, WORLD)
    image, text = _global_inputs()
    full_loss, full_image_grad, full_text_grad, full_scale_grad, full_labels = _global_loss_and_grads(
        image, text, 10.0)
    assert full_labels.tolist() == list(range(WORLD * PER_RANK))
    assert torch.allclose(torch.stack([r[0] for r in ranks]).mean(), full_loss, atol=1e-12)
    assert not torch.allclose(ranks[0][0], ranks[1][0])              # the per-rank losses do differ
    assert [int(r[5]) for r in ranks] == [0] * WORLD
    for rank, (_, image_grad, text_grad, scale_grad, labels, _) in enumerate(ranks):
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        assert labels.tolist() == list(range(rank * PER_RANK, (rank + 1) * PER_RANK))     # global-rank offset
        assert torch.allclose(image_grad, WORLD * full_image_grad[rows], atol=1e-12)
        assert torch.allclose(text_grad, WORLD * full_text_grad[rows], atol=1e-12)
    assert torch.allclose(torch.stack([r[3] for r in ranks]).mean(), full_scale_grad, atol=1e-12)
