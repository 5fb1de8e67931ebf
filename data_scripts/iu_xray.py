"""IU-Xray / OpenI chest X-ray reports, read from the copy the installed ``torchxrayvision`` ships.

``torchxrayvision`` installs ``data/NLMCXR_reports.tgz`` (the 3,955 ``ecgen-radiology/<n>.xml`` reports of
the Indiana University collection, Demner-Fushman et al. 2016). Their licence (CC BY-NC-ND 4.0) forbids
redistributing modified copies, so nothing here copies them: every function reads the archive from the
installed package at run time, and the evaluation writes aggregate numbers only.

* ``load_reports()``: one dict per report: ``id`` (``"CXR<n>"``), ``findings``, ``impression`` (``None``
  when absent) and ``mesh_major`` (the MeSH major terms as written, e.g. ``"Opacity/lung/base/left"``).
* ``report_sentences(report)``: ``modeling_cgns.sentences.split_sentences(report_text(impression,
  findings))``, the splitter used for every pretraining report.
* ``mesh_observations(term)``: the CheXpert observations a MeSH major term states (the mapping below,
  also in docs/labeller.md).
* ``evaluate_labeller()``: report-level labels from ``modeling_cgns.label_sentences`` against the MeSH
  labels, per-observation precision / recall / F1 and their macro mean.
* ``iu_sentences(max_reports)``: every sentence with the index of its report, for the text-side
  clustering evaluation.

Command: ``python -m data_scripts.iu_xray --evaluate_labeller --output iu_labeller.json``.
"""
import argparse
import importlib.util
import io
import json
import os
import tarfile
import xml.etree.ElementTree as ElementTree
from typing import Dict, List, Optional, Sequence, Tuple

from .builder import TaskSpec
from modeling_cgns.labeller import OBSERVATIONS, PATHOLOGIES, label_sentences, report_labels
from modeling_cgns.sentences import report_text, split_sentences

ARCHIVE_NAME = "NLMCXR_reports.tgz"
MIN_POSITIVES = 20  # observations with at least this many positive reports enter the macro F1

# MeSH major term -> CheXpert observations. A term is "Head/qualifier/qualifier..."; the head decides,
# qualifiers only where the head alone is ambiguous. Terms not listed (normal, calcified granuloma,
# calcinosis, hypoinflation, hyperdistention, emphysema, spine and bone degeneration, hiatal hernia,
# costophrenic angle blunting, foreign bodies, ...) state no CheXpert observation.
_MESH_HEADS: Dict[str, Tuple[str, ...]] = {
    "cardiomegaly": ("Cardiomegaly",),
    "opacity": ("Lung Opacity",),
    "airspace disease": ("Lung Opacity",),
    "infiltrate": ("Lung Opacity",),
    "lung diseases, interstitial": ("Lung Opacity",),
    "pulmonary fibrosis": ("Lung Opacity",),
    "fibrosis": ("Lung Opacity",),
    "nodule": ("Lung Lesion",),
    "mass": ("Lung Lesion",),
    "cavitation": ("Lung Lesion",),
    "pulmonary edema": ("Edema",),
    "pulmonary congestion": ("Edema",),
    "heart failure": ("Edema",),
    "consolidation": ("Consolidation",),
    "pneumonia": ("Pneumonia",),
    "pulmonary atelectasis": ("Atelectasis",),
    "pneumothorax": ("Pneumothorax",),
    "hydropneumothorax": ("Pneumothorax", "Pleural Effusion"),
    "hemopneumothorax": ("Pneumothorax", "Pleural Effusion"),
    "pleural effusion": ("Pleural Effusion",),
    "hemothorax": ("Pleural Effusion",),
    "fractures, bone": ("Fracture",),
    "catheters, indwelling": ("Support Devices",),
    "implanted medical device": ("Support Devices",),
    "surgical instruments": ("Support Devices",),
    "tube, inserted": ("Support Devices",),
    "medical device": ("Support Devices",),
    "stents": ("Support Devices",),
    "sutures": ("Support Devices",),
    "spinal fusion": ("Support Devices",),
}
_ENLARGED = {"enlarged", "prominent", "widened", "wide", "large"}
_NOT_LUNG = {"mediastinum", "bone", "bones", "breast", "soft tissue", "abdomen", "spine", "thoracic vertebrae"}


def mesh_observations(term: str) -> Tuple[str, ...]:
    """CheXpert observations stated by one MeSH major term (docs/labeller.md has the table).

    Head-only rules are in ``_MESH_HEADS``; qualifier rules: ``Cardiac Shadow`` / ``Heart`` with
    ``enlarged`` -> Cardiomegaly; ``Mediastinum`` with enlarged / prominent / widened -> Enlarged
    Cardiomediastinum; ``Density`` (not of the mediastinum, bone, breast, ...), ``Cicatrix`` (scarring;
    not of the pleura), ``Markings`` / ``Lung`` with ``interstitial`` and ``Thickening/bronchovascular``
    -> Lung Opacity; ``Thickening`` / ``Cicatrix`` of the pleura and ``Pleura`` itself -> Pleural Other.
    """
    parts = [p.strip().lower() for p in (term or "").split("/")]
    head, qualifiers = parts[0], set(parts[1:])
    if head in _MESH_HEADS:
        return _MESH_HEADS[head]
    if head in ("cardiac shadow", "heart") and qualifiers & _ENLARGED:
        return ("Cardiomegaly",)
    if head == "mediastinum" and qualifiers & _ENLARGED:
        return ("Enlarged Cardiomediastinum",)
    if head == "density" and not qualifiers & _NOT_LUNG:
        return ("Lung Opacity",)
    if head == "cicatrix":
        return ("Pleural Other",) if "pleura" in qualifiers else ("Lung Opacity",)
    if head in ("markings", "lung") and "interstitial" in qualifiers:
        return ("Lung Opacity",)
    if head == "thickening":
        if "pleura" in qualifiers:
            return ("Pleural Other",)
        if "bronchovascular" in qualifiers:
            return ("Lung Opacity",)
    if head == "pleura":
        return ("Pleural Other",)
    return ()


def mesh_labels(terms: Sequence[str]) -> Optional[Dict[str, int]]:
    """Report-level 0/1 labels from a report's MeSH major terms; ``None`` for a report marked ``No Indexing``.

    No Finding follows the same rule as the labeller's reports (``report_labels``): 1 when no pathology is
    stated."""
    if any((t or "").strip().lower() == "no indexing" for t in terms):
        return None
    out = {obs: 0 for obs in OBSERVATIONS}
    for term in terms:
        for obs in mesh_observations(term):
            out[obs] = 1
    out["No Finding"] = int(not any(out[o] for o in PATHOLOGIES))
    return out


def archive_path() -> str:
    """Path of ``NLMCXR_reports.tgz`` inside the installed torchxrayvision; a clear error when absent."""
    # located, not imported: importing torchxrayvision loads torch and takes seconds
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the IU-Xray reports are read from the torchxrayvision package, which is not "
                                "installed (pip install torchxrayvision)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", ARCHIVE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: this torchxrayvision version does not ship the IU-Xray reports")
    return path


def _text(element: Optional[ElementTree.Element]) -> Optional[str]:
    if element is None or element.text is None or not element.text.strip():
        return None
    return element.text.strip()


def parse_report(xml_bytes: bytes, name: str = "") -> Dict[str, object]:
    """One ecgen XML report -> ``{"id", "findings", "impression", "mesh_major"}``."""
    try:
        root = ElementTree.parse(io.BytesIO(xml_bytes)).getroot()
    except ElementTree.ParseError as err:
        raise ValueError(f"{name}: not a well-formed ecgen XML report ({err})") from err
    uid = root.find("uId")
    sections = {a.get("Label", "").upper(): _text(a) for a in root.iter("AbstractText")}
    return {
        "id": uid.get("id") if uid is not None and uid.get("id") else os.path.splitext(os.path.basename(name))[0],
        "findings": sections.get("FINDINGS"),
        "impression": sections.get("IMPRESSION"),
        "mesh_major": [t for t in (_text(e) for e in root.iter("major")) if t],
    }


def load_reports(path: Optional[str] = None, max_reports: Optional[int] = None,
                 errors: Optional[List[str]] = None) -> List[Dict[str, object]]:
    """Every report of the archive, ordered by its number (``1.xml``, ``2.xml``, ...).

    A member that cannot be read or parsed is skipped and described in ``errors`` when a list is given,
    else raises."""
    if max_reports is not None and (not isinstance(max_reports, int) or max_reports < 1):
        raise ValueError(f"max_reports must be a positive integer or None, got {max_reports!r}")
    path = path or archive_path()
    raw: Dict[str, bytes] = {}
    # one sequential pass: random access into a gzip stream would decompress it again for every member
    with tarfile.open(path, "r|gz") as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".xml"):
                raw[member.name] = archive.extractfile(member).read()
    names = sorted(raw, key=lambda n: (len(os.path.basename(n)), os.path.basename(n)))
    if max_reports is not None:
        names = names[:max_reports]
    reports = []
    for name in names:
        try:
            reports.append(parse_report(raw[name], name))
        except ValueError as err:
            if errors is None:
                raise
            errors.append(f"{name}: {err}")
    return reports


def report_sentences(report: Dict[str, object]) -> List[str]:
    """The report's sentences as pretraining sees them: ``split_sentences(report_text(impression, findings))``."""
    return split_sentences(report_text(report["impression"], report["findings"]))


def iu_sentences(max_reports: Optional[int] = None, path: Optional[str] = None) -> Tuple[List[str], List[int]]:
    """All sentences of the first ``max_reports`` reports (all by default) and, per sentence, the index of its
    report in ``load_reports()`` order. Reports with no usable sentence contribute nothing."""
    sentences, report_index = [], []
    for i, report in enumerate(load_reports(path, max_reports=max_reports)):
        for sentence in report_sentences(report):
            sentences.append(sentence)
            report_index.append(i)
    return sentences, report_index


#: ``load_cgns_dataset("iu_xray", task="reports")``: text-only rows for scoring the clustering on real reports
TASKS = {"reports": TaskSpec("pretraining", (), None)}


def load(data_dir=None, task: str = "reports", data_pct: float = 1.0, seed: int = 0, cache_dir=None,
         max_reports: Optional[int] = None, **options):
    """The IU-Xray reports as a text-only ``DatasetDict`` with one split, ``test``: per report ``report_id``,
    ``report`` (impression + findings), ``sentences`` and ``sentence_meanings`` (the labeller's,
    ``modeling_cgns.sentence_meanings``). Read from the installed torchxrayvision at every call and kept in
    memory only: the reports' licence (CC BY-NC-ND) forbids redistributing modified copies, so nothing is
    written to a cache. Reports without a usable sentence are left out. ``data_dir`` may name another copy of
    the archive; ``data_pct`` and ``seed`` are accepted for the common signature (there is no train split)."""
    import datasets

    from modeling_cgns.labeller import sentence_meanings

    if options:
        raise ValueError(f"iu_xray takes no options {sorted(options)} (only max_reports)")
    if task not in TASKS:
        raise ValueError(f"iu_xray has no task {task!r}; it provides: {', '.join(TASKS)}")
    path = os.path.join(data_dir, ARCHIVE_NAME) if data_dir and os.path.isdir(data_dir) else data_dir
    rows = {"report_id": [], "report": [], "sentences": [], "sentence_meanings": []}
    for report in load_reports(path, max_reports=max_reports):
        sentences = report_sentences(report)
        if not sentences:
            continue
        rows["report_id"].append(str(report["id"]))
        rows["report"].append(report_text(report["impression"], report["findings"]))
        rows["sentences"].append(sentences)
        rows["sentence_meanings"].append(sentence_meanings(sentences))
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)})


def precision_recall_f1(truth: Sequence[int], predicted: Sequence[int]) -> Dict[str, float]:
    """Binary precision / recall / F1 with the counts; 0.0 where a denominator is 0."""
    tp = sum(1 for t, p in zip(truth, predicted) if t and p)
    fp = sum(1 for t, p in zip(truth, predicted) if p and not t)
    fn = sum(1 for t, p in zip(truth, predicted) if t and not p)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"positives": tp + fn, "predicted": tp + fp, "tp": tp, "fp": fp, "fn": fn,
            "precision": precision, "recall": recall, "f1": f1}


def evaluate_labeller(path: Optional[str] = None, uncertain_as: int = 0,
                      min_positives: int = MIN_POSITIVES) -> Dict[str, object]:
    """Labeller vs MeSH on every indexed IU report: per-observation scores and the macro F1 over the
    observations with at least ``min_positives`` positive reports (docs/labeller.md)."""
    errors: List[str] = []
    reports = load_reports(path, errors=errors)
    truth, predicted = [], []
    skipped = {"no indexing": 0, "no text": 0}
    normal_tag = {"reports": 0, "labelled_no_finding": 0}  # MeSH "normal" is a stricter No Finding
    for report in reports:
        gold = mesh_labels(report["mesh_major"])
        if gold is None:
            skipped["no indexing"] += 1
            continue
        sentences = report_sentences(report)
        if not sentences:
            skipped["no text"] += 1
            continue
        truth.append(gold)
        predicted.append(report_labels(label_sentences(sentences), uncertain_as=uncertain_as))
        if any(t.strip().lower() == "normal" for t in report["mesh_major"]):
            normal_tag["reports"] += 1
            normal_tag["labelled_no_finding"] += predicted[-1]["No Finding"]
    per_observation = {obs: precision_recall_f1([t[obs] for t in truth], [p[obs] for p in predicted])
                       for obs in OBSERVATIONS}
    included = [obs for obs in OBSERVATIONS if per_observation[obs]["positives"] >= min_positives]
    macro_f1 = sum(per_observation[o]["f1"] for o in included) / len(included) if included else 0.0
    pathologies = [o for o in included if o != "No Finding"]  # No Finding is derived from the others
    macro_f1_without_no_finding = (sum(per_observation[o]["f1"] for o in pathologies) / len(pathologies)
                                   if pathologies else 0.0)
    return {"reports": len(reports), "evaluated": len(truth), "skipped": skipped, "unreadable": errors,
            "uncertain_as": uncertain_as, "min_positives": min_positives, "macro_f1_observations": included,
            "macro_f1": macro_f1, "macro_f1_without_no_finding": macro_f1_without_no_finding,
            "mesh_normal": normal_tag, "per_observation": per_observation}


def format_table(result: Dict[str, object]) -> str:
    """Markdown table of ``evaluate_labeller``'s result."""
    lines = ["| observation | positive reports | precision | recall | F1 | in macro |", "|---|---:|---:|---:|---:|:-:|"]
    for obs, s in result["per_observation"].items():
        inside = "yes" if obs in result["macro_f1_observations"] else "no"
        lines.append(f"| {obs} | {s['positives']} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | "
                     f"{inside} |")
    lines.append(f"\nmacro F1 over the {len(result['macro_f1_observations'])} observations with >= "
                 f"{result['min_positives']} positive reports: {result['macro_f1']:.3f} "
                 f"(without No Finding: {result['macro_f1_without_no_finding']:.3f}; "
                 f"MeSH 'normal' reports labelled No Finding: {result['mesh_normal']['labelled_no_finding']} of "
                 f"{result['mesh_normal']['reports']}; "
                 f"{result['evaluated']} of {result['reports']} reports evaluated; skipped: {result['skipped']}; "
                 f"unreadable: {len(result['unreadable'])}; uncertain counted as {result['uncertain_as']})")
    return "\n".join(lines)


def main(argv=None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--evaluate_labeller", action="store_true",
                        help="score modeling_cgns.label_sentences against the reports' MeSH major terms")
    parser.add_argument("--uncertain_as", type=int, choices=(0, 1), default=0,
                        help="report-level value of an observation only uncertain in its sentences (default 0)")
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if not args.evaluate_labeller:
        parser.error("nothing to do: pass --evaluate_labeller")
    result = evaluate_labeller(uncertain_as=args.uncertain_as)
    print(format_table(result))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")
    return result


if __name__ == "__main__":
    main()


__all__ = ["ARCHIVE_NAME", "MIN_POSITIVES", "archive_path", "parse_report", "load_reports", "report_sentences",
           "iu_sentences", "mesh_observations", "mesh_labels", "precision_recall_f1", "evaluate_labeller",
           "format_table", "main", "TASKS", "load"]
