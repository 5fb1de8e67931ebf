"""Common model checks: shapes, save/load, Auto classes, gradients, config validation, no NaN."""
import math

import pytest
import torch
from transformers import AutoConfig, AutoModel, BertConfig, TimmWrapperConfig

from modeling_cgns import CGNSConfig, CGNSModel
from tiny import tiny_batch, tiny_config

ARCHS = ["resnet18", "vit_tiny_patch16_224"]


@pytest.fixture(scope="module", params=ARCHS)
def model_and_batch(request):
    torch.manual_seed(0)
    model = CGNSModel(tiny_config(request.param))
    return request.param, model, tiny_batch()


def test_shapes(model_and_batch):
    arch, model, batch = model_and_batch
    model.train()
    out = model(**batch, reconstruct=True)
    grid = 2 if arch == "resnet18" else 4   # 64 px: stride 32 -> 2x2, patch 16 -> 4x4
    b, d = 3, 32
    assert out.image_embeds.shape == (b, d) and out.text_embeds.shape == (b, d)
    assert out.local_image_embeds.shape == (b, grid * grid, d)
    s_max = int(batch["sentence_index"].max()) + 1
    assert out.sentence_embeds.shape == (b, s_max, d) and out.sentence_mask.shape == (b, s_max)
    assert out.text_to_image_features.shape == (b, grid * grid, d)
    n = int(out.sentence_mask.sum())
    assert out.text_sentence_features.shape == (n, d) == out.cross_sentence_features.shape
    assert out.reconstruction.shape == batch["pixel_values"].shape
    assert out.token_mask.sum(dim=1).tolist() == [round(0.5 * grid * grid)] * b
    assert out.logits_per_image.shape == (b, b)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(b))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(b))
    names = out.named_losses()
    assert set(names) == {"loss", "global_loss", "local_image_loss", "local_text_loss", "reconstruction_loss",
                          "bml_loss"}
    assert all(torch.isfinite(v) for v in names.values())
    assert -1.0 <= float(out.local_image_loss) <= 1.0
    # the global loss at initialisation is about log B
    assert abs(float(out.global_loss) - math.log(b)) < 1.0
    for key in ("i2t_acc1", "i2t_acc5", "t2i_acc1", "t2i_acc5"):
        assert 0.0 <= float(out.retrieval[key]) <= 1.0
    assert float(out.retrieval["i2t_acc5"]) == 1.0    # 3 candidates < 5


def test_loss_is_sum_of_terms(model_and_batch):
    _, model, batch = model_and_batch
    model.eval()
    with torch.no_grad():
        out = model(**batch, reconstruct=True)
    total = out.global_loss + out.local_image_loss + out.local_text_loss + out.reconstruction_loss
    torch.testing.assert_close(out.loss, total)
    with torch.no_grad():
        stage1 = model(**batch)
    assert stage1.reconstruction_loss is None and stage1.reconstruction is None
    torch.testing.assert_close(stage1.loss, stage1.global_loss + stage1.local_image_loss + stage1.local_text_loss)


def test_eval_is_deterministic_and_unmasked(model_and_batch):
    _, model, batch = model_and_batch
    model.eval()
    with torch.no_grad():
        a = model(**batch, reconstruct=True)
        b = model(**batch, reconstruct=True)
    assert not a.token_mask.any()
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.reconstruction, b.reconstruction)


def test_every_trainable_parameter_gets_a_gradient(model_and_batch):
    _, model, batch = model_and_batch
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch, reconstruct=True).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    nonfinite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert nonfinite == []


def test_stage1_keeps_decoder_in_graph_with_zero_gradient(model_and_batch):
    _, model, batch = model_and_batch
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch, reconstruct=False).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if name.startswith("decoder.") or name == "image_mask_token":
            assert torch.count_nonzero(p.grad) == 0, name


def test_save_load_round_trip(model_and_batch, tmp_path):
    _, model, batch = model_and_batch
    model.clustering.initialized.fill_(True)
    model.clustering.centroid_vectors.normal_()
    model.clustering.num_updates.fill_(7)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    reloaded = CGNSModel.from_pretrained(tmp_path)
    auto = AutoModel.from_pretrained(tmp_path)
    assert isinstance(auto, CGNSModel)
    for m in (model, reloaded, auto):
        m.eval()
    with torch.no_grad():
        ref = model(**batch, reconstruct=True)
        for other in (reloaded, auto):
            out = other(**batch, reconstruct=True)
            for key in ("loss", "image_embeds", "text_embeds", "reconstruction", "local_text_loss"):
                torch.testing.assert_close(getattr(out, key), getattr(ref, key), atol=1e-5, rtol=1e-5)
    for key, value in model.clustering.state_dict().items():
        torch.testing.assert_close(reloaded.clustering.state_dict()[key], value)
    model.clustering.initialized.fill_(False)


def test_auto_config_registration(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CGNSConfig)
    a, b = loaded.to_dict(), config.to_dict()
    a.pop("_name_or_path"), b.pop("_name_or_path")
    assert a == b
    assert loaded.vision_config.architecture == "resnet18" and loaded.text_config.hidden_size == 32


def test_feature_accessors_match_forward(model_and_batch):
    _, model, batch = model_and_batch
    model.eval()
    with torch.no_grad():
        out = model(**batch, return_loss=False)
        img = model.get_image_features(batch["pixel_values"]).pooler_output
        txt = model.get_text_features(batch["input_ids"], batch["attention_mask"],
                                      batch["sentence_index"]).pooler_output
        local = model.get_local_image_features(batch["pixel_values"])
        sentences, mask = model.get_sentence_features(batch["input_ids"], batch["attention_mask"],
                                                      batch["sentence_index"])
    torch.testing.assert_close(img, out.image_embeds)
    torch.testing.assert_close(txt, out.text_embeds)
    torch.testing.assert_close(local, out.local_image_embeds)
    torch.testing.assert_close(sentences, out.sentence_embeds)
    assert torch.equal(mask, out.sentence_mask)
    assert out.loss is None


def test_resnet_local_tokens_are_spatial():
    """Token p of the local grid must come from grid cell p (row-major), not a raw channel reshape (G.9)."""
    torch.manual_seed(0)
    model = CGNSModel(tiny_config("resnet18", image_size=64)).eval()
    captured = {}
    model.local_image_projection.register_forward_hook(lambda m, i, o: captured.update(tokens=i[0]))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fmap = model.vision_model(pixel_values=x).last_hidden_state    # (1, C, 2, 2)
        model.get_image_features(x)
    tokens = captured["tokens"]
    for p in range(4):
        torch.testing.assert_close(tokens[0, p], fmap[0, :, p // 2, p % 2])


def test_empty_report_and_all_padding_rows_are_finite():
    torch.manual_seed(0)
    model = CGNSModel(tiny_config()).train()
    batch = tiny_batch()
    batch["sentence_index"][1] = -1                  # a report with no usable sentence
    batch["attention_mask"][2] = 0                   # an all-padding row
    batch["sentence_index"][2] = 3                   # stray ids under padding must be ignored
    out = model(**batch, reconstruct=True)
    assert torch.isfinite(out.loss)
    assert out.sentence_mask[1].sum() == 0 and out.sentence_mask[2].sum() == 0
    assert torch.isfinite(out.text_embeds).all()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # a batch in which no report has a sentence at all
    batch["sentence_index"][:] = -1
    model.zero_grad()
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.text_sentence_features.shape[0] == 0
    out.loss.backward()


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    config = tiny_config()
    config.text_config.hidden_dropout_prob = 0.0
    config.text_config.attention_probs_dropout_prob = 0.0
    model = CGNSModel(config).train()
    batch = tiny_batch()
    # BatchNorm running stats change in train mode; compare gradients from identical starting states.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    model(**batch).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    torch.manual_seed(1)
    model(**batch).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("kwargs, message", [
    (dict(vision_config=TimmWrapperConfig(architecture="efficientnet_b0")), "unsupported vision tower"),
    (dict(text_config=TimmWrapperConfig(architecture="resnet18")), "unsupported text tower"),
    (dict(local_text_temperature=0.0), "local_text_temperature"),
    (dict(projection_dim=30, sentence_pool_heads=4), "divisible"),
    (dict(hard_negative_mode="multiply"), "hard_negative_mode"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(num_clusters=8, cluster_queue_size=4), "cluster_queue_size"),
    (dict(max_text_length=1000), "max_position_embeddings"),
    (dict(bml_alpha=0.6, bml_beta=0.5), "bml_alpha"),
    (dict(image_size=100), "multiple of 32"),
    (dict(logit_scale_init_value=10.0), "clamp"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def test_default_config_is_the_reference():
    config = CGNSConfig(text_config=BertConfig())
    assert config.vision_config.architecture == "resnet50"
    assert config.projection_dim == 768 and config.num_clusters == 128
    assert config.cluster_init_threshold == 0.4 and config.cluster_momentum == 0.001
    assert config.hard_negative_weight == 3.0 and config.bml_alpha == 0.2 and config.bml_beta == 0.5
    assert config.bml_weight == 1e-4 and config.local_text_temperature == 1.0
    assert math.isclose(math.exp(config.logit_scale_init_value), 10.0)
    assert config.mask_ratio == 0.5 and config.reconstruction_weight == 10.0 and config.max_text_length == 256


def test_image_size_mismatch_is_a_clear_error():
    model = CGNSModel(tiny_config("resnet18", image_size=64)).eval()
    with pytest.raises(ValueError, match="image_size"):
        model.get_image_features(torch.randn(1, 3, 96, 96))
