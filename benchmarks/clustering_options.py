"""Which clustering options find real false negatives: the measurement behind the defaults (docs/clustering.md).

Two phases:

1. ``--record``: one pretraining run (default: the ``make demo`` configuration, any pretraining argument
   can follow ``--``) that stores, for every training micro-batch, the text sentence features z1, the
   cross-modal ones z2 and the sentences' meaning ids, and at the end the same for the validation split
   under the final model (``stream.safetensors`` in ``--study_dir``).
2. ``--replay`` (default when a stream exists): runs the online k-means of every option set in the grid over
   the recorded stream, in training order, exactly as the model would (``CrossModalKMeans.update``, dead-
   cluster handling every step, the loss's false-negative gate), and scores each against the meanings:
   false-negative precision / recall per batch during training and on the validation split with the final
   centroids, the least number of live clusters at any step after initialisation, and the hard negatives.

The replay holds the features fixed: an option's own effect on the features through the loss is not in it,
which is why the chosen settings are then confirmed by real runs (``make ablation``, README).

    python benchmarks/clustering_options.py --record [--study_dir outputs/clustering_study] [-- --max_steps 150]
    python benchmarks/clustering_options.py [--study_dir outputs/clustering_study] [--grid small|focus|decay|full]
"""
import argparse
import itertools
import json
import math
import os
import time
from typing import Dict, List

import torch
from safetensors.torch import load_file, save_file

from modeling_cgns import cluster_metrics
from modeling_cgns.clustering import CrossModalKMeans, gated_false_negative_mask, nearest_two_centroids

STREAM = "stream.safetensors"


# ----------------------------------------------------------------------------------------------------- record
def record(study_dir: str, extra: List[str]) -> str:
    from cgns.pretraining import cli
    from cgns.pretraining.callbacks import Callback
    from modeling_cgns.collator import flat_sentence_meanings, pop_sentence_meanings

    tensors: Dict[str, torch.Tensor] = {}

    class Recorder(Callback):
        def __init__(self):
            self.n = 0

        def on_step_end(self, run, micro_batches):
            for mb in micro_batches:
                if "meanings" not in mb:
                    raise SystemExit("the dataset carries no sentence meanings: record on synthetic_cxr")
                tensors[f"train.{self.n}.z1"] = mb["text_sentence_features"].float().cpu()
                tensors[f"train.{self.n}.z2"] = mb["cross_sentence_features"].float().cpu()
                tensors[f"train.{self.n}.meaning"] = mb["meanings"]["sentence_meaning_ids"].cpu()
                tensors[f"train.{self.n}.topic"] = mb["meanings"]["sentence_topic_ids"].cpu()
                self.n += 1

        @torch.no_grad()
        def on_train_end(self, run):
            model = run.model
            model.eval()
            for i, batch in enumerate(run.eval_dataloader):
                meanings = pop_sentence_meanings(batch)
                out = model(**batch, return_loss=False)
                flat = flat_sentence_meanings(meanings, out.sentence_mask)
                tensors[f"val.{i}.z1"] = out.text_sentence_features.float().cpu()
                tensors[f"val.{i}.z2"] = out.cross_sentence_features.float().cpu()
                tensors[f"val.{i}.meaning"] = flat["sentence_meaning_ids"].cpu()
                tensors[f"val.{i}.topic"] = flat["sentence_topic_ids"].cpu()
            model.train()

    original = cli.default_callbacks
    cli.default_callbacks = lambda args: original(args) + [Recorder()]
    os.makedirs(study_dir, exist_ok=True)
    argv = ["--config", "demo", "--output_dir", os.path.join(study_dir, "run"),
            "--overwrite_output_dir", "true", "--report_to", "none"] + extra
    cli.main(argv)
    path = os.path.join(study_dir, STREAM)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    print(f"recorded {sum(1 for k in tensors if k.endswith('.z1'))} batches -> {path}")
    return path


# ----------------------------------------------------------------------------------------------------- replay
def load_stream(path: str):
    raw = load_file(path)

    def batches(prefix):
        n = len({k.split(".")[1] for k in raw if k.startswith(prefix + ".")})
        return [{f: raw[f"{prefix}.{i}.{f}"] for f in ("z1", "z2", "meaning", "topic")} for i in range(n)]

    return batches("train"), batches("val")


def replay(train, val, num_clusters: int, features: str, update: str, assignment: str, empty: str, gate: str,
           threshold: float, patience: int, momentum: float = 0.001, decay: float = 1.0, warmup: int = 0,
           seed: int = 0) -> Dict[str, float]:
    torch.manual_seed(seed)
    km = CrossModalKMeans(num_clusters, train[0]["z1"].shape[1], momentum=momentum, dead_patience=patience,
                          features=features, update_rule=update, assignment=assignment, empty_policy=empty,
                          warmup_updates=warmup, count_decay=decay, live_window=10)
    km.train()
    pairs = torch.zeros(4, dtype=torch.float64)
    hard = torch.zeros(3, dtype=torch.float64)
    min_live, started = num_clusters, None
    largest = 0.0
    for step, b in enumerate(train):
        km.update(b["z1"], b["z2"])
        if patience:
            km.reassign_dead()
        c = km.centroids
        if c is None:
            continue
        started = step if started is None else started
        stats = km.diagnostics(torch.nn.functional.normalize(b["z1"], dim=-1),
                               torch.nn.functional.normalize(b["z2"], dim=-1))
        min_live = min(min_live, int(stats.get("live_clusters", num_clusters)))
        largest = max(largest, stats.get("largest_cluster_share", 0.0))
        own, hn = nearest_two_centroids(b["z1"], c)
        mask = gated_false_negative_mask(b["z1"], own, c, gate, threshold)
        pairs += cluster_metrics.pair_counts(mask, b["meaning"])
        hard += cluster_metrics.hard_negative_counts(own, hn, b["meaning"], b["topic"], num_clusters)
    out = {"init_step": started if started is not None else -1, "min_live": min_live,
           "max_largest_share": largest}
    tr = cluster_metrics.pair_scores(pairs)
    out.update({"train_precision": tr["precision"], "train_recall": tr["recall"], "base_rate": tr["base_rate"]})
    if km.centroids is not None:
        vpairs = torch.zeros(4, dtype=torch.float64)
        assign, means = [], []
        for b in val:
            own, _ = nearest_two_centroids(b["z1"], km.centroids)
            vpairs += cluster_metrics.pair_counts(gated_false_negative_mask(b["z1"], own, km.centroids, gate,
                                                                            threshold), b["meaning"])
            assign.append(own)
            means.append(b["meaning"])
        va = cluster_metrics.pair_scores(vpairs)
        out.update({"val_precision": va["precision"], "val_recall": va["recall"], "val_base_rate": va["base_rate"],
                    "val_nmi": cluster_metrics.normalized_mutual_information(torch.cat(assign), torch.cat(means))})
    hs = cluster_metrics.hard_negative_scores(hard)
    out.update({"hn_other_meaning": hs["other_meaning"], "hn_same_topic": hs["same_topic"]})
    return out


GRIDS = {
    "small": dict(num_clusters=[16, 64], features=["cross", "text"], update=["momentum", "spherical"],
                  assignment=["argmax"], empty=["reseed", "split"], gate=[("cluster", 0.0), ("similarity", 0.9)],
                  patience=[0, 5]),
    "focus": dict(num_clusters=[16, 32, 64], features=["text"], update=["spherical"], assignment=["argmax", "sinkhorn"],
                  empty=["reseed", "split"], gate=[("cluster", 0.0), ("centroid", 0.0), ("similarity", 0.7),
                                                   ("similarity", 0.8), ("similarity", 0.85)], patience=[5]),
    # the count decay and a late start, around the best settings of "focus"
    "decay": dict(num_clusters=[32, 48, 64], features=["text"], update=["spherical"], assignment=["argmax"],
                  empty=["reseed", "split"], gate=[("cluster", 0.0), ("similarity", 0.8), ("similarity", 0.85)],
                  patience=[5], decay=[1.0, 0.99, 0.9], warmup=[0, 50]),
    "full": dict(num_clusters=[16, 32, 64, 128], features=["cross", "text", "both"], update=["momentum", "spherical"],
                 assignment=["argmax", "sinkhorn"], empty=["reseed", "split"],
                 gate=[("cluster", 0.0), ("centroid", 0.0), ("similarity", 0.8), ("similarity", 0.9),
                       ("similarity", 0.95)],
                 patience=[0, 2, 5]),
}


def run_grid(study_dir: str, grid: str, out_json: str) -> List[dict]:
    train, val = load_stream(os.path.join(study_dir, STREAM))
    g = GRIDS[grid]
    rows = []
    combos = list(itertools.product(g["num_clusters"], g["features"], g["update"], g["assignment"], g["empty"],
                                    g["gate"], g["patience"], g.get("decay", [1.0]), g.get("warmup", [0])))
    # the empty-cluster policy only matters with a patience
    combos = [c for c in combos if not (c[6] == 0 and c[4] != "reseed")]
    started = time.perf_counter()
    for k, feat, upd, asg, empty, (gate, thr), pat, decay, warmup in combos:
        res = replay(train, val, k, feat, upd, asg, empty, gate, thr, pat, decay=decay, warmup=warmup)
        rows.append({"num_clusters": k, "features": feat,
                     "update": upd if decay == 1.0 else f"{upd[:3]}{decay:g}",
                     "assignment": asg if not warmup else f"{asg[:3]}+w{warmup}", "empty": empty,
                     "gate": gate, "threshold": thr, "patience": pat, **res})
    print(f"{len(rows)} option sets replayed over {len(train)} batches in {time.perf_counter() - started:.0f} s")
    with open(out_json, "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def fmt(v):
    return "  nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:5.2f}"


def print_table(rows: List[dict], top: int = 25) -> None:
    def key(r):
        # the target: validation precision >= 0.6 at recall >= 0.4, with >= 90 % of the clusters live
        ok = (r.get("val_precision", 0) or 0) >= 0.6 and (r.get("val_recall", 0) or 0) >= 0.4 \
            and r["min_live"] >= 0.9 * r["num_clusters"]
        p, rc = r.get("val_precision") or 0, r.get("val_recall") or 0
        f1 = 2 * p * rc / (p + rc) if p + rc > 0 and not (math.isnan(p) or math.isnan(rc)) else 0
        return (ok, f1)

    rows = sorted(rows, key=key, reverse=True)
    print(f"{'K':>4} {'features':>8} {'update':>9} {'assign':>8} {'empty':>6} {'gate':>10} {'thr':>5} {'pat':>3} | "
          f"{'trP':>5} {'trR':>5} | {'valP':>5} {'valR':>5} {'NMI':>5} {'base':>5} | live hnOther hnTopic")
    for r in rows[:top]:
        print(f"{r['num_clusters']:>4} {r['features']:>8} {r['update']:>9} {r['assignment']:>8} {r['empty']:>6} "
              f"{r['gate']:>10} {r['threshold']:5.2f} {r['patience']:>3} | {fmt(r['train_precision'])} "
              f"{fmt(r['train_recall'])} | {fmt(r.get('val_precision'))} {fmt(r.get('val_recall'))} "
              f"{fmt(r.get('val_nmi'))} {fmt(r.get('val_base_rate'))} | {r['min_live']:>3}/{r['num_clusters']:<3} "
              f"{fmt(r['hn_other_meaning'])} {fmt(r['hn_same_topic'])}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study_dir", default="outputs/clustering_study")
    parser.add_argument("--record", action="store_true", help="record a stream first (a pretraining run)")
    parser.add_argument("--grid", default="full", choices=sorted(GRIDS))
    parser.add_argument("--top", type=int, default=25)
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.record:
        record(args.study_dir, extra)
    rows = run_grid(args.study_dir, args.grid, os.path.join(args.study_dir, f"replay_{args.grid}.json"))
    print_table(rows, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
