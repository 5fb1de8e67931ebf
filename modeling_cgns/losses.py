"""The CGNS objective as pure functions on tensors (docs/method.md section B).

Each function cites the equation it implements. The model computes features; these functions
turn features into named losses, so they can be tested against slow loop oracles in isolation.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import distributed
from .clustering import gated_false_negative_mask, nearest_two_centroids


def global_contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric image-report InfoNCE, L_g (B.1), over the batch of every process.

    Args:
        image_embeds, text_embeds: (B, D), L2-normalised, this process's batch (B equal on all ranks).
        logit_scale: scalar, the already exponentiated (and clamped) inverse temperature.
    Returns:
        loss, logits_per_image (B, B_world), logits_per_text (B, B_world), labels (B,) = rank * B + arange(B).
    """
    all_image = distributed.gather_with_grad(image_embeds)
    all_text = distributed.gather_with_grad(text_embeds)
    logits_per_image = logit_scale * image_embeds @ all_text.t()
    logits_per_text = logit_scale * text_embeds @ all_image.t()
    batch = image_embeds.shape[0]
    labels = distributed.get_rank() * batch + torch.arange(batch, device=image_embeds.device)
    loss = 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
    return loss, logits_per_image, logits_per_text, labels


@torch.no_grad()
def retrieval_accuracy(logits: torch.Tensor, labels: torch.Tensor, topk=(1, 5)) -> Dict[int, torch.Tensor]:
    """Share of rows whose label is among the top-k logits, for each k (capped at the number of columns)."""
    out = {}
    for k in topk:
        kk = min(k, logits.shape[1])
        hits = (logits.topk(kk, dim=1).indices == labels.unsqueeze(1)).any(dim=1)
        out[k] = hits.float().mean()
    return out


def local_image_loss(predicted_image: torch.Tensor, text_to_image: torch.Tensor, predicted_cross: torch.Tensor,
                     image_tokens: torch.Tensor, sample_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SimSiam local image loss L_li (B.2).

    ``L_li(b) = -1/2 [mean_p cos(h(V_bp), sg(V~_bp)) + mean_p cos(h(V~_bp), sg(V_bp))]``, averaged over the
    samples selected by ``sample_mask`` (B,) — reports without any sentence have no text-to-image
    features and are left out (loss 0 with a graph if none is left).

    Args:
        predicted_image: h(V) (B, P, D); text_to_image: V~ (B, P, D); predicted_cross: h(V~); image_tokens: V.
    """
    per_token = F.cosine_similarity(predicted_image, text_to_image.detach(), dim=-1) \
        + F.cosine_similarity(predicted_cross, image_tokens.detach(), dim=-1)
    per_sample = -0.5 * per_token.mean(dim=1)
    if sample_mask is None:
        return per_sample.mean()
    weights = sample_mask.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp(min=1.0)


def sentence_infonce(text_sentences: torch.Tensor, cross_sentences: torch.Tensor, temperature: float) -> torch.Tensor:
    """Plain sentence-level InfoNCE: anchor z1_i, positive z2_i, negatives z2_j (B.3 step 1 loss)."""
    if text_sentences.shape[0] == 0:
        return text_sentences.sum() * 0.0 + cross_sentences.sum() * 0.0
    z1 = F.normalize(text_sentences, dim=-1)
    z2 = F.normalize(cross_sentences, dim=-1)
    logits = z1 @ z2.t() / temperature
    return F.cross_entropy(logits, torch.arange(z1.shape[0], device=z1.device))


def bidirectional_margin_loss(similarity: torch.Tensor, mask: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """BML (B.3 d): ``mean_ij relu(D_ij + alpha) + relu(-D_ij - beta)``, ``D_ij = (C_ij - C_ii) F_ij``.

    The mean runs over all N^2 entries, as in the reference: pairs outside the mask contribute the
    constant ``alpha`` and no gradient.
    """
    delta = (similarity - similarity.diagonal().unsqueeze(1)) * mask.to(similarity.dtype)
    return (F.relu(delta + alpha) + F.relu(-delta - beta)).mean()


def hard_negative_logits(cos_pos: torch.Tensor, cos_hard: torch.Tensor, temperature: float, mode: str,
                         weight: float) -> torch.Tensor:
    """Logits with hard negatives (B.3 e), (N, 2N).

    ``cos_pos`` = C (N, N) = cos(z1_i, z2_j); ``cos_hard`` = G (N, N) = cos(z1_i, hn_j).
    * ``"additive"`` (default, ClusterNS): row i = ``[C_i., G_i.] / tau + w e_{N+i}``: every anchor's hard
      negative stays a real logit, the anchor's own gets ``+w``.
    * ``"reference"``: row i = ``[C_i., 0, .., w G_ii, .., 0] / tau`` — the reference's multiplicative mask,
      whose N-1 zero logits stay in the softmax.
    """
    n = cos_pos.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=cos_pos.device)
    if mode == "additive":
        return torch.cat([cos_pos, cos_hard], dim=1) / temperature + torch.cat(
            [torch.zeros_like(cos_pos), eye.to(cos_pos.dtype) * weight], dim=1)
    if mode == "reference":
        own_hard = torch.where(eye, cos_hard * weight, torch.zeros_like(cos_hard))
        return torch.cat([cos_pos, own_hard], dim=1) / temperature
    raise ValueError(f"unknown hard_negative_mode {mode!r}")


FALSE_NEGATIVE_HANDLINGS = ("bml", "remove", "attract")


def cluster_guided_text_loss(text_sentences: torch.Tensor, cross_sentences: torch.Tensor,
                             centroids: Optional[torch.Tensor], temperature: float = 1.0,
                             hard_negative_mode: str = "additive", hard_negative_weight: float = 3.0,
                             remove_false_negatives: bool = False, bml_alpha: float = 0.2, bml_beta: float = 0.5,
                             bml_weight: float = 1e-4, false_negative_gate: str = "cluster",
                             false_negative_threshold: float = 0.9, false_negative_handling: str = "bml",
                             use_hard_negatives: bool = True,
                             ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Local text loss L_lt with cross-modal clustering guidance (B.3 b-f; docs/clustering.md).

    Args:
        text_sentences: z1 (N, D), the text sentence features (anchors), with gradient.
        cross_sentences: z2 (N, D), the image-to-text cross-modal sentence features (positives), with gradient.
        centroids: (K, D) k-means centroids, or ``None`` before initialisation / when clustering is off —
            then the loss is the plain sentence InfoNCE.
        false_negative_gate: which same-cluster pairs count as false negatives
            (``clustering.gated_false_negative_mask``: "cluster" = the reference, "centroid", "similarity"
            with ``false_negative_threshold``).
        false_negative_handling: what is done with them besides the BML term (always added at
            ``bml_weight``): "bml" nothing else (reference), "remove" drop them from the InfoNCE denominator,
            "attract" count them as further positives (-log of the summed softmax over positives). With either,
            a hard-negative column whose centroid is the anchor's own cluster is dropped from its row too
            (in the additive mode every anchor's hard negative is a logit of every row).
            ``remove_false_negatives=True`` is the older spelling of "remove".
        use_hard_negatives: with False the centroid hard-negative logits are left out (ablation, and the
            gradient-share measurement).
    Returns:
        (loss, parts): ``infonce``, ``bml`` (tensors in the graph), and detached ``own_cluster`` (N,),
        ``hard_cluster`` (N,), ``false_negative_mask`` (N, N) when the centroids were used.
    """
    if remove_false_negatives:
        false_negative_handling = "remove"
    if false_negative_handling not in FALSE_NEGATIVE_HANDLINGS:
        raise ValueError(f"false_negative_handling must be one of {FALSE_NEGATIVE_HANDLINGS}, "
                         f"got {false_negative_handling!r}")
    if centroids is None or text_sentences.shape[0] < 2:
        loss = sentence_infonce(text_sentences, cross_sentences, temperature)
        return loss, {"infonce": loss, "bml": loss.new_zeros(())}
    z1 = F.normalize(text_sentences, dim=-1)
    z2 = F.normalize(cross_sentences, dim=-1)
    n = z1.shape[0]
    centroids = centroids.to(z1.dtype)
    with torch.no_grad():
        own_cluster, hard_cluster = nearest_two_centroids(z1, centroids)
        same_cluster = gated_false_negative_mask(z1, own_cluster, centroids, false_negative_gate,
                                                 false_negative_threshold)
    cos_pos = z1 @ z2.t()
    if use_hard_negatives:
        hard_negatives = F.normalize(centroids[hard_cluster], dim=-1).detach()
        cos_hard = z1 @ hard_negatives.t()
        logits = hard_negative_logits(cos_pos, cos_hard, temperature, hard_negative_mode, hard_negative_weight)
    else:
        logits = cos_pos / temperature
    extra = logits.shape[1] - n
    targets = torch.arange(n, device=z1.device)
    # With "remove" / "attract" the additive mode's other anchors' hard negatives that are the anchor's OWN
    # centroid (hard_cluster[j] == own_cluster[i]) are false negatives too: they are dropped from the row.
    own_centroid_columns = None
    if extra:
        own_centroid_columns = hard_cluster.unsqueeze(0) == own_cluster.unsqueeze(1)
        if hard_negative_mode != "additive":      # the reference's other columns are constant zeros, no centroid
            own_centroid_columns = torch.zeros_like(own_centroid_columns)
    if false_negative_handling == "remove":
        drop = torch.cat([same_cluster, own_centroid_columns if extra else same_cluster.new_zeros(n, 0)], dim=1)
        infonce = F.cross_entropy(logits.masked_fill(drop, float("-inf")), targets)
    elif false_negative_handling == "attract":
        positives = same_cluster | torch.eye(n, dtype=torch.bool, device=z1.device)
        positives = torch.cat([positives, positives.new_zeros(n, extra)], dim=1)
        if extra:
            logits = logits.masked_fill(torch.cat([same_cluster.new_zeros(n, n), own_centroid_columns], dim=1),
                                        float("-inf"))
        log_probs = logits.log_softmax(dim=1)
        infonce = -torch.logsumexp(log_probs.masked_fill(~positives, float("-inf")), dim=1).mean()
    else:
        infonce = F.cross_entropy(logits, targets)
    bml = bidirectional_margin_loss(cos_pos, same_cluster, bml_alpha, bml_beta)
    return infonce + bml_weight * bml, {"infonce": infonce, "bml": bml, "own_cluster": own_cluster,
                                        "hard_cluster": hard_cluster, "false_negative_mask": same_cluster}


def text_loss_gradient_shares(text_sentences: torch.Tensor, cross_sentences: torch.Tensor,
                              centroids: Optional[torch.Tensor], **loss_kwargs) -> Dict[str, float]:
    """How much of the local text loss's gradient on the anchors z1 comes from the false-negative handling
    and from the hard negatives (docs/clustering.md "Does it act?").

    With ``g`` the gradient of ``cluster_guided_text_loss`` on z1 (z2 and the centroids held fixed),
    ``g_no_fn`` the same with the false-negative handling off (handling "bml" at weight 0) and ``g_no_hn``
    without the hard-negative logits: ``false_negative = |g - g_no_fn| / |g|`` and
    ``hard_negative = |g - g_no_hn| / |g|`` (Frobenius norms). 0 means the part does not act at all.
    Returns ``{}`` without centroids or with fewer than two sentences.
    """
    if centroids is None or text_sentences.shape[0] < 2:
        return {}
    with torch.enable_grad():
        z1 = text_sentences.detach().float().requires_grad_(True)
        z2 = cross_sentences.detach().float()
        c = centroids.detach().float()

        def grad(**overrides):
            kwargs = {**loss_kwargs, **overrides}
            loss, _ = cluster_guided_text_loss(z1, z2, c, **kwargs)
            return torch.autograd.grad(loss, z1)[0]

        full = grad()
        no_fn = grad(remove_false_negatives=False, false_negative_handling="bml", bml_weight=0.0)
        no_hn = grad(use_hard_negatives=False)
    norm = float(full.norm())
    if norm == 0:
        return {"false_negative": 0.0, "hard_negative": 0.0}
    return {"false_negative": float((full - no_fn).norm()) / norm,
            "hard_negative": float((full - no_hn).norm()) / norm}


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, weight: float = 10.0,
                        pixel_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CM-MIR loss (B.4): ``weight * mean |x_hat - x|``; with ``pixel_mask`` (B, 1, H, W) in {0, 1},
    only the masked pixels count (mean over them)."""
    if reconstruction.shape[-2:] != target.shape[-2:]:
        target = F.interpolate(target, size=reconstruction.shape[-2:], mode="bilinear", align_corners=False)
    error = (reconstruction - target).abs()
    if pixel_mask is None:
        return weight * error.mean()
    pixel_mask = pixel_mask.to(error.dtype).expand_as(error)
    return weight * (error * pixel_mask).sum() / pixel_mask.sum().clamp(min=1.0)


__all__ = [
    "global_contrastive_loss",
    "retrieval_accuracy",
    "local_image_loss",
    "sentence_infonce",
    "bidirectional_margin_loss",
    "hard_negative_logits",
    "cluster_guided_text_loss",
    "text_loss_gradient_shares",
    "FALSE_NEGATIVE_HANDLINGS",
    "reconstruction_loss",
]
