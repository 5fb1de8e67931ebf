"""MGCA checkpoint conversion (modeling_cgns.convert_mgca, issue 15).

The fake checkpoints follow MGCA's module tree key for key (``img_encoder_q.model.*`` = torchvision
ResNet without ``fc`` or MGCA's ViT; ``global_embed`` / ``local_embed`` MLP heads; a BLIP-style BERT
with cross-attention blocks; token attention layers; prototypes) and are saved the way Lightning saves
them: ``torch.save`` of a dict with ``state_dict``, ``hyper_parameters``, ``epoch`` and friends.

Sizes: the ResNet trees are torchvision's real resnet18 and resnet50 (random weights, BatchNorm
statistics randomised so a swapped tensor would show); the ViT is MGCA's layout at width 64 / depth 2
for the numeric check (an independent plain-torch forward is the oracle) and at the real ViT-B/16 size
shape-only (meta tensors), since a full ViT-B forward is too slow for the fast tier. The BERT is tiny.
"""
import argparse
import json
import os
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from modeling_cgns import CGNSForImageClassification, CGNSModel
from modeling_cgns import convert_mgca as cm

EMB_DIM = 16
TEXT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=40)


# --------------------------------------------------------------------------------------------------
# fake MGCA checkpoints
# --------------------------------------------------------------------------------------------------

def randomise_(module: nn.Module, seed: int) -> nn.Module:
    """Every float parameter and buffer drawn afresh (variances positive) so that no two tensors coincide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            values = torch.randn(tensor.shape, generator=g) * 0.05
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            elif name.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
                values = values + 1.0
            tensor.copy_(values)
    return module


def mgca_projection_heads(prefix: str, in_global: int, in_local: int, hidden: int = 24) -> dict:
    """MGCA's GlobalEmbedding (Linear-BN-ReLU-Linear-BN(affine=False)) and LocalEmbedding (Conv1d version)."""
    global_head = nn.Sequential(nn.Linear(in_global, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                nn.Linear(hidden, EMB_DIM), nn.BatchNorm1d(EMB_DIM, affine=False))
    local_head = nn.Sequential(nn.Conv1d(in_local, hidden, 1), nn.BatchNorm1d(hidden), nn.ReLU(),
                               nn.Conv1d(hidden, EMB_DIM, 1), nn.BatchNorm1d(EMB_DIM, affine=False))
    state = {f"{prefix}global_embed.head.{k}": v for k, v in global_head.state_dict().items()}
    state.update({f"{prefix}local_embed.head.{k}": v for k, v in local_head.state_dict().items()})
    return state


def mgca_text_encoder(seed: int = 1):
    """Tiny BERT + MGCA's text-side extras: per-layer cross-attention tensors and the position_ids buffer."""
    torch.manual_seed(seed)
    bert = randomise_(BertModel(BertConfig(**TEXT), add_pooling_layer=False), seed).eval()
    prefix = cm.TEXT_PREFIX
    state = {prefix + k: v.clone() for k, v in bert.state_dict().items()}
    h = TEXT["hidden_size"]
    for layer in range(TEXT["num_hidden_layers"]):
        base = f"{prefix}encoder.layer.{layer}.crossattention."
        for name in ("self.query", "self.key", "self.value", "output.dense"):
            state[base + name + ".weight"] = torch.randn(h, h)
            state[base + name + ".bias"] = torch.randn(h)
        state[base + "output.LayerNorm.weight"] = torch.ones(h)
        state[base + "output.LayerNorm.bias"] = torch.zeros(h)
    state[prefix + "embeddings.position_ids"] = torch.arange(TEXT["max_position_embeddings"]).expand(1, -1)
    state.update(mgca_projection_heads("text_encoder_q.", h, h))
    return bert, state


def mgca_shared_modules() -> dict:
    state = {}
    for name in ("patch_local_atten_layer", "word_local_atten_layer"):
        attention = nn.MultiheadAttention(EMB_DIM, 1, batch_first=True)
        state.update({f"{name}.{k}": v for k, v in attention.state_dict().items()})
    state["prototype_layer.weight"] = torch.randn(10, EMB_DIM)
    return state


def mgca_resnet(arch: str, seed: int = 0) -> nn.Module:
    resnet = getattr(torchvision.models, arch)(weights=None)
    resnet.fc = nn.Identity()  # MGCA's cnn_backbones replace fc by an identity
    return randomise_(resnet, seed).eval()


def vit_state(dim: int, depth: int, patch: int, image_size: int, device=None, seed: int = 0) -> dict:
    """MGCA's VisionTransformer tensors (vits.py layout), random; ``device="meta"`` for shapes only."""
    g = torch.Generator().manual_seed(seed)

    def tensor(*shape, scale=0.05, offset=0.0):
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=g) * scale + offset

    tokens = (image_size // patch) ** 2
    state = {"cls_token": tensor(1, 1, dim), "pos_embed": tensor(1, tokens + 1, dim),
             "patch_embed.proj.weight": tensor(dim, 3, patch, patch), "patch_embed.proj.bias": tensor(dim),
             "norm.weight": tensor(dim, offset=1.0), "norm.bias": tensor(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": tensor(dim, offset=1.0), b + "norm1.bias": tensor(dim),
                      b + "attn.qkv.weight": tensor(3 * dim, dim), b + "attn.qkv.bias": tensor(3 * dim),
                      b + "attn.proj.weight": tensor(dim, dim), b + "attn.proj.bias": tensor(dim),
                      b + "norm2.weight": tensor(dim, offset=1.0), b + "norm2.bias": tensor(dim),
                      b + "mlp.fc1.weight": tensor(4 * dim, dim), b + "mlp.fc1.bias": tensor(4 * dim),
                      b + "mlp.fc2.weight": tensor(dim, 4 * dim), b + "mlp.fc2.bias": tensor(dim)})
    return state


def vit_reference_forward(state: dict, pixels: torch.Tensor, num_heads: int) -> torch.Tensor:
    """MGCA's ViT forward written out with plain torch ops: (B, 3, S, S) -> (B, 1 + P, D) after the final LN."""
    weight = state["patch_embed.proj.weight"]
    dim, patch = weight.shape[0], weight.shape[-1]
    x = F.conv2d(pixels, weight, state["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], dim=1) + state["pos_embed"]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    head = dim // num_heads
    for i in range(depth):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), state[b + "norm1.weight"], state[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"])
        q, k, v = qkv.view(len(x), -1, 3, num_heads, head).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * head ** -0.5).softmax(dim=-1)
        out = (attention @ v).transpose(1, 2).reshape(len(x), -1, dim)
        x = x + F.linear(out, state[b + "attn.proj.weight"], state[b + "attn.proj.bias"])
        h = F.layer_norm(x, (dim,), state[b + "norm2.weight"], state[b + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"])),
                     state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"])
        x = x + h
    return F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6)


def lightning_checkpoint(state_dict: dict, img_encoder: str, **extra) -> dict:
    """The top level of a PyTorch Lightning 1.5 checkpoint (what MGCA's ModelCheckpoint wrote)."""
    checkpoint = {
        "epoch": 20, "global_step": 33137, "pytorch-lightning_version": "1.5.10",
        "state_dict": OrderedDict(state_dict),
        "hyper_parameters": {"img_encoder": img_encoder, "emb_dim": EMB_DIM, "learning_rate": 2e-5,
                             "gpus": 2, "strategy": "ddp", "max_epochs": 50, "softmax_temperature": 0.07},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}":
                      {"best_model_score": torch.tensor(1.25), "best_model_path": "epoch=20.ckpt"}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                              "param_groups": [{"lr": 2e-5, "betas": (0.9, 0.999), "params": [0]}]}],
        "lr_schedulers": [{"base_lrs": [2e-5], "last_epoch": 33137, "_step_count": 33138}],
    }
    checkpoint.update(extra)
    return checkpoint


def resnet_checkpoint(arch: str):
    resnet = mgca_resnet(arch)
    state = {cm.IMAGE_PREFIX + k: v.clone() for k, v in resnet.state_dict().items()}
    width = 2048 if arch == "resnet50" else 512
    state.update(mgca_projection_heads("img_encoder_q.", width, width // 2))
    bert, text_state = mgca_text_encoder()
    state.update(text_state)
    state.update(mgca_shared_modules())
    return resnet, bert, lightning_checkpoint(state, "resnet_50" if arch == "resnet50" else "resnet_18")


def vit_checkpoint(dim: int = 64, depth: int = 2, image_size: int = 64):
    image_state = vit_state(dim, depth, 16, image_size)
    state = {cm.IMAGE_PREFIX + k: v for k, v in image_state.items()}
    state.update(mgca_projection_heads("img_encoder_q.", dim, dim))
    bert, text_state = mgca_text_encoder()
    state.update(text_state)
    state.update(mgca_shared_modules())
    return image_state, bert, lightning_checkpoint(state, "vit_base")


def convert(tmp_path, checkpoint: dict, name: str, *extra):
    path = tmp_path / f"{name}.ckpt"
    torch.save(checkpoint, path)
    out = tmp_path / name
    report = cm.main(["--checkpoint", str(path), "--output_dir", str(out), *extra])
    return report, out


def resnet_features(resnet: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet up to layer4 (MGCA's encoder before its pooling): (B, C, h, w)."""
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(pixels))))
    return resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(x))))


@pytest.fixture(scope="module")
def resnet18_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mgca_r18")
    resnet, bert, checkpoint = resnet_checkpoint("resnet18")
    report, out = convert(tmp, checkpoint, "mgca-resnet18", "--image_size", "64")
    return resnet, bert, checkpoint, report, out


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mgca_vit")
    image_state, bert, checkpoint = vit_checkpoint()
    report, out = convert(tmp, checkpoint, "mgca-vit")
    return image_state, bert, checkpoint, report, out


# --------------------------------------------------------------------------------------------------
# mapping and parity
# --------------------------------------------------------------------------------------------------

def test_resnet50_every_image_key_mapped_and_feature_map_equal(tmp_path):
    """Real-size torchvision ResNet-50 tree: all 318 tower tensors mapped, same layer4 map to 1e-5."""
    resnet, _, checkpoint = resnet_checkpoint("resnet50")
    report, out = convert(tmp_path, checkpoint, "mgca-resnet50", "--image_size", "64", "--no_unmapped_weights")
    image_keys = {k for k in checkpoint["state_dict"] if k.startswith(cm.IMAGE_PREFIX)}
    assert len(image_keys) == 318 and image_keys <= set(report["mapped"])
    assert report["vision"]["architecture"] == "resnet50" and report["vision_tensors"] == 318
    model = CGNSModel.from_pretrained(str(out)).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = resnet_features(resnet, pixels)
        actual = model.vision_model(pixel_values=pixels).last_hidden_state
    assert actual.shape == expected.shape == (2, 2048, 2, 2)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not (out / "unmapped_weights.safetensors").exists()


def test_resnet18_export_maps_towers_and_lists_everything_else(resnet18_export):
    resnet, bert, checkpoint, report, out = resnet18_export
    state = checkpoint["state_dict"]
    assert set(report["mapped"]) | set(report["unmapped"]) == set(state)
    assert not set(report["mapped"]) & set(report["unmapped"])
    for key, target in report["mapped"].items():
        prefix = cm.IMAGE_PREFIX if key.startswith(cm.IMAGE_PREFIX) else cm.TEXT_PREFIX
        tower = "vision_model.timm_model." if prefix == cm.IMAGE_PREFIX else "text_model."
        assert target == tower + key[len(prefix):]
    expected_unmapped = {k for k in state if not k.startswith((cm.IMAGE_PREFIX, cm.TEXT_PREFIX))}
    expected_unmapped |= {k for k in state if ".crossattention." in k or k.endswith("position_ids")}
    assert set(report["unmapped"]) == expected_unmapped
    assert all(entry["reason"] and "no CGNS counterpart" not in entry["reason"]
               for entry in report["unmapped"].values())  # every key is a known MGCA module
    on_disk = json.loads((out / "conversion_report.json").read_text())
    assert set(on_disk["unmapped"]) == expected_unmapped
    saved = load_file(str(out / "unmapped_weights.safetensors"))
    assert set(saved) == expected_unmapped
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    card = (out / "README.md").read_text()
    assert "mgca-resnet18.ckpt" in card and report["source"]["sha256"] in card and "None was written" in card
    assert report["source"]["epoch"] == 20 and report["source"]["hyper_parameters"]["emb_dim"] == EMB_DIM


def test_resnet18_tower_and_text_tower_reproduce_the_source(resnet18_export):
    resnet, bert, _, _, out = resnet18_export
    model = CGNSModel.from_pretrained(str(out)).eval()
    g = torch.Generator().manual_seed(4)
    pixels = torch.randn(2, 3, 64, 64, generator=g)
    input_ids = torch.randint(1, TEXT["vocab_size"], (2, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model.vision_model(pixel_values=pixels).last_hidden_state,
                                   resnet_features(resnet, pixels), rtol=1e-5, atol=1e-5)
        converted = model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        source = bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        torch.testing.assert_close(converted, source, rtol=1e-5, atol=1e-5)


def test_vit_tower_matches_an_independent_forward(vit_export):
    image_state, _, checkpoint, report, out = vit_export
    assert {k for k in checkpoint["state_dict"] if k.startswith(cm.IMAGE_PREFIX)} <= set(report["mapped"])
    assert report["vision"] == {"architecture": "vit_base_patch16_224", "image_size": 64,
                                "model_args": {"embed_dim": 64, "depth": 2, "num_heads": 1, "img_size": 64}}
    model = CGNSModel.from_pretrained(str(out)).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        actual = model.vision_model(pixel_values=pixels).last_hidden_state
        expected = vit_reference_forward(image_state, pixels, num_heads=1)
    assert actual.shape == expected.shape == (2, 17, 64)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_real_size_vit_b16_layout_is_timm_vit_base_shape_for_shape():
    """Shape-only (meta tensors): MGCA's ViT-B/16 tree is timm's vit_base_patch16_224 without the head."""
    import timm

    image_state = vit_state(768, 12, 16, 224, device="meta")
    arch, model_args, size, _ = cm.infer_vision_config(image_state)
    assert (arch, model_args, size) == ("vit_base_patch16_224", None, 224)
    with torch.device("meta"):
        timm_vit = timm.create_model(arch, pretrained=False, num_classes=0)
    assert {k: tuple(v.shape) for k, v in timm_vit.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in image_state.items()}


def test_broken_layouts_are_refused(tmp_path):
    _, _, checkpoint = resnet_checkpoint("resnet18")
    checkpoint["state_dict"].pop(cm.IMAGE_PREFIX + "layer2.0.bn1.running_var")
    torch.save(checkpoint, tmp_path / "missing.ckpt")
    with pytest.raises(SystemExit, match="get no value from the checkpoint"):
        cm.main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--output_dir", str(tmp_path / "a")])
    _, _, checkpoint = resnet_checkpoint("resnet18")
    checkpoint["hyper_parameters"]["img_encoder"] = "vit_base"
    torch.save(checkpoint, tmp_path / "declared.ckpt")
    with pytest.raises(SystemExit, match="img_encoder='vit_base' but the weights are a resnet18"):
        cm.main(["--checkpoint", str(tmp_path / "declared.ckpt"), "--output_dir", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------------------------------
# safe loading
# --------------------------------------------------------------------------------------------------

def _write_marker(path):
    with open(path, "w") as f:
        f.write("executed")
    return {}


class PayloadOnLoad:
    """Unpickling this calls _write_marker: a stand-in for any code a pickle can run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _write_marker, (self.path,)


def test_checkpoint_with_an_arbitrary_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker.txt"
    _, _, checkpoint = resnet_checkpoint("resnet18")
    checkpoint["hyper_parameters"]["callback"] = PayloadOnLoad(str(marker))
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(cm.UnsafeCheckpointError, match=r"refused.*_write_marker"):
        cm.load_lightning_checkpoint(str(tmp_path / "evil.ckpt"))
    with pytest.raises(SystemExit, match="refused"):
        cm.main(["--checkpoint", str(tmp_path / "evil.ckpt"), "--output_dir", str(tmp_path / "out")])
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_namespace_and_lightning_attribute_dict_hyper_parameters_load_as_plain_dicts(tmp_path, monkeypatch):
    # Lightning is not installed: pickle the AttributeDict from a stand-in module at Lightning's path.
    module = types.ModuleType("pytorch_lightning.utilities.parsing")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__, AttributeDict.__qualname__ = module.__name__, "AttributeDict"
    module.AttributeDict = AttributeDict
    for name in ("pytorch_lightning", "pytorch_lightning.utilities", module.__name__):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    hparams = AttributeDict(img_encoder="resnet_18", emb_dim=EMB_DIM,
                            args=argparse.Namespace(batch_size=72, gpus="0,1"))
    checkpoint = {"state_dict": OrderedDict(a=torch.ones(2)), "hyper_parameters": hparams, "epoch": 1}
    torch.save(checkpoint, tmp_path / "hp.ckpt")
    monkeypatch.delitem(sys.modules, module.__name__)
    loaded = cm.load_lightning_checkpoint(str(tmp_path / "hp.ckpt"))
    assert type(loaded["hyper_parameters"]) is dict and type(loaded["hyper_parameters"]["args"]) is dict
    assert loaded["hyper_parameters"] == {"img_encoder": "resnet_18", "emb_dim": EMB_DIM,
                                          "args": {"batch_size": 72, "gpus": "0,1"}}
    assert torch.equal(loaded["state_dict"]["a"], torch.ones(2))


def test_non_checkpoints_get_a_one_line_error(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "list.ckpt")
    with pytest.raises(ValueError, match="expected a MGCA PyTorch Lightning checkpoint"):
        cm.load_lightning_checkpoint(str(tmp_path / "list.ckpt"))
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        cm.load_lightning_checkpoint(str(tmp_path / "text.ckpt"))
    with pytest.raises(FileNotFoundError):
        cm.load_lightning_checkpoint(str(tmp_path / "absent.ckpt"))


# --------------------------------------------------------------------------------------------------
# text config and tokenizer
# --------------------------------------------------------------------------------------------------

def test_text_config_and_tokenizer_options(tmp_path):
    from transformers import BertTokenizerFast

    from modeling_cgns import CGNSProcessor

    _, bert, checkpoint = resnet_checkpoint("resnet18")
    config_dir = tmp_path / "bert"
    BertConfig(**{**TEXT, "num_hidden_layers": 12, "hidden_act": "gelu_new"}).save_pretrained(config_dir)
    vocab = tmp_path / "vocab.txt"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab.write_text("\n".join(specials + [f"w{i}" for i in range(TEXT["vocab_size"] - len(specials))]) + "\n")
    tokenizer_dir = tmp_path / "tokenizer"
    BertTokenizerFast(vocab=str(vocab)).save_pretrained(tokenizer_dir)
    report, out = convert(tmp_path, checkpoint, "with-text", "--image_size", "64", "--text_config",
                          str(config_dir), "--tokenizer", str(tokenizer_dir))
    model = CGNSModel.from_pretrained(str(out))
    assert model.config.text_config.num_hidden_layers == 2 and model.config.text_config.hidden_act == "gelu_new"
    assert any("12 layers" in note for note in report["notes"])
    processor = CGNSProcessor.from_pretrained(str(out))
    assert len(processor.tokenizer) == TEXT["vocab_size"] and processor.image_processor.image_size == 64
    assert "Written from" in (out / "README.md").read_text()

    BertConfig(**{**TEXT, "hidden_size": 48}).save_pretrained(tmp_path / "wide")
    with pytest.raises(SystemExit, match="hidden_size 48 .config. vs 32 .checkpoint."):
        convert(tmp_path, checkpoint, "wide-text", "--text_config", str(tmp_path / "wide"))


# --------------------------------------------------------------------------------------------------
# downstream protocols accept the export
# --------------------------------------------------------------------------------------------------

def test_export_loads_in_every_frozen_tower_protocol(resnet18_export, vit_export):
    from modeling_cgns import CGNSForObjectDetection, CGNSForSemanticSegmentation

    resnet, _, _, _, out = resnet18_export
    probe = CGNSForImageClassification.from_pretrained(str(out), num_labels=5)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(probe.extract_features(pixels), resnet_features(resnet, pixels).mean(dim=(2, 3)),
                                   rtol=1e-5, atol=1e-5)
    for cls in (CGNSForObjectDetection, CGNSForSemanticSegmentation):
        model = cls.from_pretrained(str(out), num_labels=1) if cls is CGNSForSemanticSegmentation \
            else cls.from_pretrained(str(out))
        assert all(torch.equal(a, b) for a, b in zip(model.vision_model.state_dict().values(),
                                                     probe.vision_model.state_dict().values()))
    image_state, _, _, _, vit_out = vit_export
    vit_probe = CGNSForImageClassification.from_pretrained(str(vit_out), num_labels=5)
    with torch.no_grad():
        torch.testing.assert_close(vit_probe.extract_features(pixels),
                                   vit_reference_forward(image_state, pixels, 1)[:, 0], rtol=1e-5, atol=1e-5)
    CGNSForSemanticSegmentation.from_pretrained(str(vit_out), num_labels=1)


@pytest.mark.filterwarnings("ignore::modeling_cgns.metrics.UndefinedMetricWarning")
@pytest.mark.filterwarnings("ignore:.*has no positive example:UserWarning")
def test_tiny_linear_probe_runs_on_the_export(resnet18_export, tmp_path):
    from cgns.downstream import cli as td

    out = resnet18_export[-1]
    results = td.main(["--dataset", "synthetic_cxr", "--cache_dir", str(tmp_path / "cache"), "--model", str(out),
                       "--output_dir", str(tmp_path / "probe"), "--dataset_options", "num_images=60",
                       "image_size=64", "--batch_size", "16", "--quiet", "--seeds", "0", "--max_epochs", "2"])
    assert results["model"] == str(out) and results["summary"]["auroc"]["n"] == 1
    assert os.path.isfile(tmp_path / "probe" / "results.md")


# --------------------------------------------------------------------------------------------------
# baseline sweep (downstream/baselines.py)
# --------------------------------------------------------------------------------------------------

def fake_results(command):
    """What train_downstream writes, for the argument list of one baseline command."""
    arg = {command[i]: command[i + 1] for i in range(2, len(command) - 1) if command[i].startswith("--")}
    pct = float(arg["--data_pct"])
    stat = {"mean": pct / 2 + 0.3, "std": 0.01, "n": 3}
    if arg["--task"] == "detection":
        return {"task": "detection", "metric": "map", "summary": {"map": {**stat, "mean": pct / 10},
                                                                  "map_mgca": stat}}
    metric = "accuracy" if arg["--dataset"] == "covidx" else "dice" if arg["--task"] == "segmentation" else "auroc"
    return {"task": arg["--task"], "metric": metric, "summary": {metric: stat}}


@pytest.fixture
def fake_runner(monkeypatch):
    from cgns.downstream import baselines

    calls = []

    def run_command(command, log_path):
        calls.append(command)
        out = command[command.index("--output_dir") + 1]
        os.makedirs(out, exist_ok=True)
        if "--dataset" in command and command[command.index("--dataset") + 1] == "siim":
            return 3  # a failing protocol: no results.json
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(fake_results(command), f)
        return 0

    monkeypatch.setattr(baselines, "run_command", run_command)
    return calls


def test_baseline_sweep_runs_every_cell_and_writes_one_row_per_table(fake_runner, resnet18_export, tmp_path):
    from cgns.downstream import baselines

    table = tmp_path / "baselines.md"
    table.write_text(open(os.path.join(os.path.dirname(__file__), "..", "docs", "baselines.md")).read())
    published = [line for line in table.read_text().splitlines() if "| published" in line]
    export = str(resnet18_export[-1])
    argv = ["--model", export, "--name", "converted", "--output_dir", str(tmp_path / "runs"), "--table", str(table),
            "--seeds", "0", "1", "--data_dir", f"chexpert={tmp_path}", f"rsna={tmp_path}", f"siim={tmp_path}",
            f"object_cxr={tmp_path}", "--train_args", "--num_workers 2"]
    rows = baselines.main(argv)
    assert len(fake_runner) == 3 * 6  # chexpert, rsna x3 protocols, siim, object_cxr; covidx has no data_dir
    detection = next(c for c in fake_runner if "detection" in c and "object_cxr" in c and "0.01" in c)
    assert detection[1:] == [baselines.TRAIN_ENTRY, "--task", "detection", "--dataset", "object_cxr",
                             "--dataset_task", "detection", "--data_dir", str(tmp_path), "--data_pct", "0.01",
                             "--model", export, "--output_dir", str(tmp_path / "runs" / "detection-object_cxr-1pct"),
                             "--seeds", "0", "1", "--quiet", "--num_workers", "2"]
    classification = [c.strip() for c in rows["classification"].split("|")[1:-1]]
    assert classification[0] == "converted" and classification[1].startswith("measured here")
    assert classification[2:] == ["30.5 ± 1.0", "35.0 ± 1.0", "80.0 ± 1.0"] * 2 + ["not run"] * 3
    dense = [c.strip() for c in rows["dense"].split("|")[1:-1]][2:]
    assert all(c.startswith("failed (exit 3") for c in dense[:3])
    assert dense[3:6] == ["30.5 ± 1.0", "35.0 ± 1.0", "80.0 ± 1.0"]
    assert dense[6:9] == ["30.5 ± 1.0 [0.1 ± 1.0]", "35.0 ± 1.0 [1.0 ± 1.0]", "80.0 ± 1.0 [10.0 ± 1.0]"]
    lines = table.read_text().splitlines()
    for name, row in rows.items():
        assert lines[lines.index(baselines.marker(name)) - 1] == row
    assert [line for line in lines if "| published" in line] == published

    # a second sweep reuses finished runs (only the failed ones rerun) and replaces the row
    fake_runner.clear()
    baselines.main(argv)
    assert len(fake_runner) == 3 and all("siim" in c for c in fake_runner)
    assert sum(line.startswith("| converted |") for line in table.read_text().splitlines()) == 2


def test_baseline_sweep_marks_detection_na_for_vit_and_matches_train_downstream_format(fake_runner, vit_export,
                                                                                        tmp_path):
    from cgns.downstream import common
    from cgns.downstream import baselines

    rows = baselines.main(["--model", str(vit_export[-1]), "--output_dir", str(tmp_path / "runs"), "--table",
                           str(tmp_path / "new.md"), "--data_dir", f"rsna={tmp_path}", "--tables", "dense"])
    cells = [c.strip() for c in rows["dense"].split("|")[1:-1]]
    assert cells[0] == "mgca-vit" and cells[8:14] == ["n/a (ResNet only)"] * 6
    assert not any("detection" in c for c in fake_runner)
    text = (tmp_path / "new.md").read_text()
    assert baselines.table_header("dense") in text and baselines.marker("dense") in text
    for stat in ({"mean": 0.8765, "std": 0.0123}, {"mean": None, "std": None}):
        assert baselines.format_mean_std(stat) == common.format_mean_std(stat)


@pytest.mark.slow
def test_baseline_sweep_runs_train_downstream_as_a_subprocess(resnet18_export, tmp_path, monkeypatch):
    """The real subprocess path, on the synthetic dataset instead of the seven clinical columns."""
    from cgns.downstream import baselines

    monkeypatch.setattr(baselines, "COLUMNS", (
        baselines.Column("Synthetic", "classification", "synthetic_cxr", "classification", "classification"),))
    monkeypatch.setattr(baselines, "PCTS", (1.0,))
    rows = baselines.main(["--model", str(resnet18_export[-1]), "--output_dir", str(tmp_path / "runs"),
                           "--table", str(tmp_path / "t.md"), "--tables", "classification", "--seeds", "0",
                           "--data_dir", f"synthetic_cxr={tmp_path / 'raw'}", "--train_args",
                           f"--cache_dir {tmp_path / 'cache'} --dataset_options num_images=40 image_size=64 "
                           f"--max_epochs 1 --batch_size 16"])
    results = json.loads((tmp_path / "runs" / "classification-synthetic_cxr-100pct" / "results.json").read_text())
    assert rows["classification"].split("|")[3].strip() == baselines.format_cell(results)
