"""Batched heads and losses == the per-sample loop oracle (tests/oracles.py), in value and gradient."""
import pytest
import torch
import torch.nn.functional as F

import oracles
from modeling_cgns import losses
from modeling_cgns.modeling_cgns import (CGNSAttentionPool2d, CGNSLocalCrossAttention, CGNSPredictor,
                                         CGNSSentenceAttentionPool, segment_mean)

D = 16


def ragged_text(seed=0, batch=4, length=24, dim=D):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    sentence_index = torch.full((batch, length), -1, dtype=torch.long)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    counts = [1, 3, 5, 2][:batch]
    for b, n in enumerate(counts):
        pos = 1
        for s in range(n):
            span = int(torch.randint(1, 4, (1,), generator=g))
            sentence_index[b, pos:pos + span] = s
            pos += span
        attention_mask[b, pos + 1:] = 0
    sentence_index[3, -1] = 1            # a stray id under padding: must be ignored
    return tokens, sentence_index, attention_mask


def grads(outputs, inputs):
    return torch.autograd.grad(outputs, inputs, retain_graph=True, allow_unused=True)


def test_segment_mean_matches_loop():
    tokens, sentence_index, attention_mask = ragged_text()
    batched, mask = segment_mean(tokens, sentence_index, attention_mask)
    loop = oracles.sentences_loop(tokens, sentence_index, attention_mask)
    assert mask.sum(dim=1).tolist() == [t.shape[0] for t in loop]
    for b, rows in enumerate(loop):
        torch.testing.assert_close(batched[b][mask[b]], rows)
        assert torch.all(batched[b][~mask[b]] == 0)
    weights = torch.randn_like(batched)
    g_batched = grads((batched * weights).sum(), tokens)[0]
    g_loop = grads(sum((rows * weights[b][mask[b]]).sum() for b, rows in enumerate(loop)), tokens)[0]
    torch.testing.assert_close(g_batched, g_loop)


def test_sentence_attention_pool_matches_loop():
    torch.manual_seed(0)
    tokens, sentence_index, attention_mask = ragged_text(seed=1)
    pool = CGNSSentenceAttentionPool(D, 4).double()
    sentences, mask = segment_mean(tokens, sentence_index, attention_mask)
    batched = pool(sentences, mask)
    loop = oracles.sentence_pool_loop(pool, oracles.sentences_loop(tokens, sentence_index, attention_mask))
    torch.testing.assert_close(batched, loop)
    params = [tokens] + list(pool.parameters())
    for a, b in zip(grads(batched.square().sum(), params), grads(loop.square().sum(), params)):
        torch.testing.assert_close(a, b)


def test_grid_attention_pool_matches_loop():
    torch.manual_seed(0)
    pool = CGNSAttentionPool2d(9, 24, 4).double()
    torch.nn.init.normal_(pool.positional_embedding)
    tokens = torch.randn(3, 9, 24, dtype=torch.float64, requires_grad=True)
    batched = pool(tokens)
    loop = torch.stack([oracles.attention_pool_loop(pool, tokens[b], pool.positional_embedding) for b in range(3)])
    torch.testing.assert_close(batched, loop)
    params = [tokens] + list(pool.parameters())
    for a, b in zip(grads(batched.sum(), params), grads(loop.sum(), params)):
        torch.testing.assert_close(a, b)


def test_cross_attention_and_simsiam_match_loop():
    torch.manual_seed(0)
    tokens, sentence_index, attention_mask = ragged_text(seed=2)
    sentences, mask = segment_mean(tokens, sentence_index, attention_mask)
    image = F.normalize(torch.randn(4, 9, D, dtype=torch.float64), dim=-1).requires_grad_()
    cross = CGNSLocalCrossAttention(D).double()
    predictor = CGNSPredictor(D, D // 2).double()
    t2i, i2t = cross(image, sentences, mask)
    loop_sentences = oracles.sentences_loop(tokens, sentence_index, attention_mask)
    loop_t2i, loop_i2t = oracles.cross_attention_loop(cross, image, loop_sentences)
    for b in range(4):
        torch.testing.assert_close(t2i[b], loop_t2i[b])
        torch.testing.assert_close(i2t[b][mask[b]], loop_i2t[b])
    simsiam = losses.local_image_loss(predictor(image), t2i, predictor(t2i), image, mask.any(dim=1))
    loop_simsiam = oracles.simsiam_loop(predictor, image, loop_t2i)
    torch.testing.assert_close(simsiam, loop_simsiam)
    params = [tokens, image] + list(cross.parameters()) + list(predictor.parameters())
    for a, b in zip(grads(simsiam, params), grads(loop_simsiam, params)):
        torch.testing.assert_close(a, b)
    # the image-to-text side feeds the text loss
    z1, z2 = sentences[mask], i2t[mask]
    batched_text = losses.sentence_infonce(z1, z2, 0.5)
    loop_text = oracles.sentence_infonce_loop(torch.cat(loop_sentences), torch.cat(loop_i2t), 0.5)
    torch.testing.assert_close(batched_text, loop_text)
    for a, b in zip(grads(batched_text, params), grads(loop_text, params)):
        torch.testing.assert_close(a, b)


def test_padded_sentences_do_not_leak_into_text_to_image():
    torch.manual_seed(0)
    cross = CGNSLocalCrossAttention(D)
    image = torch.randn(1, 4, D)
    sentences = torch.randn(1, 3, D)
    mask = torch.tensor([[True, True, False]])
    t2i, _ = cross(image, sentences, mask)
    sentences_changed = sentences.clone()
    sentences_changed[0, 2] = 100.0
    t2i_changed, _ = cross(image, sentences_changed, mask)
    torch.testing.assert_close(t2i, t2i_changed)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_global_loss_matches_loop(scale):
    g = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(5, D, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(5, D, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    loss, logits_i, logits_t, labels = losses.global_contrastive_loss(image, text, torch.tensor(scale))
    loop = oracles.global_loss_loop(image, text, scale)
    torch.testing.assert_close(loss, loop)
    assert labels.tolist() == list(range(5))
    torch.testing.assert_close(logits_t, logits_i.t())
    for a, b in zip(grads(loss, [image, text]), grads(loop, [image, text])):
        torch.testing.assert_close(a, b)


def test_identity_alignment_gives_low_global_loss():
    emb = F.normalize(torch.eye(6, D), dim=-1)
    loss = losses.global_contrastive_loss(emb, emb, torch.tensor(100.0))[0]
    assert float(loss) < 1e-6


def test_retrieval_accuracy_known_answer():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.1], [0.0, 0.1, 0.2]])
    acc = losses.retrieval_accuracy(logits, torch.arange(3), topk=(1, 2))
    assert float(acc[1]) == pytest.approx(2 / 3)
    assert float(acc[2]) == pytest.approx(1.0)
