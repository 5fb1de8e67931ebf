"""Step time of the demo model with the text tower fine-tuned, frozen, and frozen + cached.

One CGNS training step (forward with the loss, backward, Adam) of the demo configuration's towers
(the packaged demo config: vision tower, image size, projection, clusters; the shipped MiniLM text tower)
on real synthetic_cxr reports, in one process, for three text-tower settings:

* ``finetune``: every text parameter trains (the reference, ``--freeze_text_layers 0``);
* ``frozen``: the whole text tower frozen (``--freeze_text_layers -1``), still run every step;
* ``frozen_cached``: frozen and wrapped in ``FrozenTextFeatureCache`` (``--cache_text_features``),
  measured after one warm-up pass over the batch, i.e. the steady state from the second epoch on.

The median of ``--repeats`` steps after ``--warmup`` steps; ratios against ``finetune`` and
``frozen`` of the same run.

    python benchmarks/bench_text_cache.py                       # demo config, batch 32
    python benchmarks/bench_text_cache.py --vision_model resnet18 --image_size 128
"""
import argparse
import json
import os
import statistics
import time

import torch



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="demo", help="a packaged config by name or a JSON file")
    p.add_argument("--vision_model", default=None, help="default: the config's")
    p.add_argument("--image_size", type=int, default=None, help="default: the config's")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def main(argv=None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    from accelerate import PartialState

    from cgns.configs import read_config
    from cgns.pretraining.arguments import DataArguments, ModelArguments
    from cgns.pretraining.build import build_model, build_processor, freeze_text_layers
    from data_scripts.synthetic_cxr import generate_study
    from modeling_cgns.text_cache import FrozenTextFeatureCache

    PartialState()
    config = read_config(args.config)
    image_size = args.image_size or config["image_size"]
    vision = args.vision_model or config["vision_model"]
    studies = [generate_study(i, image_size=image_size) for i in range(args.batch_size)]
    results = {}
    for mode in ("finetune", "frozen", "frozen_cached"):
        torch.manual_seed(0)
        model_args = ModelArguments(
            vision_model=vision, projection_dim=config.get("projection_dim"), image_size=image_size,
            max_text_length=config.get("max_text_length"), num_clusters=config.get("num_clusters"),
            decoder_channels=config.get("decoder_channels"))
        model = build_model(model_args)
        processor = build_processor(model, model_args, DataArguments())
        if mode != "finetune":
            freeze_text_layers(model, -1)
        if mode == "frozen_cached":
            FrozenTextFeatureCache(model.text_model).attach()
        batch = processor(text=[s["report"] for s in studies], images=[s["image"] for s in studies],
                          return_tensors="pt")
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            out = model(**batch, return_loss=True)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        results[mode] = statistics.median(times)
        print(f"{mode}: {results[mode]:.2f} s/step", flush=True)
    summary = {"vision_model": vision, "image_size": image_size, "batch_size": args.batch_size,
               "tokens": int(batch["input_ids"].shape[1]), "threads": torch.get_num_threads(),
               "seconds_per_step": results,
               "speedup_cached_vs_finetune": results["finetune"] / results["frozen_cached"],
               "speedup_cached_vs_frozen": results["frozen"] / results["frozen_cached"]}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
