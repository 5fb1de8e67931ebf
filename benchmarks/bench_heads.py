"""Batched CGNS heads + losses vs the per-sample loop oracle (the reference's structure).

Everything after the two encoders: projections, attention pool over the grid, token -> sentence
means, sentence attention pool, sigmoid cross-attention both ways, SimSiam predictor, global
InfoNCE, local image loss and sentence-level InfoNCE; forward + backward.

    python benchmarks/bench_heads.py [--batch 64 --tokens 49 --sentences 10 --dim 768 --repeats 5]
"""
import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from modeling_cgns import losses
from modeling_cgns.modeling_cgns import (CGNSAttentionPool2d, CGNSLocalCrossAttention, CGNSPredictor,
                                         CGNSSentenceAttentionPool, segment_mean)


# --------------------------------------------------------------------------------------------------
# the peer: the reference's structure, one report at a time (tests/py holds the same loops as the
# parity tests' oracles; the benchmark keeps its own copy so that it never imports from tests/)
# --------------------------------------------------------------------------------------------------

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




class Heads(torch.nn.Module):
    def __init__(self, vision_width, text_width, dim, grid_tokens):
        super().__init__()
        self.attention_pool = CGNSAttentionPool2d(grid_tokens, vision_width, 8)
        self.global_image_projection = torch.nn.Linear(vision_width, dim)
        self.local_image_projection = torch.nn.Linear(vision_width, dim)
        self.local_text_projection = torch.nn.Linear(text_width, dim)
        self.sentence_pool = CGNSSentenceAttentionPool(dim, 8)
        self.cross_attention = CGNSLocalCrossAttention(dim)
        self.predictor = CGNSPredictor(dim, dim // 2)

    def common(self, grid, hidden):
        image = F.normalize(self.global_image_projection(self.attention_pool(grid)), dim=-1)
        local = F.normalize(self.local_image_projection(grid), dim=-1)
        tokens = F.normalize(self.local_text_projection(hidden), dim=-1)
        return image, local, tokens

    def batched(self, grid, hidden, sentence_index, attention_mask):
        image, local, tokens = self.common(grid, hidden)
        sentences, mask = segment_mean(tokens, sentence_index, attention_mask)
        text = F.normalize(self.sentence_pool(sentences, mask), dim=-1)
        t2i, i2t = self.cross_attention(local, sentences, mask)
        lg = losses.global_contrastive_loss(image, text, torch.tensor(10.0))[0]
        li = losses.local_image_loss(self.predictor(local), t2i, self.predictor(t2i), local, mask.any(dim=1))
        lt = losses.sentence_infonce(sentences[mask], i2t[mask], 1.0)
        return lg + li + lt

    def loop(self, grid, hidden, sentence_index, attention_mask):
        image, local, tokens = self.common(grid, hidden)
        sentence_list = sentences_loop(tokens, sentence_index, attention_mask)
        text = F.normalize(sentence_pool_loop(self.sentence_pool, sentence_list), dim=-1)
        t2i, i2t = cross_attention_loop(self.cross_attention, local, sentence_list)
        lg = losses.global_contrastive_loss(image, text, torch.tensor(10.0))[0]
        li = simsiam_loop(self.predictor, local, t2i)
        lt = losses.sentence_infonce(torch.cat(sentence_list), torch.cat(i2t), 1.0)
        return lg + li + lt


def make_inputs(batch, tokens, sentences, vision_width, text_width, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(batch, tokens, vision_width, generator=g, requires_grad=True)
    hidden = torch.randn(batch, length, text_width, generator=g, requires_grad=True)
    sentence_index = torch.full((batch, length), -1, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        n = max(1, sentences + int(torch.randint(-3, 4, (1,), generator=g)))
        pos = 1
        for s in range(n):
            span = int(torch.randint(4, 16, (1,), generator=g))
            if pos + span >= length - 1:
                break
            sentence_index[b, pos:pos + span] = s
            pos += span
        attention_mask[b, :pos + 1] = 1
    return grid, hidden, sentence_index, attention_mask


def time_it(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=49)
    parser.add_argument("--sentences", type=int, default=10)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--vision_width", type=int, default=2048)
    parser.add_argument("--text_width", type=int, default=768)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    heads = Heads(args.vision_width, args.text_width, args.dim, args.tokens)
    inputs = make_inputs(args.batch, args.tokens, args.sentences, args.vision_width, args.text_width, args.length)

    def run(kind):
        def step():
            heads.zero_grad(set_to_none=True)
            getattr(heads, kind)(*inputs).backward()
        return step

    with torch.no_grad():
        a, b = heads.batched(*inputs), heads.loop(*inputs)
    assert math.isclose(float(a), float(b), rel_tol=1e-4, abs_tol=1e-5), (float(a), float(b))
    batched = time_it(run("batched"), args.repeats)
    loop = time_it(run("loop"), args.repeats)
    n_sent = int((inputs[2].max(dim=1).values + 1).sum())
    print(f"B={args.batch} P={args.tokens} N={n_sent} sentences D={args.dim} L={args.length} "
          f"threads={torch.get_num_threads()}")
    print(f"batched heads+losses fwd+bwd: {batched * 1000:.1f} ms (median of {args.repeats})")
    print(f"per-sample loop oracle:       {loop * 1000:.1f} ms")
    print(f"speed-up: {loop / batched:.1f}x")
    return loop / batched


if __name__ == "__main__":
    main()
