"""Cost of the cross-modal clustering (docs/method.md B.3 a-e) next to the whole CGNS head-and-loss step.

Everything after the two encoders is timed on random encoder outputs, with the reference sizes: a
ResNet-50 grid (2048 x 7 x 7 = 49 tokens), Bio_ClinicalBERT-sized text (hidden 768, L = 256),
projection_dim 768, 64 reports x 10 sentences (N = 640 sentences), K = 128 clusters.

* head-and-loss: forward + backward of the CGNS heads built from ``modeling_cgns.modeling_cgns``
  (attention pool, projections, segment mean, sentence pool, local cross-attention, predictor)
  and the global + local image + cluster-guided local text losses.
* clustering: ``CrossModalKMeans.update`` (assignment, momentum update, queue, diagnostics) plus what
  the clustering adds to the local text loss (nearest / second-nearest centroids, false-negative
  mask, hard-negative logits, BML), measured as forward + backward of ``cluster_guided_text_loss``
  with centroids minus the same with ``centroids=None`` (plain sentence InfoNCE).

    python benchmarks/bench_clustering.py [--reports 64] [--sentences 10] [--clusters 128] [--repeats 5]

Prints medians (after warm-up) and the ratio clustering / head-and-loss (target <= 10 %).
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


from modeling_cgns import CGNSConfig, losses
from modeling_cgns.clustering import CrossModalKMeans
from modeling_cgns.modeling_cgns import (
    CGNSAttentionPool2d,
    CGNSLocalCrossAttention,
    CGNSPredictor,
    CGNSSentenceAttentionPool,
    segment_mean,
)


class CGNSHeads(nn.Module):
    """The CGNSModel modules after the towers (ResNet grid variant), wired as in ``CGNSModel.forward``."""

    def __init__(self, vision_width: int, grid_tokens: int, text_hidden: int, dim: int, heads: int = 8):
        super().__init__()
        self.attention_pool = CGNSAttentionPool2d(grid_tokens, vision_width, heads)
        self.global_image_projection = nn.Linear(vision_width, dim)
        self.local_image_projection = nn.Linear(vision_width, dim)
        self.local_text_projection = nn.Linear(text_hidden, dim)
        self.sentence_pool = CGNSSentenceAttentionPool(dim, heads)
        self.cross_attention = CGNSLocalCrossAttention(dim)
        self.predictor = CGNSPredictor(dim, dim // 2)
        self.logit_scale = nn.Parameter(torch.tensor(2.3026))

    def forward(self, vision_features, text_hidden, attention_mask, sentence_index, centroids, loss_options):
        tokens = vision_features.flatten(2).transpose(1, 2)
        image_embeds = F.normalize(self.global_image_projection(self.attention_pool(tokens)), dim=-1)
        local_image = F.normalize(self.local_image_projection(tokens), dim=-1)
        text_tokens = F.normalize(self.local_text_projection(text_hidden), dim=-1)
        sentences, sentence_mask = segment_mean(text_tokens, sentence_index, attention_mask)
        text_embeds = F.normalize(self.sentence_pool(sentences, sentence_mask), dim=-1)
        text_to_image, image_to_text = self.cross_attention(local_image, sentences, sentence_mask)
        text_sentences, cross_sentences = sentences[sentence_mask], image_to_text[sentence_mask]
        global_loss = losses.global_contrastive_loss(image_embeds, text_embeds, self.logit_scale.exp())[0]
        local_image_loss = losses.local_image_loss(self.predictor(local_image), text_to_image,
                                                   self.predictor(text_to_image), local_image,
                                                   sentence_mask.any(dim=1))
        local_text_loss, _ = losses.cluster_guided_text_loss(text_sentences, cross_sentences, centroids, **loss_options)
        return global_loss + local_image_loss + local_text_loss, text_sentences, cross_sentences


def encoder_outputs(reports, sentences, length, vision_width, grid, text_hidden, seed):
    g = torch.Generator().manual_seed(seed)
    vision = torch.randn(reports, vision_width, grid, grid, generator=g).requires_grad_(True)
    hidden = torch.randn(reports, length, text_hidden, generator=g).requires_grad_(True)
    span = (length - 2) // sentences                       # [CLS] s0 .. s9 [SEP] padding
    sentence_index = torch.full((reports, length), -1, dtype=torch.long)
    for s in range(sentences):
        sentence_index[:, 1 + s * span: 1 + (s + 1) * span] = s
    attention_mask = torch.zeros(reports, length, dtype=torch.long)
    attention_mask[:, : 2 + sentences * span] = 1
    return vision, hidden, attention_mask, sentence_index


def median_seconds(fn, repeats, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reports", type=int, default=64)
    parser.add_argument("--sentences", type=int, default=10)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=128)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--vision-width", type=int, default=2048)
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--text-hidden", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", choices=("reference", "default"), default="default",
                        help="the clustering settings timed: CGNSConfig.REFERENCE_SETTINGS' or CGNSConfig's defaults")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = (CGNSConfig.reference_preset(num_clusters=args.clusters) if args.settings == "reference"
           else CGNSConfig(num_clusters=args.clusters))
    loss_options = dict(temperature=cfg.local_text_temperature, hard_negative_mode=cfg.hard_negative_mode,
                        hard_negative_weight=cfg.hard_negative_weight, bml_weight=cfg.bml_weight,
                        false_negative_gate=cfg.false_negative_gate,
                        false_negative_threshold=cfg.false_negative_threshold,
                        false_negative_handling=cfg.false_negative_handling, use_hard_negatives=cfg.use_hard_negatives)

    heads = CGNSHeads(args.vision_width, args.grid ** 2, args.text_hidden, args.dim)
    vision, hidden, attention_mask, sentence_index = encoder_outputs(
        args.reports, args.sentences, args.length, args.vision_width, args.grid, args.text_hidden, args.seed)
    kmeans = CrossModalKMeans(args.clusters, args.dim, init_threshold=1.0, features=cfg.cluster_features,
                              update_rule=cfg.cluster_update, assignment=cfg.cluster_assignment,
                              empty_policy=cfg.empty_cluster_policy, dead_patience=cfg.dead_cluster_patience,
                              count_decay=cfg.cluster_count_decay)
    with torch.no_grad():
        _, text_sentences, cross_sentences = heads(vision, hidden, attention_mask, sentence_index, None, loss_options)
    num_sentences = text_sentences.shape[0]
    kmeans.update(text_sentences, cross_sentences)                  # N >= K: initialises from this batch
    assert kmeans.centroids is not None, "the benchmark batch must hold at least K sentences"
    text_leaf = text_sentences.detach().clone().requires_grad_(True)
    cross_leaf = cross_sentences.detach().clone().requires_grad_(True)

    def head_and_loss():
        heads.zero_grad(set_to_none=True)
        vision.grad = hidden.grad = None
        loss, _, _ = heads(vision, hidden, attention_mask, sentence_index, kmeans.centroids, loss_options)
        loss.backward()

    def kmeans_update():
        kmeans.update(text_sentences, cross_sentences)
        kmeans.reassign_dead()

    def text_loss(centroids):
        def run():
            text_leaf.grad = cross_leaf.grad = None
            loss, _ = losses.cluster_guided_text_loss(text_leaf, cross_leaf, centroids, **loss_options)
            loss.backward()
        return run

    head_s, head_runs = median_seconds(head_and_loss, args.repeats, args.warmup)
    inner = max(args.repeats, 20)
    update_s, _ = median_seconds(kmeans_update, inner, args.warmup)
    # guided and plain loss interleaved, so load changes on a shared machine hit both alike
    guided, plain = text_loss(kmeans.centroids), text_loss(None)
    for _ in range(args.warmup):
        guided(), plain()
    pairs = [(median_seconds(guided, 1, 0)[0], median_seconds(plain, 1, 0)[0]) for _ in range(inner)]
    guided_s = statistics.median(g for g, _ in pairs)
    plain_s = statistics.median(p for _, p in pairs)
    loss_extra_s = max(statistics.median(g - p for g, p in pairs), 0.0)
    clustering_s = update_s + loss_extra_s
    upper_s = update_s + guided_s              # bound: the whole text loss counted as clustering

    print(f"settings: {args.settings} (features {cfg.cluster_features}, update {cfg.cluster_update}, assignment "
          f"{cfg.cluster_assignment}, gate {cfg.false_negative_gate}, handling {cfg.false_negative_handling})")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; reports {args.reports} x sentences "
          f"{args.sentences} = N {num_sentences}, K {args.clusters}, D {args.dim}, "
          f"vision {args.vision_width} x {args.grid}x{args.grid}, text {args.text_hidden} x L {args.length}")
    print(f"head-and-loss fwd+bwd       median {head_s * 1e3:9.2f} ms  (runs: "
          + ", ".join(f"{t * 1e3:.0f}" for t in head_runs) + ")")
    print(f"CrossModalKMeans.update     median {update_s * 1e3:9.2f} ms")
    print(f"text loss fwd+bwd, clusters median {guided_s * 1e3:9.2f} ms")
    print(f"text loss fwd+bwd, plain    median {plain_s * 1e3:9.2f} ms  -> clustering adds "
          f"{loss_extra_s * 1e3:.2f} ms (median paired difference)")
    print(f"clustering total                   {clustering_s * 1e3:9.2f} ms")
    print(f"ratio clustering / head-and-loss = {clustering_s / head_s:.2%} (target <= 10%); upper bound "
          f"(update + whole text loss) {upper_s / head_s:.2%}")
    return clustering_s / head_s


if __name__ == "__main__":
    main()
