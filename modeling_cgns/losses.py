"""The CGNS objective as pure functions on tensors (docs/method.md section B).

Each function cites the equation it implements. The model computes features; these functions
turn features into named losses, so they can be tested against slow loop oracles in isolation.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import distributed
from .clustering import false_negative_mask, nearest_two_centroids


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


def cluster_guided_text_loss(text_sentences: torch.Tensor, cross_sentences: torch.Tensor,
                             centroids: Optional[torch.Tensor], temperature: float = 1.0,
                             hard_negative_mode: str = "additive", hard_negative_weight: float = 3.0,
                             remove_false_negatives: bool = False, bml_alpha: float = 0.2, bml_beta: float = 0.5,
                             bml_weight: float = 1e-4) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Local text loss L_lt with cross-modal clustering guidance (B.3 b-f).

    Args:
        text_sentences: z1 (N, D), the text sentence features (anchors), with gradient.
        cross_sentences: z2 (N, D), the image-to-text cross-modal sentence features (positives), with gradient.
        centroids: (K, D) k-means centroids in z2 space, or ``None`` before initialisation / when
            clustering is off — then the loss is the plain sentence InfoNCE.
    Returns:
        (loss, parts) where parts holds ``infonce`` and ``bml`` (both detached-free tensors).
    """
    if centroids is None or text_sentences.shape[0] < 2:
        loss = sentence_infonce(text_sentences, cross_sentences, temperature)
        return loss, {"infonce": loss, "bml": loss.new_zeros(())}
    z1 = F.normalize(text_sentences, dim=-1)
    z2 = F.normalize(cross_sentences, dim=-1)
    n = z1.shape[0]
    centroids = centroids.to(z1.dtype)
    with torch.no_grad():
        own_cluster, hard_cluster = nearest_two_centroids(z1, centroids)
        same_cluster = false_negative_mask(own_cluster)
    hard_negatives = F.normalize(centroids[hard_cluster], dim=-1).detach()
    cos_pos = z1 @ z2.t()
    cos_hard = z1 @ hard_negatives.t()
    logits = hard_negative_logits(cos_pos, cos_hard, temperature, hard_negative_mode, hard_negative_weight)
    if remove_false_negatives:
        drop = torch.cat([same_cluster, torch.zeros_like(same_cluster)], dim=1)
        logits = logits.masked_fill(drop, float("-inf"))
    infonce = F.cross_entropy(logits, torch.arange(n, device=z1.device))
    bml = bidirectional_margin_loss(cos_pos, same_cluster, bml_alpha, bml_beta)
    return infonce + bml_weight * bml, {"infonce": infonce, "bml": bml}


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
    "reconstruction_loss",
]
