"""Frozen-encoder object detection on top of the CGNS image tower (docs/method.md E.2, MGCA's YOLOv3 protocol).

``CGNSForObjectDetection`` keeps only the image tower of a CGNS export (attribute ``vision_model``, as in
:class:`~modeling_cgns.modeling_classification.CGNSForImageClassification`, so ``from_pretrained`` loads it
by name and drops the rest of the export) and adds a YOLOv3 neck and heads for one class with three anchors
per scale. The tower gives C3 / C4 / C5 (ResNet layer2 / layer3 / layer4, strides 8 / 16 / 32) through
timm's ``forward_intermediates``; the heads predict on C5, C4 and C3 in that order (7x7, 14x14, 28x28 at
224 px).

Deliberate difference from the reference (G.26): the tower stays in **eval mode** even while the model
trains (``FrozenVisionTowerMixin``, shared with the classifier and the segmenter), so its BatchNorm running
statistics never move. The reference froze the parameters but left BN in train mode, so the "frozen" encoder
drifted with the detection data. The head's own BatchNorm layers train normally.

Only ResNet-style towers (a feature map, ``config.vision_kind == "grid"``) are supported: the protocol is
ResNet-only and a ViT has no stride-8 / 16 / 32 pyramid.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import nms
from transformers import AutoModel, AutoModelForObjectDetection
from transformers.utils import ModelOutput

from .configuration_cgns import CGNSConfig
from .modeling_cgns import CGNSPreTrainedModel
from .modeling_classification import FrozenVisionTowerMixin

# E.2: the COCO YOLOv3 anchors scaled by 224/416, in pixels at 224, per scale from coarse (stride 32) to fine.
ANCHORS_224 = (
    ((62.46, 48.46), (84.0, 106.62), (200.85, 175.54)),  # stride 32
    ((16.15, 32.85), (33.38, 24.23), (31.77, 64.08)),  # stride 16
    ((5.38, 7.0), (8.62, 16.15), (17.77, 12.38)),  # stride 8
)
STRIDES = (32, 16, 8)
NUM_CLASSES = 1  # E.2: one "lesion" class for RSNA and Object-CXR
LAMBDA_XY = 2.5
LAMBDA_WH = 2.5
LAMBDA_CONF = 1.0
LAMBDA_CLS = 1.0
NOOBJ_WEIGHT = 0.5
IGNORE_THRESHOLD = 0.5
# How the class BCE is normalised. The reference (MGCA's YOLOLoss) writes BCE(sigmoid(cls) * mask, tcls * mask)
# averaged over every anchor of the grid, like the x / y / w / h terms; "object_anchors" averages it over the
# assigned anchors only, which makes it by far the largest term of a sparse grid.
CLASS_LOSS_NORMALIZATIONS = ("all_anchors", "object_anchors")
# Reference widths for ResNet-50 (C5 = 2048 channels): branch filters [512, 1024], [256, 512], [128, 256].
# Other towers scale them by C5 / 2048, i.e. the first branch's 1x1 width is C5 // 4.
REFERENCE_WIDTH_DIVISOR = 4


@dataclass
class CGNSObjectDetectionOutput(ModelOutput):
    """Output of :class:`CGNSForObjectDetection`.

    Args:
        loss (`torch.FloatTensor` of shape `()`, given ``labels``): the total YOLOv3 loss,
            ``2.5 (x + y) + 2.5 (w + h) + conf + cls`` summed over the three scales.
        loss_x, loss_y, loss_w, loss_h, loss_conf, loss_cls (`torch.FloatTensor` of shape `()`): the
            unweighted terms, each summed over the scales.
        logits (`tuple` of three `torch.FloatTensor`): raw head outputs per scale, coarse to fine, each
            `(batch, 3 * (5 + num_classes), G, G)` with G = image_size / 32, / 16, / 8; per anchor the
            channels are (t_x, t_y, t_w, t_h, objectness, class logits).
    """

    loss: Optional[torch.FloatTensor] = None
    loss_x: Optional[torch.FloatTensor] = None
    loss_y: Optional[torch.FloatTensor] = None
    loss_w: Optional[torch.FloatTensor] = None
    loss_h: Optional[torch.FloatTensor] = None
    loss_conf: Optional[torch.FloatTensor] = None
    loss_cls: Optional[torch.FloatTensor] = None
    logits: Optional[Tuple[torch.FloatTensor, ...]] = None


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------

class ConvBNLeaky(nn.Sequential):
    """Darknet "CBL": Conv (no bias) + BatchNorm + LeakyReLU(0.1), 'same' padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.1),
        )


class YOLOBranch(nn.Module):
    """Six CBL layers alternating 1x1 (``filters[0]``) and 3x3 (``filters[1]``), then a 1x1 output conv.

    ``forward(x)`` -> (route (B, filters[0], G, G): the 5th layer's output, fed to the next branch;
    logits (B, out_channels, G, G)).
    """

    def __init__(self, in_channels: int, filters: Tuple[int, int], out_channels: int):
        super().__init__()
        narrow, wide = filters
        self.body = nn.Sequential(
            ConvBNLeaky(in_channels, narrow, 1), ConvBNLeaky(narrow, wide, 3),
            ConvBNLeaky(wide, narrow, 1), ConvBNLeaky(narrow, wide, 3),
            ConvBNLeaky(wide, narrow, 1),
        )
        self.last = ConvBNLeaky(narrow, wide, 3)
        self.output = nn.Conv2d(wide, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        route = self.body(x)
        return route, self.output(self.last(route))


class YOLOv3Head(nn.Module):
    """Darknet-style YOLOv3 neck + heads on (C3, C4, C5) (E.2).

    Branch 0 on C5; branch 1 on concat(upsample(CBL(route 0)), C4); branch 2 on
    concat(upsample(CBL(route 1)), C3). ``forward([c3, c4, c5])`` -> logits per scale, coarse to fine.
    """

    def __init__(self, in_channels: Sequence[int], num_anchors: int = 3, num_classes: int = NUM_CLASSES):
        super().__init__()
        c3, c4, c5 = in_channels
        width = max(1, c5 // REFERENCE_WIDTH_DIVISOR)
        out_channels = num_anchors * (5 + num_classes)
        self.branch0 = YOLOBranch(c5, (width, 2 * width), out_channels)
        self.reduce1 = ConvBNLeaky(width, width // 2, 1)
        self.branch1 = YOLOBranch(c4 + width // 2, (width // 2, width), out_channels)
        self.reduce2 = ConvBNLeaky(width // 2, width // 4, 1)
        self.branch2 = YOLOBranch(c3 + width // 4, (width // 4, width // 2), out_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3, c4, c5 = features
        route0, logits0 = self.branch0(c5)
        up1 = F.interpolate(self.reduce1(route0), scale_factor=2, mode="nearest")
        route1, logits1 = self.branch1(torch.cat([up1, c4], dim=1))
        up2 = F.interpolate(self.reduce2(route1), scale_factor=2, mode="nearest")
        _, logits2 = self.branch2(torch.cat([up2, c3], dim=1))
        return logits0, logits1, logits2


# --------------------------------------------------------------------------------------------------
# targets, loss and decoding (pure functions on tensors)
# --------------------------------------------------------------------------------------------------

def shape_iou(box_wh: torch.Tensor, anchor_wh: torch.Tensor) -> torch.Tensor:
    """IoU of boxes and anchors aligned at a common centre: (N, 2), (A, 2) -> (N, A).

    The reference's "+1 pixel" convention (E.2, applied even in grid units) is not reproduced: it inflates
    small shapes and is a leftover of pixel-indexed boxes.
    """
    inter = torch.minimum(box_wh[:, None, 0], anchor_wh[None, :, 0]) * torch.minimum(box_wh[:, None, 1],
                                                                                       anchor_wh[None, :, 1])
    union = box_wh[:, None].prod(-1) + anchor_wh[None].prod(-1) - inter
    return inter / union.clamp(min=1e-12)


@dataclass
class YOLOTargets:
    """Per-scale training targets, each (B, A, G, G); ``obj_mask`` / ``noobj_mask`` boolean."""

    obj_mask: torch.Tensor
    noobj_mask: torch.Tensor
    tx: torch.Tensor
    ty: torch.Tensor
    tw: torch.Tensor
    th: torch.Tensor


def build_targets(boxes: Sequence[torch.Tensor], anchors: torch.Tensor, grid_size: int,
                  ignore_threshold: float = IGNORE_THRESHOLD) -> YOLOTargets:
    """YOLOv3 targets for one scale (E.2), vectorised over all boxes of the batch.

    Args:
        boxes: per image an (n_i, 4) tensor of normalised [x_min, y_min, x_max, y_max]; boxes without
            area are ignored (their log-size target would be -inf).
        anchors: (A, 2) anchor width / height in grid cells.
        grid_size: G.
    Each box goes to the cell holding its centre and to the anchor of best shape IoU: ``tx, ty`` are the
    centre's offsets in that cell (BCE targets of the sigmoid outputs), ``tw, th = log(size / anchor)``.
    Every anchor of that cell whose shape IoU exceeds ``ignore_threshold`` leaves the no-object mask.
    When two boxes claim the same cell and anchor, one of them wins (as in the reference).
    """
    batch, num_anchors, device = len(boxes), anchors.shape[0], anchors.device
    shape = (batch, num_anchors, grid_size, grid_size)
    obj_mask = torch.zeros(shape, dtype=torch.bool, device=device)
    noobj_mask = torch.ones(shape, dtype=torch.bool, device=device)
    tx, ty, tw, th = (torch.zeros(shape, device=device) for _ in range(4))
    counts = torch.tensor([len(b) for b in boxes], device=device)
    if int(counts.sum()) == 0:
        return YOLOTargets(obj_mask, noobj_mask, tx, ty, tw, th)
    all_boxes = torch.cat([torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]).to(device)
    image_index = torch.repeat_interleave(torch.arange(batch, device=device), counts)
    size = (all_boxes[:, 2:] - all_boxes[:, :2]) * grid_size
    valid = (size > 0).all(dim=1)
    all_boxes, image_index, size = all_boxes[valid], image_index[valid], size[valid]
    centre = (all_boxes[:, :2] + all_boxes[:, 2:]) / 2 * grid_size
    cell = centre.long().clamp(0, grid_size - 1)
    gi, gj = cell[:, 0], cell[:, 1]
    ious = shape_iou(size, anchors)
    best = ious.argmax(dim=1)
    box_idx, anchor_idx = (ious > ignore_threshold).nonzero(as_tuple=True)
    noobj_mask[image_index[box_idx], anchor_idx, gj[box_idx], gi[box_idx]] = False
    noobj_mask[image_index, best, gj, gi] = False
    obj_mask[image_index, best, gj, gi] = True
    where = (image_index, best, gj, gi)
    tx[where] = centre[:, 0] - gi
    ty[where] = centre[:, 1] - gj
    tw[where] = torch.log(size[:, 0] / anchors[best, 0] + 1e-16)
    th[where] = torch.log(size[:, 1] / anchors[best, 1] + 1e-16)
    return YOLOTargets(obj_mask, noobj_mask, tx, ty, tw, th)


def split_logits(logits: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """(B, A * (5 + C), G, G) -> (B, A, G, G, 5 + C)."""
    batch, channels, height, width = logits.shape
    return logits.view(batch, num_anchors, channels // num_anchors, height, width).permute(0, 1, 3, 4, 2)


def yolo_scale_loss(prediction: torch.Tensor, targets: YOLOTargets,
                    class_loss_normalization: str = "all_anchors") -> dict:
    """The unweighted YOLOv3 terms of one scale (E.2), prediction (B, A, G, G, 5 + C) raw logits.

    Written as the reference writes them, ``BCE(sigmoid(x) * mask, tx * mask)`` averaged over *all*
    B * A * G * G anchors (masked-out anchors contribute 0), here with the logit form for stability;
    objectness ``BCE(conf * mask, mask) + 0.5 * BCE(conf * noobj, 0)``. The class BCE (target 1 on the
    object anchors) is averaged over all B * A * G * G * C entries with ``"all_anchors"`` (the reference),
    over the object anchors' C entries only with ``"object_anchors"``.
    """
    if class_loss_normalization not in CLASS_LOSS_NORMALIZATIONS:
        raise ValueError(f"class_loss_normalization must be one of {CLASS_LOSS_NORMALIZATIONS}, "
                         f"got {class_loss_normalization!r}")
    obj = targets.obj_mask.to(prediction.dtype)
    noobj = targets.noobj_mask.to(prediction.dtype)
    count = obj.numel()

    def masked_bce(logit, target, mask):
        return (F.binary_cross_entropy_with_logits(logit, target, reduction="none") * mask).sum() / count

    objectness = prediction[..., 4]
    class_logits = prediction[..., 5:][targets.obj_mask]
    class_bce = F.binary_cross_entropy_with_logits(class_logits, torch.ones_like(class_logits), reduction="sum")
    if class_loss_normalization == "all_anchors":
        loss_cls = class_bce / prediction[..., 5:].numel()
    else:
        loss_cls = class_bce / class_logits.numel() if class_logits.numel() else prediction.sum() * 0.0
    return {
        "loss_x": masked_bce(prediction[..., 0], targets.tx, obj),
        "loss_y": masked_bce(prediction[..., 1], targets.ty, obj),
        "loss_w": ((prediction[..., 2] - targets.tw) ** 2 * obj).sum() / count,
        "loss_h": ((prediction[..., 3] - targets.th) ** 2 * obj).sum() / count,
        "loss_conf": masked_bce(objectness, obj, obj)
        + NOOBJ_WEIGHT * masked_bce(objectness, torch.zeros_like(objectness), noobj),
        "loss_cls": loss_cls,
    }


def decode_scale(prediction: torch.Tensor, anchors_px: torch.Tensor, image_size: int
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, A, G, G, 5 + C) raw logits -> boxes (B, A*G*G, 4) normalised xyxy, objectness (B, A*G*G)."""
    batch, num_anchors, grid_size = prediction.shape[:3]
    cells = torch.arange(grid_size, device=prediction.device, dtype=prediction.dtype)
    centre_x = (prediction[..., 0].sigmoid() + cells.view(1, 1, 1, -1)) / grid_size
    centre_y = (prediction[..., 1].sigmoid() + cells.view(1, 1, -1, 1)) / grid_size
    # exp is capped so that an untrained head cannot produce infinite boxes (and NaN IoUs)
    width = prediction[..., 2].clamp(max=10.0).exp() * anchors_px[:, 0].view(1, -1, 1, 1) / image_size
    height = prediction[..., 3].clamp(max=10.0).exp() * anchors_px[:, 1].view(1, -1, 1, 1) / image_size
    boxes = torch.stack([centre_x - width / 2, centre_y - height / 2, centre_x + width / 2,
                         centre_y + height / 2], dim=-1).clamp(0.0, 1.0)
    return boxes.reshape(batch, -1, 4), prediction[..., 4].sigmoid().reshape(batch, -1)


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------

class CGNSForObjectDetection(FrozenVisionTowerMixin, CGNSPreTrainedModel):
    """Frozen CGNS ResNet tower + YOLOv3 neck and heads for one class (E.2).

    ``forward(pixel_values=(B, 3, S, S), labels=None)`` -> :class:`CGNSObjectDetectionOutput`; ``labels`` is
    a list of B tensors (n_i, 4) of normalised [x_min, y_min, x_max, y_max] (n_i may be 0).
    :meth:`decode` turns the logits into per-image (boxes, scores) after the confidence threshold and NMS.

    Build it with ``from_pretrained(path_or_hub_id, init=...)`` (``"pretrained"``, ``"random"``,
    ``"imagenet"``: as for :class:`CGNSForImageClassification`), or ``CGNSForObjectDetection(config)``.
    Channel widths come from the tower's ``feature_info``: the reference widths for ResNet-50 (first
    branch 512 / 1024), scaled by C5 / 2048 otherwise (resnet18: 128 / 256).
    """

    model_card_kind = "detection"

    def __init__(self, config: CGNSConfig):
        super().__init__(config)
        if config.vision_kind != "grid":
            raise ValueError(
                f"object detection (docs/method.md E.2) needs a ResNet-style tower with a stride 8/16/32 "
                f"feature pyramid; {config.vision_config.architecture!r} is a token (ViT) tower. Use a "
                f"ResNet export.")
        self.vision_model = AutoModel.from_config(config.vision_config)
        info = self.vision_model.timm_model.feature_info
        by_stride = {level["reduction"]: index for index, level in enumerate(info)}
        missing = [s for s in STRIDES if s not in by_stride]
        if missing:
            raise ValueError(f"tower {config.vision_config.architecture!r} has no feature map at stride(s) "
                             f"{missing} (feature_info reductions: {sorted(by_stride)})")
        if config.image_size % 32:
            raise ValueError(f"image_size ({config.image_size}) must be a multiple of 32")
        self.feature_indices = [by_stride[s] for s in (8, 16, 32)]
        channels = [info[i]["num_chs"] for i in self.feature_indices]
        self.num_anchors = len(ANCHORS_224[0])
        self.num_classes = NUM_CLASSES
        # a training choice, not part of the architecture: the protocol sets it (see yolo_scale_loss)
        self.class_loss_normalization = "all_anchors"
        self.detection_head = YOLOv3Head(channels, self.num_anchors, self.num_classes)
        self.post_init()
        self.reset_head()
        self.freeze_vision_model()

    @property
    def anchors_px(self) -> torch.Tensor:
        """(3 scales coarse to fine, 3 anchors, 2) anchor width / height in pixels at ``config.image_size``.

        Derived from E.2's anchors at 224 px, not stored: they are fixed by the protocol and the image size.
        """
        return torch.tensor(ANCHORS_224) * (self.config.image_size / 224.0)

    # ---------------------------------------------------------------- head initialisation
    def reset_head(self) -> None:
        """Fresh head from the current torch RNG (PyTorch's default Conv / BatchNorm initialisation).

        Lets several seeds share one loaded tower.
        """
        for module in self.detection_head.modules():
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                module.reset_parameters()

    # ---------------------------------------------------------------- forward
    @torch.no_grad()
    def extract_features(self, pixel_values: torch.Tensor) -> List[torch.Tensor]:
        """pixel_values (B, 3, S, S) -> frozen [C3 (B, c3, S/8, S/8), C4 (S/16), C5 (S/32)]."""
        return list(self.vision_model.timm_model.forward_intermediates(
            pixel_values, indices=self.feature_indices, intermediates_only=True))

    def forward(self, pixel_values: Optional[torch.Tensor] = None, labels: Optional[Sequence[torch.Tensor]] = None,
                features: Optional[Sequence[torch.Tensor]] = None) -> CGNSObjectDetectionOutput:
        """``pixel_values`` (B, 3, S, S), or ``features`` = the frozen [C3, C4, C5] of :meth:`extract_features`
        (cached by the protocol: the tower is frozen and deterministic, so the head sees the same inputs)."""
        if (pixel_values is None) == (features is None):
            raise ValueError("pass exactly one of pixel_values and features")
        features = self.extract_features(pixel_values) if features is None else list(features)
        logits = self.detection_head(features)
        if labels is None:
            return CGNSObjectDetectionOutput(logits=logits)
        batch = features[0].shape[0]
        if len(labels) != batch:
            raise ValueError(f"labels has {len(labels)} entries for a batch of {batch} images")
        terms = self.detection_loss(logits, labels)
        loss = (LAMBDA_XY * (terms["loss_x"] + terms["loss_y"])
                + LAMBDA_WH * (terms["loss_w"] + terms["loss_h"])
                + LAMBDA_CONF * terms["loss_conf"] + LAMBDA_CLS * terms["loss_cls"])
        return CGNSObjectDetectionOutput(loss=loss, logits=logits, **terms)

    def detection_loss(self, logits: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> dict:
        """The unweighted loss terms, each summed over the scales."""
        totals = {}
        for scale_logits, anchors_px in zip(logits, self.anchors_px):
            grid_size = scale_logits.shape[-1]
            anchors_grid = anchors_px.to(scale_logits.device) * grid_size / self.config.image_size
            targets = build_targets([box.to(scale_logits.device) for box in labels], anchors_grid, grid_size)
            terms = yolo_scale_loss(split_logits(scale_logits, self.num_anchors), targets,
                                    self.class_loss_normalization)
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value
        return totals

    @torch.no_grad()
    def decode(self, outputs, conf_threshold: float = 0.5, nms_iou: float = 0.5
               ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Detections per image: (boxes (n, 4) normalised xyxy, scores (n,)), by descending score.

        E.2: objectness >= ``conf_threshold``, then greedy NMS at ``nms_iou`` (one class, so per-class NMS is
        plain NMS). The score is the objectness; boxes are clipped to the image. ``outputs`` is a
        :class:`CGNSObjectDetectionOutput` or its ``logits`` tuple.
        """
        logits = outputs.logits if isinstance(outputs, CGNSObjectDetectionOutput) else outputs
        decoded = [decode_scale(split_logits(scale_logits.float(), self.num_anchors),
                                anchors_px.to(scale_logits.device), self.config.image_size)
                   for scale_logits, anchors_px in zip(logits, self.anchors_px)]
        boxes = torch.cat([b for b, _ in decoded], dim=1)
        scores = torch.cat([s for _, s in decoded], dim=1)
        detections = []
        for image_boxes, image_scores in zip(boxes, scores):
            keep = image_scores >= conf_threshold
            image_boxes, image_scores = image_boxes[keep], image_scores[keep]
            kept = nms(image_boxes, image_scores, nms_iou)
            detections.append((image_boxes[kept], image_scores[kept]))
        return detections

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load from a CGNS export as :class:`FrozenVisionTowerMixin` does (``init`` = ``"pretrained"`` /
        ``"random"`` / ``"imagenet"``: the export's tower, timm's random initialisation, ImageNet weights).

        The head is then drawn afresh with :meth:`reset_head` (from the current torch RNG), so a loaded
        detector starts like ``CGNSForObjectDetection(config)``.
        """
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).reset_head()
        return loaded


AutoModelForObjectDetection.register(CGNSConfig, CGNSForObjectDetection, exist_ok=True)

__all__ = ["CGNSForObjectDetection", "CGNSObjectDetectionOutput", "YOLOv3Head", "YOLOBranch", "ConvBNLeaky",
           "YOLOTargets", "build_targets", "shape_iou", "split_logits", "yolo_scale_loss", "decode_scale",
           "ANCHORS_224", "CLASS_LOSS_NORMALIZATIONS"]
