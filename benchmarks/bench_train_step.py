"""Time and memory of one full CM-CGNS training step against a CLIP-style step on the same towers.

Paper-scale towers at random init (no download): timm ResNet-50 (224 px, 7x7x2048 grid) and a
BERT-base-sized ``BertConfig()`` (12 layers, hidden 768, 256 word pieces). Variants:

* ``cgns_stage1``: CGNSModel forward (global InfoNCE + local SimSiam + cluster-guided text loss, with
  initialised k-means so the hard-negative path runs), backward, Adam step over the stage-1
  parameters, then ``after_optimizer_step`` — everything the pretraining loop does per step (the
  k-means update runs inside the forward, before the loss, as in the reference);
* ``cgns_stage2``: the same plus the CM-MIR masking, decoder and reconstruction loss, Adam over all;
* ``clip``: the global-only peer on the same two towers — the same attention-pooled image vector
  and the report's [CLS] vector, one linear projection each, ``open_clip.loss.ClipLoss``, Adam.

Each variant runs in its own subprocess, so peak memory is per variant: on CPU the growth of the
peak resident set (``resource.getrusage`` max RSS) from just before the model is built to the end
of the timed steps; on CUDA ``torch.cuda.max_memory_allocated`` over the same span. Time is the
median of ``--repeats`` steps after ``--warmup`` steps. CPU runs fp32; CUDA runs bf16 autocast.

    python benchmarks/bench_train_step.py                           # CPU, batch 8
    python benchmarks/bench_train_step.py --device cuda --batch_size 64
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from transformers import AutoModel, BertConfig, BertModel, TimmWrapperConfig

from modeling_cgns import CGNSConfig, CGNSModel
from modeling_cgns.modeling_cgns import CGNSAttentionPool2d
from cgns.pretraining.optimization import stage_parameters

VARIANTS = ("clip", "cgns_stage1", "cgns_stage2")


# --------------------------------------------------------------------------------------------------
# models and inputs
# --------------------------------------------------------------------------------------------------

def paper_scale_config(image_size: int, text_length: int) -> CGNSConfig:
    # cluster_init_threshold 1.0: the centroids initialise as soon as K features are queued, so the
    # timed steps include the hard-negative logits (as in training after the warm-up)
    return CGNSConfig(vision_config=TimmWrapperConfig(architecture="resnet50"), text_config=BertConfig(),
                      projection_dim=768, image_size=image_size, max_text_length=text_length,
                      cluster_init_threshold=1.0)


class ClipBaseline(nn.Module):
    """Global-only dual encoder on the same towers: attention-pooled image, [CLS] text, ClipLoss."""

    def __init__(self, config):
        super().__init__()
        self.vision_model = AutoModel.from_config(config.vision_config)
        self.text_model = BertModel(config.text_config, add_pooling_layer=False)
        width = self.vision_model.timm_model.num_features
        grid = config.image_size // self.vision_model.timm_model.feature_info[-1]["reduction"]
        self.attention_pool = CGNSAttentionPool2d(grid * grid, width, config.attention_pool_heads)
        self.image_projection = nn.Linear(width, config.projection_dim)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.loss_fn = ClipLoss()

    def forward(self, pixel_values, input_ids, attention_mask, **_):
        grid = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image = self.image_projection(self.attention_pool(grid.flatten(2).transpose(1, 2)))
        text = self.text_projection(
            self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0])
        return self.loss_fn(F.normalize(image, dim=-1), F.normalize(text, dim=-1),
                            self.logit_scale.exp().clamp(max=100.0))


def synthetic_batch(batch_size: int, image_size: int, text_length: int, vocab_size: int, device):
    """Random pixels and full-length reports of ~10 sentences each (the MIMIC order of magnitude)."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, vocab_size, (batch_size, text_length), generator=g)
    input_ids[:, 0], input_ids[:, -1] = 101, 102
    sentence_index = torch.full((batch_size, text_length), -1, dtype=torch.long)
    for b in range(batch_size):
        bounds = sorted(torch.randperm(text_length - 3, generator=g)[:9].add(2).tolist())
        starts, ends = [1] + bounds, bounds + [text_length - 1]
        for s, (start, end) in enumerate(zip(starts, ends)):
            sentence_index[b, start:end] = s
    batch = {"pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=g),
             "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "sentence_index": sentence_index}
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# one variant (subprocess)
# --------------------------------------------------------------------------------------------------

def run_variant(variant: str, device_name: str, batch_size: int, warmup: int, repeats: int,
                image_size: int, text_length: int) -> dict:
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    config = paper_scale_config(image_size, text_length)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "clip":
        model = ClipBaseline(config)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        model = CGNSModel(config)
        params = stage_parameters(model, 1 if variant == "cgns_stage1" else 2)
    model.to(device).train()
    optimizer = torch.optim.Adam(params, lr=1e-5, weight_decay=1e-6)
    batch = synthetic_batch(batch_size, image_size, text_length, config.text_config.vocab_size, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    def step():
        with autocast:
            if variant == "clip":
                loss = model(**batch)
            else:
                out = model(**batch, reconstruct=variant == "cgns_stage2")
                loss = out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if variant != "clip":
            model.after_optimizer_step()       # the k-means update itself ran inside forward (before_loss)
        if cuda:
            torch.cuda.synchronize()
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if variant != "clip" and not bool(model.clustering.initialized):
        raise RuntimeError("k-means did not initialise during warm-up; raise --warmup")
    times, losses = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    if cuda:
        peak_bytes = torch.cuda.max_memory_allocated()
        memory_kind = "torch.cuda.max_memory_allocated"
    else:
        # ru_maxrss is in KiB on Linux
        peak_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
        memory_kind = "max RSS growth from model build to end"
    return {"variant": variant, "median_s": statistics.median(times), "times_s": times,
            "peak_memory_mib": peak_bytes / 2 ** 20, "memory_kind": memory_kind,
            "trainable_params_m": sum(p.numel() for p in params) / 1e6, "final_loss": losses[-1]}


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--text_length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--output_json", default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # internal: run one variant
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        result = run_variant(args.worker, args.device, args.batch_size, args.warmup, args.repeats,
                             args.image_size, args.text_length)
        print("RESULT " + json.dumps(result), flush=True)
        return result

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    results = {}
    for variant in args.variants:
        command = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--device", args.device,
                   "--batch_size", str(args.batch_size), "--image_size", str(args.image_size),
                   "--text_length", str(args.text_length), "--warmup", str(args.warmup),
                   "--repeats", str(args.repeats)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            raise RuntimeError(f"variant {variant} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        results[variant] = json.loads(lines[-1][len("RESULT "):])
        r = results[variant]
        print(f"{variant:12s} step {r['median_s']:.3f} s (median of {len(r['times_s'])})  "
              f"peak memory {r['peak_memory_mib']:.0f} MiB  trainable {r['trainable_params_m']:.1f} M",
              flush=True)

    summary = {"device": args.device, "batch_size": args.batch_size, "image_size": args.image_size,
               "text_length": args.text_length, "torch_threads": torch.get_num_threads(),
               "platform": platform.platform(),
               "date": time.strftime("%Y-%m-%d"), "results": results}
    if "clip" in results:
        for variant, target in (("cgns_stage1", 1.15), ("cgns_stage2", 1.3)):
            if variant in results:
                time_ratio = results[variant]["median_s"] / results["clip"]["median_s"]
                memory_ratio = results[variant]["peak_memory_mib"] / results["clip"]["peak_memory_mib"]
                summary[f"{variant}_vs_clip"] = {"time": time_ratio, "memory": memory_ratio, "target": target}
                print(f"{variant}/clip: time {time_ratio:.2f}x, memory {memory_ratio:.2f}x "
                      f"(target <= {target}x: time {'met' if time_ratio <= target else 'MISSED'}, "
                      f"memory {'met' if memory_ratio <= target else 'MISSED'})")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()


__all__ = ["paper_scale_config", "ClipBaseline", "synthetic_batch", "run_variant", "main"]
