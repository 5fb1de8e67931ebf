"""CGNSConfig: a vision tower (timm through ``TimmWrapperConfig``) + a BERT-family text tower.

Defaults are the reference values of docs/method.md (sections A-C). Every width is read from the
sub-configs, so the same code serves ResNet-50/ViT-B16 + Bio_ClinicalBERT and the CPU-sized
resnet18 + MiniLM default.
"""
import math
from typing import Optional

from transformers import AutoConfig, PretrainedConfig, TimmWrapperConfig

VISION_FAMILIES = {
    # timm architecture prefix -> tower kind ("grid": B x C x h x w maps, "tokens": B x (prefix + P) x C)
    "resnet": "grid",
    "resnext": "grid",
    "wide_resnet": "grid",
    "seresnet": "grid",
    "vit_": "tokens",
    "deit_": "tokens",
}
TEXT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "camembert")
HARD_NEGATIVE_MODES = ("additive", "reference")
RECONSTRUCTION_TARGETS = ("image", "masked")
DEFAULT_MAX_TEXT_LENGTH = 256
CLUSTER_UPDATE_TIMINGS = ("before_loss", "after_step")
CLUSTER_INIT_SOURCES = ("batch", "queue")
HEAD_INITS = ("pytorch", "normal")
CLUSTER_FEATURES = ("cross", "text", "both")
CLUSTER_UPDATES = ("momentum", "spherical")
CLUSTER_ASSIGNMENTS = ("argmax", "sinkhorn")
EMPTY_CLUSTER_POLICIES = ("reseed", "split")
FALSE_NEGATIVE_GATES = ("cluster", "centroid", "similarity")
FALSE_NEGATIVE_HANDLINGS = ("bml", "remove", "attract")


def _is_int(value) -> bool:
    # bool is a subclass of int, but num_clusters=True is a mistake, not K = 1
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def vision_tower_kind(architecture: str) -> Optional[str]:
    """"grid" for ResNet-family timm architectures, "tokens" for ViT/DeiT, ``None`` if unsupported."""
    for prefix, kind in VISION_FAMILIES.items():
        if architecture.startswith(prefix):
            return kind
    return None


class CGNSConfig(PretrainedConfig):
    r"""Configuration of a [`CGNSModel`].

    Args:
        vision_config (`dict` or `TimmWrapperConfig`): the image tower; `architecture` must be a timm
            ResNet-family (grid features) or ViT/DeiT-family (token features) name.
        text_config (`dict` or BERT-family `PretrainedConfig`): the report tower.
        projection_dim (`int`, 768): shared embedding width D of every projection.
        image_size (`int`, 224): input resolution; fixes the attention-pool grid and the decoder output.
        attention_pool_heads (`int`, 8): heads of the CLIP-style attention pool over the ResNet grid.
        sentence_pool_heads (`int`, 8): heads of the sentence attention pool that makes the report vector.
        predictor_hidden_dim (`int`, None): SimSiam predictor bottleneck; default projection_dim // 2.
        logit_scale_init_value (`float`, ln 10): initial log inverse temperature of the global loss (tau 0.1).
        logit_scale_max (`float`, 100): the exponentiated scale is clamped at this value (CLIP).
        max_text_length (`int`, None): word pieces per report, [CLS]/[SEP] included; when not given,
            256 or the text tower's `max_position_embeddings` if that is smaller.
        local_text_temperature (`float`, 1.0): temperature of the sentence-level InfoNCE (reference: 1).
        use_clustering (`bool`, True): cross-modal k-means hard negatives and false-negative handling.
        num_clusters (`int`, 128): K.
        cluster_init_threshold (`float`, 0.4): centroids initialise once mean cos(text, cross-modal) <= this.
        cluster_momentum (`float`, 0.001): eta of the centroid update m <- eta * S_k + (1 - eta) * m.
        cluster_queue_size (`int`, None): recent cross-modal features kept for initialisation and
            re-seeding; default 2 * num_clusters.
        dead_cluster_patience (`int`, 5): re-seed a centroid that had no member for this many updates;
            0 disables it (reference behaviour).
        hard_negative_mode (`str`, "additive"): "additive" keeps every anchor's hard-negative logit and adds
            `hard_negative_weight` to the anchor's own (ClusterNS); "reference" multiplies (B.3 e).
        hard_negative_weight (`float`, 3.0).
        remove_false_negatives (`bool`, False): the older spelling of ``false_negative_handling="remove"``.
        bml_alpha / bml_beta (`float`, 0.2 / 0.5): bidirectional margin loss margins.
        bml_weight (`float`, 1e-4).
        use_reconstruction (`bool`, True): build the CM-MIR decoder (used in stage 2).
        mask_ratio (`float`, 0.5): share of image tokens replaced by the mask token in CM-MIR.
        reconstruction_weight (`float`, 10.0): the L1 reconstruction loss is multiplied by this.
        reconstruction_target (`str`, "image"): "image" = L1 over the whole image, "masked" = masked regions only.
        decoder_layers / decoder_heads / decoder_ffn_dim (`int`, 6 / 8 / 2048): ViT-tower CM-MIR decoder.
        decoder_channels (`list[int]`, [512, 256, 128, 64]): widths of the convolutional upsampling blocks.
        global_loss_weight / local_image_loss_weight / local_text_loss_weight (`float`, 1.0).
        cluster_update_timing (`str`, "before_loss"): "before_loss" (reference, B.3 a then b): a training
            forward with ``return_loss`` updates (or initialises) the centroids with this batch's detached
            cross-modal features, then takes the hard negatives from the updated centroids; "after_step":
            the loss reads the previous centroids and ``model.after_optimizer_step()`` applies the update.
        cluster_init_source (`str`, "batch"): initialise the centroids from exactly the triggering
            (global) batch (reference; a batch with fewer than K features falls back to the queue), or
            "queue": from the last ``cluster_queue_size`` features.
        decoder_align_corners (`bool`, True): bilinear ×2 upsampling of the CM-MIR decoders (reference True).
        cluster_features (`str`, "text"): what the centroids are fitted to: the cross-modal sentence features
            z2 ("cross", reference), the text sentence features z1 ("text"), or both ("both").
        cluster_update (`str`, "spherical"): "momentum" = the reference ``m <- eta * S_k + (1 - eta) * m`` (a sum);
            "spherical" = mini-batch spherical k-means, per-centre rate n_k / N_k (``cluster_count_decay``).
        cluster_assignment (`str`, "argmax"): how the update assigns points: nearest centroid (reference) or
            balanced by Sinkhorn-Knopp ("sinkhorn", as SwAV / MGCA).
        empty_cluster_policy (`str`, "reseed"): a centroid dead for ``dead_cluster_patience`` updates is
            re-seeded from a queued feature ("reseed") or refilled by splitting the largest cluster ("split").
        cluster_warmup_updates (`int`, 0): the centroids initialise no earlier than this many updates.
        cluster_count_decay (`float`, 0.9): forgetting factor of the per-centre counts (1 = plain mini-batch k-means).
        false_negative_gate (`str`, "cluster"): which same-cluster pairs are false negatives: all ("cluster",
            reference), those closer to the anchor than its centroid ("centroid", ClusterNS's test), or those with
            text cosine >= ``false_negative_threshold`` ("similarity").
        false_negative_threshold (`float`, 0.9): the "similarity" gate's cosine.
        false_negative_handling (`str`, "remove"): besides the BML term (``bml_weight``), false negatives are kept
            in the InfoNCE denominator ("bml", reference), removed from it ("remove") or made positives ("attract").
        use_hard_negatives (`bool`, True): the centroid hard-negative logits (ablation switch).
        head_init (`str`, "pytorch"): the heads' Linear/Conv2d layers keep PyTorch's default initialisation
            (reference, A.3; the projection weights are N(0, in_dim^-1/2)); "normal": N(0, initializer_range)
            weights and zero biases (the transformers convention).

    The clustering defaults (text features, spherical k-means with count decay 0.9, re-seeding after 5 idle
    updates, false negatives removed from the denominator) were chosen by measuring false-negative precision and
    recall against the synthetic data's sentence meanings (docs/clustering.md); the reference's are in
    ``REFERENCE_SETTINGS``. ``CGNSConfig.reference_preset(**kwargs)`` builds the configuration that reproduces the
    authors' code wherever a deliberate fix is a flag (docs/deviations.md).
    """

    model_type = "cgns"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        projection_dim: int = 768,
        image_size: int = 224,
        attention_pool_heads: int = 8,
        sentence_pool_heads: int = 8,
        predictor_hidden_dim: Optional[int] = None,
        logit_scale_init_value: float = math.log(10.0),
        logit_scale_max: float = 100.0,
        max_text_length: Optional[int] = None,
        local_text_temperature: float = 1.0,
        use_clustering: bool = True,
        num_clusters: int = 128,
        cluster_init_threshold: float = 0.4,
        cluster_momentum: float = 0.001,
        cluster_queue_size: Optional[int] = None,
        dead_cluster_patience: int = 5,
        hard_negative_mode: str = "additive",
        hard_negative_weight: float = 3.0,
        remove_false_negatives: bool = False,
        bml_alpha: float = 0.2,
        bml_beta: float = 0.5,
        bml_weight: float = 1e-4,
        use_reconstruction: bool = True,
        mask_ratio: float = 0.5,
        reconstruction_weight: float = 10.0,
        reconstruction_target: str = "image",
        decoder_layers: int = 6,
        decoder_heads: int = 8,
        decoder_ffn_dim: int = 2048,
        decoder_channels=(512, 256, 128, 64),
        global_loss_weight: float = 1.0,
        local_image_loss_weight: float = 1.0,
        local_text_loss_weight: float = 1.0,
        initializer_range: float = 0.02,
        cluster_update_timing: str = "before_loss",
        cluster_init_source: str = "batch",
        decoder_align_corners: bool = True,
        head_init: str = "pytorch",
        cluster_features: str = "text",
        cluster_update: str = "spherical",
        cluster_assignment: str = "argmax",
        empty_cluster_policy: str = "reseed",
        cluster_warmup_updates: int = 0,
        cluster_count_decay: float = 0.9,
        false_negative_gate: str = "cluster",
        false_negative_threshold: float = 0.9,
        false_negative_handling: str = "remove",
        use_hard_negatives: bool = True,
        **kwargs,
    ):
        if vision_config is None:
            vision_config = TimmWrapperConfig(architecture="resnet50")
        elif isinstance(vision_config, dict):
            vision_config = dict(vision_config)
            vision_config.setdefault("model_type", "timm_wrapper")
            model_type = vision_config.pop("model_type")
            vision_config = AutoConfig.for_model(model_type, **vision_config)
        if text_config is None:
            text_config = AutoConfig.for_model("bert")
        elif isinstance(text_config, dict):
            text_config = dict(text_config)
            model_type = text_config.pop("model_type", "bert")
            text_config = AutoConfig.for_model(model_type, **text_config)
        self.vision_config = vision_config
        self.text_config = text_config
        self.projection_dim = projection_dim
        self.image_size = image_size
        self.attention_pool_heads = attention_pool_heads
        self.sentence_pool_heads = sentence_pool_heads
        self.predictor_hidden_dim = predictor_hidden_dim if predictor_hidden_dim is not None else projection_dim // 2
        self.logit_scale_init_value = logit_scale_init_value
        self.logit_scale_max = logit_scale_max
        if max_text_length is None:
            # A default that was not asked for follows the text tower instead of failing validation.
            max_positions = getattr(text_config, "max_position_embeddings", None)
            max_text_length = min(DEFAULT_MAX_TEXT_LENGTH, max_positions) if max_positions else DEFAULT_MAX_TEXT_LENGTH
        self.max_text_length = max_text_length
        self.local_text_temperature = local_text_temperature
        self.use_clustering = use_clustering
        self.num_clusters = num_clusters
        self.cluster_init_threshold = cluster_init_threshold
        self.cluster_momentum = cluster_momentum
        self.cluster_queue_size = cluster_queue_size if cluster_queue_size is not None else 2 * num_clusters
        self.dead_cluster_patience = dead_cluster_patience
        self.hard_negative_mode = hard_negative_mode
        self.hard_negative_weight = hard_negative_weight
        self.remove_false_negatives = remove_false_negatives
        self.bml_alpha = bml_alpha
        self.bml_beta = bml_beta
        self.bml_weight = bml_weight
        self.use_reconstruction = use_reconstruction
        self.mask_ratio = mask_ratio
        self.reconstruction_weight = reconstruction_weight
        self.reconstruction_target = reconstruction_target
        self.decoder_layers = decoder_layers
        self.decoder_heads = decoder_heads
        self.decoder_ffn_dim = decoder_ffn_dim
        self.decoder_channels = list(decoder_channels)
        self.global_loss_weight = global_loss_weight
        self.local_image_loss_weight = local_image_loss_weight
        self.local_text_loss_weight = local_text_loss_weight
        self.initializer_range = initializer_range
        self.cluster_update_timing = cluster_update_timing
        self.cluster_init_source = cluster_init_source
        self.decoder_align_corners = decoder_align_corners
        self.head_init = head_init
        self.cluster_features = cluster_features
        self.cluster_update = cluster_update
        self.cluster_assignment = cluster_assignment
        self.empty_cluster_policy = empty_cluster_policy
        self.cluster_warmup_updates = cluster_warmup_updates
        self.cluster_count_decay = cluster_count_decay
        self.false_negative_gate = false_negative_gate
        self.false_negative_threshold = false_negative_threshold
        # the older boolean spelling of false_negative_handling="remove"
        self.false_negative_handling = ("remove" if remove_false_negatives and false_negative_handling == "bml"
                                        else false_negative_handling)
        self.use_hard_negatives = use_hard_negatives
        super().__init__(**kwargs)
        self.validate()

    @property
    def vision_kind(self) -> str:
        return vision_tower_kind(self.vision_config.architecture)

    @property
    def text_hidden_size(self) -> int:
        return self.text_config.hidden_size

    def validate(self) -> None:
        """Raise ``ValueError`` with a readable message for any inconsistent setting."""
        problems = []
        if getattr(self.vision_config, "model_type", None) != "timm_wrapper":
            problems.append(
                f"vision_config must be a TimmWrapperConfig (model_type 'timm_wrapper'), got "
                f"{getattr(self.vision_config, 'model_type', type(self.vision_config).__name__)!r}")
        elif vision_tower_kind(self.vision_config.architecture) is None:
            problems.append(
                f"unsupported vision tower {self.vision_config.architecture!r}: CGNS supports timm ResNet-family "
                f"({', '.join(k for k, v in VISION_FAMILIES.items() if v == 'grid')}) and ViT-family "
                f"({', '.join(k for k, v in VISION_FAMILIES.items() if v == 'tokens')}) architectures")
        if getattr(self.text_config, "model_type", None) not in TEXT_MODEL_TYPES:
            problems.append(f"unsupported text tower model_type {getattr(self.text_config, 'model_type', None)!r}; "
                            f"expected one of {TEXT_MODEL_TYPES}")
        for name in ("projection_dim", "image_size", "attention_pool_heads", "sentence_pool_heads",
                     "predictor_hidden_dim", "max_text_length", "num_clusters", "cluster_queue_size",
                     "decoder_layers", "decoder_heads", "decoder_ffn_dim"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if _is_int(self.num_clusters) and self.num_clusters == 1:
            # the hard negative of a sentence is its second-nearest centroid (B.3)
            problems.append("num_clusters must be >= 2 (the hard negative is the second-nearest centroid), got 1")
        # NaN passes every ``<`` / ``<=`` check below, so each float field is first checked to be a real number
        # logit_scale_max may be inf (no cap: the reference preset) but never NaN
        if not (_is_real(self.logit_scale_max) or self.logit_scale_max == math.inf):
            problems.append(f"logit_scale_max must be a finite number, got {self.logit_scale_max!r} (or inf: no cap)")
        for name in ("logit_scale_init_value", "local_text_temperature", "cluster_init_threshold",
                     "cluster_momentum", "hard_negative_weight", "bml_alpha", "bml_beta", "bml_weight",
                     "mask_ratio", "reconstruction_weight", "global_loss_weight", "local_image_loss_weight",
                     "local_text_loss_weight", "initializer_range"):
            value = getattr(self, name)
            if not _is_real(value):
                problems.append(f"{name} must be a finite number, got {value!r}")
        if problems:
            raise ValueError("invalid CGNSConfig:\n  - " + "\n  - ".join(problems))
        if not problems:
            if self.projection_dim % self.sentence_pool_heads:
                problems.append(f"projection_dim ({self.projection_dim}) must be divisible by sentence_pool_heads "
                                f"({self.sentence_pool_heads})")
            if self.use_reconstruction and self.vision_kind == "tokens" and self.projection_dim % self.decoder_heads:
                problems.append(f"projection_dim ({self.projection_dim}) must be divisible by decoder_heads "
                                f"({self.decoder_heads})")
            if self.image_size % 32:
                problems.append(f"image_size ({self.image_size}) must be a multiple of 32 (the tower's stride)")
            if self.cluster_queue_size < self.num_clusters:
                problems.append(f"cluster_queue_size ({self.cluster_queue_size}) must be >= num_clusters "
                                f"({self.num_clusters}): initialisation needs K features")
            max_positions = getattr(self.text_config, "max_position_embeddings", None)
            if max_positions is not None and self.max_text_length > max_positions:
                problems.append(f"max_text_length ({self.max_text_length}) exceeds the text tower's "
                                f"max_position_embeddings ({max_positions})")
        if self.logit_scale_max <= 0 or not math.isfinite(self.logit_scale_init_value):
            problems.append("logit_scale_max must be positive and logit_scale_init_value finite")
        elif math.exp(self.logit_scale_init_value) > self.logit_scale_max:
            problems.append(f"initial temperature 1/exp({self.logit_scale_init_value}) is below the clamp "
                            f"1/{self.logit_scale_max}")
        if not self.decoder_channels or any(not _is_int(c) or c <= 0 for c in self.decoder_channels):
            problems.append(f"decoder_channels must be a non-empty list of positive integers, got {self.decoder_channels}")
        if self.local_text_temperature <= 0:
            problems.append(f"local_text_temperature must be > 0, got {self.local_text_temperature}")
        if self.hard_negative_mode not in HARD_NEGATIVE_MODES:
            problems.append(f"hard_negative_mode must be one of {HARD_NEGATIVE_MODES}, got {self.hard_negative_mode!r}")
        if self.reconstruction_target not in RECONSTRUCTION_TARGETS:
            problems.append(f"reconstruction_target must be one of {RECONSTRUCTION_TARGETS}, "
                            f"got {self.reconstruction_target!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            problems.append(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 < self.cluster_momentum <= 1.0:
            problems.append(f"cluster_momentum must be in (0, 1], got {self.cluster_momentum}")
        if not 0.0 <= self.bml_alpha <= self.bml_beta:
            problems.append(f"need 0 <= bml_alpha <= bml_beta, got alpha={self.bml_alpha}, beta={self.bml_beta}")
        if self.dead_cluster_patience < 0:
            problems.append(f"dead_cluster_patience must be >= 0, got {self.dead_cluster_patience}")
        for name in ("hard_negative_weight", "bml_weight", "reconstruction_weight", "global_loss_weight",
                     "local_image_loss_weight", "local_text_loss_weight"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not _is_int(self.cluster_warmup_updates) or self.cluster_warmup_updates < 0:
            problems.append(f"cluster_warmup_updates must be an integer >= 0, got {self.cluster_warmup_updates!r}")
        if not _is_real(self.cluster_count_decay) or not 0.0 < self.cluster_count_decay <= 1.0:
            problems.append(f"cluster_count_decay must be in (0, 1], got {self.cluster_count_decay!r}")
        if not _is_real(self.false_negative_threshold) or not -1.0 <= self.false_negative_threshold <= 1.0:
            problems.append(f"false_negative_threshold must be a cosine in [-1, 1], got {self.false_negative_threshold!r}")
        if not isinstance(self.use_hard_negatives, bool):
            problems.append(f"use_hard_negatives must be true or false, got {self.use_hard_negatives!r}")
        if self.remove_false_negatives and self.false_negative_handling != "remove":
            problems.append("remove_false_negatives=True contradicts false_negative_handling="
                            f"{self.false_negative_handling!r} (it is the older spelling of 'remove')")
        for name, allowed in (("cluster_update_timing", CLUSTER_UPDATE_TIMINGS),
                              ("cluster_init_source", CLUSTER_INIT_SOURCES), ("head_init", HEAD_INITS),
                              ("cluster_features", CLUSTER_FEATURES), ("cluster_update", CLUSTER_UPDATES),
                              ("cluster_assignment", CLUSTER_ASSIGNMENTS),
                              ("empty_cluster_policy", EMPTY_CLUSTER_POLICIES),
                              ("false_negative_gate", FALSE_NEGATIVE_GATES),
                              ("false_negative_handling", FALSE_NEGATIVE_HANDLINGS)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.decoder_align_corners, bool):
            problems.append(f"decoder_align_corners must be true or false, got {self.decoder_align_corners!r}")
        if problems:
            raise ValueError("invalid CGNSConfig:\n  - " + "\n  - ".join(problems))

    @classmethod
    def reference_preset(cls, **kwargs) -> "CGNSConfig":
        """The configuration that reproduces the authors' code wherever a deliberate fix is a flag
        (``REFERENCE_SETTINGS``; docs/deviations.md lists the fixes that are not flags). ``kwargs`` set the
        towers and sizes (``vision_config``, ``text_config``, ...) and may override any setting."""
        return cls(**{**REFERENCE_SETTINGS, **kwargs})


# Every objective/behaviour setting at the value of the authors' code (docs/method.md A-C and G). Sizes and
# towers are not here: the reference's are the CGNSConfig defaults (ResNet-50/ViT-B16 + BERT, D 768, K 128).
REFERENCE_SETTINGS = {
    "hard_negative_mode": "reference",        # G.12: multiplicative mask (default: additive, ClusterNS)
    "hard_negative_weight": 3.0,
    "remove_false_negatives": False,
    "local_text_temperature": 1.0,
    "bml_alpha": 0.2,
    "bml_beta": 0.5,
    "bml_weight": 1e-4,
    "num_clusters": 128,
    "cluster_init_threshold": 0.4,
    "cluster_momentum": 0.001,
    "dead_cluster_patience": 0,
    "cluster_update_timing": "before_loss",
    "cluster_init_source": "batch",
    "logit_scale_init_value": math.log(10.0),
    "logit_scale_max": math.inf,              # the reference never clamps the temperature
    "mask_ratio": 0.5,
    "reconstruction_weight": 10.0,
    "reconstruction_target": "image",
    "decoder_align_corners": True,
    "head_init": "pytorch",
    "cluster_features": "cross",
    "cluster_update": "momentum",
    "cluster_assignment": "argmax",
    "empty_cluster_policy": "reseed",
    "cluster_warmup_updates": 0,
    "cluster_count_decay": 1.0,
    "false_negative_gate": "cluster",
    "false_negative_handling": "bml",
    "use_hard_negatives": True,
    "global_loss_weight": 1.0,
    "local_image_loss_weight": 1.0,
    "local_text_loss_weight": 1.0,
}


__all__ = ["CGNSConfig", "vision_tower_kind", "VISION_FAMILIES", "TEXT_MODEL_TYPES",
           "REFERENCE_SETTINGS", "CLUSTER_UPDATE_TIMINGS", "CLUSTER_INIT_SOURCES", "HEAD_INITS", "CLUSTER_FEATURES",
           "CLUSTER_UPDATES", "CLUSTER_ASSIGNMENTS", "EMPTY_CLUSTER_POLICIES", "FALSE_NEGATIVE_GATES",
           "FALSE_NEGATIVE_HANDLINGS"]
