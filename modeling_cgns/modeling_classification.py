"""Frozen-encoder linear classification on top of the CGNS image tower (docs/method.md E.1).

``CGNSForImageClassification`` keeps only the image tower of a CGNS export (same attribute name,
``vision_model``, so ``from_pretrained`` loads it by name and ignores the text tower, projections
and decoder) and adds one linear layer. The tower is frozen in every sense the protocol needs:
no gradient, no optimiser state, and BatchNorm statistics that never move because the tower stays
in eval mode even while the Trainer calls ``model.train()``.

The loading and freezing logic lives in :class:`FrozenVisionTowerMixin`, shared with the segmentation
model (``modeling_segmentation.py``).

Features (E.1): the mean of the last ResNet feature map (not the pretraining attention pool) or
the ViT CLS token after the final LayerNorm.
"""
import contextlib
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForImageClassification, PretrainedConfig
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import logging as hf_logging

from .configuration_cgns import CGNSConfig
from .metrics import MULTI_LABEL, SINGLE_LABEL
from .modeling_cgns import CGNSPreTrainedModel

INITS = ("pretrained", "random", "imagenet")
# from_pretrained keyword arguments that locate files; they are also needed to read the config alone
logger = hf_logging.get_logger(__name__)

_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' warnings and progress bars (the load report, "Loading weights") off inside the block; its
    errors stay, and the previous settings come back."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class FrozenVisionTowerMixin:
    """Shared by the downstream models that put a head on a frozen CGNS image tower ``vision_model``.

    Gives them the freezing (no gradient, eval mode kept through ``train()``) and the construction from
    a CGNS export with ``init`` = pretrained / random / imagenet. Mix it in before
    :class:`CGNSPreTrainedModel`; the model must build ``self.vision_model`` in ``__init__``.
    """

    # Everything of a CGNS export except the image tower (text tower, projections, decoder, k-means
    # state) is expected to be left behind; only a missing tower is an error (see from_pretrained).
    _keys_to_ignore_on_load_unexpected = [r"^(?!vision_model\.)"]
    input_modalities = ("image",)
    supports_gradient_checkpointing = False

    def freeze_vision_model(self) -> None:
        """No gradient and eval mode for the tower; only the head is trainable."""
        self.vision_model.requires_grad_(False)
        self.vision_model.eval()

    def train(self, mode: bool = True):
        # The Trainer puts the model in train mode every step; the tower must stay in eval so that
        # BatchNorm keeps its pretrained running statistics (E.1 calls backbone.eval() per batch; for
        # segmentation this is the deliberate fix of G.26, where the reference leaves BN in train mode).
        # The call before every step changes nothing: then only the heads are set and the tower is not
        # walked (a full pass over a ResNet tower through PreTrainedModel.train costs ~1.7 ms, measured:
        # a sixth of a cached linear-probe step). Any change of mode, or a tower found in train mode at
        # its root, takes the full path.
        if mode == self.training and not self.vision_model.training:
            for child in self.children():
                if child is not self.vision_model:
                    child.train(mode)
            return self
        super().train(mode)
        self.vision_model.eval()
        return self

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, init: str = "pretrained", **kwargs):
        """Load from a CGNS export (local folder or hub id).

        ``init``: ``"pretrained"`` (the export's image tower; an export without one is an error),
        ``"random"`` (timm's random initialisation of the export's architecture) or ``"imagenet"``
        (timm ImageNet weights; needs the network). Other keyword arguments (``num_labels``,
        ``problem_type``, ``id2label``, ...) go to the config as with any ``from_pretrained``.
        ``cls`` is the downstream model being built (classifier or segmenter).
        """
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        check_cgns_export(pretrained_model_name_or_path, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
        if init == "pretrained":
            return_info = kwargs.pop("output_loading_info", False)
            # A CGNS export has no head: transformers' load report would list the head as MISSING and the
            # export's other parts as UNEXPECTED, both by design. It is silenced for this load only; what
            # matters is checked below (the tower) and reported here (a head missing from a saved head model).
            with _quiet_transformers():
                model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                                      output_loading_info=True, **kwargs)
            head_missing = sorted(k for k in info["missing_keys"] if not k.startswith("vision_model."))
            if head_missing and cls.__name__ in (getattr(model.config, "architectures", None) or []):
                logger.warning(f"{pretrained_model_name_or_path!r} is a saved {cls.__name__} but lacks "
                               f"{len(head_missing)} head weight(s) (e.g. {head_missing[0]!r}): they are freshly "
                               f"initialised")
            missing = sorted(k for k in info["missing_keys"] if k.startswith("vision_model."))
            if missing:
                raise ValueError(
                    f"{pretrained_model_name_or_path!r} has no (complete) vision tower: {len(missing)} image "
                    f"tower weight(s) are missing from its checkpoint (e.g. {missing[0]!r}). A frozen-tower "
                    f"{cls.__name__} needs a CGNS export saved with CGNSModel.save_pretrained; use "
                    f"init='random' or 'imagenet' for baselines.")
            # Loading replaces the parameter objects, which drops the requires_grad=False set in __init__.
            model.freeze_vision_model()
            return (model, info) if return_info else model
        config = CGNSConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
        model = cls(config)
        model.load_timm_weights(pretrained=init == "imagenet")
        return model

    def load_timm_weights(self, pretrained: bool) -> None:
        """Replace the tower by timm's own initialisation (``pretrained=False``) or ImageNet weights.

        timm's initialisation (not the generic ``_init_weights``) is what a "Random Init" baseline
        means: the architecture as its authors initialise it.
        """
        import timm
        from huggingface_hub import constants

        vision_config = self.config.vision_config
        model_args = dict(vision_config.model_args or {})
        if pretrained and constants.HF_HUB_OFFLINE:
            raise RuntimeError(
                f"init='imagenet' downloads timm's ImageNet weights for {vision_config.architecture!r}, but "
                f"the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE=1). Run once online (the weights "
                f"are then cached) or use init='pretrained' / 'random'.")
        try:
            source = timm.create_model(vision_config.architecture, pretrained=pretrained, num_classes=0,
                                       **model_args)
        except Exception as err:  # network, no weights for this architecture, ...: say which step failed
            raise RuntimeError(f"could not create timm model {vision_config.architecture!r} with "
                               f"pretrained={pretrained}: {err}") from err
        self.vision_model.timm_model.load_state_dict(source.state_dict())
        self.freeze_vision_model()


class CGNSForImageClassification(FrozenVisionTowerMixin, CGNSPreTrainedModel):
    """Frozen CGNS image tower + a linear head.

    ``forward(pixel_values=(B, 3, S, S))`` or ``forward(features=(B, F))`` (precomputed with
    :meth:`extract_features`) -> ``ImageClassifierOutput(loss, logits (B, num_labels))``. The loss,
    when ``labels`` are given, is BCE-with-logits for ``problem_type="multi_label_classification"``
    (multi-label and binary, labels (B, C) float) and cross-entropy for
    ``"single_label_classification"`` (labels (B,) int).

    Build it with ``from_pretrained(path_or_hub_id, num_labels=..., problem_type=..., init=...)``:
    ``init="pretrained"`` loads the export's tower, ``"random"`` a fresh timm-initialised tower of
    the export's architecture, ``"imagenet"`` timm's ImageNet weights (needs the network).
    ``CGNSForImageClassification(config)`` builds a random tower from a :class:`CGNSConfig`.
    """

    model_card_kind = "classification"

    def __init__(self, config: CGNSConfig):
        super().__init__(config)
        self.vision_model = AutoModel.from_config(config.vision_config)
        self.feature_dim = self.vision_model.timm_model.num_features
        self.classifier = nn.Linear(self.feature_dim, config.num_labels)
        self.post_init()
        self.freeze_vision_model()

    # ---------------------------------------------------------------- head
    def reset_classifier(self) -> None:
        """A fresh head from the current torch RNG: N(0, initializer_range) weights, zero bias (as post_init).

        Lets several probe seeds share one loaded tower (and one feature cache).
        """
        nn.init.normal_(self.classifier.weight, mean=0.0, std=self.config.initializer_range)
        nn.init.zeros_(self.classifier.bias)

    # ---------------------------------------------------------------- features
    @torch.no_grad()
    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) -> frozen features (B, feature_dim): ResNet mean pool / ViT CLS."""
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state
        if self.config.vision_kind == "grid":
            return hidden.mean(dim=(2, 3))
        if getattr(self.vision_model.timm_model, "cls_token", None) is not None:
            return hidden[:, 0]
        # ViTs trained without a class token have no CLS: their patch tokens are averaged instead.
        return hidden.mean(dim=1)

    def forward(self, pixel_values: Optional[torch.Tensor] = None, features: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> ImageClassifierOutput:
        """Give exactly one of ``pixel_values`` (B, 3, S, S) or ``features`` (B, feature_dim)."""
        if (pixel_values is None) == (features is None):
            raise ValueError("give exactly one of pixel_values or features")
        if features is None:
            features = self.extract_features(pixel_values)
        logits = self.classifier(features)
        loss = self.classification_loss(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """BCE-with-logits (multi-label, binary) or cross-entropy (single-label), by config.problem_type."""
        problem_type = self.config.problem_type
        if problem_type is None:
            # Same inference as the data contract: float (B, C) targets are multi-label, integer ones classes.
            problem_type = SINGLE_LABEL if not labels.is_floating_point() else MULTI_LABEL
        if problem_type == MULTI_LABEL:
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype).view_as(logits))
        if problem_type == SINGLE_LABEL:
            return F.cross_entropy(logits, labels.view(-1).long())
        raise ValueError(f"problem_type {problem_type!r} is not supported; "
                         f"use {MULTI_LABEL!r} or {SINGLE_LABEL!r}")


def check_cgns_export(pretrained_model_name_or_path, **hub_kwargs) -> None:
    """Raise a clear error unless the folder / hub id holds a CGNS config (``model_type="cgns"``)."""
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
    except OSError as err:
        where = "folder" if os.path.isdir(str(pretrained_model_name_or_path)) else "model"
        raise OSError(f"cannot read a CGNS export from {where} {pretrained_model_name_or_path!r}: "
                      f"{err}") from err
    model_type = config_dict.get("model_type")
    if model_type != CGNSConfig.model_type:
        raise ValueError(
            f"{pretrained_model_name_or_path!r} is not a CGNS export: its config has model_type "
            f"{model_type!r}, expected 'cgns'. A frozen-tower downstream model needs the CGNS image tower "
            f"(CGNSModel.save_pretrained).")


AutoModelForImageClassification.register(CGNSConfig, CGNSForImageClassification, exist_ok=True)

__all__ = ["CGNSForImageClassification", "FrozenVisionTowerMixin", "check_cgns_export", "INITS"]
