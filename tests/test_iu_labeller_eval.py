"""The labeller's IU-Xray evaluation reproduces its recorded numbers (docs/iu_labeller_eval.json, aggregate numbers
only) from the reports shipped in the installed torchxrayvision, read at test time and never copied."""
import importlib.util
import json
import os

import pytest

from data_scripts import iu_xray

RECORD = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "iu_labeller_eval.json")


def _archive():
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not os.path.isfile(os.path.join(list(spec.submodule_search_locations)[0], "data",
                                                       iu_xray.ARCHIVE_NAME)):
        pytest.skip("torchxrayvision (test extra) with its NLMCXR_reports.tgz is not installed")
    return iu_xray.archive_path()


def test_mesh_mapping_known_answers():
    m = iu_xray.mesh_observations
    assert m("Cardiomegaly/mild") == ("Cardiomegaly",)
    assert m("Cardiac Shadow/enlarged/borderline") == ("Cardiomegaly",)
    assert m("Cardiac Shadow/left/obscured") == ()
    assert m("Mediastinum/prominent/mild") == ("Enlarged Cardiomediastinum",)
    assert m("Opacity/lung/base/left") == ("Lung Opacity",)
    assert m("Density/mediastinum") == ()
    assert m("Cicatrix/lung/apex/bilateral") == ("Lung Opacity",)
    assert m("Cicatrix/pleura/right") == ("Pleural Other",)
    assert m("Thickening/pleura/apex/bilateral") == ("Pleural Other",)
    assert m("Nodule/lung/lower lobe/right") == ("Lung Lesion",)
    assert m("Calcified Granuloma/lung/upper lobe/right") == ()
    assert m("Pulmonary Congestion/mild") == ("Edema",)
    assert m("Hydropneumothorax/apex/right") == ("Pneumothorax", "Pleural Effusion")
    assert m("Catheters, Indwelling/right") == ("Support Devices",)
    assert m("Fractures, Bone/ribs/right/healed") == ("Fracture",)
    assert m("normal") == () and m("Lung/hypoinflation") == ()
    labels = iu_xray.mesh_labels(["Calcified Granuloma", "Implanted Medical Device/left"])
    assert labels["No Finding"] == 1 and labels["Support Devices"] == 1 and sum(labels.values()) == 2
    assert iu_xray.mesh_labels(["Cardiomegaly"])["No Finding"] == 0
    assert iu_xray.mesh_labels(["No Indexing"]) is None


def test_parse_report_on_a_constructed_report():
    xml = (b'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="CXR7"/><MedlineCitation><Article><Abstract>'
           b'<AbstractText Label="FINDINGS">Heart is enlarged. No effusion.</AbstractText>'
           b'<AbstractText Label="IMPRESSION"/></Abstract></Article></MedlineCitation>'
           b'<MeSH><major>Cardiomegaly/mild</major><minor>x</minor></MeSH></eCitation>')
    report = iu_xray.parse_report(xml, "ecgen-radiology/7.xml")
    assert report == {"id": "CXR7", "findings": "Heart is enlarged. No effusion.", "impression": None,
                      "mesh_major": ["Cardiomegaly/mild"]}
    assert iu_xray.report_sentences(report) == ["heart is enlarged", "no effusion"]
    with pytest.raises(ValueError, match="bad.xml"):
        iu_xray.parse_report(b"<eCitation>", "bad.xml")


def test_precision_recall_f1_known_answer():
    s = iu_xray.precision_recall_f1([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert (s["tp"], s["fp"], s["fn"], s["positives"]) == (2, 1, 1, 3)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert iu_xray.precision_recall_f1([0, 0], [0, 0])["f1"] == 0.0


def test_evaluation_reproduces_the_recorded_numbers():
    _archive()
    with open(RECORD) as handle:
        recorded = json.load(handle)
    result = iu_xray.evaluate_labeller(uncertain_as=recorded["uncertain_as"], min_positives=recorded["min_positives"])
    for key in ("reports", "evaluated", "skipped", "unreadable", "macro_f1_observations", "mesh_normal"):
        assert result[key] == recorded[key], key
    for obs, scores in recorded["per_observation"].items():
        got = result["per_observation"][obs]
        assert (got["tp"], got["fp"], got["fn"]) == (scores["tp"], scores["fp"], scores["fn"]), obs
        assert got["f1"] == pytest.approx(scores["f1"], abs=1e-12)
    assert result["macro_f1"] == pytest.approx(recorded["macro_f1"], abs=1e-12)
    # the target, on the recorded (= reproduced) numbers
    assert recorded["macro_f1"] >= 0.8 and len(recorded["macro_f1_observations"]) >= 10


def test_iu_sentences_align_with_their_reports():
    path = _archive()
    reports = iu_xray.load_reports(path, max_reports=6)
    assert [r["id"] for r in reports] == ["CXR1", "CXR2", "CXR3", "CXR4", "CXR5", "CXR6"]
    sentences, report_index = iu_xray.iu_sentences(max_reports=6, path=path)
    assert len(sentences) == len(report_index) > 6
    assert report_index == sorted(report_index) and set(report_index) <= set(range(6))
    for i, report in enumerate(reports):
        assert [s for s, r in zip(sentences, report_index) if r == i] == iu_xray.report_sentences(report)
    with pytest.raises(ValueError, match="max_reports"):
        iu_xray.iu_sentences(max_reports=0, path=path)


def test_command_writes_the_table(tmp_path, capsys, monkeypatch):
    _archive()
    fake = {"reports": 1, "evaluated": 1, "skipped": {}, "unreadable": [], "uncertain_as": 0, "min_positives": 20,
            "macro_f1_observations": ["Cardiomegaly"], "macro_f1": 0.5, "macro_f1_without_no_finding": 0.5,
            "mesh_normal": {"reports": 0, "labelled_no_finding": 0},
            "per_observation": {"Cardiomegaly": iu_xray.precision_recall_f1([1, 1], [1, 0])}}
    monkeypatch.setattr(iu_xray, "evaluate_labeller", lambda uncertain_as: fake)
    out = tmp_path / "eval.json"
    iu_xray.main(["--evaluate_labeller", "--output", str(out)])
    assert json.loads(out.read_text()) == fake
    assert "| Cardiomegaly | 2 | 1.000 | 0.500 | 0.667 | yes |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        iu_xray.main([])
