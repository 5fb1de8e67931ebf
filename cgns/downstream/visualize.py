"""Pictures of what a CGNS export attends to and how it clusters sentences (docs/evaluation.md).

    cgns evaluate --task visualize --model path/to/cgns_export --output_dir O \
        --images a.png b.png --reports a.txt b.txt
    cgns evaluate --task visualize --model path/to/cgns_export --output_dir O \
        --dataset synthetic_cxr --dataset_task pretraining --split validation --num_examples 4

* ``attention/<example>_sentence<k>.png``: the evaluation crop of the image (gray) with sentence k's
  attention over the image grid (``CGNSModel.get_sentence_attention``) upsampled and overlaid as a
  heat map; one RGB PNG of ``image_size x image_size`` pixels per sentence, the sentence in the
  PNG's ``sentence`` text field and in ``attention/index.json``.
* for a trained model (its k-means initialised), over the sentences of the examples (with a dataset:
  up to ``--max_cluster_reports`` rows of the split): ``clusters.json`` / ``clusters.md`` (per
  cluster: size and the most central sentences, by cosine of the cross-modal sentence feature T~ -
  the k-means input - to the centroid) and ``clusters_pca.png``, a 2-D PCA projection of those
  features coloured by cluster, centroids marked.
"""
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


from .common import write_results
from .embeddings import (EncoderEvaluationArguments, image_batch, load_model_and_processor, pick_split, report_sentences,
                         text_batch)
from .specs import TASK_DEFAULTS

logger = logging.getLogger("downstream.visualize")

#: The options of the encoder-only protocols (`cgns evaluate` adds them to the command line).
ARGUMENTS = EncoderEvaluationArguments
DEFAULTS = TASK_DEFAULTS["visualize"]
DATASET_TASK = "pretraining"
#: --images / --reports replace --dataset.
DATASET_OPTIONAL = True
RESULTS_HEADER = "| model | attention pictures | clusters |\n|---|---|---|\n"

OVERLAY_ALPHA = 0.45
PCA_FIGURE_INCHES, PCA_DPI = 8, 100


# --------------------------------------------------------------------------------------------------
# pictures (pure functions)
# --------------------------------------------------------------------------------------------------

def overlay_attention(pixel_values: torch.Tensor, attention: np.ndarray, image_mean: float = 0.5,
                      image_std: float = 0.5, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """(3, S, S) normalised crop + (g, g) attention -> (S, S, 3) uint8 RGB: gray image under a jet heat map.

    The map is upsampled bilinearly to S x S and scaled to [0, 1] by its own min and max (a constant
    map shows as uniform colour).
    """
    import matplotlib

    size = pixel_values.shape[-1]
    gray = (pixel_values[0].float() * image_std + image_mean).clamp(0, 1).cpu().numpy()
    heat = torch.as_tensor(np.asarray(attention, dtype=np.float32))[None, None]
    heat = F.interpolate(heat, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    colour = matplotlib.colormaps["jet"](heat)[..., :3]
    blended = (1 - alpha) * gray[..., None] + alpha * colour
    return np.round(np.clip(blended, 0, 1) * 255).astype(np.uint8)


def save_png(rgb: np.ndarray, path: str, text: Optional[Dict[str, str]] = None) -> None:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    Image.fromarray(rgb, mode="RGB").save(path, format="PNG", pnginfo=info)


def pca_2d(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D) -> (projection (N, 2), mean (D,), components (2, D)) by SVD of the centred rows."""
    features = np.asarray(features, dtype=np.float64)
    mean = features.mean(axis=0)
    _, _, vt = np.linalg.svd(features - mean, full_matrices=False)
    components = np.zeros((2, features.shape[1]))
    components[: min(2, len(vt))] = vt[:2]
    return (features - mean) @ components.T, mean, components


def plot_clusters(projection: np.ndarray, assignments: np.ndarray, centroids_2d: np.ndarray, path: str,
                  title: str) -> None:
    """Scatter of the 2-D projection coloured by cluster, centroids as crosses: a PNG of 800 x 800 px."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(PCA_FIGURE_INCHES, PCA_FIGURE_INCHES), dpi=PCA_DPI)
    cmap = matplotlib.colormaps["tab20"]
    for cluster in range(len(centroids_2d)):
        members = assignments == cluster
        colour = cmap(cluster % 20)
        if members.any():
            ax.scatter(projection[members, 0], projection[members, 1], s=12, color=colour,
                       label=f"cluster {cluster} ({int(members.sum())})")
        ax.scatter(centroids_2d[cluster, 0], centroids_2d[cluster, 1], marker="x", s=90, color=colour,
                   linewidths=2.5)
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=PCA_DPI)             # no tight bbox: the size stays exactly 800 x 800
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# examples
# --------------------------------------------------------------------------------------------------

def examples_from_files(images: Sequence[str], reports: Sequence[str]) -> List[Dict]:
    """``--images`` / ``--reports`` (report text files, or the report text itself) -> example dicts."""
    from PIL import Image

    if len(images) != len(reports):
        raise ValueError(f"--images and --reports must pair up: got {len(images)} images and {len(reports)} reports")
    examples = []
    for image_path, report in zip(images, reports):
        text = open(report).read() if os.path.isfile(report) else report
        sentences = report_sentences({"report": text})
        if not sentences:
            raise ValueError(f"report {report!r} has no sentence of at least two words")
        with Image.open(image_path) as im:
            image = im.convert("L")
        examples.append({"name": os.path.splitext(os.path.basename(image_path))[0], "image": image,
                         "sentences": sentences})
    return examples


def examples_from_split(split, limit: int, name_column: Optional[str]) -> List[Dict]:
    examples = []
    for index in range(min(limit, len(split))):
        row = split[index]
        sentences = report_sentences(row)
        if not sentences:
            continue
        name = str(row[name_column]) if name_column else f"example{index:04d}"
        examples.append({"name": name.replace(os.sep, "_"), "image": row["image"], "sentences": sentences})
    return examples


@torch.no_grad()
def write_attention_pictures(model, processor, examples: List[Dict], output_dir: str, direction: str,
                             batch_size: int = 16) -> List[Dict]:
    """One overlay PNG per (example, sentence); returns the index rows {file, example, sentence}."""
    device = next(model.parameters()).device
    folder = os.path.join(output_dir, "attention")
    os.makedirs(folder, exist_ok=True)
    ip = processor.image_processor
    index = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        pixel_values = image_batch(processor, [e["image"] for e in chunk], device)
        attention, sentence_mask = model.get_sentence_attention(
            pixel_values, **text_batch(processor, [e["sentences"] for e in chunk], device), direction=direction)
        for b, example in enumerate(chunk):
            for s, sentence in enumerate(example["sentences"]):
                if s >= sentence_mask.shape[1] or not bool(sentence_mask[b, s]):
                    continue                          # cut by the tokenizer's max_length
                grid_map = attention[b, s].float().cpu().numpy().reshape(model.grid_size, model.grid_size)
                rgb = overlay_attention(pixel_values[b], grid_map, ip.image_mean, ip.image_std)
                file_name = f"{example['name']}_sentence{s}.png"
                save_png(rgb, os.path.join(folder, file_name), {"sentence": sentence, "direction": direction})
                index.append({"file": os.path.join("attention", file_name), "example": example["name"],
                              "sentence": sentence})
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return index


@torch.no_grad()
def cross_sentence_features(model, processor, examples: List[Dict], batch_size: int = 16
                            ) -> Tuple[torch.Tensor, List[str]]:
    """T~ (the k-means input) of every sentence of ``examples``: ((N, D) normalised, N sentence texts)."""
    device = next(model.parameters()).device
    features, texts = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        out = model(pixel_values=image_batch(processor, [e["image"] for e in chunk], device),
                    **text_batch(processor, [e["sentences"] for e in chunk], device), return_loss=False)
        features.append(F.normalize(out.cross_sentence_features.float(), dim=-1).cpu())
        mask = out.sentence_mask.cpu()
        texts += [e["sentences"][s] for b, e in enumerate(chunk) for s in range(mask.shape[1]) if bool(mask[b, s])]
    return torch.cat(features), texts


def cluster_report(features: torch.Tensor, texts: List[str], centroids: torch.Tensor, top: int = 5) -> List[Dict]:
    """Per cluster: size and the ``top`` most central distinct sentences (highest cosine to the centroid)."""
    from modeling_cgns.clustering import assign_to_centroids

    centroids = F.normalize(centroids.float(), dim=-1)
    assignments = assign_to_centroids(features, centroids)
    similarity = features @ centroids.t()
    report = []
    for cluster in range(len(centroids)):
        members = torch.nonzero(assignments == cluster).flatten()
        order = members[torch.argsort(similarity[members, cluster], descending=True)]
        central, seen = [], set()
        for i in order.tolist():
            if texts[i] not in seen:
                seen.add(texts[i])
                central.append({"sentence": texts[i], "cosine": float(similarity[i, cluster])})
            if len(central) == top:
                break
        report.append({"cluster": cluster, "size": int(len(members)), "central_sentences": central})
    return report


def write_cluster_outputs(model, features: torch.Tensor, texts: List[str], output_dir: str, top: int) -> Dict:
    from modeling_cgns.clustering import assign_to_centroids

    centroids = F.normalize(model.clustering.centroids.detach().float().cpu(), dim=-1)
    report = cluster_report(features, texts, centroids, top)
    with open(os.path.join(output_dir, "clusters.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = ["| cluster | size | most central sentences (cosine to centroid) |", "|---|---|---|"]
    for entry in report:
        central = "<br>".join(f"{c['sentence']} ({c['cosine']:.2f})" for c in entry["central_sentences"])
        lines.append(f"| {entry['cluster']} | {entry['size']} | {central} |")
    with open(os.path.join(output_dir, "clusters.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    projection, mean, components = pca_2d(features.numpy())
    centroids_2d = (centroids.numpy() - mean) @ components.T
    plot_clusters(projection, assign_to_centroids(features, centroids).numpy(), centroids_2d,
                  os.path.join(output_dir, "clusters_pca.png"),
                  f"{len(texts)} sentence features (T~), {len(centroids)} clusters: PCA")
    return {"clusters_json": "clusters.json", "clusters_md": "clusters.md", "plot": "clusters_pca.png",
            "num_sentences": len(texts), "sizes": [e["size"] for e in report]}


def check_arguments(args) -> None:
    images, reports = args.images, args.reports
    if images or reports:
        if len(images or []) != len(reports or []):
            raise ValueError(f"--images and --reports must pair up: got {len(images or [])} images and "
                             f"{len(reports or [])} reports")
        missing = [p for p in images if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"--images: no such file(s) {missing}")
    elif not args.dataset:
        raise ValueError("--task visualize needs --images and --reports, or --dataset")


def run(args) -> Dict:
    """Examples -> attention overlays; for a trained model also the cluster report and PCA plot."""
    model, processor = load_model_and_processor(args.model)
    direction = args.attention_direction
    if args.images:
        examples = examples_from_files(args.images, args.reports or [])
        cluster_examples = examples
    elif args.dataset:
        import data_scripts

        dataset_dict = data_scripts.load_cgns_dataset(
            args.dataset, data_dir=args.data_dir, task=args.dataset_task, cache_dir=args.cache_dir,
            **args.dataset_options)
        split = dataset_dict[pick_split(dataset_dict, args.split)]
        if "image" not in split.features or not {"sentences", "report"} & set(split.features):
            raise ValueError(f"visualize needs rows with an 'image' and a 'sentences' or 'report' column; the split "
                             f"has {sorted(split.features)}")
        name_column = next((c for c in ("study_id", "image_id") if c in split.features), None)
        examples = examples_from_split(split, args.num_examples, name_column)
        cluster_examples = examples_from_split(split, args.max_cluster_reports, name_column)
    else:
        raise ValueError("visualize needs --images and --reports, or --dataset (with --dataset_task and --split)")
    if not examples:
        raise ValueError("no example with an image and a report sentence to draw")
    os.makedirs(args.output_dir, exist_ok=True)
    index = write_attention_pictures(model, processor, examples, args.output_dir, direction, args.batch_size)
    results = {"task": "visualize", "model": args.model, "attention_direction": direction,
               "attention_pictures": len(index), "attention_index": os.path.join("attention", "index.json")}
    if model.clustering.centroids is None:
        results["clusters"] = None
        results["clusters_skipped"] = "the model's k-means was never initialised (an untrained export)"
        logger.info("no cluster report: %s", results["clusters_skipped"])
    else:
        features, texts = cross_sentence_features(model, processor, cluster_examples, args.batch_size)
        results["clusters"] = write_cluster_outputs(model, features, texts, args.output_dir,
                                                    args.cluster_top_sentences)
    clusters = "not initialised" if results["clusters"] is None else f"{len(results['clusters']['sizes'])}"
    write_results(results, args.output_dir, RESULTS_HEADER, f"| {args.model} | {len(index)} | {clusters} |")
    logger.info("visualize: %d attention pictures in %s", len(index), os.path.join(args.output_dir, "attention"))
    return results


__all__ = [
    "run", "ARGUMENTS", "DEFAULTS", "DATASET_TASK", "DATASET_OPTIONAL", "check_arguments",
    "overlay_attention", "save_png", "pca_2d", "plot_clusters", "cluster_report",
    "write_attention_pictures", "cross_sentence_features", "write_cluster_outputs", "examples_from_files",
    "examples_from_split",
]
