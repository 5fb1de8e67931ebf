"""Is a fall in false-negative precision the features' fault or the online k-means'? Re-cluster offline and compare.

For each export: the validation split's sentence features z1 (as ``--task clustering`` computes them) are scored
with the export's own online centroids and with offline spherical k-means centroids at the same K (Lloyd
iterations from random sentences, several restarts), through the same scoring (``cgns.downstream.clustering.score``:
batch-level false-negative precision / recall against the sentence meanings, NMI). If offline k-means does no
better than the online centroids, the features themselves stopped grouping by meaning (docs/clustering.md,
"What stage 2 does to z1").

    python benchmarks/clustering_offline_vs_online.py EXPORT [EXPORT ...] [--restarts 3] [--iterations 50]
        [--dataset_options num_images=2000 image_size=146 lesion_contrast_scale=3]
"""
import argparse
import types

import torch
import torch.nn.functional as F

from cgns.downstream import clustering
from cgns.downstream.arguments import parse_option
from cgns.downstream.embeddings import load_model_and_processor


def spherical_kmeans(z: torch.Tensor, k: int, seed: int, iterations: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centroids = z[torch.randperm(len(z), generator=generator)[:k]].clone()
    for _ in range(iterations):
        assignments = (z @ centroids.T).argmax(1)
        for j in range(k):
            members = assignments == j
            if members.any():
                centroids[j] = F.normalize(z[members].mean(0), dim=0)
            else:   # an empty cluster restarts from a random sentence
                centroids[j] = z[torch.randint(len(z), (1,), generator=generator)][0]
    return centroids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("exports", nargs="+")
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=32, help="reports per forward (the pretraining batch)")
    parser.add_argument("--dataset_options", nargs="*",
                        default=["num_images=2000", "image_size=146", "lesion_contrast_scale=3.0"])
    args = parser.parse_args(argv)
    options = dict(parse_option(item) for item in args.dataset_options)
    print("| export | centroids | FN precision | FN recall | NMI |")
    print("|---|---|---|---|---|")
    for path in args.exports:
        model, processor = load_model_and_processor(path)
        model.eval()
        load_args = types.SimpleNamespace(dataset="synthetic_cxr", data_dir=None, dataset_task="pretraining",
                                          cache_dir=None, dataset_options=options, split="validation",
                                          max_cluster_rows=0)
        _, examples = clustering.load_examples(load_args)
        with torch.no_grad():
            features = clustering.sentence_features(model, processor, examples, args.batch_size)
        cfg = model.config
        runs = [("online", model.clustering.centroids.detach().cpu())]
        runs += [(f"offline, restart {seed}", spherical_kmeans(features["z1"], cfg.num_clusters, seed, args.iterations))
                 for seed in range(args.restarts)]
        for name, centroids in runs:
            scores = clustering.score(features, centroids, cfg.false_negative_gate, cfg.false_negative_threshold)
            batch = scores["batch"]
            print(f"| {path} | {name} | {100 * batch['precision']:.1f} % | {100 * batch['recall']:.1f} % | "
                  f"{scores['nmi']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
