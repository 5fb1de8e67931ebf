"""Frozen-encoder semantic segmentation on top of the CGNS image tower (docs/method.md E.3).

``CGNSForSemanticSegmentation`` keeps only the image tower of a CGNS export (``vision_model``, loaded
and frozen exactly like the linear probe's, through :class:`FrozenVisionTowerMixin`) and trains a
decoder that outputs one logit per pixel at the input resolution:

* grid towers (ResNet): a U-Net decoder (the ``segmentation_models_pytorch.Unet`` decoder of E.3)
  fed by the tower's multi-scale maps (``timm_model.forward_intermediates``; strides 2..32 for a
  ResNet): per block, nearest x2 upsampling, concatenation of the skip map of that stride, and two
  Conv3x3 + BN + ReLU; decoder channels (256, 128, 64, 32, 16) by default; a Conv3x3 -> 1 head;
* token towers (ViT): SETR-naive: Linear D -> D on the final (normed) patch tokens -> D x h x w
  grid -> 4 x {Conv3x3 + BN + ReLU + bilinear x2} with 512, 256, 128, 64 channels -> Conv3x3 -> 1.

The loss (E.3, MGCA's ``MixedLoss``) is ``10 * Focal(gamma=2) - log(softDice)``, the soft Dice taken
over the whole batch with smooth 1. The metric is the per-image Dice of ``sigmoid > 0.5`` with the
empty-ground-truth rule (:func:`dice_per_image`).

Deliberate fix of G.26: the reference freezes the encoder with ``requires_grad = False`` but leaves
its BatchNorm in train mode, so the "frozen" ResNet's running statistics drift towards the
segmentation data. Here the tower stays in eval mode (``FrozenVisionTowerMixin.train``): frozen
means frozen, and the pretrained statistics are the ones evaluated.

Decoder sizes are config values, so they travel with ``save_pretrained``:
``segmentation_decoder_channels`` (U-Net, default (256, 128, 64, 32, 16)) and
``segmentation_setr_channels`` (SETR-naive, default (512, 256, 128, 64)); pass them to
``from_pretrained(..., segmentation_decoder_channels=[...])`` to change them.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSemanticSegmentation
from transformers.modeling_outputs import SemanticSegmenterOutput

from .configuration_cgns import CGNSConfig
from .modeling_cgns import CGNSPreTrainedModel
from .modeling_classification import FrozenVisionTowerMixin

UNET_DECODER_CHANNELS = (256, 128, 64, 32, 16)
SETR_CHANNELS = (512, 256, 128, 64)
FOCAL_WEIGHT = 10.0
FOCAL_GAMMA = 2.0
DICE_SMOOTH = 1.0


# --------------------------------------------------------------------------------------------------
# loss and metric (E.3)
# --------------------------------------------------------------------------------------------------

def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Binary focal loss, mean over every pixel (MGCA's ``FocalLoss``, no alpha).

    ``BCE(x, t) * sigmoid(-x * (2t - 1)) ** gamma``, i.e. ``(1 - p_t) ** gamma * BCE`` for hard
    targets; soft targets (area-resized masks) are used as they are. logits, targets: same shape.
    """
    targets = targets.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    modulation = torch.exp(gamma * F.logsigmoid(-logits * (2.0 * targets - 1.0)))
    return (modulation * bce).mean()


def soft_dice(logits: torch.Tensor, targets: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice coefficient over the whole batch: ``(2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)``.

    ``p = sigmoid(logits)``; all pixels of all images are pooled (E.3), so the value is in (0, 1].
    """
    probs = torch.sigmoid(logits).flatten()
    targets = targets.to(probs.dtype).flatten()
    return (2.0 * (probs * targets).sum() + smooth) / (probs.sum() + targets.sum() + smooth)


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor, focal_weight: float = FOCAL_WEIGHT,
                      gamma: float = FOCAL_GAMMA, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """E.3's loss ``focal_weight * Focal(gamma) - log(softDice(smooth))``; logits/targets (B, 1, H, W)."""
    return focal_weight * focal_loss(logits, targets, gamma) - torch.log(soft_dice(logits, targets, smooth))


@torch.no_grad()
def dice_per_image(probs: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-image Dice of ``probs > threshold`` against ``targets > 0.5`` -> (B,) float (MGCA ``get_dice``).

    probs, targets: (B, ...) with the same number of elements per image (pass ``sigmoid(logits)``).
    An image with empty ground truth scores 1 when the prediction is empty too, else 0; otherwise
    ``2 |P n T| / (|P| + |T|)``. Soft targets are binarised at 0.5 as in the reference.
    """
    batch = probs.shape[0]
    predicted = (probs.reshape(batch, -1) > threshold).float()
    truth = (targets.reshape(batch, -1) > 0.5).float()
    truth_sum, predicted_sum = truth.sum(dim=1), predicted.sum(dim=1)
    overlap = 2.0 * (predicted * truth).sum(dim=1) / (truth_sum + predicted_sum).clamp(min=1.0)
    return torch.where(truth_sum > 0, overlap, (predicted_sum == 0).float())


# --------------------------------------------------------------------------------------------------
# decoders
# --------------------------------------------------------------------------------------------------

def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv3x3 (no bias: BN follows) + BatchNorm + ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class UNetDecoderBlock(nn.Module):
    """Nearest upsampling to the skip map's size (x2 without one), concatenation, 2 x conv_bn_relu."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = conv_bn_relu(out_channels, out_channels)

    def forward(self, hidden: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if skip is None:
            hidden = F.interpolate(hidden, scale_factor=2.0, mode="nearest")
        else:
            hidden = torch.cat([F.interpolate(hidden, size=skip.shape[-2:], mode="nearest"), skip], dim=1)
        return self.conv2(self.conv1(hidden))


class UNetDecoder(nn.Module):
    """U-Net decoder over a tower's feature maps, finest first (e.g. ResNet strides 2, 4, 8, 16, 32).

    The deepest map enters the first block; each block then takes the next shallower map as its skip
    until they run out (a ResNet has 4 skips for the 5 default blocks, as in smp's Unet, whose stride-1
    "skip" is the raw input and unused). Output: (B, decoder_channels[-1], ...) at the deepest map's
    resolution times 2 ** len(decoder_channels).
    """

    def __init__(self, feature_channels: Sequence[int], decoder_channels: Sequence[int]):
        super().__init__()
        skip_channels = list(feature_channels[-2::-1])[:len(decoder_channels)]
        skip_channels += [0] * (len(decoder_channels) - len(skip_channels))
        in_channels = [feature_channels[-1]] + list(decoder_channels[:-1])
        self.blocks = nn.ModuleList(UNetDecoderBlock(i, s, o)
                                    for i, s, o in zip(in_channels, skip_channels, decoder_channels))

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        skips = features[-2::-1]
        hidden = features[-1]
        for index, block in enumerate(self.blocks):
            hidden = block(hidden, skips[index] if index < len(skips) else None)
        return hidden


class SETRNaiveDecoder(nn.Module):
    """SETR-naive: Linear D -> D on the patch tokens, a (D, h, w) grid, then per channel count
    Conv3x3 + BN + ReLU + bilinear x2. Output (B, channels[-1], h * 2 ** len(channels), ...)."""

    def __init__(self, embed_dim: int, channels: Sequence[int]):
        super().__init__()
        self.token_projection = nn.Linear(embed_dim, embed_dim)
        in_channels = [embed_dim] + list(channels[:-1])
        self.blocks = nn.ModuleList(conv_bn_relu(i, o) for i, o in zip(in_channels, channels))

    def forward(self, patch_tokens: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
        """patch_tokens (B, h * w, D), row-major, and grid_size (h, w)."""
        batch, _, dim = patch_tokens.shape
        hidden = self.token_projection(patch_tokens).transpose(1, 2).reshape(batch, dim, *grid_size)
        for block in self.blocks:
            # E.3's SETR-naive upsamples with nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            hidden = F.interpolate(block(hidden), scale_factor=2.0, mode="bilinear", align_corners=True)
        return hidden


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------

class CGNSForSemanticSegmentation(FrozenVisionTowerMixin, CGNSPreTrainedModel):
    """Frozen CGNS image tower + a trainable U-Net (grid tower) or SETR-naive (token tower) decoder.

    ``forward(pixel_values=(B, 3, S, S), labels=(B, 1, S, S) float in [0, 1] or None)`` ->
    ``SemanticSegmenterOutput(loss, logits (B, 1, S, S))``: one binary-foreground logit per pixel at
    the input size; the loss (E.3, :func:`segmentation_loss`) only when ``labels`` are given.

    Build it with ``from_pretrained(path_or_hub_id, init=...)`` exactly like
    :class:`CGNSForImageClassification` (``init`` pretrained / random / imagenet), or
    ``CGNSForSemanticSegmentation(config)`` for a random tower. Only ``decoder`` and ``head`` train.
    """

    model_card_kind = "segmentation"

    def __init__(self, config: CGNSConfig):
        super().__init__(config)
        self.vision_model = AutoModel.from_config(config.vision_config)
        timm_model = self.vision_model.timm_model
        if config.vision_kind == "grid":
            decoder_channels = list(getattr(config, "segmentation_decoder_channels", None)
                                    or UNET_DECODER_CHANNELS)
            feature_channels = [info["num_chs"] for info in timm_model.feature_info]
            self.decoder = UNetDecoder(feature_channels, decoder_channels)
        else:
            decoder_channels = list(getattr(config, "segmentation_setr_channels", None) or SETR_CHANNELS)
            self.decoder = SETRNaiveDecoder(timm_model.num_features, decoder_channels)
        self.head = nn.Conv2d(decoder_channels[-1], 1, 3, padding=1)
        self.post_init()
        self.freeze_vision_model()

    def reset_decoder(self) -> None:
        """Redraw decoder and head from the current torch RNG, as post_init does.

        N(0, initializer_range) conv / linear weights, zero biases, BatchNorm 1 / 0 with fresh running
        statistics. Lets several seeds share one loaded tower.
        """
        std = self.config.initializer_range
        for module in list(self.decoder.modules()) + [self.head]:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor):
        """Frozen tower -> the decoder's input: the list of feature maps, finest first (grid towers),
        or (patch tokens (B, h * w, D), (h, w)) after the final norm, prefix tokens dropped (token towers)."""
        timm_model = self.vision_model.timm_model
        if self.config.vision_kind == "grid":
            return timm_model.forward_intermediates(pixel_values, intermediates_only=True)
        tokens = self.vision_model(pixel_values=pixel_values).last_hidden_state
        grid_size = timm_model.patch_embed.dynamic_feat_size(pixel_values.shape[-2:])
        return tokens[:, getattr(timm_model, "num_prefix_tokens", 0):], tuple(grid_size)

    def forward(self, pixel_values: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> SemanticSegmenterOutput:
        encoded = self.encode(pixel_values)
        hidden = self.decoder(encoded) if self.config.vision_kind == "grid" else self.decoder(*encoded)
        logits = self.head(hidden)
        if logits.shape[-2:] != pixel_values.shape[-2:]:
            # towers whose total stride is not 2 ** (number of decoder blocks) still give full-size maps
            logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        loss = segmentation_loss(logits, labels.view_as(logits)) if labels is not None else None
        return SemanticSegmenterOutput(loss=loss, logits=logits)


AutoModelForSemanticSegmentation.register(CGNSConfig, CGNSForSemanticSegmentation, exist_ok=True)

__all__ = [
    "CGNSForSemanticSegmentation", "UNetDecoder", "SETRNaiveDecoder", "segmentation_loss", "focal_loss",
    "soft_dice", "dice_per_image", "UNET_DECODER_CHANNELS", "SETR_CHANNELS",
]
