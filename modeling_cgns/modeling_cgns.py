"""CGNS model: image tower + report tower, global and local alignment, cross-modal clustering state
and the CM-MIR decoder (docs/method.md A-B, docs/huggingface.md, docs/deviations.md).

Reads top to bottom: batched building blocks -> decoders -> pre-trained base -> CGNSModel.
Everything the reference computes per sample is batched here with padding masks; the slow
per-sample versions live in tests as parity oracles.
"""
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, logging

from . import losses
from .clustering import CrossModalKMeans
from .configuration_cgns import CGNSConfig
from .model_card import public_name

logger = logging.get_logger(__name__)
# CrossModalKMeans buffers holding features; every other one is the bool ``initialized`` or a long counter.
_CLUSTERING_FLOAT_BUFFERS = ("centroid_vectors", "queue", "cluster_sizes")


# --------------------------------------------------------------------------------------------------
# batched building blocks
# --------------------------------------------------------------------------------------------------

def segment_mean(token_features: torch.Tensor, sentence_index: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token -> sentence features by averaging the tokens of each sentence (A.4), batched.

    Args:
        token_features: (B, L, D).
        sentence_index: (B, L) long; sentence id 0..S-1 of each token, -1 for [CLS]/[SEP]/padding.
        attention_mask: (B, L); tokens with mask 0 never count, whatever their sentence id.
    Returns:
        sentences (B, S_max, D) — rows of empty or absent sentences are zero — and
        sentence_mask (B, S_max) bool, True where the sentence has at least one token.
    """
    if attention_mask is not None:
        sentence_index = sentence_index.masked_fill(attention_mask == 0, -1)
    num_sentences = max(int(sentence_index.max()) + 1, 1) if sentence_index.numel() else 1
    ids = torch.arange(num_sentences, device=sentence_index.device)
    membership = (sentence_index.unsqueeze(1) == ids.view(1, -1, 1)).to(token_features.dtype)  # (B, S, L)
    counts = membership.sum(dim=-1)
    sentences = membership @ token_features / counts.clamp(min=1.0).unsqueeze(-1)
    return sentences, counts > 0


def whole_text_sentence_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``sentence_index`` when none is given (a CLIP-style call with a plain tokenizer's output): the whole text
    is one sentence.

    Args:
        attention_mask: (B, L); the first and the last attended token of each row are the tokenizer's
            [CLS] and [SEP] (BERT-family tokenisation of one text) and belong to no sentence.
    Returns:
        (B, L) long: 0 on every other attended token, -1 on [CLS], [SEP] and padding.
    """
    attended = attention_mask.bool()
    positions = torch.arange(attended.shape[1], device=attended.device).expand_as(attended)
    first = torch.where(attended, positions, attended.shape[1]).min(dim=1, keepdim=True).values
    last = torch.where(attended, positions, -1).max(dim=1, keepdim=True).values
    inside = attended & (positions > first) & (positions < last)
    return torch.where(inside, 0, -1).long()


class CGNSAttentionPool2d(nn.Module):
    """CLIP-style attention pooling over the ResNet grid (A.1): [mean; tokens] + positions -> MHA -> mean slot.

    Only the mean slot's output is used, so only its query is computed.
    """

    def __init__(self, num_tokens: int, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"vision width {width} is not divisible by attention_pool_heads {num_heads}")
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.zeros(num_tokens + 1, width))
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, P, C) -> pooled (B, C)."""
        if tokens.shape[1] + 1 != self.positional_embedding.shape[0]:
            raise ValueError(f"attention pool built for {self.positional_embedding.shape[0] - 1} grid tokens, got "
                             f"{tokens.shape[1]}: image_size in the config must match the input resolution")
        seq = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.positional_embedding
        return self.c_proj(_single_query_attention(self.q_proj(seq[:, :1]), self.k_proj(seq), self.v_proj(seq),
                                                   self.num_heads))


class CGNSSentenceAttentionPool(nn.Module):
    """Report vector from its sentences (A.5): [mean of valid sentences; sentences] -> MHA -> mean slot.

    Padded sentences are excluded by a key-padding mask; the mean slot is always attendable, so a
    report without sentences yields a finite vector (the projection of a zero mean).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, sentences: torch.Tensor, sentence_mask: torch.Tensor) -> torch.Tensor:
        """sentences (B, S, D), sentence_mask (B, S) -> report vectors (B, D) (not normalised)."""
        weights = sentence_mask.to(sentences.dtype).unsqueeze(-1)
        mean = (sentences * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp(min=1.0)
        seq = torch.cat([mean, sentences], dim=1)
        key_mask = torch.cat([torch.ones_like(sentence_mask[:, :1]), sentence_mask], dim=1)
        return self.c_proj(_single_query_attention(self.q_proj(seq[:, :1]), self.k_proj(seq), self.v_proj(seq),
                                                   self.num_heads, key_mask))


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                            key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head softmax attention of one query per row: q (B, 1, C), k/v (B, T, C) -> (B, C)."""
    b, t, c = k.shape
    head = c // num_heads
    q = q.view(b, 1, num_heads, head).transpose(1, 2)
    k = k.view(b, t, num_heads, head).transpose(1, 2)
    v = v.view(b, t, num_heads, head).transpose(1, 2)
    mask = None if key_mask is None else key_mask.bool().view(b, 1, 1, t)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, c)


class CGNSLocalCrossAttention(nn.Module):
    """Sigmoid cross-attention between image tokens and sentences in both directions (A.7), batched.

    image-to-text: ``T~ = sigma(Q2(T) K1(V)^T / sqrt(D)) V1(V)`` — one image-conditioned vector per sentence;
    text-to-image: ``V~ = (sigma(Q1(V) K2(T)^T / sqrt(D)) * mask) V2(T)`` — padded sentences contribute 0.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.scale = 1.0 / math.sqrt(dim)
        self.image_query = nn.Linear(dim, dim)
        self.image_key = nn.Linear(dim, dim)
        self.image_value = nn.Linear(dim, dim)
        self.text_query = nn.Linear(dim, dim)
        self.text_key = nn.Linear(dim, dim)
        self.text_value = nn.Linear(dim, dim)

    def forward(self, image_tokens: torch.Tensor, sentences: torch.Tensor, sentence_mask: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """image_tokens (B, P, D), sentences (B, S, D), sentence_mask (B, S) ->
        (text_to_image (B, P, D), image_to_text (B, S, D))."""
        image_to_text_weights = torch.sigmoid(
            self.text_query(sentences) @ self.image_key(image_tokens).transpose(1, 2) * self.scale)
        image_to_text = image_to_text_weights @ self.image_value(image_tokens)
        text_to_image_weights = torch.sigmoid(
            self.image_query(image_tokens) @ self.text_key(sentences).transpose(1, 2) * self.scale)
        text_to_image_weights = text_to_image_weights * sentence_mask.to(sentences.dtype).unsqueeze(1)
        text_to_image = text_to_image_weights @ self.text_value(sentences)
        return text_to_image, image_to_text

    def attention_weights(self, image_tokens: torch.Tensor, sentences: torch.Tensor, sentence_mask: torch.Tensor
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two sigmoid attention maps of :meth:`forward` (the same expressions), for grounding and pictures.

        Returns (text_to_image_weights (B, P, S), zero on padded sentences; image_to_text_weights (B, S, P)):
        ``forward`` is ``(text_to_image_weights @ V2(T), image_to_text_weights @ V1(V))``.
        """
        image_to_text_weights = torch.sigmoid(
            self.text_query(sentences) @ self.image_key(image_tokens).transpose(1, 2) * self.scale)
        text_to_image_weights = torch.sigmoid(
            self.image_query(image_tokens) @ self.text_key(sentences).transpose(1, 2) * self.scale)
        text_to_image_weights = text_to_image_weights * sentence_mask.to(sentences.dtype).unsqueeze(1)
        return text_to_image_weights, image_to_text_weights


#: What :meth:`CGNSModel.get_sentence_attention` can return (see there).
ATTENTION_DIRECTIONS = ("image_to_text", "text_to_image")
#: The grounding map by default: the sentence as the query over the image tokens (A_i2t), the attention
#: that builds T~ and so is trained by the local text loss (docs/evaluation.md).
DEFAULT_ATTENTION_DIRECTION = "image_to_text"


class CGNSPredictor(nn.Sequential):
    """SimSiam predictor h (B.2): Linear(D, D/2) -> ReLU -> Linear(D/2, D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


def random_token_mask(batch: int, num_tokens: int, ratio: float, device, generator=None) -> torch.Tensor:
    """Exactly ``round(ratio * P)`` masked positions per sample, chosen uniformly: (B, P) bool."""
    num_masked = int(round(ratio * num_tokens))
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < num_masked


def _upsampling_stages(grid: int, image_size: int) -> int:
    factor = image_size // grid
    if grid * factor != image_size or factor & (factor - 1):
        raise ValueError(f"CM-MIR decoder needs image_size/grid to be a power of two, got {image_size}/{grid}")
    return int(math.log2(factor))


def _conv_upsampling_head(in_channels: int, widths, stages: int, out_channels: int,
                          align_corners: bool = True) -> nn.Sequential:
    """``stages`` x {Conv3x3 -> ReLU -> bilinear x2}, the last block without ReLU, then Tanh.

    No ReLU before the Tanh: the target spans [-1, 1] (fixes the reference's [0, 1) output, G.10).
    ``align_corners=True`` is the reference's upsampling (B.4).
    """
    widths = list(widths)[: stages - 1]
    if len(widths) < stages - 1:
        widths += [widths[-1] if widths else in_channels] * (stages - 1 - len(widths))
    layers = []
    channels = [in_channels] + widths
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True),
                   nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align_corners)]
    layers += [nn.Conv2d(channels[-1], out_channels, 3, padding=1),
               nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align_corners), nn.Tanh()]
    return nn.Sequential(*layers)


class CGNSGridDecoder(nn.Module):
    """CM-MIR decoder for grid towers (ResNet, B.4): masked image tokens ++ text-to-image features on the
    h x w grid -> convolutional upsampling to the input size."""

    def __init__(self, dim: int, grid: int, image_size: int, widths, out_channels: int = 3,
                 align_corners: bool = True):
        super().__init__()
        self.grid = grid
        self.head = _conv_upsampling_head(2 * dim, widths, _upsampling_stages(grid, image_size), out_channels,
                                          align_corners)

    def forward(self, masked_image_tokens: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
        b, p, d = masked_image_tokens.shape
        fused = torch.cat([masked_image_tokens, text_to_image], dim=-1)        # (B, P, 2D), row-major grid
        fused = fused.transpose(1, 2).reshape(b, 2 * d, self.grid, self.grid)
        return self.head(fused)


class CGNSTokenDecoder(nn.Module):
    """CM-MIR decoder for token towers (ViT, B.4): attention fusion of the masked image tokens with the
    text-to-image features, positions, a transformer decoder (separate weights per layer, batch-first:
    no attention across the batch), then convolutional upsampling."""

    def __init__(self, dim: int, grid: int, image_size: int, widths, num_layers: int, num_heads: int,
                 ffn_dim: int, out_channels: int = 3, align_corners: bool = True):
        super().__init__()
        self.grid = grid
        self.fusion = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.position_embedding = nn.Parameter(torch.zeros(grid * grid, dim))
        layer = nn.TransformerDecoderLayer(dim, num_heads, ffn_dim, dropout=0.1, batch_first=True)
        self.transformer = nn.TransformerDecoder(layer, num_layers)   # deep-copies: layers do not share weights
        self.head = _conv_upsampling_head(dim, widths, _upsampling_stages(grid, image_size), out_channels,
                                          align_corners)

    def forward(self, masked_image_tokens: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
        b, p, d = masked_image_tokens.shape
        fused, _ = self.fusion(masked_image_tokens, text_to_image, text_to_image, need_weights=False)
        fused = fused + self.position_embedding
        decoded = self.transformer(fused, fused)
        return self.head(decoded.transpose(1, 2).reshape(b, d, self.grid, self.grid))


# --------------------------------------------------------------------------------------------------
# outputs and base class
# --------------------------------------------------------------------------------------------------

@dataclass
class CGNSOutput(ModelOutput):
    """Output of :class:`CGNSModel`.

    Args:
        loss: weighted sum of the named losses (present when ``return_loss``).
        global_loss / local_image_loss / local_text_loss / reconstruction_loss / bml_loss: the named terms
            (reconstruction only when ``reconstruct=True``; bml is already inside local_text_loss).
        logits_per_image: (B, B_world) scaled image-report similarities; logits_per_text likewise.
        image_embeds / text_embeds: (B, D) normalised global embeddings.
        local_image_embeds: (B, P, D) normalised image tokens V.
        sentence_embeds: (B, S, D) sentence features T; sentence_mask (B, S) marks real sentences.
        text_to_image_features: (B, P, D) V~; image_to_text_features: (B, S, D) T~.
        text_sentence_features / cross_sentence_features: (N, D) the valid rows of T and T~, flattened
            in batch order — the anchors and positives of the local text loss and the k-means input.
        reconstruction: (B, C, H, W) CM-MIR output when ``reconstruct=True``; token_mask (B, P) the masked tokens.
        retrieval: dict of detached scalars i2t_acc1, i2t_acc5, t2i_acc1, t2i_acc5 and logit_scale.
        clustering: when the local text loss used the centroids, what it did with them (detached):
            ``own_cluster`` (N,) and ``hard_cluster`` (N,) of every anchor, ``false_negative_mask`` (N, N).
        vision_hidden_states / text_hidden_states: the towers' per-layer hidden states when
            ``output_hidden_states=True`` (timm ``forward_intermediates`` maps; BERT (B, L, H) per layer).

    As a tuple (``return_dict=False`` or ``out.to_tuple()``) only the fields that are set appear, in the
    order above: with ``return_loss=True`` the loss is index 0.
    """

    loss: Optional[torch.FloatTensor] = None
    global_loss: Optional[torch.FloatTensor] = None
    local_image_loss: Optional[torch.FloatTensor] = None
    local_text_loss: Optional[torch.FloatTensor] = None
    reconstruction_loss: Optional[torch.FloatTensor] = None
    bml_loss: Optional[torch.FloatTensor] = None
    logits_per_image: Optional[torch.FloatTensor] = None
    logits_per_text: Optional[torch.FloatTensor] = None
    image_embeds: Optional[torch.FloatTensor] = None
    text_embeds: Optional[torch.FloatTensor] = None
    local_image_embeds: Optional[torch.FloatTensor] = None
    sentence_embeds: Optional[torch.FloatTensor] = None
    sentence_mask: Optional[torch.BoolTensor] = None
    text_to_image_features: Optional[torch.FloatTensor] = None
    image_to_text_features: Optional[torch.FloatTensor] = None
    text_sentence_features: Optional[torch.FloatTensor] = None
    cross_sentence_features: Optional[torch.FloatTensor] = None
    reconstruction: Optional[torch.FloatTensor] = None
    token_mask: Optional[torch.BoolTensor] = None
    retrieval: Optional[Dict[str, torch.Tensor]] = None
    clustering: Optional[Dict[str, torch.Tensor]] = None
    vision_hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
    text_hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None

    def named_losses(self) -> Dict[str, torch.Tensor]:
        """Every loss term that was computed, by name (for logging)."""
        names = ("loss", "global_loss", "local_image_loss", "local_text_loss", "reconstruction_loss", "bml_loss")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


class CGNSPreTrainedModel(PreTrainedModel):
    config_class = CGNSConfig
    config: CGNSConfig
    base_model_prefix = "cgns"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # Both towers run under SDPA (BERT and the timm wrapper declare it); the CGNS heads call
    # F.scaled_dot_product_attention themselves. Flash/flex attention are BERT-only, so not declared.
    _supports_sdpa = True

    # which model card an export of this class gets (modeling_cgns.model_card.KINDS)
    model_card_kind = "pretraining"

    # ---------------------------------------------------------------- model card and Hub upload
    @property
    def model_card_info(self) -> Dict:
        """What the training script knows for the card (``data``, ``training_time_s``, ``training``, ``metrics``,
        ``downstream``, ``base_model``; see :func:`modeling_cgns.model_card.build_model_card`). Not saved in
        the config: a card is written by every ``save_pretrained``."""
        return self.__dict__.setdefault("_model_card_info", {})

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None,
                        push_to_hub: bool = False, **kwargs):
        """``PreTrainedModel.save_pretrained`` plus the model card ``README.md``; with ``push_to_hub=True``
        the card is uploaded with the weights (transformers' own push would write its generic card)."""
        hub = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "commit_description", "create_pr",
                                          "revision", "private") if k in kwargs} if push_to_hub else {}
        result = super().save_pretrained(save_directory, is_main_process=is_main_process, state_dict=state_dict,
                                         **kwargs)
        if is_main_process:
            repo_id = hub.pop("repo_id", None)
            self._write_model_card(save_directory, repo_id)
            if push_to_hub:
                self._upload_export(save_directory, repo_id or os.path.basename(os.path.normpath(str(save_directory))),
                                    token=kwargs.get("token"), **hub)
        return result

    def push_to_hub(self, repo_id: str, *, commit_message: Optional[str] = None,
                    commit_description: Optional[str] = None, private: Optional[bool] = None, token=None,
                    revision: Optional[str] = None, create_pr: bool = False, max_shard_size="50GB", tags=None):
        """Upload the weights, config and model card (this package's card, not transformers' generic one)."""
        with tempfile.TemporaryDirectory() as folder:
            super().save_pretrained(folder, max_shard_size=max_shard_size)
            self._write_model_card(folder, repo_id)
            return self._upload_export(folder, repo_id, token=token, private=private, commit_message=commit_message,
                                       commit_description=commit_description, revision=revision, create_pr=create_pr)

    def _write_model_card(self, folder, repo_id: Optional[str] = None) -> str:
        from .model_card import write_model_card

        info = dict(self.model_card_info)
        if repo_id:
            info["repo_id"] = repo_id
        return write_model_card(folder, self.config, kind=self.model_card_kind, **info)

    def _upload_export(self, folder, repo_id: str, token=None, private: Optional[bool] = None, **commit):
        from huggingface_hub import create_repo

        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        return self._upload_modified_files(folder, repo_id, files_timestamps={}, token=token, **commit)

    def _init_weights(self, module):
        # Only the heads reach this method (each tower is a PreTrainedModel with its own _init_weights).
        if (isinstance(self, CGNSModel) and self.config.head_init == "pytorch"
                and isinstance(module, (nn.Linear, nn.Conv2d))):
            _pytorch_default_init(module)
        else:
            super()._init_weights(module)
        if isinstance(module, CrossModalKMeans):
            # Uninitialised k-means state (fresh model, or a checkpoint without ``clustering.*``): never the
            # garbage of an empty tensor, never ``initialized=True`` without centroids. Every buffer's fresh
            # value is zero (centroids, queue, flags, counters, and the seed CGNSModel builds it with).
            for buffer in module.buffers(recurse=False):
                init.zeros_(buffer)
        if isinstance(module, CGNSModel):
            # A.3: projection weights ~ N(0, in_dim^-1/2) (biases: PyTorch default, or 0 with head_init "normal");
            # logit scale at ln(1/tau_0).
            for proj in (module.global_image_projection, module.local_image_projection, module.local_text_projection):
                init.normal_(proj.weight, mean=0.0, std=proj.in_features ** -0.5)
                if module.config.head_init == "normal":
                    init.zeros_(proj.bias)
            init.constant_(module.logit_scale, module.config.logit_scale_init_value)
            if module.image_mask_token is not None:
                init.normal_(module.image_mask_token, mean=0.0, std=module.config.initializer_range)
        elif isinstance(module, CGNSAttentionPool2d):
            init.normal_(module.positional_embedding, mean=0.0, std=module.positional_embedding.shape[1] ** -0.5)
        elif isinstance(module, CGNSTokenDecoder):
            init.zeros_(module.position_embedding)


def _pytorch_default_init(module: nn.Module) -> None:
    """What ``nn.Linear`` / ``nn.Conv2d.reset_parameters`` draw — weights kaiming-uniform(a=sqrt 5), i.e.
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)) — through transformers'
    loading-aware init functions, so weights loaded by ``from_pretrained`` are never overwritten."""
    init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    if module.bias is not None:
        fan_in = math.prod(module.weight.shape[1:])
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        init.uniform_(module.bias, -bound, bound)


def build_text_tower(text_config) -> nn.Module:
    model = AutoModel.from_config(text_config)
    _drop_text_pooler(model)
    return model


def _drop_text_pooler(model: nn.Module) -> None:
    # The pooler is never used (A.2); removing it keeps every parameter in the graph (no DDP unused params).
    if getattr(model, "pooler", None) is not None:
        model.pooler = None


def _check_local_source(argument: str, name_or_path: str) -> None:
    """One-line error for a local folder that does not exist (the hub client would instead complain that
    "Repo id must be in the form ..."). A value with one slash and no leading ``.``/``~``/``/`` is a hub id."""
    import os

    looks_local = (os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))
                   or name_or_path.count("/") > 1 or "\\" in name_or_path)
    if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(f"{argument} {name_or_path!r}: no such folder; give an existing folder written by "
                                f"save_pretrained or a hub id of the form 'namespace/name'")


def vision_grid_size(config: CGNSConfig, vision_model: nn.Module) -> int:
    """Side of the local-token grid for the configured image size (7 for ResNet-50 at 224, 14 for ViT-B/16)."""
    timm_model = vision_model.timm_model
    if config.vision_kind == "tokens":
        return config.image_size // timm_model.patch_embed.patch_size[0]
    reduction = timm_model.feature_info[-1]["reduction"]
    return config.image_size // reduction


# --------------------------------------------------------------------------------------------------
# CGNSModel
# --------------------------------------------------------------------------------------------------

# after_step timing: training forwards allowed between two after_optimizer_step calls (a loop that never
# calls it would otherwise keep every batch's features forever).
_MAX_PENDING_UPDATES = 1024


class CGNSModel(CGNSPreTrainedModel):
    """Image-report dual encoder trained with CM-CGNS.

    ``forward(pixel_values, input_ids, attention_mask, sentence_index, return_loss=True, reconstruct=False)``
    computes the global InfoNCE, the local SimSiam image loss, the cluster-guided local text loss and,
    with ``reconstruct=True`` (stage 2), the CM-MIR loss. The k-means state is ``self.clustering``; with
    the default ``cluster_update_timing="before_loss"`` a training forward updates it before the loss
    (the reference). The training loop calls ``model.after_optimizer_step()`` after each optimiser step
    (logit-scale clamp, the "after_step" k-means updates, dead-cluster re-seeding).
    """

    # The k-means state loads as float32 under ``from_pretrained(dtype=bf16/fp16)`` (see _keep_clustering_float32).
    _keep_in_fp32_modules_strict = ["clustering"]

    def __init__(self, config: CGNSConfig, vision_model: Optional[nn.Module] = None,
                 text_model: Optional[nn.Module] = None):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else AutoModel.from_config(config.vision_config)
        self.text_model = text_model if text_model is not None else build_text_tower(config.text_config)
        _drop_text_pooler(self.text_model)
        timm_model = self.vision_model.timm_model
        vision_width = timm_model.num_features
        dim = config.projection_dim
        self.grid_size = vision_grid_size(config, self.vision_model)
        self.num_prefix_tokens = getattr(timm_model, "num_prefix_tokens", 0) if config.vision_kind == "tokens" else 0
        self.attention_pool = (CGNSAttentionPool2d(self.grid_size ** 2, vision_width, config.attention_pool_heads)
                               if config.vision_kind == "grid" else None)
        self.global_image_projection = nn.Linear(vision_width, dim)
        self.local_image_projection = nn.Linear(vision_width, dim)
        self.local_text_projection = nn.Linear(config.text_hidden_size, dim)
        self.sentence_pool = CGNSSentenceAttentionPool(dim, config.sentence_pool_heads)
        self.cross_attention = CGNSLocalCrossAttention(dim)
        self.predictor = CGNSPredictor(dim, config.predictor_hidden_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.clustering = CrossModalKMeans(
            config.num_clusters, dim, init_threshold=config.cluster_init_threshold, momentum=config.cluster_momentum,
            queue_size=config.cluster_queue_size, dead_patience=config.dead_cluster_patience,
            init_source=config.cluster_init_source, features=config.cluster_features,
            update_rule=config.cluster_update, assignment=config.cluster_assignment,
            empty_policy=config.empty_cluster_policy, warmup_updates=config.cluster_warmup_updates,
            count_decay=config.cluster_count_decay)
        # after_step timing: detached (text, cross-modal) sentence features of the training forwards since the
        # last optimiser step, consumed by after_optimizer_step (not saved: empty at every step boundary).
        self._pending_cluster_features = []
        if config.use_reconstruction:
            self.image_mask_token = nn.Parameter(torch.zeros(dim))
            num_channels = 3
            if config.vision_kind == "grid":
                self.decoder = CGNSGridDecoder(dim, self.grid_size, config.image_size, config.decoder_channels,
                                               num_channels, align_corners=config.decoder_align_corners)
            else:
                self.decoder = CGNSTokenDecoder(dim, self.grid_size, config.image_size, config.decoder_channels,
                                                config.decoder_layers, config.decoder_heads, config.decoder_ffn_dim,
                                                num_channels, align_corners=config.decoder_align_corners)
        else:
            self.image_mask_token = None
            self.decoder = None
        self.post_init()

    # ---------------------------------------------------------------- k-means state: loading and dtype
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained``, plus: a checkpoint without the k-means state (``clustering.*``)
        loads with *uninitialised* clusters (``_init_weights`` resets them) and says so in a warning; the
        clustering buffers are float32 whatever ``dtype`` the rest of the model is loaded in."""
        return_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                              output_loading_info=True, **kwargs)
        missing = sorted(k for k in info["missing_keys"] if k.startswith("clustering."))
        if missing:
            logger.warning(f"{pretrained_model_name_or_path}: the checkpoint has no k-means state ({', '.join(missing)} "
                           f"missing); the clusters start uninitialised and re-initialise during training")
        model._keep_clustering_float32()
        return (model, info) if return_info else model

    def _keep_clustering_float32(self, originals: Optional[Dict[str, torch.Tensor]] = None) -> None:
        # Momentum updates of 1e-3 vanish in bf16/fp16 (8/11-bit mantissas): the k-means state stays float32.
        # ``originals`` are the float32 buffers before a cast, so their values come back exactly. The
        # fp32 loading plan (_keep_in_fp32_modules_strict) also turns the flag and counters into floats:
        # they go back to bool / long (counts are exact in float32 up to 2**24).
        buffers = self.clustering._buffers
        for name, buffer in buffers.items():
            if buffer is None:
                continue
            wanted = torch.float32 if name in _CLUSTERING_FLOAT_BUFFERS else (
                torch.bool if name == "initialized" else torch.long)
            if buffer.dtype != wanted:
                source = originals.get(name, buffer) if originals else buffer
                buffers[name] = source.to(device=buffer.device, dtype=wanted)

    def _apply(self, fn, recurse=True):
        # ``.to(dtype)``, ``.half()``, ``.bfloat16()`` all end here; device moves pass through unchanged.
        originals = {name: b for name, b in self.clustering._buffers.items()
                     if b is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        self._keep_clustering_float32(originals)
        return self

    # ---------------------------------------------------------------- construction helpers
    @classmethod
    def from_vision_text_pretrained(cls, vision_model_name_or_path: str, text_model_name_or_path: str,
                                    **config_kwargs) -> "CGNSModel":
        """A fresh CGNS model around pretrained towers.

        ``vision_model_name_or_path``: a timm name (``"resnet50"``; random init), ``"timm/<name>"`` hub id
        (ImageNet weights, online), or a local folder holding a TimmWrapper save. ``text_model_name_or_path``:
        a BERT-family hub id (e.g. ``emilyalsentzer/Bio_ClinicalBERT``) or local folder.
        ``config_kwargs`` go to :class:`CGNSConfig`. The config records each tower by
        ``model_card.public_name`` (a Hub id, or a local folder's name), never by a local path.
        """
        import os

        from transformers import TimmWrapperConfig

        _check_local_source("vision_model", vision_model_name_or_path)
        _check_local_source("text_model", text_model_name_or_path)
        if os.path.isdir(vision_model_name_or_path) or "/" in vision_model_name_or_path:
            vision_model = AutoModel.from_pretrained(vision_model_name_or_path)
        else:
            import timm

            if not timm.is_model(vision_model_name_or_path):
                # timm's own error here says to upgrade timm, which is rarely the fix
                raise ValueError(
                    f"vision_model {vision_model_name_or_path!r} is not a timm architecture name: use one such as "
                    f"'resnet50' or 'vit_base_patch16_224' (timm.list_models('resnet*') lists them), a "
                    f"'timm/<name>' hub id or an existing local folder")
            vision_model = AutoModel.from_config(TimmWrapperConfig(architecture=vision_model_name_or_path))
        text_model = AutoModel.from_pretrained(text_model_name_or_path)
        for tower, source in ((vision_model, vision_model_name_or_path), (text_model, text_model_name_or_path)):
            tower.config._name_or_path = public_name(source)
        config = CGNSConfig(vision_config=vision_model.config, text_config=text_model.config, **config_kwargs)
        # post_init only initialises the CGNS heads' own modules: the towers keep their loaded weights.
        vision_state = {k: v.clone() for k, v in vision_model.state_dict().items()}
        text_state = {k: v.clone() for k, v in text_model.state_dict().items()}
        model = cls(config, vision_model=vision_model, text_model=text_model)
        # The composite config's __init__ leaves the text sub-config without an attention backend.
        if model.text_model.config._attn_implementation is None:
            model.text_model.set_attn_implementation("sdpa")
        model.vision_model.load_state_dict(vision_state)
        model.text_model.load_state_dict(text_state, strict=False)
        return model

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint,
                                    every_n_layers: int = 1):
        """The hook behind ``activation_checkpointing_enable`` / ``gradient_checkpointing_enable`` and
        ``TrainingArguments(gradient_checkpointing=True)``: each tower switches its own checkpointing
        (BERT layers via transformers, the timm tower via ``set_grad_checkpointing``); the heads are small."""
        self.text_model._set_gradient_checkpointing(enable=enable, gradient_checkpointing_func=gradient_checkpointing_func,
                                                    every_n_layers=every_n_layers)
        if self.vision_model.supports_gradient_checkpointing:
            self.vision_model._set_gradient_checkpointing(enable=enable)

    # ---------------------------------------------------------------- encoders
    def encode_image(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (B, 3, H, W) -> (global image embedding (B, D) normalised, local tokens V (B, P, D) normalised)."""
        return self._encode_image(pixel_values)[:2]

    def _encode_image(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        """-> (image_embeds, local tokens V, the tower's hidden states or None, the tower's last_hidden_state)."""
        vision_out = self.vision_model(pixel_values=pixel_values, output_hidden_states=output_hidden_states or None)
        features = vision_out.last_hidden_state
        if self.config.vision_kind == "grid":
            tokens = features.flatten(2).transpose(1, 2)        # spatial flatten, row-major (never a raw reshape)
            global_raw = self.attention_pool(tokens)
        else:
            global_raw = features[:, 0]
            tokens = features[:, self.num_prefix_tokens:]
        image_embeds = F.normalize(self.global_image_projection(global_raw), dim=-1)
        local_image = F.normalize(self.local_image_projection(tokens), dim=-1)
        hidden_states = tuple(vision_out.hidden_states) if output_hidden_states else None
        return image_embeds, local_image, hidden_states, features

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    sentence_index: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (report embedding (B, D) normalised, sentences T (B, S, D), sentence_mask (B, S)).

        Without ``sentence_index`` the whole text is one sentence (:func:`whole_text_sentence_index`); without
        ``attention_mask`` every token is attended."""
        return self._encode_text(input_ids, attention_mask, sentence_index, token_type_ids)[:3]

    def _encode_text(self, input_ids, attention_mask=None, sentence_index=None, token_type_ids=None,
                     output_hidden_states: bool = False):
        """-> (text_embeds, sentences, sentence_mask, the tower's hidden states or None, its last_hidden_state)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if sentence_index is None:
            sentence_index = whole_text_sentence_index(attention_mask)
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        text_out = self.text_model(input_ids=input_ids, attention_mask=attention_mask,
                                   output_hidden_states=output_hidden_states or None, **kwargs)
        tokens = F.normalize(self.local_text_projection(text_out.last_hidden_state), dim=-1)
        sentences, sentence_mask = segment_mean(tokens, sentence_index, attention_mask)
        text_embeds = F.normalize(self.sentence_pool(sentences, sentence_mask), dim=-1)
        hidden_states = tuple(text_out.hidden_states) if output_hidden_states else None
        return text_embeds, sentences, sentence_mask, hidden_states, text_out.last_hidden_state

    def get_image_features(self, pixel_values: torch.Tensor, output_hidden_states: Optional[bool] = None,
                           return_dict: Optional[bool] = None) -> Union[BaseModelOutputWithPooling, Tuple]:
        """The global image embedding, in transformers' convention for ``get_image_features`` (as CLIPModel's).

        Returns ``BaseModelOutputWithPooling``: ``pooler_output`` (B, D) the normalised global image embedding,
        ``last_hidden_state`` the image tower's own (ResNet: (B, C, h, w) feature map; ViT: (B, 1 + P, C)
        tokens), ``hidden_states`` the tower's when ``output_hidden_states``; a tuple when ``return_dict=False``.
        """
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else self.config.output_hidden_states)
        image_embeds, _, hidden_states, features = self._encode_image(pixel_values, output_hidden_states)
        out = BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=image_embeds,
                                         hidden_states=hidden_states)
        return out if self._use_return_dict(return_dict) else out.to_tuple()

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                          sentence_index: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None,
                          output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None
                          ) -> Union[BaseModelOutputWithPooling, Tuple]:
        """The report embedding, in transformers' convention for ``get_text_features`` (as CLIPModel's).

        ``sentence_index`` (B, L) comes from :class:`CGNSProcessor`; without it (a CLIP-style call with a plain
        tokenizer's ``input_ids`` / ``attention_mask``) the whole text is one sentence
        (:func:`whole_text_sentence_index`), which for a one-sentence text the processor has normalised is
        the same embedding. Returns ``BaseModelOutputWithPooling``: ``pooler_output`` (B, D) the normalised
        report embedding, ``last_hidden_state`` (B, L, H) the text tower's, ``hidden_states`` its layers when
        ``output_hidden_states``; a tuple when ``return_dict=False``.
        """
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else self.config.output_hidden_states)
        text_embeds, _, _, hidden_states, last_hidden_state = self._encode_text(
            input_ids, attention_mask, sentence_index, token_type_ids, output_hidden_states)
        out = BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=text_embeds,
                                         hidden_states=hidden_states)
        return out if self._use_return_dict(return_dict) else out.to_tuple()

    def _use_return_dict(self, return_dict: Optional[bool]) -> bool:
        return self.config.return_dict if return_dict is None else bool(return_dict)

    def get_local_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised local image tokens (B, P, D) in row-major grid order."""
        return self.encode_image(pixel_values)[1]

    def get_sentence_features(self, input_ids, attention_mask, sentence_index=None, token_type_ids=None
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sentence features (B, S, D) (means of normalised tokens) and their validity mask (B, S)."""
        return self.encode_text(input_ids, attention_mask, sentence_index, token_type_ids)[1:]

    def get_sentence_attention(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor, sentence_index: torch.Tensor,
                               token_type_ids: Optional[torch.Tensor] = None,
                               direction: str = DEFAULT_ATTENTION_DIRECTION
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each sentence's local cross-attention over the image grid (A.7), for grounding and pictures.

        Returns (maps (B, S, P), sentence_mask (B, S)); P is the row-major ``grid_size x grid_size`` grid
        of :meth:`get_local_image_features`, rows of padded sentences are zero. ``direction``:
        ``"image_to_text"`` (default) -> ``maps[b, s, p]`` is the weight with which sentence s attends to
        token p when T~ is built (the sentence is the query); ``"text_to_image"`` -> the weight with which
        image token p takes in sentence s when V~ is built. Both are sigmoids (not normalised over P).
        """
        if direction not in ATTENTION_DIRECTIONS:
            raise ValueError(f"direction must be one of {ATTENTION_DIRECTIONS}, got {direction!r}")
        local_image = self.get_local_image_features(pixel_values)
        _, sentences, sentence_mask = self.encode_text(input_ids, attention_mask, sentence_index, token_type_ids)
        text_to_image_weights, image_to_text_weights = self.cross_attention.attention_weights(
            local_image, sentences, sentence_mask)
        if direction == "text_to_image":
            return text_to_image_weights.transpose(1, 2), sentence_mask
        return image_to_text_weights * sentence_mask.to(image_to_text_weights.dtype).unsqueeze(-1), sentence_mask

    def scaled_logit_scale(self) -> torch.Tensor:
        """``min(exp(logit_scale), logit_scale_max)`` in value, with the gradient of ``exp(logit_scale)``
        everywhere: a plain ``clamp`` has zero gradient above the cap, so a parameter that passed ln(max)
        could never come back. ``clamp_logit_scale_`` keeps the parameter itself at or below ln(max)."""
        scale = self.logit_scale.exp()
        excess = (scale - self.config.logit_scale_max).clamp(min=0.0)
        return scale - excess.detach()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter in place at ln(logit_scale_max), as CLIP training does after each optimiser step."""
        if math.isfinite(self.config.logit_scale_max):
            self.logit_scale.clamp_(max=math.log(self.config.logit_scale_max))

    # ---------------------------------------------------------------- training-loop hooks
    @torch.no_grad()
    def after_optimizer_step(self, reassign_dead: bool = False) -> Dict[str, float]:
        """Call once after every optimiser step (the pretraining recipe's loop and the Trainer callback
        ``CGNSClusterCallback`` do). Clamps the logit scale; with ``cluster_update_timing="after_step"``
        applies one k-means update per training forward since the previous call (so a step of G
        accumulated micro-batches makes G updates, in order); with ``reassign_dead`` re-seeds dead
        centroids (``dead_cluster_patience``). Every process must call it (the updates all-reduce).

        Returns the clustering diagnostics of the latest update (``{}`` with clustering off) plus
        ``reassigned`` when ``reassign_dead``.
        """
        self.clamp_logit_scale_()
        pending, self._pending_cluster_features = self._pending_cluster_features, []
        if not self.config.use_clustering:
            return {}
        for text_features, cross_features in pending:
            self.clustering.update(text_features, cross_features)
        stats = dict(self.clustering.last_stats)
        if reassign_dead:
            stats["reassigned"] = float(self.clustering.reassign_dead())
        return stats

    def _cluster_centroids_for_loss(self, text_sentence_features: torch.Tensor,
                                    cross_sentence_features: torch.Tensor) -> Optional[torch.Tensor]:
        """The centroids the local text loss uses in this (loss-computing) forward, after the k-means
        update of this batch when the timing is "before_loss" and the model is training (B.3 a then b).

        As in the reference, the forward that initialises the centroids still uses the plain loss.
        """
        cfg = self.config
        if not cfg.use_clustering:
            return None
        if self.training and cfg.cluster_update_timing == "before_loss":
            was_initialized = bool(self.clustering.initialized)
            self.clustering.update(text_sentence_features, cross_sentence_features)
            return self.clustering.centroids if was_initialized else None
        if self.training:
            if len(self._pending_cluster_features) >= _MAX_PENDING_UPDATES:
                raise RuntimeError(
                    f"cluster_update_timing='after_step' but after_optimizer_step() was not called for "
                    f"{_MAX_PENDING_UPDATES} training forwards: call it after every optimiser step (the "
                    f"Trainer callback modeling_cgns.CGNSClusterCallback does), or use 'before_loss'")
            self._pending_cluster_features.append((text_sentence_features.detach(),
                                                   cross_sentence_features.detach()))
        return self.clustering.centroids

    def text_loss_options(self) -> Dict[str, Any]:
        """The configuration's options of ``losses.cluster_guided_text_loss`` besides the features and centroids
        (also what ``losses.text_loss_gradient_shares`` needs to measure the same loss)."""
        cfg = self.config
        return dict(temperature=cfg.local_text_temperature, hard_negative_mode=cfg.hard_negative_mode,
                    hard_negative_weight=cfg.hard_negative_weight, bml_alpha=cfg.bml_alpha, bml_beta=cfg.bml_beta,
                    bml_weight=cfg.bml_weight, false_negative_gate=cfg.false_negative_gate,
                    false_negative_threshold=cfg.false_negative_threshold,
                    false_negative_handling=cfg.false_negative_handling, use_hard_negatives=cfg.use_hard_negatives)

    # ---------------------------------------------------------------- CM-MIR
    def reconstruct_image(self, local_image: torch.Tensor, text_to_image: torch.Tensor
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mask image tokens (training only), fuse with V~ and decode: -> (reconstruction (B, 3, H, W), mask (B, P))."""
        b, p, _ = local_image.shape
        if self.training and self.config.mask_ratio > 0:
            token_mask = random_token_mask(b, p, self.config.mask_ratio, local_image.device)
        else:
            token_mask = torch.zeros(b, p, dtype=torch.bool, device=local_image.device)
        masked = torch.where(token_mask.unsqueeze(-1), self.image_mask_token.to(local_image.dtype), local_image)
        return self.decoder(masked, text_to_image), token_mask

    def _pixel_mask(self, token_mask: torch.Tensor, size) -> torch.Tensor:
        grid = token_mask.view(-1, 1, self.grid_size, self.grid_size).float()
        return F.interpolate(grid, size=size, mode="nearest")

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        sentence_index: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        return_loss: Optional[bool] = None,
        reconstruct: bool = False,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> Union[CGNSOutput, Tuple]:
        """See the class docstring; all inputs are batch-first, ``sentence_index`` (B, L) from :class:`CGNSProcessor`.

        ``return_loss=None`` (the default) computes the loss for a training batch — both modalities, one
        report per image, with ``sentence_index`` (what the processor and the collator give) — and skips it
        otherwise. So a CLIP-style call works as CLIP's does: a plain tokenizer's ``input_ids`` /
        ``attention_mask`` (each text one sentence, :func:`whole_text_sentence_index`), any number of texts
        per image (``logits_per_image`` (B_images, B_texts), as the zero-shot pipeline reads it), or one
        modality alone (``pixel_values`` only: ``image_embeds`` is the output's first field, what the
        image-feature-extraction pipeline returns). ``return_loss=True`` needs a paired batch.

        ``output_hidden_states`` adds both towers' hidden states; ``return_dict=False`` returns
        ``CGNSOutput.to_tuple()`` (loss first when computed). Unknown keyword arguments raise ``TypeError``
        (a misspelt ``reconstruct`` must not silently drop the CM-MIR loss). ``output_attentions`` and
        ``labels`` are refused with a reason: the timm image tower exposes no attention maps, and the
        contrastive objective's targets are the batch pairing itself.
        """
        cfg = self.config
        if labels is not None:
            raise ValueError("CGNSModel takes no labels: image i and report i of the batch are the positive pair, "
                             "so the targets are implicit (use return_loss=True). Classification labels belong "
                             "to CGNSForImageClassification.")
        if output_attentions if output_attentions is not None else cfg.output_attentions:
            raise ValueError("CGNSModel cannot return attentions: the timm image tower exposes no attention maps "
                             "(text attentions: call model.text_model(..., output_attentions=True) directly)")
        if pixel_values is None and input_ids is None:
            raise ValueError("CGNSModel needs pixel_values, input_ids or both")
        paired = (pixel_values is not None and input_ids is not None
                  and pixel_values.shape[0] == input_ids.shape[0])
        if return_loss is None:
            return_loss = paired and sentence_index is not None
        if (return_loss or reconstruct) and not paired:
            raise ValueError(f"return_loss / reconstruct need a paired batch (one report per image), got "
                             f"{_batch_size(pixel_values)} image(s) and {_batch_size(input_ids)} report(s)")
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else cfg.output_hidden_states)
        return_dict = return_dict if return_dict is not None else cfg.return_dict
        out = self._forward(pixel_values, input_ids, attention_mask, sentence_index, token_type_ids,
                            return_loss, reconstruct, output_hidden_states)
        return out if return_dict else out.to_tuple()

    def _forward(self, pixel_values, input_ids, attention_mask, sentence_index, token_type_ids, return_loss,
                 reconstruct, output_hidden_states) -> CGNSOutput:
        cfg = self.config
        image_embeds = local_image = vision_hidden_states = None
        text_embeds = sentences = sentence_mask = text_hidden_states = None
        if pixel_values is not None:
            image_embeds, local_image, vision_hidden_states, _ = self._encode_image(pixel_values, output_hidden_states)
        if input_ids is not None:
            text_embeds, sentences, sentence_mask, text_hidden_states, _ = self._encode_text(
                input_ids, attention_mask, sentence_index, token_type_ids, output_hidden_states)
        encoded = dict(image_embeds=image_embeds, text_embeds=text_embeds, local_image_embeds=local_image,
                       sentence_embeds=sentences, sentence_mask=sentence_mask,
                       vision_hidden_states=vision_hidden_states, text_hidden_states=text_hidden_states)
        logit_scale = self.scaled_logit_scale()
        if image_embeds is None or text_embeds is None:
            return CGNSOutput(**encoded)
        if image_embeds.shape[0] != text_embeds.shape[0]:
            # texts are candidates for every image (zero-shot): no pairwise cross-attention
            logits_per_image = logit_scale * image_embeds @ text_embeds.t()
            return CGNSOutput(logits_per_image=logits_per_image, logits_per_text=logits_per_image.t(), **encoded)
        text_to_image, image_to_text = self.cross_attention(local_image, sentences, sentence_mask)
        text_sentence_features = sentences[sentence_mask]
        cross_sentence_features = image_to_text[sentence_mask]

        reconstruction = token_mask = None
        if reconstruct:
            if self.decoder is None:
                raise ValueError("reconstruct=True needs a model built with use_reconstruction=True")
            reconstruction, token_mask = self.reconstruct_image(local_image, text_to_image)

        # The output is built once, at the end, with every field: a ModelOutput's tuple order is the order in
        # which fields become non-None, so filling ``loss`` in afterwards would move it to the back.
        fields = dict(encoded, text_to_image_features=text_to_image, image_to_text_features=image_to_text,
                      text_sentence_features=text_sentence_features,
                      cross_sentence_features=cross_sentence_features,
                      reconstruction=reconstruction, token_mask=token_mask)
        if not return_loss:
            logits_per_image = logit_scale * image_embeds @ text_embeds.t()
            return CGNSOutput(logits_per_image=logits_per_image, logits_per_text=logits_per_image.t(), **fields)

        global_loss, logits_per_image, logits_per_text, labels = losses.global_contrastive_loss(
            image_embeds, text_embeds, logit_scale)
        has_sentences = sentence_mask.any(dim=1)
        local_image_loss = losses.local_image_loss(self.predictor(local_image), text_to_image,
                                                   self.predictor(text_to_image), local_image, has_sentences)
        centroids = self._cluster_centroids_for_loss(text_sentence_features, cross_sentence_features)
        local_text_loss, text_parts = losses.cluster_guided_text_loss(
            text_sentence_features, cross_sentence_features, centroids, **self.text_loss_options())
        loss = (cfg.global_loss_weight * global_loss + cfg.local_image_loss_weight * local_image_loss
                + cfg.local_text_loss_weight * local_text_loss)
        reconstruction_loss = None
        if reconstruct:
            pixel_mask = (self._pixel_mask(token_mask, reconstruction.shape[-2:])
                          if cfg.reconstruction_target == "masked" else None)
            reconstruction_loss = losses.reconstruction_loss(reconstruction, pixel_values,
                                                             cfg.reconstruction_weight, pixel_mask)
            loss = loss + reconstruction_loss
        elif self.decoder is not None and self.training and torch.is_grad_enabled():
            # Stage 1 leaves the decoder out of the loss. Touch its parameters with weight 0 so every
            # parameter is in the graph and DDP runs without find_unused_parameters.
            loss = loss + 0.0 * sum(p.view(-1)[0] for p in self._reconstruction_parameters())

        i2t = losses.retrieval_accuracy(logits_per_image.detach(), labels)
        t2i = losses.retrieval_accuracy(logits_per_text.detach(), labels)
        retrieval = {"i2t_acc1": i2t[1], "i2t_acc5": i2t[5], "t2i_acc1": t2i[1], "t2i_acc5": t2i[5],
                     "logit_scale": logit_scale.detach()}
        clustering = ({k: text_parts[k] for k in ("own_cluster", "hard_cluster", "false_negative_mask")}
                      if "own_cluster" in text_parts else None)
        return CGNSOutput(loss=loss, global_loss=global_loss, local_image_loss=local_image_loss,
                          local_text_loss=local_text_loss, reconstruction_loss=reconstruction_loss,
                          bml_loss=text_parts["bml"], logits_per_image=logits_per_image,
                          logits_per_text=logits_per_text, retrieval=retrieval, clustering=clustering, **fields)

    def _reconstruction_parameters(self):
        yield self.image_mask_token
        yield from self.decoder.parameters()


def _batch_size(tensor: Optional[torch.Tensor]) -> int:
    return 0 if tensor is None else int(tensor.shape[0])


__all__ = [
    "CGNSModel",
    "CGNSPreTrainedModel",
    "CGNSOutput",
    "CGNSAttentionPool2d",
    "CGNSSentenceAttentionPool",
    "CGNSLocalCrossAttention",
    "CGNSPredictor",
    "CGNSGridDecoder",
    "CGNSTokenDecoder",
    "segment_mean",
    "whole_text_sentence_index",
    "random_token_mask",
    "ATTENTION_DIRECTIONS",
]
