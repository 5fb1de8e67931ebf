"""Convert MGCA's released PyTorch Lightning checkpoints into CGNS exports (issue 15).

    python -m modeling_cgns.convert_mgca --checkpoint mgca_resnet_50.ckpt --output_dir mgca-resnet50 \
        [--text_config DIR] [--tokenizer DIR]

MGCA (Wang et al., NeurIPS 2022, github.com/HKU-MedAI/MGCA) released a ResNet-50 and a ViT-B/16
image-report model as Lightning ``.ckpt`` files. The export written here is a regular CGNS folder
(``CGNSModel.save_pretrained``: ``model.safetensors`` + ``config.json``, an image processor, a model
card) that every downstream protocol of this repository takes with ``--model``.

Recipe: load the checkpoint without unpickling anything but tensors and plain containers
(:func:`load_lightning_checkpoint`) -> read the architecture from the weights' shapes
(:func:`infer_vision_config`, :func:`infer_text_config`) -> build a :class:`CGNSModel` around a timm
tower and a BERT tower of exactly those shapes -> copy every matching tensor, checking its shape
(:func:`map_mgca_state_dict`) -> save the export, the list of what was not converted and why
(``conversion_report.json``; the tensors themselves in ``unmapped_weights.safetensors``) and a model card.

Key mapping (MGCA's module names are public: ``mgca/models/backbones/encoder.py``, ``vits.py``,
``mgca_module.py``):

* ``img_encoder_q.model.<k>`` -> ``vision_model.timm_model.<k>``. MGCA's ResNet is torchvision's with
  ``fc`` replaced by an identity, and torchvision and timm name every ResNet tensor alike; MGCA's ViT
  is the timm 0.4 ``VisionTransformer`` layout, which current timm keeps.
* ``text_encoder_q.model.<k>`` -> ``text_model.<k>``: MGCA's BLIP-style BERT (6 layers of
  Bio_ClinicalBERT) without its cross-attention blocks, which MGCA's text-only mode never runs.

Not converted, because CGNS has no module of the same architecture: MGCA's global and local
projections (Linear/Conv1d-BatchNorm MLPs, the local one on ResNet layer3), its token-level
cross-attention layers and its prototype layer. The CGNS heads of the export (attention pool,
projections, sentence pool, cross-attention, predictor) are therefore freshly initialised: the export
is for the frozen-encoder protocols, not for retrieval or zero-shot use.
"""
import argparse
import hashlib
import json
import math
import os
import pickle
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

CHECKPOINT_FORMAT = "MGCA PyTorch Lightning checkpoint"
IMAGE_PREFIX = "img_encoder_q.model."
TEXT_PREFIX = "text_encoder_q.model."
VISION_TARGET_PREFIX = "timm_model."
# ImageNet-style resnets by (block type, blocks per stage); every other layout is refused by shape checks.
RESNET_LAYOUTS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}
VIT_BASE = {"embed_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16, "img_size": 224, "mlp_ratio": 4.0}
UNMAPPED_REASONS = (
    (r"^img_encoder_q\.global_embed\.",
     "MGCA global image projection (Linear-BatchNorm-ReLU-Linear-BatchNorm on the pooled / CLS feature): "
     "CGNS projects with one Linear after its attention pool / CLS, so there is no matching module"),
    (r"^img_encoder_q\.local_embed\.",
     "MGCA local image projection (1x1 Conv1d-BatchNorm MLP on ResNet layer3 / ViT patch tokens): CGNS "
     "projects layer4 / patch tokens with one Linear"),
    (r"^text_encoder_q\.global_embed\.",
     "MGCA global report projection (Linear-BatchNorm MLP on [CLS]): CGNS pools sentences instead"),
    (r"^text_encoder_q\.local_embed\.",
     "MGCA local word projection (Conv1d-BatchNorm MLP): CGNS projects tokens with one Linear"),
    (r"^(patch|word)_local_atten_layer\.",
     "MGCA token-level nn.MultiheadAttention (unused with MGCA's default use_local_atten=False)"),
    (r"^prototype_layer\.", "MGCA prototype layer (cross-modal prototype alignment): CGNS has no prototypes"),
    (r"^text_encoder_q\.model\.encoder\.layer\.\d+\.crossattention\.",
     "cross-attention of MGCA's BLIP-style BERT, never run in its text-only mode"),
    (r"^text_encoder_q\.model\.embeddings\.position_ids$",
     "buffer arange(max_position_embeddings), rebuilt by the text tower (checked to be that arange)"),
    (r"^text_encoder_q\.model\.pooler\.", "BERT pooler: never used by CGNS (its text tower has none)"),
)


# --------------------------------------------------------------------------------------------------
# safe loading
# --------------------------------------------------------------------------------------------------

LIGHTNING_ATTRIBUTE_DICT_PATHS = (
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
)
# A Lightning 1.5 checkpoint (MGCA pins pytorch-lightning 1.5.10) holds epoch, global_step,
# pytorch-lightning_version, state_dict, loops, callbacks (keyed by state-key strings), optimizer_states,
# lr_schedulers, hparams_name and hyper_parameters (dict(model.hparams)): tensors and plain values, all
# within torch's own weights-only allowlist. Beyond it, hyper-parameters may be pickled as an argparse
# Namespace or as Lightning's AttributeDict (a dict with attribute access), e.g. by other Lightning
# versions. Both are plain containers whose construction runs no user code; the AttributeDict is rebuilt
# as a plain dict, so Lightning need not be installed. Everything else is refused, including the callback
# classes that Lightning < 1.5 used as dictionary keys (re-save such a checkpoint with Lightning first).
SAFE_GLOBALS = [argparse.Namespace] + [(dict, path) for path in LIGHTNING_ATTRIBUTE_DICT_PATHS]


class UnsafeCheckpointError(ValueError):
    """The checkpoint pickles an object outside the allowlist; it was not unpickled."""


def load_lightning_checkpoint(path: str) -> Dict[str, Any]:
    """Read a Lightning ``.ckpt`` with ``torch.load(weights_only=True)``; returns a dict with ``state_dict``.

    Only tensors, plain containers and :data:`SAFE_GLOBALS` are accepted; anything else raises
    :class:`UnsafeCheckpointError` naming the offending globals, and nothing is ever loaded with
    ``weights_only=False``. Namespace / AttributeDict values come back as plain dicts.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            reason = _unpickler_reason(err)
            if reason.startswith("Unsupported operand"):  # bytes that are no pickle at all
                raise ValueError(f"{path}: not a readable torch checkpoint ({reason})") from None
            raise UnsafeCheckpointError(
                f"{path}: refused: the checkpoint pickles objects other than tensors and plain containers "
                f"({_unsafe_globals(path) or reason}); only {_allowed_names()} are allowed and the "
                f"file is never unpickled without weights_only") from None
        except (RuntimeError, EOFError, OSError) as err:
            raise ValueError(f"{path}: not a readable torch checkpoint: {_first_line(err)}") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a {CHECKPOINT_FORMAT} (a dict), got {type(checkpoint).__name__}")
    if "state_dict" not in checkpoint:
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            checkpoint = {"state_dict": checkpoint}  # a bare state dict of the LightningModule
        else:
            raise ValueError(f"{path}: no 'state_dict' entry; top-level keys: {sorted(map(str, checkpoint))[:10]}")
    state_dict = checkpoint["state_dict"]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: 'state_dict' is a {type(state_dict).__name__}, not a dict of tensors")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: 'state_dict' must map names to tensors (non-tensor entries: {bad[:5]})")
    return _plain(checkpoint)


def _plain(value):
    """Namespace / AttributeDict (anywhere inside plain containers) -> dict: the rest sees plain types only."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if type(value) is dict:
        return {k: _plain(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain(v) for v in value)
    return value


def _unsafe_globals(path: str) -> str:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) format: the unpickler's own message is used instead
        return ""


def _allowed_names() -> str:
    return "tensors, plain containers, " + ", ".join(
        ["argparse.Namespace"] + list(LIGHTNING_ATTRIBUTE_DICT_PATHS))


def _unpickler_reason(err: Exception) -> str:
    """The part of torch's long weights-only message that says what was refused."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    rest = text.split(marker, 1)[1].strip() if marker in text else ""
    return rest.splitlines()[0] if rest else _first_line(err)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# architecture from shapes
# --------------------------------------------------------------------------------------------------

def sub_state(state_dict: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _count_indexed(keys, pattern: str) -> int:
    """Number of distinct N in keys matching ``pattern`` (a regex with one ``(\\d+)`` group)."""
    found = {int(m.group(1)) for m in (re.match(pattern, k) for k in keys) if m}
    if found and found != set(range(len(found))):
        raise ValueError(f"non-contiguous module indices for {pattern!r}: {sorted(found)}")
    return len(found)


def infer_vision_config(image_state: Dict[str, torch.Tensor], image_size: Optional[int] = None
                        ) -> Tuple[str, Optional[Dict[str, Any]], int, List[str]]:
    """MGCA image-encoder tensors (``img_encoder_q.model.`` stripped) -> (timm architecture, model_args,
    image_size, notes). Raises ``ValueError`` for a layout that is neither a torchvision ResNet nor a ViT."""
    notes = []
    if "conv1.weight" in image_state and "layer1.0.conv1.weight" in image_state:
        block = "bottleneck" if "layer1.0.conv3.weight" in image_state else "basic"
        stages = tuple(_count_indexed(image_state, rf"^layer{i}\.(\d+)\.") for i in range(1, 5))
        arch = RESNET_LAYOUTS.get((block, stages))
        if arch is None:
            raise ValueError(f"unsupported ResNet layout: {block} blocks per stage {stages}; known: "
                             f"{sorted(RESNET_LAYOUTS.values())}")
        size = image_size or 224
        notes.append(f"ResNet tower {arch} at {size} px (MGCA's downstream input; its pretraining upsampled "
                     f"224 px inputs to 299 px inside the encoder)")
        return arch, None, size, notes
    if "cls_token" in image_state and "patch_embed.proj.weight" in image_state:
        embed_dim = image_state["cls_token"].shape[-1]
        patch = image_state["patch_embed.proj.weight"].shape[-1]
        depth = _count_indexed(image_state, r"^blocks\.(\d+)\.")
        num_tokens = image_state["pos_embed"].shape[1] - 1
        grid = math.isqrt(num_tokens)
        if grid * grid != num_tokens:
            raise ValueError(f"pos_embed has {num_tokens} patch positions, not a square grid")
        mlp_ratio = image_state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
        # The head count is not stored in any shape; ViTs (and MGCA's create_vit) use 64-wide heads.
        values = {"embed_dim": embed_dim, "depth": depth, "num_heads": max(1, embed_dim // 64),
                  "patch_size": patch, "img_size": grid * patch, "mlp_ratio": mlp_ratio}
        notes.append(f"ViT num_heads is not stored in the weights: assumed embed_dim / 64 = {values['num_heads']}")
        if image_size is not None and image_size != values["img_size"]:
            raise ValueError(f"--image_size {image_size} differs from the checkpoint's position grid "
                             f"({grid} x {patch} = {values['img_size']} px)")
        model_args = {k: v for k, v in values.items() if VIT_BASE[k] != v}
        if "blocks.0.attn.qkv.bias" not in image_state:
            model_args["qkv_bias"] = False
        return "vit_base_patch16_224", model_args or None, values["img_size"], notes
    raise ValueError("the image encoder is neither a torchvision-layout ResNet (conv1, layer1-4) nor a ViT "
                     f"(cls_token, patch_embed, blocks); first keys: {sorted(image_state)[:5]}")


def infer_text_config(text_state: Dict[str, torch.Tensor], text_config_path: Optional[str] = None):
    """MGCA BERT tensors (``text_encoder_q.model.`` stripped) -> (``BertConfig``, notes).

    Widths, depth, vocabulary and positions come from the shapes; with ``text_config_path`` (a local
    BERT config / model folder) the rest (heads, activation, epsilon) comes from that config, and a
    depth that differs is taken from the checkpoint (MGCA keeps the first 6 of Bio_ClinicalBERT's 12).
    """
    from transformers import AutoConfig, BertConfig

    notes = []
    try:
        vocab, hidden = text_state["embeddings.word_embeddings.weight"].shape
        max_positions = text_state["embeddings.position_embeddings.weight"].shape[0]
        type_vocab = text_state["embeddings.token_type_embeddings.weight"].shape[0]
        intermediate = text_state["encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"the text encoder lacks the BERT tensor {err.args[0]!r}") from None
    layers = _count_indexed(text_state, r"^encoder\.layer\.(\d+)\.")
    shapes = {"vocab_size": vocab, "hidden_size": hidden, "max_position_embeddings": max_positions,
              "type_vocab_size": type_vocab, "intermediate_size": intermediate}
    if text_config_path is None:
        heads = max(1, hidden // 64)
        config = BertConfig(num_hidden_layers=layers, num_attention_heads=heads, hidden_act="gelu",
                            layer_norm_eps=1e-12, **shapes)
        notes.append(f"text config inferred from shapes (no --text_config): {layers} layers, hidden {hidden}, "
                     f"num_attention_heads assumed hidden / 64 = {heads} (BERT-base and MGCA's bert_config.json)")
        return config, notes
    config = AutoConfig.from_pretrained(text_config_path)
    if config.model_type != "bert":
        raise ValueError(f"--text_config {text_config_path!r} is a {config.model_type!r} config; MGCA's text "
                         f"encoder is a BERT")
    wrong = {k: (getattr(config, k), v) for k, v in shapes.items() if getattr(config, k) != v}
    if wrong:
        raise ValueError(f"--text_config {text_config_path!r} does not match the checkpoint: "
                         + ", ".join(f"{k} {a} (config) vs {b} (checkpoint)" for k, (a, b) in wrong.items()))
    if config.num_hidden_layers != layers:
        notes.append(f"--text_config has {config.num_hidden_layers} layers, the checkpoint {layers}: using "
                     f"{layers} (MGCA's bert_config.json keeps the first 6 of Bio_ClinicalBERT's layers)")
        config.num_hidden_layers = layers
    # MGCA's BLIP-style config enables cross-attention; the converted tower is the text-only encoder.
    config.add_cross_attention = False
    config.is_decoder = False
    notes.append(f"text config from {text_config_path}")
    return config, notes


def largest_divisor(value: int, candidates=(8, 4, 2, 1)) -> int:
    return next(c for c in candidates if value % c == 0)


def build_cgns_config(state_dict: Dict[str, torch.Tensor], hyper_parameters: Dict[str, Any],
                      text_config_path: Optional[str] = None, image_size: Optional[int] = None):
    """The :class:`CGNSConfig` of the export and the notes explaining each inferred choice."""
    from transformers import TimmWrapperConfig

    from .configuration_cgns import CGNSConfig

    image_state = sub_state(state_dict, IMAGE_PREFIX)
    if not image_state:
        raise ValueError(f"no image-encoder tensors ({IMAGE_PREFIX}*): not an MGCA checkpoint "
                         f"(first keys: {sorted(state_dict)[:5]})")
    arch, model_args, size, notes = infer_vision_config(image_state, image_size)
    declared = str(hyper_parameters.get("img_encoder", ""))
    if declared and ("vit" in declared) != arch.startswith("vit"):
        raise ValueError(f"hyper_parameters say img_encoder={declared!r} but the weights are a {arch}")
    text_state = sub_state(state_dict, TEXT_PREFIX)
    if text_state:
        text_config, text_notes = infer_text_config(text_state, text_config_path)
    else:
        from transformers import BertConfig

        text_config = BertConfig()
        text_notes = ["the checkpoint has no text encoder: the export's text tower is BERT-base, randomly initialised"]
    emb_dim = hyper_parameters.get("emb_dim")
    if not isinstance(emb_dim, int) or emb_dim <= 0:
        head = state_dict.get("img_encoder_q.global_embed.head.3.weight")
        emb_dim = int(head.shape[0]) if head is not None else 128
    config = CGNSConfig(
        vision_config=TimmWrapperConfig(architecture=arch, model_args=model_args),
        text_config=text_config,
        # MGCA's embedding width; the CGNS heads of the export are fresh, so only their size is chosen here
        projection_dim=emb_dim,
        sentence_pool_heads=largest_divisor(emb_dim),
        image_size=size,
        max_text_length=min(256, text_config.max_position_embeddings),
        use_reconstruction=False,
    )
    return config, notes + text_notes


# --------------------------------------------------------------------------------------------------
# mapping
# --------------------------------------------------------------------------------------------------

def unmapped_reason(key: str) -> str:
    for pattern, reason in UNMAPPED_REASONS:
        if re.search(pattern, key):
            return reason
    return "not part of MGCA's known layout: no CGNS counterpart"


def map_mgca_state_dict(state_dict: Dict[str, torch.Tensor], model) -> Dict[str, Any]:
    """Copy MGCA tensors into ``model`` (a :class:`CGNSModel` of the inferred shapes), in place.

    Returns ``{"mapped": {mgca key: cgns key}, "unmapped": {mgca key: reason}, "vision_tensors": n,
    "text_tensors": n}``. Raises ``ValueError`` when a tower tensor has another shape than its target or
    when a tower tensor of the model receives no value (an incomplete tower is never exported).
    """
    towers = [("vision_model", IMAGE_PREFIX, VISION_TARGET_PREFIX, model.vision_model)]
    if any(k.startswith(TEXT_PREFIX) for k in state_dict):
        towers.append(("text_model", TEXT_PREFIX, "", model.text_model))
    mapped, unmapped, counts = {}, {}, {}
    for name, prefix, target_prefix, module in towers:
        targets = module.state_dict()
        filled = {}
        for key, tensor in state_dict.items():
            if not key.startswith(prefix):
                continue
            target = target_prefix + key[len(prefix):]
            if target not in targets:  # e.g. the BERT cross-attention: listed as unmapped below
                continue
            if tuple(targets[target].shape) != tuple(tensor.shape):
                raise ValueError(f"{key}: shape {tuple(tensor.shape)} does not fit {name}.{target} "
                                 f"{tuple(targets[target].shape)}")
            filled[target] = tensor
            mapped[key] = f"{name}.{target}"
        missing = sorted(set(targets) - set(filled))
        if missing:
            raise ValueError(f"{len(missing)} tensor(s) of the CGNS {name} get no value from the checkpoint "
                             f"(e.g. {missing[:3]}): the checkpoint's {prefix}* layout is not the expected one")
        module.load_state_dict({k: v.to(targets[k].dtype) for k, v in filled.items()}, strict=True)
        counts[name] = len(filled)
    for key in state_dict:
        if key not in mapped:
            unmapped[key] = unmapped_reason(key)
    position_ids = state_dict.get(TEXT_PREFIX + "embeddings.position_ids")
    if position_ids is not None and not torch.equal(position_ids.flatten().long(),
                                                    torch.arange(position_ids.numel())):
        raise ValueError(f"{TEXT_PREFIX}embeddings.position_ids is not arange(n): the text tower would differ")
    return {"mapped": mapped, "unmapped": unmapped, "vision_tensors": counts.get("vision_model", 0),
            "text_tensors": counts.get("text_model", 0)}


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------

def json_safe(value):
    """Hyper-parameters -> JSON values (tensors and other objects by their repr)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return repr(value)


def group_unmapped(unmapped: Dict[str, str], state_dict: Dict[str, torch.Tensor]) -> List[Dict[str, Any]]:
    """Unmapped keys grouped by reason: [{"reason", "tensors", "parameters", "examples"}], largest first."""
    groups: Dict[str, List[str]] = {}
    for key, reason in unmapped.items():
        groups.setdefault(reason, []).append(key)
    rows = [{"reason": reason, "tensors": len(keys),
             "parameters": int(sum(state_dict[k].numel() for k in keys)), "examples": sorted(keys)[:3]}
            for reason, keys in groups.items()]
    return sorted(rows, key=lambda row: -row["parameters"])


MODEL_CARD = """---
library_name: transformers
tags: [cgns, mgca, chest-x-ray, converted]
---
# {title}

Converted from MGCA's released checkpoint `{checkpoint}` (sha256 `{sha256}`) by
`python -m modeling_cgns.convert_mgca`. MGCA: Wang et al., "Multi-Granularity Cross-modal Alignment for
Generalized Medical Visual Representation Learning", NeurIPS 2022, https://github.com/HKU-MedAI/MGCA.
The MGCA repository ships no licence file: ask its authors before redistributing these weights.

## What was converted

| part | source (MGCA) | here (CGNS) | tensors |
|---|---|---|---|
| image encoder | `img_encoder_q.model.*` | `vision_model` (timm `{arch}`{model_args}) | {vision_tensors} |
| text encoder | `text_encoder_q.model.*` (self-attention stack) | `text_model` (BERT, {text_layers} layers) | {text_tensors} |

Every image-encoder tensor was mapped and shape-checked (the converter is tested to reproduce the source
tower's feature map to 1e-5 on checkpoints with MGCA's layout, `tests/test_convert_mgca.py`).
Image size {image_size} px, pixels normalised to [-1, 1] (mean = std = 0.5, as MGCA).

## What was not converted

These MGCA tensors have no CGNS module of the same architecture. They are listed one by one in
`conversion_report.json`{unmapped_file}.

| reason | tensors | parameters |
|---|---|---|
{unmapped_rows}

The CGNS heads in this export (attention pool, projections, sentence pool, local cross-attention,
predictor, cluster state) are **freshly initialised, not MGCA's**: use the export for the frozen-encoder
protocols (`cgns evaluate --task classification / detection / segmentation --model <this folder>`),
not for retrieval or zero-shot classification.

## Tokenizer

{tokenizer}

## Conversion notes

{notes}
"""


def write_model_card(output_dir: str, report: Dict[str, Any]) -> None:
    vision = report["vision"]
    model_args = f", model_args {json.dumps(vision['model_args'])}" if vision["model_args"] else ""
    rows = "\n".join(f"| {g['reason']} | {g['tensors']} | {g['parameters']:,} |" for g in report["unmapped_groups"])
    unmapped_file = (", and saved under their MGCA names in `unmapped_weights.safetensors`"
                     if report["unmapped_weights_file"] else "")
    tokenizer = (f"Written from `{report['tokenizer']}` (processor_config.json + tokenizer files)."
                 if report["tokenizer"] else
                 "**None was written** (no `--tokenizer` given). The image protocols do not need one; to use the "
                 "text tower, save Bio_ClinicalBERT's tokenizer (emilyalsentzer/Bio_ClinicalBERT, vocabulary "
                 f"{report['text']['vocab_size']}) with a `CGNSProcessor` next to this export.")
    card = MODEL_CARD.format(
        title=f"MGCA ({vision['architecture']}) as a CGNS export", checkpoint=report["source"]["file"],
        sha256=report["source"]["sha256"], arch=vision["architecture"], model_args=model_args,
        vision_tensors=report["vision_tensors"], text_tensors=report["text_tensors"],
        text_layers=report["text"]["num_hidden_layers"], image_size=vision["image_size"],
        unmapped_file=unmapped_file, unmapped_rows=rows or "| (none) | 0 | 0 |", tokenizer=tokenizer,
        notes="\n".join(f"* {note}" for note in report["notes"]))
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(card)


def convert_mgca_checkpoint(checkpoint_path: str, output_dir: str, text_config_path: Optional[str] = None,
                            tokenizer_path: Optional[str] = None, image_size: Optional[int] = None,
                            save_unmapped: bool = True) -> Dict[str, Any]:
    """Checkpoint -> CGNS export in ``output_dir``; returns the conversion report (also written as JSON)."""
    from safetensors.torch import save_file

    from .modeling_cgns import CGNSModel
    from .processing_cgns import CGNSImageProcessor, CGNSProcessor

    checkpoint = load_lightning_checkpoint(checkpoint_path)
    state_dict = checkpoint["state_dict"]
    hyper_parameters = checkpoint.get("hyper_parameters") or {}
    config, notes = build_cgns_config(state_dict, hyper_parameters, text_config_path, image_size)
    tokenizer = None
    if tokenizer_path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        if len(tokenizer) != config.text_config.vocab_size:
            raise ValueError(f"--tokenizer {tokenizer_path!r} has {len(tokenizer)} tokens, the checkpoint's "
                             f"text tower {config.text_config.vocab_size}: they do not belong together")

    model = CGNSModel(config)
    mapping = map_mgca_state_dict(state_dict, model)
    model.eval()
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    image_processor = CGNSImageProcessor(image_size=config.image_size)
    if tokenizer is not None:
        CGNSProcessor(image_processor, tokenizer, max_length=config.max_text_length).save_pretrained(output_dir)
    else:
        image_processor.save_pretrained(output_dir)
    unmapped_file = None
    if save_unmapped and mapping["unmapped"]:
        unmapped_file = "unmapped_weights.safetensors"
        save_file({k: state_dict[k].contiguous() for k in sorted(mapping["unmapped"])},
                  os.path.join(output_dir, unmapped_file), metadata={"source": os.path.basename(checkpoint_path)})

    vision = config.vision_config
    report = {
        "source": {"file": os.path.basename(checkpoint_path), "sha256": file_sha256(checkpoint_path),
                   "format": CHECKPOINT_FORMAT, "epoch": checkpoint.get("epoch"),
                   "global_step": checkpoint.get("global_step"),
                   "pytorch_lightning_version": checkpoint.get("pytorch-lightning_version"),
                   "hyper_parameters": json_safe(hyper_parameters)},
        "vision": {"architecture": vision.architecture, "model_args": vision.model_args,
                   "image_size": config.image_size},
        "text": {"num_hidden_layers": config.text_config.num_hidden_layers,
                 "hidden_size": config.text_config.hidden_size, "vocab_size": config.text_config.vocab_size,
                 "num_attention_heads": config.text_config.num_attention_heads},
        "vision_tensors": mapping["vision_tensors"], "text_tensors": mapping["text_tensors"],
        "not_converted_cgns_modules": ["attention_pool", "global_image_projection", "local_image_projection",
                                       "local_text_projection", "sentence_pool", "cross_attention", "predictor",
                                       "logit_scale", "clustering"],
        "tokenizer": tokenizer_path,
        "unmapped_weights_file": unmapped_file,
        "unmapped_groups": group_unmapped(mapping["unmapped"], state_dict),
        "notes": notes,
        "mapped": mapping["mapped"],
        "unmapped": {k: {"shape": list(state_dict[k].shape), "reason": r}
                     for k, r in sorted(mapping["unmapped"].items())},
    }
    with open(os.path.join(output_dir, "conversion_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    write_model_card(output_dir, report)
    return report


def print_summary(report: Dict[str, Any], output_dir: str, stream=sys.stdout) -> None:
    vision = report["vision"]
    print(f"converted {report['source']['file']} -> {output_dir}", file=stream)
    print(f"  vision_model: {report['vision_tensors']} tensors into timm {vision['architecture']} "
          f"({vision['image_size']} px)", file=stream)
    print(f"  text_model:   {report['text_tensors']} tensors into BERT ({report['text']['num_hidden_layers']} layers)",
          file=stream)
    print(f"  not converted: {len(report['unmapped'])} tensors (all listed in conversion_report.json)", file=stream)
    for group in report["unmapped_groups"]:
        print(f"    {group['tensors']:4d} tensors, {group['parameters']:,} parameters: {group['reason']}", file=stream)
        for key in group["examples"]:
            print(f"         e.g. {key}", file=stream)
    for note in report["notes"]:
        print(f"  note: {note}", file=stream)
    if report["tokenizer"] is None:
        print("  no tokenizer written (pass --tokenizer DIR with Bio_ClinicalBERT's tokenizer to add one); the "
              "image protocols do not need it", file=stream)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="MGCA Lightning .ckpt (ResNet-50 or ViT-B/16)")
    p.add_argument("--output_dir", required=True, help="folder of the CGNS export")
    p.add_argument("--text_config", default=None,
                   help="local BERT config / model folder (e.g. Bio_ClinicalBERT) for what shapes cannot tell "
                        "(heads, activation); default: inferred from the weights")
    p.add_argument("--tokenizer", default=None, help="local tokenizer folder to save with the export (a CGNSProcessor)")
    p.add_argument("--image_size", type=int, default=None,
                   help="ResNet input size (default 224; ViT: from the weights)")
    p.add_argument("--no_unmapped_weights", action="store_true",
                   help="do not save the unconverted MGCA tensors in unmapped_weights.safetensors (they stay listed)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    try:
        report = convert_mgca_checkpoint(args.checkpoint, args.output_dir, args.text_config, args.tokenizer,
                                         args.image_size, save_unmapped=not args.no_unmapped_weights)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"convert_mgca: {err}") from None
    print_summary(report, args.output_dir)
    return report


if __name__ == "__main__":
    main()

__all__ = [
    "main", "parse_args", "convert_mgca_checkpoint", "load_lightning_checkpoint", "infer_vision_config",
    "infer_text_config", "build_cgns_config", "map_mgca_state_dict", "UnsafeCheckpointError",
    "SAFE_GLOBALS", "UNMAPPED_REASONS", "write_model_card",
]
