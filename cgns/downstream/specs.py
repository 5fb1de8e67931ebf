"""What the ``cgns evaluate`` command line needs to know about each protocol, without importing it.

Each protocol's own options (``ARGUMENTS``), its defaults (``DEFAULTS``) and the registry's order live here, in a
module that imports neither torch nor the Trainer, so that ``cgns evaluate --help`` and the parser are fast
(BENCHMARKS.md, "cgns --help"). The protocol modules (``cgns.downstream.<task>``) take their ``ARGUMENTS`` and
``DEFAULTS`` from here; the constants spelled out below are the library's own (tests/test_downstream_cli.py checks
that they match ``modeling_cgns``).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

#: the registered protocols, in the order of the command line's choices: task -> module under cgns.downstream
MODULES = {
    "classification": "classification",  # linear probe, docs/linear_probe.md
    "detection": "detection",  # YOLOv3 head, docs/detection.md
    "segmentation": "segmentation",  # U-Net / SETR decoder, docs/segmentation.md
    "retrieval": "retrieval",  # image <-> report Recall@k, docs/evaluation.md
    "zero_shot": "zero_shot",  # prompt classification, AUROC
    "grounding": "grounding",  # pointing game of the local cross-attention
    "visualize": "visualize",  # attention overlays, cluster report and plot
    "clustering": "clustering",  # false negatives found by the clustering, against sentence meanings
}
TASKS = tuple(MODULES)

#: protocol defaults of the shared hyperparameters (docs/method.md E.1 / E.2 / E.3); an explicit value wins
TASK_DEFAULTS: Dict[str, Dict[str, float]] = {
    "classification": {"max_epochs": 100, "batch_size": 48, "lr": 5e-4, "weight_decay": 1e-6},
    "detection": {"max_epochs": 50, "batch_size": 16, "lr": 5e-4, "weight_decay": 1e-6},
    "segmentation": {"max_epochs": 50, "batch_size": 16, "lr": 5e-4, "weight_decay": 0.05},
    "retrieval": {"batch_size": 64},
    "zero_shot": {"batch_size": 64},
    "grounding": {"batch_size": 16},
    "visualize": {"batch_size": 16},
    "clustering": {},
}

# the library's constants, spelled out (modeling_cgns.modeling_classification.INITS,
# modeling_cgns.modeling_detection.CLASS_LOSS_NORMALIZATIONS, modeling_cgns.modeling_cgns.ATTENTION_DIRECTIONS /
# DEFAULT_ATTENTION_DIRECTION): importing them would import torch
INITS = ("pretrained", "random", "imagenet")
CLASS_LOSS_NORMALIZATIONS = ("all_anchors", "object_anchors")
ATTENTION_DIRECTIONS = ("image_to_text", "text_to_image")
DEFAULT_ATTENTION_DIRECTION = "image_to_text"
# detection: model selection / early stopping scores (DetectionArguments.selection_metric); the first is the default
SELECTION_METRICS = ("map_all_scores", "map", "loss")


@dataclass(kw_only=True)
class ClassificationArguments:
    """Options of the linear probe only (``--task classification``)."""

    _argument_group_name = "Linear-probe options (--task classification)"

    feature_cache_dir: Optional[str] = field(default=None, metadata={
        "help": "classification: folder of the cached frozen features, one safetensors file per model, init, "
                "split and preprocessing, reused by later runs (other seeds, --standardize_features, the same "
                "validation / test splits at another --data_pct) (default: <cache_dir or ~/.cache/cgns>/features)"})
    no_feature_cache: bool = field(default=False, metadata={
        "help": "classification: extract the features afresh and write no cache file"})


@dataclass(kw_only=True)
class DetectionArguments:
    """Options of the detection protocol only (``--task detection``)."""

    _argument_group_name = "Detection options (--task detection)"

    min_epochs: int = field(default=25, metadata={
        "help": "detection: early stopping never fires before this epoch (not in E.2: on a small or "
                "synthetic set the head needs several epochs before its first confident box)"})
    selection_metric: str = field(default=SELECTION_METRICS[0], metadata={
        "choices": SELECTION_METRICS,
        "help": "detection: validation score of the best epoch and of early stopping. map_all_scores: mAP of "
                "the detections at any confidence (threshold-free, not 0 before the first box scores 0.5); "
                "map: E.2's mAP at confidence 0.5 (the reference's choice); loss: validation loss"})
    class_loss_normalization: str = field(default=CLASS_LOSS_NORMALIZATIONS[0], metadata={
        "choices": CLASS_LOSS_NORMALIZATIONS,
        "help": "detection: class BCE averaged over every anchor (all_anchors, the reference's YOLOLoss) or "
                "over the object anchors only (object_anchors)"})
    feature_cache_gb: float = field(default=2.0, metadata={
        "help": "detection: keep the frozen tower's C3 / C4 / C5 of every split in memory when they fit in this "
                "many GiB (0: never) and train the head on them; the tower is frozen and there is no "
                "augmentation, so the head sees the same inputs, many times faster"})


@dataclass(kw_only=True)
class SegmentationArguments:
    """Options of the segmentation protocol only (``--task segmentation``)."""

    _argument_group_name = "Segmentation options (--task segmentation)"

    balance_train: bool = field(default=True, metadata={
        "help": "segmentation: keep every positive training image (a non-empty mask) plus as many "
                "negatives drawn with RandomState(--balance_seed), before --data_pct, as E.3 does for SIIM "
                "(whose builder already balances: then this is a no-op); validation and test stay as they "
                "are. --no_balance_train keeps the split as loaded"})
    balance_seed: int = field(default=42, metadata={"help": "segmentation: seed of the negatives kept (E.3: 42)"})


@dataclass
class EncoderEvaluationArguments:
    """Command-line options of the encoder-only protocols (retrieval, zero_shot, grounding, visualize).

    Each of those modules names this class as its ``ARGUMENTS``, so ``cgns.downstream.arguments`` puts the
    fields on the ``cgns evaluate`` command line once; the other protocols ignore them.
    """

    split: Optional[str] = field(default=None, metadata={
        "help": "retrieval / zero_shot / grounding / visualize: the split evaluated (default: test when the "
                "dataset has one, else validation)"})
    prompts: Optional[str] = field(default=None, metadata={
        "help": "zero_shot / grounding: prompt JSON {label: {positive: [...], negative: [...]}} "
                "(default: the zero_shot_prompts.json shipped in cgns/downstream)"})
    embedding_cache_dir: Optional[str] = field(default=None, metadata={
        "help": "retrieval / zero_shot: folder of the cached embeddings, one safetensors file per model and "
                "split (default: <cache_dir or ~/.cache/cgns>/embeddings)"})
    no_embedding_cache: bool = field(default=False, metadata={
        "help": "retrieval / zero_shot: recompute the embeddings and write no cache file"})
    attention_direction: str = field(default=DEFAULT_ATTENTION_DIRECTION, metadata={
        "choices": ATTENTION_DIRECTIONS,
        "help": "grounding / visualize: which local cross-attention map (CGNSModel.get_sentence_attention)"})
    random_init_baseline: bool = field(default=False, metadata={
        "help": "grounding: also score the export's architecture with fresh weights (seed 0), the random-init "
                "baseline, beside the uniform map"})
    images: Optional[List[str]] = field(default=None, metadata={
        "help": "visualize: image files (instead of --dataset), paired with --reports"})
    reports: Optional[List[str]] = field(default=None, metadata={
        "help": "visualize: one report per image, a text file or the report text itself"})
    num_examples: int = field(default=4, metadata={
        "help": "visualize: rows of the split drawn as attention pictures"})
    max_cluster_reports: int = field(default=500, metadata={
        "help": "visualize: rows of the split whose sentences go into the cluster report and plot"})
    cluster_top_sentences: int = field(default=5, metadata={
        "help": "visualize: most central sentences listed per cluster"})


@dataclass
class ClusteringArguments:
    """Options of ``--task clustering``."""

    cluster_batch_size: int = field(default=32, metadata={
        "help": "clustering: reports per forward, i.e. per batch whose pairs the 'batch' scores count (the "
                "pretraining batch size; demo 32)"})
    max_cluster_rows: int = field(default=0, metadata={
        "help": "clustering: score at most this many rows of the split (0: all)"})


#: each protocol's own options (``ARGUMENTS`` of its module); the encoder-only ones share one class
TASK_ARGUMENTS = {
    "classification": ClassificationArguments,
    "detection": DetectionArguments,
    "segmentation": SegmentationArguments,
    "retrieval": EncoderEvaluationArguments,
    "zero_shot": EncoderEvaluationArguments,
    "grounding": EncoderEvaluationArguments,
    "visualize": EncoderEvaluationArguments,
    "clustering": ClusteringArguments,
}

__all__ = ["MODULES", "TASKS", "TASK_DEFAULTS", "TASK_ARGUMENTS", "INITS", "CLASS_LOSS_NORMALIZATIONS",
           "ATTENTION_DIRECTIONS", "DEFAULT_ATTENTION_DIRECTION", "SELECTION_METRICS", "ClassificationArguments",
           "DetectionArguments", "SegmentationArguments", "EncoderEvaluationArguments", "ClusteringArguments"]
