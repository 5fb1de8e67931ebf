"""Model cards (``README.md`` with YAML front matter) for every CGNS export.

Every export folder — the pretraining ``final/``, a linear-probe, segmentation or detection head —
gets a card written by :func:`write_model_card`; ``save_pretrained`` of any CGNS model writes one
from ``model.model_card_info`` (what the training script knows: data, training time, metrics), and
``push_to_hub`` uploads it instead of transformers' generic card. The card states what a Hub user
needs and what transformers cannot tell them: the model classes live in this package, so
``pip install`` it and ``import modeling_cgns`` before ``AutoModel.from_pretrained``.
"""
import json
import math
import os
from typing import Any, Dict, Mapping, Optional

LIBRARY_NAME = "cgns"     # the Hub's library_name of every export
PACKAGE_NAME = "cm-cgns"  # the distribution on the package index (`cgns` there is an unrelated project)
INSTALL_LINE = f"pip install {PACKAGE_NAME}"
IMPORT_LINE = "import modeling_cgns  # registers model_type 'cgns' with the transformers Auto classes"
CARD_NAME = "README.md"

# kind -> (title, pipeline tag, Auto class, task sentence)
KINDS = {
    "pretraining": ("CGNS image-report encoder (CM-CGNS pretraining)", "zero-shot-image-classification", "AutoModel",
                    "image and report embeddings (global and local) for retrieval, zero-shot and downstream transfer"),
    "classification": ("CGNS frozen-tower linear probe", "image-classification", "AutoModelForImageClassification",
                       "chest X-ray classification with a linear head on the frozen CGNS image tower"),
    "segmentation": ("CGNS frozen-tower segmentation head", "image-segmentation", "CGNSForSemanticSegmentation",
                     "chest X-ray segmentation with a decoder on the frozen CGNS image tower"),
    "detection": ("CGNS frozen-tower detection head", "object-detection", "CGNSForObjectDetection",
                  "chest X-ray object detection with a head on the frozen CGNS image tower"),
}

# config fields that define the pretraining objective (docs/method.md A-C)
OBJECTIVE_FIELDS = ("projection_dim", "image_size", "max_text_length", "use_clustering", "num_clusters",
                    "cluster_momentum", "cluster_init_threshold", "hard_negative_mode", "hard_negative_weight",
                    "cluster_features", "cluster_update", "cluster_assignment", "empty_cluster_policy",
                    "false_negative_gate", "false_negative_threshold", "false_negative_handling", "use_hard_negatives",
                    "local_text_temperature", "bml_alpha", "bml_beta", "bml_weight",
                    "use_reconstruction", "mask_ratio", "reconstruction_weight", "reconstruction_target",
                    "global_loss_weight", "local_image_loss_weight", "local_text_loss_weight")

LIMITATIONS = (
    "Research use only. This model is **not** a medical device and has not been validated for clinical use: "
    "do not use it for diagnosis, triage or treatment decisions.",
    "Chest X-ray models learn the scanners, hospitals, patient populations and label extraction of their training "
    "data; performance on other sites, devices, views (lateral, paediatric) or populations is unknown until "
    "measured there, and can differ across sex, age and ethnicity groups.",
    "Report-derived labels and text are noisy; retrieval and classification scores are not calibrated "
    "probabilities of disease.",
    "Exports trained on the synthetic demo data are for testing the software only and carry no medical signal.",
)


def public_name(name_or_path) -> str:
    """How an export names a source given as a Hub id or a local path (a tower's ``_name_or_path`` in
    ``config.json``, a dataset in the card): a Hub id or a plain name as given; a local folder by name, never
    by path (an export names no path of the machine that made it): ``org/name`` for a snapshot in the Hub
    cache (``models--org--name/snapshots/<commit>``), else the folder's own name."""
    text = str(name_or_path)
    path = os.path.normpath(os.path.expanduser(text))
    if not (os.path.isabs(path) or os.path.exists(path)):
        return text
    parts = path.split(os.sep)
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/")
    return parts[-1]


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _format_duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _table(rows: Mapping[str, Any], header=("name", "value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {k} | {_format_value(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def _scalars(metrics: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Flat {name: number-or-string} of a (possibly nested) metrics dict; lists/arrays are left out."""
    flat: Dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, Mapping):
            flat.update({f"{key}/{k}": v for k, v in _scalars(value).items()})
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[str(key)] = value
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            flat[str(key)] = value.item()
    return flat


def tower_description(config) -> Dict[str, Any]:
    """Architecture of the two towers (and the projection width) from a :class:`CGNSConfig`."""
    vision = config.vision_config
    text = config.text_config
    return {
        "image tower": f"timm `{vision.architecture}` ({config.vision_kind} features), {config.image_size} px input",
        "report tower": (f"{text.model_type} ({getattr(text, 'num_hidden_layers', '?')} layers, hidden "
                         f"{getattr(text, 'hidden_size', '?')}, vocab {getattr(text, 'vocab_size', '?')}"
                         + (f", from `{public_name(text._name_or_path)}`" if getattr(text, "_name_or_path", "") else "")
                         + ")"),
        "projection dim": config.projection_dim,
    }


def build_model_card(config, kind: str = "pretraining", repo_id: Optional[str] = None, data: Any = None,
                     training_time_s: Optional[float] = None, training: Optional[Mapping[str, Any]] = None,
                     metrics: Optional[Mapping[str, Any]] = None, downstream: Optional[Mapping[str, Any]] = None,
                     base_model: Optional[str] = None, notes: Optional[str] = None) -> str:
    """The card text for one export.

    Args:
        config: the export's :class:`CGNSConfig` (a downstream model's config is one too).
        kind: "pretraining", "classification", "segmentation" or "detection".
        repo_id: the Hub id to show in the usage lines (default: a placeholder).
        data: what it was trained on (a dataset name/path, or a dict of split -> description).
        training_time_s: wall-clock training time in seconds.
        training: other training facts (steps, epochs, batch size, seeds, ...).
        metrics: final metrics of this export (validation/test), nested dicts are flattened.
        downstream: downstream results when present (task -> metrics).
        base_model: the CGNS export a downstream head was trained on: a Hub id goes to the front matter's
            ``base_model``; a local folder is named in the text by its folder name, never by its path.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    title, pipeline_tag, auto_class, task = KINDS[kind]
    where = repo_id or "path/or/hub-id-of-this-export"
    # inference: false -- the Hub's hosted widget cannot run the pipeline: it would need this package imported
    # (no trust_remote_code here); the usage lines below are what works.
    front = {"library_name": LIBRARY_NAME, "license": "apache-2.0", "pipeline_tag": pipeline_tag, "inference": False,
             "tags": ["cgns", "chest-x-ray", "medical-imaging", "radiology-reports", kind]}
    base_is_local = bool(base_model) and public_name(base_model) != str(base_model)
    if base_model and not base_is_local:
        front["base_model"] = base_model          # a Hub id: the Hub links the card to it
    lines = ["---"]
    for key, value in front.items():
        lines.append(f"{key}: {json.dumps(value)}")
    lines += ["---", "", f"# {title}", "", f"Use: {task}.", ""]
    if base_is_local:
        # a local folder is named, never its path (and base_model must be a Hub id): push the CGNS export to
        # the Hub and set base_model to its id to link the two
        lines += [f"Trained on the frozen CGNS export `{public_name(base_model)}` (a local folder when this card was "
                  f"written; set `base_model` to its Hub id after pushing it).", ""]

    lines += ["## Install and load", "",
              "The model classes are not part of transformers: install this package and import it first, "
              "otherwise `AutoModel` reports an unknown model type `cgns` and `AutoProcessor` cannot build the "
              "processor.", "", "```bash", INSTALL_LINE, "```", "", "```python", IMPORT_LINE]
    if kind == "pretraining":
        lines += ["from transformers import AutoModel, AutoProcessor, pipeline", "",
                  "# labels go through the model's own report handling (sentences, lower case, no punctuation)",
                  f'classify = pipeline("zero-shot-image-classification", model="{where}")',
                  'classify(image, candidate_labels=["pleural effusion", "pneumothorax", "cardiomegaly"],',
                  '         hypothesis_template="There is {}.")',
                  f'embed = pipeline("image-feature-extraction", model="{where}")',
                  "embed(image)   # [[...]]: the global image embedding (projection dim), unit norm", "",
                  f'model = AutoModel.from_pretrained("{where}")',
                  f'processor = AutoProcessor.from_pretrained("{where}")',
                  'inputs = processor(images=image, text="No acute cardiopulmonary process.")',
                  "out = model(**inputs, return_loss=False)   # out.image_embeds, out.text_embeds"]
    elif kind == "classification":
        lines += ["from transformers import pipeline", "",
                  f'classify = pipeline("image-classification", model="{where}")', "classify(image)"]
    else:
        lines += [f"from modeling_cgns import {auto_class}", "",
                  f'model = {auto_class}.from_pretrained("{where}")']
    lines += ["```", ""]

    lines += ["## Model", "", _table(tower_description(config), ("part", "description")), ""]
    if kind != "pretraining":
        head = {"task": kind, "labels": getattr(config, "num_labels", None)}
        if getattr(config, "id2label", None):
            head["label names"] = ", ".join(str(v) for _, v in sorted(config.id2label.items()))
        if getattr(config, "problem_type", None):
            head["problem type"] = config.problem_type
        lines += [_table(head, ("head", "value")), ""]

    lines += ["## Training data", ""]
    if isinstance(data, Mapping):
        lines += [_table(data, ("split / source", "description"))]
    else:
        lines += [f"{data}" if data else "Not recorded for this export."]
    lines += [""]

    lines += ["## Objective settings", "",
              _table({name: getattr(config, name) for name in OBJECTIVE_FIELDS if hasattr(config, name)},
                     ("setting", "value")), ""]

    lines += ["## Training", ""]
    facts = dict(_scalars(training))
    if training_time_s is not None:
        facts = {"training time": _format_duration(training_time_s), **facts}
    lines += [_table(facts, ("fact", "value")) if facts else "Not recorded for this export.", ""]

    lines += ["## Final metrics", ""]
    final = _scalars(metrics)
    lines += [_table(final, ("metric", "value")) if final else "Not recorded for this export.", ""]

    if downstream:
        lines += ["## Downstream results", ""]
        for task_name, result in downstream.items():
            lines += [f"### {task_name}", "", _table(_scalars(result), ("metric", "value")), ""]

    if notes:
        lines += ["## Notes", "", notes, ""]
    lines += ["## Intended use and limitations", ""] + [f"- {item}" for item in LIMITATIONS] + [""]
    return "\n".join(lines)


def write_model_card(save_directory: str, config, **card_info) -> str:
    """Write ``save_directory/README.md`` (see :func:`build_model_card` for ``card_info``); returns the path."""
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, CARD_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(build_model_card(config, **card_info))
    return path


def save_export(model, save_directory: str, image_processor=None, **card_info) -> str:
    """A downstream (or any) export in one call: ``model.save_pretrained`` with its model card filled from
    ``card_info`` (see :func:`build_model_card`), plus the image processor, so that
    ``pipeline("image-classification", model=save_directory)`` and ``AutoImageProcessor`` work on it."""
    model.model_card_info.update({k: v for k, v in card_info.items() if v is not None})
    model.save_pretrained(save_directory)
    if image_processor is not None:
        image_processor.save_pretrained(save_directory)
    return save_directory


def read_front_matter(path: str) -> Dict[str, Any]:
    """The YAML front matter of a card written here (one JSON value per ``key: value`` line)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if not text.startswith("---\n"):
        raise ValueError(f"{path} has no YAML front matter")
    block = text[4:text.index("\n---", 4)]
    out = {}
    for line in block.splitlines():
        key, _, value = line.partition(": ")
        out[key] = json.loads(value)
    return out


__all__ = ["build_model_card", "write_model_card", "save_export", "read_front_matter", "tower_description",
           "public_name",
           "LIBRARY_NAME", "PACKAGE_NAME", "INSTALL_LINE", "IMPORT_LINE", "CARD_NAME", "KINDS", "LIMITATIONS"]
