"""Does the export's clustering find real false negatives? Scored against sentence meanings (docs/clustering.md).

    cgns evaluate --task clustering --dataset synthetic_cxr --model path/to/cgns_export --output_dir O

Recipe: every sentence of every row of the split -> the export's text sentence features z1 and cross-modal
features z2 (one forward per batch of ``--cluster_batch_size`` reports, as in training; text-only rows, e.g.
``--dataset iu_xray``, give z1 alone, which is all the loss's cluster decisions use) -> the anchors'
clusters, hard-negative clusters and false-negative mask exactly as the local text loss forms them (the
export's ``false_negative_gate``) -> scored against the sentences' meanings (``modeling_cgns.cluster_metrics``):

* ``batch``: pairs within each batch of reports, the pairs the training loss sees (what ``cluster/fn_*`` logs);
* ``split``: every pair of sentences of the split (a stricter view: the base rate of the whole split);
* NMI of the clusters with the meanings, live clusters and the largest cluster's share, hard-negative quality.

Meanings come from the split's ``sentence_meanings`` column (synthetic_cxr: the generator's own tags); for a
dataset without it, from the rule-based sentence labeller when it is installed (``modeling_cgns.sentence_meanings``).

Writes ``results.json`` / ``results.md``, ``clusters_by_meaning.png`` (clusters x meanings, each row the
cluster's share of every meaning) and ``clusters.json`` / ``clusters.md`` (per cluster: size, majority meaning,
purity and the most central sentences).
"""
import json
import logging
import math
import os
from collections import Counter
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import data_scripts
from modeling_cgns import cluster_metrics as cm
from modeling_cgns.clustering import gated_false_negative_mask, nearest_two_centroids

from .common import write_results
from .embeddings import image_batch, load_model_and_processor, pick_split, report_sentences, require_dataset, \
    text_batch
from .specs import TASK_DEFAULTS, ClusteringArguments

logger = logging.getLogger("downstream.clustering")



#: --split comes with the encoder-only protocols' options (EncoderEvaluationArguments)
ARGUMENTS = ClusteringArguments
DEFAULTS = TASK_DEFAULTS["clustering"]
#: image-report rows; synthetic_cxr's test split with meanings is --dataset_task grounding --split test
DATASET_TASK = "pretraining"
RESULTS_HEADER = ("| model | dataset | split | sentences | K | live | FN precision (batch) | FN recall (batch) | "
                  "base rate (batch) | FN precision (split) | FN recall (split) | NMI | HN other meaning | "
                  "HN same topic |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def check_arguments(args) -> None:
    require_dataset(args, "clustering")
    if args.cluster_batch_size < 2:
        raise ValueError("--cluster_batch_size must be at least 2 (pairs within a batch)")


def row_meanings(row: Dict, sentences: List[str]) -> Optional[List[str]]:
    """The meanings of a row's (non-blank) sentences: its ``sentence_meanings`` column, else the labeller's."""
    if row.get("sentence_meanings") is not None:
        raw = row.get("sentences") or []
        pairs = [(s, m) for s, m in zip(raw, row["sentence_meanings"]) if s and s.strip()]
        if len(raw) != len(row["sentence_meanings"]):
            raise ValueError(f"a row has {len(raw)} sentences but {len(row['sentence_meanings'])} meanings")
        return [m for _, m in pairs]
    labeller = _labeller()
    return labeller(sentences) if labeller is not None else None


def _labeller():
    try:
        from modeling_cgns import sentence_meanings
    except ImportError:
        return None
    return sentence_meanings


@torch.no_grad()
def sentence_features(model, processor, examples: List[Dict], batch_size: int) -> Dict:
    """z1, z2 (normalised), meanings, texts and the batch each sentence was in, for every kept sentence."""
    device = next(model.parameters()).device
    z1, z2, texts, meanings, batch_ids = [], [], [], [], []
    for number, start in enumerate(range(0, len(examples), batch_size)):
        chunk = examples[start:start + batch_size]
        text = text_batch(processor, [e["sentences"] for e in chunk], device)
        if chunk[0].get("image") is None:
            # text-only rows: the anchors z1 are all the loss's cluster decisions need (no z2)
            sentences, mask = model.get_sentence_features(**text)
            z1.append(F.normalize(sentences[mask].float(), dim=-1).cpu())
        else:
            out = model(pixel_values=image_batch(processor, [e["image"] for e in chunk], device), **text,
                        return_loss=False)
            z1.append(F.normalize(out.text_sentence_features.float(), dim=-1).cpu())
            z2.append(F.normalize(out.cross_sentence_features.float(), dim=-1).cpu())
            mask = out.sentence_mask
        mask = mask.cpu()
        for b, example in enumerate(chunk):
            for s in range(mask.shape[1]):
                if bool(mask[b, s]):
                    texts.append(example["sentences"][s])
                    meanings.append(example["meanings"][s])
                    batch_ids.append(number)
    return {"z1": torch.cat(z1), "z2": torch.cat(z2) if z2 else None, "texts": texts, "meanings": meanings,
            "batch": torch.tensor(batch_ids)}


def score(features: Dict, centroids: torch.Tensor, gate: str, threshold: float) -> Dict:
    """Every number of the task from ``sentence_features`` and the export's centroids (pure; tested)."""
    z1, meanings = features["z1"], features["meanings"]
    ids = torch.tensor([cm.meaning_id(m) for m in meanings], dtype=torch.long)
    topics = torch.tensor([cm.meaning_id(cm.meaning_topic(m)) for m in meanings], dtype=torch.long)
    centroids = F.normalize(centroids.float(), dim=-1)
    own, hard = nearest_two_centroids(z1, centroids)
    k = centroids.shape[0]
    batch_pairs, hard_counts = torch.zeros(4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for b in torch.unique(features["batch"]).tolist():
        rows = torch.nonzero(features["batch"] == b).flatten()
        mask = gated_false_negative_mask(z1[rows], own[rows], centroids, gate, threshold)
        batch_pairs += cm.pair_counts(mask, ids[rows])
        hard_counts += cm.hard_negative_counts(own[rows], hard[rows], ids[rows], topics[rows], k)
    split_pairs = torch.zeros(4, dtype=torch.float64)
    if gate == "cluster":
        split_pairs = cm.pair_counts_from_assignments(own, ids)
    else:
        for start in range(0, len(ids), 1024):           # chunks of anchor rows against every sentence
            rows = slice(start, start + 1024)
            split_pairs += cm.pair_counts(gated_false_negative_mask(z1, own, centroids, gate, threshold, rows), ids,
                                          rows)
    counts = torch.bincount(own, minlength=k)
    return {
        "num_sentences": len(meanings), "num_meanings": len(set(meanings)), "num_clusters": k,
        "live_clusters": int((counts > 0).sum()), "largest_cluster_share": float(counts.max() / max(len(own), 1)),
        "batch": cm.pair_scores(batch_pairs), "split": cm.pair_scores(split_pairs),
        "nmi": cm.normalized_mutual_information(own, ids),
        "hard_negatives": cm.hard_negative_scores(hard_counts),
        "assignments": own,
    }


def cluster_table(assignments: torch.Tensor, meanings: List[str], texts: List[str], z1: torch.Tensor,
                  centroids: torch.Tensor, top: int = 5) -> List[Dict]:
    """Per cluster: size, majority meaning and its share (purity), the meanings it holds, central sentences."""
    centroids = F.normalize(centroids.float(), dim=-1)
    sims = z1 @ centroids.t()
    table = []
    for k in range(centroids.shape[0]):
        members = torch.nonzero(assignments == k).flatten()
        held = Counter(meanings[i] for i in members.tolist())
        majority, count = held.most_common(1)[0] if held else (None, 0)
        order = members[torch.argsort(sims[members, k], descending=True)].tolist()
        central, seen = [], set()
        for i in order:
            if texts[i] not in seen:
                seen.add(texts[i])
                central.append(texts[i])
            if len(central) == top:
                break
        table.append({"cluster": k, "size": len(members), "majority_meaning": majority,
                      "purity": count / len(members) if len(members) else None,
                      "meanings": dict(held.most_common()), "central_sentences": central})
    return table


MAX_PICTURE_MEANINGS = 40


def plot_clusters_by_meaning(assignments: torch.Tensor, meanings: List[str], num_clusters: int, path: str) -> None:
    """Heat map: rows = clusters (those with members), columns = meanings (by frequency); each cell the share
    of the cluster's sentences with that meaning. A clustering that follows meaning has one bright cell a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the most frequent meanings get a column each, the rest one "other" column (real text has thousands)
    names = [m for m, _ in Counter(meanings).most_common(MAX_PICTURE_MEANINGS)]
    if len(set(meanings)) > len(names):
        names.append("(other)")
    col = {m: j for j, m in enumerate(names)}
    grid = np.zeros((num_clusters, len(names)))
    for a, m in zip(assignments.tolist(), meanings):
        grid[a, col.get(m, len(names) - 1)] += 1
    used = grid.sum(1) > 0
    grid = grid[used] / grid[used].sum(1, keepdims=True)
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(names) + 2), max(3, min(0.25 * used.sum() + 1.5, 40))))
    ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n if len(n) <= 40 else n[:37] + "..." for n in names], rotation=90, fontsize=7)
    ax.set_yticks(range(int(used.sum())))
    ax.set_yticklabels([str(k) for k in np.nonzero(used)[0]], fontsize=7)
    ax.set_xlabel("sentence meaning (most frequent first)")
    ax.set_ylabel("cluster")
    ax.set_title("share of each cluster's sentences by meaning")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_examples(args) -> Tuple[str, List[Dict]]:
    """(split name, examples with image, sentences and their meanings) of the split evaluated."""
    dataset_dict = data_scripts.load_cgns_dataset(
        args.dataset, data_dir=args.data_dir, task=args.dataset_task, cache_dir=args.cache_dir,
        **args.dataset_options)
    split_name = pick_split(dataset_dict, args.split)
    split = dataset_dict[split_name]
    if not {"sentences", "report"} & set(split.features):
        raise ValueError(f"clustering needs rows with a 'sentences' or 'report' column (and, optionally, an "
                         f"'image'); {args.dataset}/{args.dataset_task} split {split_name!r} has "
                         f"{sorted(split.features)}")
    has_image = "image" in split.features
    limit = len(split) if not args.max_cluster_rows else min(len(split), args.max_cluster_rows)
    examples, without = [], 0
    for index in range(limit):
        row = split[index]
        sentences = report_sentences(row)
        meanings = row_meanings(row, sentences) if sentences else None
        if meanings is None and sentences:
            raise ValueError(f"{args.dataset}/{args.dataset_task} has no sentence_meanings column and no sentence "
                             f"labeller is available to derive them")
        if not sentences:
            without += 1
            continue
        examples.append({"image": row["image"] if has_image else None, "sentences": sentences,
                         "meanings": meanings})
    if without:
        logger.warning("%d of %d rows have no report sentence and are left out", without, limit)
    if not examples:
        raise ValueError("no row with a report sentence to cluster")
    return split_name, examples


def run(args) -> Dict:
    model, processor = load_model_and_processor(args.model)
    if model.clustering.centroids is None:
        raise ValueError(f"{args.model}: the export's k-means was never initialised (an untrained export, or "
                         f"use_clustering=false): there are no clusters to score")
    split_name, examples = load_examples(args)
    features = sentence_features(model, processor, examples, args.cluster_batch_size)
    cfg = model.config
    centroids = model.clustering.centroids.detach().cpu()
    scores = score(features, centroids, cfg.false_negative_gate, cfg.false_negative_threshold)
    assignments = scores.pop("assignments")
    os.makedirs(args.output_dir, exist_ok=True)
    table = cluster_table(assignments, features["meanings"], features["texts"], features["z1"], centroids)
    with open(os.path.join(args.output_dir, "clusters.json"), "w") as f:
        json.dump(table, f, indent=1)
    lines = ["| cluster | size | majority meaning | purity | most central sentences |", "|---|---|---|---|---|"]
    for entry in table:
        purity = "" if entry["purity"] is None else f"{entry['purity']:.2f}"
        lines.append(f"| {entry['cluster']} | {entry['size']} | {entry['majority_meaning'] or ''} | {purity} | "
                     + " / ".join(entry["central_sentences"]) + " |")
    with open(os.path.join(args.output_dir, "clusters.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_clusters_by_meaning(assignments, features["meanings"], centroids.shape[0],
                             os.path.join(args.output_dir, "clusters_by_meaning.png"))
    results = {"task": "clustering", "dataset": args.dataset, "dataset_task": args.dataset_task,
               "split": split_name, "model": args.model, "cluster_batch_size": args.cluster_batch_size,
               "settings": {name: getattr(cfg, name) for name in (
                   "num_clusters", "cluster_features", "cluster_update", "cluster_assignment", "empty_cluster_policy",
                   "false_negative_gate", "false_negative_threshold", "false_negative_handling")},
               "test": scores, "clusters_json": "clusters.json", "picture": "clusters_by_meaning.png"}
    b, s = scores["batch"], scores["split"]
    row = (f"| {args.model} | {args.dataset}/{args.dataset_task} | {split_name} | {scores['num_sentences']} | "
           f"{scores['num_clusters']} | {scores['live_clusters']} | {_pct(b['precision'])} | {_pct(b['recall'])} | "
           f"{_pct(b['base_rate'])} | {_pct(s['precision'])} | {_pct(s['recall'])} | {scores['nmi']:.2f} | "
           f"{_pct(scores['hard_negatives']['other_meaning'])} | {_pct(scores['hard_negatives']['same_topic'])} |")
    write_results(results, args.output_dir, RESULTS_HEADER, row)
    logger.info("clustering of %d sentences: false-negative precision %.2f / recall %.2f per batch (base rate %.3f), "
                "NMI %.2f, %d of %d clusters live", scores["num_sentences"], b["precision"], b["recall"],
                b["base_rate"], scores["nmi"], scores["live_clusters"], scores["num_clusters"])
    return results


def _pct(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


__all__ = ["run", "ARGUMENTS", "DEFAULTS", "DATASET_TASK", "RESULTS_HEADER", "ClusteringArguments", "check_arguments",
           "row_meanings", "sentence_features", "score", "cluster_table", "plot_clusters_by_meaning"]
