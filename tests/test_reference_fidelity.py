"""Reference fidelity (issue 14, docs/deviations.md): known answers that pin the authors' behaviour for the
k-means timing and initialisation source, the decoders' align_corners=True upsampling and the heads'
PyTorch-default initialisation; the logit-scale cap that keeps its gradient; the reference preset."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gloo import run_on_ranks

from modeling_cgns import CGNSConfig, CGNSModel, losses
from modeling_cgns.clustering import CrossModalKMeans, greedy_chain_init
from modeling_cgns.configuration_cgns import REFERENCE_SETTINGS
from modeling_cgns.modeling_cgns import CGNSGridDecoder, CGNSTokenDecoder, _conv_upsampling_head
from tiny import REFERENCE_CLUSTERING, tiny_batch, tiny_config


def _text_loss(model, text, cross, centroids):
    cfg = model.config
    return losses.cluster_guided_text_loss(
        text, cross, centroids, temperature=cfg.local_text_temperature, hard_negative_mode=cfg.hard_negative_mode,
        hard_negative_weight=cfg.hard_negative_weight, remove_false_negatives=cfg.remove_false_negatives,
        bml_alpha=cfg.bml_alpha, bml_beta=cfg.bml_beta, bml_weight=cfg.bml_weight)[0]


def _hand_momentum_update(centroids, cross, momentum):
    """B.3 a written out: nearest centroid by cosine, per-cluster sums of the unit rows, m <- eta S + (1-eta) m."""
    z2 = F.normalize(cross.detach().float(), dim=-1)
    nearest = (z2 @ F.normalize(centroids, dim=-1).t()).argmax(dim=1)
    updated = centroids.clone()
    for k in range(centroids.shape[0]):
        members = z2[nearest == k]
        if len(members):
            updated[k] = momentum * members.sum(dim=0) + (1 - momentum) * centroids[k]
    return updated


def _model_with_centroids(seed=0, **overrides):
    torch.manual_seed(seed)
    model = CGNSModel(tiny_config(cluster_momentum=0.5, **{**REFERENCE_CLUSTERING, **overrides})).train()
    model.clustering.centroid_vectors.copy_(torch.randn(4, 32, generator=torch.Generator().manual_seed(seed + 1)))
    model.clustering.initialized.fill_(True)
    return model


# --------------------------------------------------------------------------------------------------
# 1. centroid timing
# --------------------------------------------------------------------------------------------------

def test_before_loss_hard_negatives_come_from_the_centroids_updated_with_this_batch():
    model = _model_with_centroids()
    assert model.config.cluster_update_timing == "before_loss"              # the reference is the default
    old = model.clustering.centroid_vectors.clone()
    out = model(**tiny_batch(batch=4))
    text, cross = out.text_sentence_features, out.cross_sentence_features
    expected_centroids = _hand_momentum_update(old, cross, 0.5)
    torch.testing.assert_close(model.clustering.centroid_vectors, expected_centroids)
    assert int(model.clustering.num_updates) == 1
    torch.testing.assert_close(out.local_text_loss, _text_loss(model, text, cross, expected_centroids))
    # not vacuous: the previous centroids give another loss
    assert abs(float(out.local_text_loss - _text_loss(model, text, cross, old))) > 1e-4


def test_after_step_uses_the_previous_centroids_and_updates_after_the_step():
    model = _model_with_centroids(cluster_update_timing="after_step")
    old = model.clustering.centroid_vectors.clone()
    out = model(**tiny_batch(batch=4))
    text, cross = out.text_sentence_features, out.cross_sentence_features
    torch.testing.assert_close(out.local_text_loss, _text_loss(model, text, cross, old))
    assert torch.equal(model.clustering.centroid_vectors, old)              # the forward changed nothing
    stats = model.after_optimizer_step()
    torch.testing.assert_close(model.clustering.centroid_vectors, _hand_momentum_update(old, cross, 0.5))
    assert stats["num_updates"] == 1.0
    model.after_optimizer_step()                                             # nothing pending any more
    assert int(model.clustering.num_updates) == 1


def test_after_step_one_update_per_accumulated_forward_in_order():
    model = _model_with_centroids(cluster_update_timing="after_step")
    reference = _model_with_centroids(cluster_update_timing="after_step")
    outs = [model(**tiny_batch(batch=4, seed=s)) for s in (0, 1)]
    model.after_optimizer_step()
    for out in outs:
        reference.clustering.update(out.text_sentence_features, out.cross_sentence_features)
    assert int(model.clustering.num_updates) == 2
    torch.testing.assert_close(model.clustering.centroid_vectors, reference.clustering.centroid_vectors)


def test_the_initialising_forward_uses_the_plain_loss_as_the_reference():
    torch.manual_seed(0)
    model = CGNSModel(tiny_config(cluster_init_threshold=1.0, **REFERENCE_CLUSTERING)).train()       # trigger always met
    out = model(**tiny_batch(batch=4))
    assert bool(model.clustering.initialized) and int(model.clustering.num_updates) == 1
    text, cross = out.text_sentence_features, out.cross_sentence_features
    torch.testing.assert_close(out.local_text_loss, losses.sentence_infonce(text, cross, 1.0))
    # the next forward updates the fresh centroids, then uses them
    initial = model.clustering.centroid_vectors.clone()
    out = model(**tiny_batch(batch=4, seed=1))
    updated = _hand_momentum_update(initial, out.cross_sentence_features, model.config.cluster_momentum)
    torch.testing.assert_close(model.clustering.centroid_vectors, updated)
    torch.testing.assert_close(out.local_text_loss, _text_loss(model, out.text_sentence_features,
                                                               out.cross_sentence_features, updated))


def test_evaluation_forward_never_updates():
    model = _model_with_centroids().eval()
    before = {k: v.clone() for k, v in model.clustering.state_dict().items()}
    with torch.no_grad():
        out = model(**tiny_batch(batch=4))
    assert all(torch.equal(before[k], v) for k, v in model.clustering.state_dict().items())
    torch.testing.assert_close(out.local_text_loss, _text_loss(model, out.text_sentence_features,
                                                               out.cross_sentence_features, before["centroid_vectors"]))


def test_non_finite_features_skip_the_update_and_are_counted():
    module = CrossModalKMeans(2, 3, init_threshold=1.0)
    module.update(torch.eye(3)[:2], torch.eye(3)[:2])
    before = module.centroid_vectors.clone()
    bad = torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, 0.0]])
    stats = module.update(bad, bad)
    assert stats["skipped_nonfinite"] == 1.0 and torch.equal(module.centroid_vectors, before)
    assert int(module.num_updates) == 1


def _before_loss_on_rank(rank, world):
    """Two training forwards of the same tiny model on this rank's half of each batch: the first
    initialises the centroids from the global batch, the second updates them (all inside forward)."""
    torch.manual_seed(0)
    model = CGNSModel(tiny_config(cluster_init_threshold=1.0, cluster_momentum=0.3, **REFERENCE_CLUSTERING)).train()
    history = []
    for seed in (0, 1):
        batch = tiny_batch(batch=4, seed=seed)
        mine = {k: v[2 * rank: 2 * rank + 2] for k, v in batch.items()}
        out = model(**mine)
        history.append({"text": out.text_sentence_features.detach(), "cross": out.cross_sentence_features.detach(),
                        "centroids": model.clustering.centroid_vectors.clone()})
    return history


@pytest.mark.distributed
def test_two_process_update_inside_forward_matches_one_process_on_the_global_batch():
    ranks = run_on_ranks(_before_loss_on_rank, 2)
    oracle = CrossModalKMeans(4, 32, init_threshold=1.0, momentum=0.3)
    for step in range(2):
        assert torch.equal(ranks[0][step]["centroids"], ranks[1][step]["centroids"]), step
        text = torch.cat([r[step]["text"] for r in ranks])
        cross = torch.cat([r[step]["cross"] for r in ranks])
        oracle.update(text, cross)
        torch.testing.assert_close(ranks[0][step]["centroids"], oracle.centroid_vectors, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# 2. initialisation source
# --------------------------------------------------------------------------------------------------

def _init_stream():
    """First call: 6 rows that all point one way (mean cosine ~1: no initialisation, but queued).
    Second call: 5 rows with mean text/cross cosine 0 (triggers)."""
    g = torch.Generator().manual_seed(3)
    early = F.normalize(torch.eye(8)[0] + 0.05 * torch.randn(6, 8, generator=g), dim=-1)
    early[0] = -F.normalize(torch.ones(8), dim=-1)                          # an outlier the chain would love
    trigger = F.normalize(torch.eye(8)[1:6] + 0.05 * torch.randn(5, 8, generator=g), dim=-1)
    text = F.normalize(torch.eye(8)[7].expand(5, 8).clone(), dim=-1)
    return early, trigger, text


def _draw_first(module, n):
    return int(torch.randint(n, (1,), generator=module._generator()))


def test_initialisation_from_exactly_the_triggering_batch():
    early, trigger, text = _init_stream()
    module = CrossModalKMeans(4, 8, init_threshold=0.4, queue_size=12, seed=7)
    module.update(early, early)
    assert not bool(module.initialized) and int(module.queue_count) == 6
    first = _draw_first(module, 5)
    stats = module.update(text, trigger)
    assert stats["mean_text_cross_similarity"] == pytest.approx(0.0, abs=0.05)
    assert bool(module.initialized)
    torch.testing.assert_close(module.centroid_vectors, greedy_chain_init(trigger, 4, first))
    distances = torch.cdist(module.centroid_vectors, trigger)
    assert distances.min(dim=1).values.max() < 1e-6                         # every centroid is a row of it


def test_queue_source_can_pick_rows_of_earlier_batches():
    early, trigger, text = _init_stream()
    module = CrossModalKMeans(4, 8, init_threshold=0.4, queue_size=12, seed=7, init_source="queue")
    module.update(early, early)
    first = _draw_first(module, 11)
    module.update(text, trigger)
    pool = torch.cat([early, trigger])
    torch.testing.assert_close(module.centroid_vectors, greedy_chain_init(pool, 4, first))
    assert torch.cdist(module.centroid_vectors, early).min() < 1e-6         # the two sources really differ


def test_a_triggering_batch_smaller_than_k_falls_back_to_the_queue():
    early, trigger, text = _init_stream()
    module = CrossModalKMeans(6, 8, init_threshold=0.4, queue_size=12, seed=7)      # K 6 > 5 rows
    module.update(early, early)
    first = _draw_first(module, 11)
    module.update(text, trigger)
    assert bool(module.initialized)
    torch.testing.assert_close(module.centroid_vectors, greedy_chain_init(torch.cat([early, trigger]), 6, first))


def test_model_passes_the_init_source_to_its_kmeans():
    assert CGNSModel(tiny_config()).clustering.init_source == "batch"
    assert CGNSModel(tiny_config(cluster_init_source="queue")).clustering.init_source == "queue"


# --------------------------------------------------------------------------------------------------
# 3. decoder upsampling
# --------------------------------------------------------------------------------------------------

def test_upsampling_head_known_answer_align_corners_true():
    """One stage with an identity conv: output = tanh(bilinear x2 of the input), corners aligned."""
    head = _conv_upsampling_head(1, [], 1, 1)
    nn.init.dirac_(head[0].weight)
    nn.init.zeros_(head[0].bias)
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    # align_corners=True samples the 2 input points at output positions 0 and 3: rows 0, 1/3, 2/3, 1
    row = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    expected = torch.tanh(row[None, :] + 2 * torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])[:, None])
    torch.testing.assert_close(head(x)[0, 0], expected)
    old = _conv_upsampling_head(1, [], 1, 1, align_corners=False)
    old.load_state_dict(head.state_dict())
    assert not torch.allclose(old(x), head(x))


def _functional_head(head, x, align_corners):
    for layer in head:
        if isinstance(layer, nn.Upsample):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=align_corners)
        else:
            x = layer(x)
    return x


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_patch16_224"])
def test_model_decoder_equals_an_align_corners_true_computation(arch):
    torch.manual_seed(0)
    model = CGNSModel(tiny_config(arch)).eval()
    decoder = model.decoder
    assert isinstance(decoder, CGNSGridDecoder if arch == "resnet18" else CGNSTokenDecoder)
    b, p, d = 2, model.grid_size ** 2, 32
    tokens, t2i = torch.randn(b, p, d), torch.randn(b, p, d)
    with torch.no_grad():
        out = decoder(tokens, t2i)
        if arch == "resnet18":
            fused = torch.cat([tokens, t2i], dim=-1).transpose(1, 2).reshape(b, 2 * d, decoder.grid, decoder.grid)
        else:
            fused, _ = decoder.fusion(tokens, t2i, t2i, need_weights=False)
            fused = fused + decoder.position_embedding
            fused = decoder.transformer(fused, fused).transpose(1, 2).reshape(b, d, decoder.grid, decoder.grid)
        torch.testing.assert_close(out, _functional_head(decoder.head, fused, True))
        assert not torch.allclose(out, _functional_head(decoder.head, fused, False), atol=1e-4)
    old = CGNSModel(tiny_config(arch, decoder_align_corners=False))
    assert all(not m.align_corners for m in old.decoder.modules() if isinstance(m, nn.Upsample))


# --------------------------------------------------------------------------------------------------
# 4. head initialisation
# --------------------------------------------------------------------------------------------------

def _head_layers(model):
    """(name, module) of every Linear/Conv2d outside the towers and the three projections."""
    skip = ("vision_model.", "text_model.", "global_image_projection", "local_image_projection",
            "local_text_projection")
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.startswith(skip)]


def _uniform_check(values, bound, what):
    """``values`` ~ U(-bound, bound): inside the bounds, mean 0 and variance bound^2 / 3 within 5 sigma."""
    n = values.numel()
    assert values.abs().max() <= bound * (1 + 1e-6), what
    assert abs(float(values.mean())) < 5 * bound / math.sqrt(3 * n), what
    var = float(values.square().mean())
    assert abs(var - bound ** 2 / 3) < 5 * bound ** 2 * math.sqrt(4 / 45 / n), what


def test_heads_start_from_pytorch_default_initialisation():
    torch.manual_seed(0)
    model = CGNSModel(tiny_config(projection_dim=64, predictor_hidden_dim=64, decoder_channels=[64, 32]))
    layers = _head_layers(model)
    names = {n.split(".")[0] for n, _ in layers}
    assert {"attention_pool", "sentence_pool", "cross_attention", "predictor", "decoder"} <= names
    weights = {}
    for name, module in layers:
        fan_in = math.prod(module.weight.shape[1:])
        bound = 1 / math.sqrt(fan_in)
        weights.setdefault(fan_in, []).append(module.weight.detach().flatten())
        # kaiming_uniform(a=sqrt 5) has bound sqrt(6 / ((1 + 5) fan_in)) = 1 / sqrt(fan_in), like the bias
        assert module.weight.abs().max() <= bound * (1 + 1e-6), name
        if module.bias is not None and module.bias.numel() >= 32:
            _uniform_check(module.bias.detach(), bound, name)
    for fan_in, tensors in weights.items():
        _uniform_check(torch.cat(tensors), 1 / math.sqrt(fan_in), f"fan_in {fan_in}")
    # A.3: projection weights N(0, in_dim^-1/2); biases PyTorch default (not zero)
    proj = model.local_text_projection
    assert float(proj.weight.std()) == pytest.approx(proj.in_features ** -0.5, rel=0.1)
    _uniform_check(proj.bias.detach(), 1 / math.sqrt(proj.in_features), "projection bias")


def test_normal_head_init_keeps_the_transformers_convention():
    torch.manual_seed(0)
    model = CGNSModel(tiny_config(head_init="normal"))
    for name, module in _head_layers(model):
        if name.endswith("out_proj"):
            continue                      # nn.MultiheadAttention resets its own biases
        assert torch.count_nonzero(module.bias) == 0, name
    weights = torch.cat([m.weight.detach().flatten() for _, m in _head_layers(model)])
    assert float(weights.std()) == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(model.local_text_projection.bias) == 0


def test_pytorch_head_init_does_not_touch_loaded_weights(tmp_path):
    torch.manual_seed(0)
    model = CGNSModel(tiny_config())
    model.save_pretrained(tmp_path)
    loaded = CGNSModel.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------------
# logit scale: capped value, gradient kept, parameter clamped after the step
# --------------------------------------------------------------------------------------------------

def test_logit_scale_above_the_cap_keeps_its_gradient():
    torch.manual_seed(0)
    model = CGNSModel(tiny_config()).train()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(200.0))
    out = model(**tiny_batch())
    assert float(out.retrieval["logit_scale"]) == pytest.approx(100.0)
    out.global_loss.backward()
    assert model.logit_scale.grad is not None and float(model.logit_scale.grad.abs()) > 0
    # the old exp().clamp() had none there
    clamped = model.logit_scale.exp().clamp(max=100.0)
    assert torch.autograd.grad(clamped, model.logit_scale)[0] == 0
    model.after_optimizer_step()
    assert float(model.logit_scale) == pytest.approx(math.log(100.0))


def _push_then_pull(model, scale_fn, clamp_parameter):
    """Adam on the logit scale alone: 6 steps pushing it up past the cap, then 30 pulling it down."""
    optimizer = torch.optim.Adam([model.logit_scale], lr=0.5)
    for step in range(36):
        optimizer.zero_grad()
        scale = scale_fn()
        (-scale if step < 6 else scale).backward()
        optimizer.step()
        if clamp_parameter:
            model.clamp_logit_scale_()
            assert float(model.logit_scale) <= math.log(100.0) + 1e-6
    return float(model.logit_scale)


def test_logit_scale_comes_back_after_pushing_against_the_cap():
    torch.manual_seed(0)
    model = CGNSModel(tiny_config())
    assert _push_then_pull(model, model.scaled_logit_scale, clamp_parameter=True) < math.log(100.0) - 1.0
    # the former exp().clamp(max) formulation: past the cap the gradient is 0, so it never comes back
    stuck = CGNSModel(tiny_config())
    final = _push_then_pull(stuck, lambda: stuck.logit_scale.exp().clamp(max=100.0), clamp_parameter=False)
    assert final > math.log(100.0)


# --------------------------------------------------------------------------------------------------
# the reference preset
# --------------------------------------------------------------------------------------------------

def test_reference_preset_sets_every_reference_value(tmp_path):
    base = tiny_config()
    config = CGNSConfig.reference_preset(vision_config=base.vision_config, text_config=base.text_config,
                                         projection_dim=32, image_size=64, attention_pool_heads=4,
                                         sentence_pool_heads=4, num_clusters=4, max_text_length=48)
    for name, value in REFERENCE_SETTINGS.items():
        if name != "num_clusters":
            assert getattr(config, name) == value, name
    assert config.hard_negative_mode == "reference" and config.head_init == "pytorch"
    assert math.isinf(config.logit_scale_max)
    config.save_pretrained(tmp_path)                     # inf travels as transformers' tagged float
    reloaded = CGNSConfig.from_pretrained(tmp_path)
    assert math.isinf(reloaded.logit_scale_max) and reloaded.cluster_update_timing == "before_loss"


def test_reference_json_preset_maps_onto_the_reference_settings():
    import os

    from cgns.pretraining.arguments import parse_args

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cgns", "configs",
                        "reference_resnet50.json")
    kwargs = parse_args(["--config", path]).model.config_kwargs()
    for name, value in REFERENCE_SETTINGS.items():
        assert kwargs.get(name) == value, name


@pytest.mark.parametrize("field,value", [("cluster_update_timing", "during"), ("cluster_init_source", "both"),
                                         ("head_init", "xavier"), ("decoder_align_corners", "yes")])
def test_invalid_reference_fields_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


__all__ = []
