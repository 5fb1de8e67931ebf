"""What the reference-fidelity settings change (docs/deviations.md), measured on random-init towers.

* ``init``: at step 0 (fresh model, eval mode, no update), for ``head_init="pytorch"`` (reference) and
  ``"normal"`` (N(0, 0.02), zero bias): the mean pairwise cosine between the cross-modal sentence
  features z2 (off-diagonal pairs), and the k-means trigger, the mean cos(z1_i, z2_j) over all pairs.
  Paper-sized towers: timm ResNet-50 at 224 px and a BERT-base-sized ``BertConfig()`` (D 768), random
  inputs; or (``--setting demo``) configs/demo.json's towers on synthetic_cxr image-report pairs.
* ``timing``: the same seeded short run (tiny towers, Adam, same batches, dropout seeded) with
  ``cluster_update_timing="before_loss"`` (reference) and ``"after_step"``; prints the largest
  absolute difference of the total and local-text losses over the steps.

    python benchmarks/bench_reference_fidelity.py init [--batch_size 8] [--setting paper|demo]
    python benchmarks/bench_reference_fidelity.py timing [--steps 50]
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from transformers import BertConfig, TimmWrapperConfig

from modeling_cgns import CGNSConfig, CGNSModel


def synthetic_batch(batch_size: int, image_size: int, text_length: int, vocab_size: int, seed: int = 0) -> dict:
    """Random pixels and full-length reports of 10 sentences of random word pieces each."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000 if vocab_size > 2000 else 5, vocab_size, (batch_size, text_length), generator=g)
    sentence_index = torch.full((batch_size, text_length), -1, dtype=torch.long)
    for b in range(batch_size):
        cuts = sorted(torch.randperm(text_length - 3, generator=g)[:9].add(2).tolist())
        for s, (start, end) in enumerate(zip([1] + cuts, cuts + [text_length - 1])):
            sentence_index[b, start:end] = s
    return {"pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=g),
            "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "sentence_index": sentence_index}


def mean_offdiagonal_cosine(features: torch.Tensor) -> float:
    z = F.normalize(features, dim=-1)
    sims = z @ z.t()
    n = z.shape[0]
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def demo_model_and_batch(head_init: str, batch_size: int):
    """configs/demo.json: random-init resnet18 at 128 px + the pretrained MiniLM, synthetic_cxr reports."""
    from cgns.pretraining.arguments import parse_args
    from cgns.pretraining.build import build_model, build_processor
    from cgns.pretraining.data import get_dataloaders

    config = parse_args(["--config", "demo", "--num_images", "64",
                                        "--head_init", head_init, "--per_device_eval_batch_size", str(batch_size),
                                        "--output_dir", "/tmp/bench_reference_fidelity"])
    model = build_model(config.model)
    processor = build_processor(model, config.model, config.data)
    _, eval_loader = get_dataloaders(config, processor)
    return model, next(iter(eval_loader))


@torch.no_grad()
def step0_statistics(head_init: str, batch_size: int, seed: int, setting: str = "paper") -> dict:
    torch.manual_seed(seed)
    if setting == "demo":
        model, batch = demo_model_and_batch(head_init, batch_size)
    else:
        config = CGNSConfig(vision_config=TimmWrapperConfig(architecture="resnet50"), text_config=BertConfig(),
                            projection_dim=768, image_size=224, max_text_length=128, head_init=head_init)
        model = CGNSModel(config)
        batch = synthetic_batch(batch_size, 224, 128, config.text_config.vocab_size)
    model.eval()
    out = model(**batch, return_loss=False)
    z1, z2 = out.text_sentence_features, out.cross_sentence_features
    trigger = float((F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).t()).mean())
    return {"setting": setting, "head_init": head_init, "seed": seed, "sentences": int(z2.shape[0]),
            "cross_modal_pairwise_cosine": round(mean_offdiagonal_cosine(z2), 4),
            "text_pairwise_cosine": round(mean_offdiagonal_cosine(z1), 4),
            "trigger_mean_text_cross_cosine": round(trigger, 4)}


def short_run(timing: str, steps: int, batch_size: int, seed: int) -> list:
    torch.manual_seed(seed)
    config = CGNSConfig(
        vision_config=TimmWrapperConfig(architecture="resnet18"),
        text_config=BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128, max_position_embeddings=64),
        projection_dim=64, image_size=64, max_text_length=48, attention_pool_heads=4, sentence_pool_heads=4,
        num_clusters=8, cluster_momentum=0.01, decoder_channels=[16, 8], cluster_update_timing=timing)
    model = CGNSModel(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = [synthetic_batch(batch_size, 64, 48, 1000)]
    history = []
    for step in range(steps):
        torch.manual_seed(seed * 1000 + step)               # same dropout masks in both runs
        batch = {k: v.roll(step, dims=0) for k, v in batches[0].items()}
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.after_optimizer_step()
        history.append({"loss": float(out.loss), "local_text_loss": float(out.local_text_loss),
                        "initialized": bool(model.clustering.initialized)})
    return history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["init", "timing"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--setting", choices=["paper", "demo"], default="paper",
                        help="init: paper-sized random towers on random inputs, or configs/demo.json (random "
                             "resnet18 + pretrained MiniLM) on synthetic_cxr")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if args.what == "init":
        for seed in args.seeds:
            for head_init in ("pytorch", "normal"):
                print(json.dumps(step0_statistics(head_init, args.batch_size, seed, args.setting)), flush=True)
        return
    runs = {timing: short_run(timing, args.steps, args.batch_size, args.seeds[0])
            for timing in ("before_loss", "after_step")}
    a, b = runs["before_loss"], runs["after_step"]
    first_init = next((i for i, r in enumerate(a) if r["initialized"]), None)
    print(json.dumps({
        "steps": args.steps, "batch_size": args.batch_size, "centroids_initialised_at_step": first_init,
        "max_abs_loss_difference": max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)),
        "max_abs_local_text_loss_difference": max(abs(x["local_text_loss"] - y["local_text_loss"])
                                                  for x, y in zip(a, b)),
        "mean_loss_before_loss": sum(x["loss"] for x in a) / len(a),
        "mean_loss_after_step": sum(y["loss"] for y in b) / len(b)}))


if __name__ == "__main__":
    main()


__all__ = ["main", "step0_statistics", "short_run", "mean_offdiagonal_cosine"]
