"""Slow per-sample loop versions of the batched CGNS heads and losses: the parity oracles.

These follow docs/method.md literally, one report at a time, as the reference code does. They live in
tests only (docs/deviations.md) and are imported by the parity tests and the head benchmark.
"""
import math

import torch
import torch.nn.functional as F


def sentences_loop(token_features, sentence_index, attention_mask):
    """A.4 per sample: list of (S_b, D) tensors, one row per sentence id that has tokens."""
    out = []
    for b in range(token_features.shape[0]):
        rows = []
        ids = sentence_index[b].masked_fill(attention_mask[b] == 0, -1)
        top = int(ids.max()) if ids.numel() else -1
        for s in range(top + 1):
            where = (ids == s).nonzero().flatten()
            if len(where):
                rows.append(token_features[b, where].mean(dim=0))
        out.append(torch.stack(rows) if rows else token_features.new_zeros(0, token_features.shape[-1]))
    return out


def attention_pool_loop(pool, tokens_b, positional=None):
    """One sample of CLIP-style attention pooling: [mean; tokens] (+ pos) -> MHA -> position 0."""
    seq = torch.cat([tokens_b.mean(dim=0, keepdim=True), tokens_b], dim=0)
    if positional is not None:
        seq = seq + positional
    heads = pool.num_heads
    width = seq.shape[-1]
    dh = width // heads
    q = pool.q_proj(seq[:1]).view(1, heads, dh)
    k = pool.k_proj(seq).view(-1, heads, dh)
    v = pool.v_proj(seq).view(-1, heads, dh)
    outs = []
    for h in range(heads):
        scores = (q[0, h] @ k[:, h].t()) / math.sqrt(dh)
        outs.append(torch.softmax(scores, dim=-1) @ v[:, h])
    return pool.c_proj(torch.cat(outs))


def sentence_pool_loop(pool, sentence_list):
    return torch.stack([attention_pool_loop(pool, t) for t in sentence_list])


def cross_attention_loop(cross, image_tokens, sentence_list):
    """A.7 per sample: returns lists of text_to_image (P, D) and image_to_text (S_b, D)."""
    scale = 1.0 / math.sqrt(image_tokens.shape[-1])
    t2i, i2t = [], []
    for b, sentences in enumerate(sentence_list):
        v = image_tokens[b]
        a_i2t = torch.sigmoid(cross.text_query(sentences) @ cross.image_key(v).t() * scale)
        i2t.append(a_i2t @ cross.image_value(v))
        a_t2i = torch.sigmoid(cross.image_query(v) @ cross.text_key(sentences).t() * scale)
        t2i.append(a_t2i @ cross.text_value(sentences))
    return t2i, i2t


def simsiam_loop(predictor, image_tokens, t2i_list):
    """B.2 per sample, averaged over samples that have sentences."""
    values = []
    for b, t2i in enumerate(t2i_list):
        if t2i.abs().sum() == 0 and t2i.shape[0]:
            continue
        v = image_tokens[b]
        a = F.cosine_similarity(predictor(v), t2i.detach(), dim=-1).mean()
        c = F.cosine_similarity(predictor(t2i), v.detach(), dim=-1).mean()
        values.append(-0.5 * (a + c))
    return torch.stack(values).mean()


def global_loss_loop(image_embeds, text_embeds, scale):
    """B.1 one row at a time."""
    n = image_embeds.shape[0]
    total = 0.0
    for i in range(n):
        li = torch.stack([scale * image_embeds[i] @ text_embeds[j] for j in range(n)])
        lt = torch.stack([scale * text_embeds[i] @ image_embeds[j] for j in range(n)])
        total = total + 0.5 * (-torch.log_softmax(li, 0)[i] - torch.log_softmax(lt, 0)[i])
    return total / n


def sentence_infonce_loop(z1, z2, temperature):
    z1 = F.normalize(z1, dim=-1)
    z2 = F.normalize(z2, dim=-1)
    total = 0.0
    for i in range(z1.shape[0]):
        row = torch.stack([z1[i] @ z2[j] / temperature for j in range(z2.shape[0])])
        total = total - torch.log_softmax(row, 0)[i]
    return total / z1.shape[0]


__all__ = ["sentences_loop", "attention_pool_loop", "sentence_pool_loop", "cross_attention_loop", "simsiam_loop",
           "global_loss_loop", "sentence_infonce_loop"]
