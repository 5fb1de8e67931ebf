"""Linear-probe overheads: ``model.train()`` per Trainer step, and the on-disk feature cache.

1. ``CGNSForImageClassification.train()``: the Trainer calls it before every step. Timed here against the
   full walk it replaces as the peer (``PreTrainedModel.train`` over every module, then ``tower.eval()``,
   what the method did before), both on the same model, ``--calls`` calls each.
2. The feature cache (``--feature_cache_dir``): the same cached probe (``cgns.downstream.cli.main``, 2 seeds)
   run twice on one export; the first run extracts the frozen features and writes them, the second reads
   them. The peer of the second is the first; ``--no_feature_cache`` is the same as the first.

    python benchmarks/bench_probe_overhead.py [--arch resnet10t] [--image_size 128] [--num_images 2000]
"""
import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import BertConfig, TimmWrapperConfig

from cgns.downstream.cli import main as evaluate
from modeling_cgns import CGNSConfig, CGNSForImageClassification, CGNSModel
from modeling_cgns.modeling_cgns import CGNSPreTrainedModel
from modeling_cgns.processing_cgns import default_resize_size


def config(arch: str, image_size: int, **overrides) -> CGNSConfig:
    return CGNSConfig(vision_config=TimmWrapperConfig(architecture=arch),
                      text_config=BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64),
                      projection_dim=32, image_size=image_size, num_clusters=4, decoder_channels=[16, 8],
                      **overrides)


def time_train_calls(arch: str, image_size: int, calls: int) -> dict:
    model = CGNSForImageClassification(config(arch, image_size, num_labels=5,
                                              problem_type="multi_label_classification"))

    def full_walk(mode=True):
        CGNSPreTrainedModel.train(model, mode)
        model.vision_model.eval()

    out = {}
    for name, call in (("full walk (before)", full_walk), ("train() now", model.train)):
        call(True)
        start = time.perf_counter()
        for _ in range(calls):
            call(True)
        out[name] = (time.perf_counter() - start) / calls * 1e3
    out["ratio"] = out["full walk (before)"] / out["train() now"]
    return out


def time_feature_cache(arch: str, image_size: int, num_images: int, workdir: str) -> dict:
    export = os.path.join(workdir, "export")
    torch.manual_seed(0)
    CGNSModel(config(arch, image_size)).save_pretrained(export)
    render = default_resize_size(image_size)
    common = ["--task", "classification", "--dataset", "synthetic_cxr", "--model", export, "--cache_dir",
              os.path.join(workdir, "cache"), "--dataset_options", f"num_images={num_images}",
              f"image_size={render}", "--seeds", "0", "1", "--max_epochs", "20", "--quiet", "true"]
    evaluate(common + ["--output_dir", os.path.join(workdir, "warmup"), "--no_feature_cache"])
    times = {}
    for name in ("first run (extracts, writes)", "second run (reads the cache)"):
        start = time.perf_counter()
        evaluate(common + ["--output_dir", os.path.join(workdir, name.split()[0])])
        times[name] = time.perf_counter() - start
    times["ratio"] = times["first run (extracts, writes)"] / times["second run (reads the cache)"]
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet10t")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    result = {"train_call_ms": time_train_calls(args.arch, args.image_size, args.calls)}
    print(json.dumps(result, indent=2), flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        result["feature_cache_s"] = time_feature_cache(args.arch, args.image_size, args.num_images, workdir)
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
