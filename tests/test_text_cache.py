"""FrozenTextFeatureCache: a cached frozen text tower gives the model the same losses and gradients."""
import pytest
import torch

from modeling_cgns import CGNSModel
from modeling_cgns.text_cache import FrozenTextFeatureCache
from tests.tiny import tiny_batch, tiny_config


def _frozen_model(seed: int = 0) -> CGNSModel:
    torch.manual_seed(seed)
    model = CGNSModel(tiny_config(use_clustering=False))
    model.text_model.requires_grad_(False)
    model.train()
    model.text_model.eval()  # the reference computation: the frozen tower without dropout
    model.vision_model.eval()  # batch-norm running statistics are updated by a forward in train mode
    return model


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch, return_loss=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_cached_tower_matches_the_tower_value_and_gradient():
    model = _frozen_model()
    batch = tiny_batch(batch=4, length=20)
    ref_out, ref_grads = _loss_and_grads(model, batch)

    cache = FrozenTextFeatureCache(model.text_model).attach()
    model.train()  # the cache must switch the tower to eval itself (no dropout in what it stores)
    model.vision_model.eval()  # batch norm statistics out of the comparison
    for p in model.text_model.parameters():
        assert not p.requires_grad
    first_out, first_grads = _loss_and_grads(model, batch)   # every row a miss
    second_out, second_grads = _loss_and_grads(model, batch)  # every row a hit
    assert cache.misses == 4 and cache.hits == 4 and cache.stats()["rows"] == 4
    for out, grads in ((first_out, first_grads), (second_out, second_grads)):
        for name in ("global_loss", "local_text_loss", "local_image_loss"):
            torch.testing.assert_close(getattr(out, name), getattr(ref_out, name), rtol=1e-5, atol=1e-6)
        assert set(grads) == set(ref_grads)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padding_and_batch_composition_do_not_change_a_row():
    model = _frozen_model()
    cache = FrozenTextFeatureCache(model.text_model).attach()
    batch = tiny_batch(batch=3, length=20)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        full = model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        # the same row 2 padded further and on its own: served from the cache, same valid tokens
        ids2 = torch.cat([ids[2:], torch.zeros(1, 5, dtype=ids.dtype)], dim=1)
        mask2 = torch.cat([mask[2:], torch.zeros(1, 5, dtype=mask.dtype)], dim=1)
        alone = model.text_model(input_ids=ids2, attention_mask=mask2).last_hidden_state
    assert cache.hits == 1 and cache.misses == 3
    valid = mask[2].bool()
    torch.testing.assert_close(alone[0, :20][valid], full[2][valid])
    assert torch.all(alone[0, 20:] == 0) and torch.all(full[2][~valid] == 0)


def test_a_different_report_is_a_miss_and_hidden_states_bypass_the_cache():
    model = _frozen_model()
    cache = FrozenTextFeatureCache(model.text_model).attach()
    batch = tiny_batch(batch=2, length=12)
    with torch.no_grad():
        model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        changed = batch["input_ids"].clone()
        changed[0, 1] += 1
        model.text_model(input_ids=changed, attention_mask=batch["attention_mask"])
        assert (cache.misses, cache.hits) == (3, 1)
        out = model.text_model(input_ids=changed, attention_mask=batch["attention_mask"], output_hidden_states=True)
    assert out.hidden_states is not None and (cache.misses, cache.hits) == (3, 1)


def test_state_dict_untouched_and_detach_restores_the_tower():
    model = _frozen_model()
    keys = list(model.state_dict())
    cache = FrozenTextFeatureCache(model.text_model).attach()
    assert list(model.state_dict()) == keys
    cache.detach()
    assert "forward" not in vars(model.text_model)


def test_refuses_a_tower_that_trains():
    model = CGNSModel(tiny_config(use_clustering=False))
    with pytest.raises(ValueError, match="fully frozen"):
        FrozenTextFeatureCache(model.text_model)


def test_pretraining_arguments_refuse_cache_without_a_frozen_tower():
    from cgns.pretraining.arguments import PretrainingArguments

    with pytest.raises(ValueError, match="freeze_text_layers -1"):
        PretrainingArguments(cache_text_features=True, freeze_text_layers=2)
