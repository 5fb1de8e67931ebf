"""The demo pipeline end to end (tiny sizes), and the ablation's statistics on constructed numbers."""
import json
import os

import pytest

from cgns.experiments import demo

TINY_PRETRAIN = [
    "--pretrain_args", "--num_images", "40", "--image_size", "64", "--projection_dim", "32",
    "--num_clusters", "4", "--decoder_channels", "16", "8", "--per_device_train_batch_size", "8",
    "--max_text_length", "48", "--stage1_epochs", "1", "--stage2_epochs", "1", "--logging_steps", "1",
    "--report_to", "none",
]


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = demo.main(["--output_dir", str(out), "--fractions", "0.1", "1", "--seeds", "0",
                         "--probe_max_epochs", "2", *TINY_PRETRAIN])
    for name in ("results.md", "results.json", "results.png", "clustering.png"):
        assert (out / name).exists(), name
    assert (out / "cgns" / "pretrain" / "final" / "model.safetensors").exists()
    assert (out / "cgns" / "untrained" / "model.safetensors").exists()
    results = json.loads((out / "results.json").read_text())
    text = (out / "results.md").read_text()
    assert demo.encoder_table(results) in text and demo.probe_table(results) in text
    cluster_line = demo.clustering_line(results["pretraining"]["clustering"], results["num_clusters"])
    assert summary["table"] == demo.encoder_table(results) + "\n\n" + demo.probe_table(results) + "\n\n" + cluster_line
    assert cluster_line in text
    # the clustering line's numbers are the last validation record's (metrics.jsonl), not typed by hand
    records = [json.loads(line) for line in open(os.path.join(out, "cgns", "pretrain", "metrics.jsonl"))]
    last_eval = [r for r in records if r.get("split") == "eval"][-1]
    clustering = results["pretraining"]["clustering"]
    assert clustering["fn_precision"] == last_eval["fn_precision"] and clustering["fn_recall"] == last_eval["fn_recall"]
    assert f"false-negative precision {100 * last_eval['fn_precision']:.1f} %" in cluster_line
    assert clustering["min_live_clusters"] == min(r["cluster/live_clusters"] for r in records
                                                  if "cluster/live_clusters" in r)

    # every encoder number in results.json is the one in the protocol's own results file, and the table
    # shows it (no number typed by hand)
    for init in ("pretrained", "random"):
        enc = results["encoders"][init]
        retrieval = json.loads(open(enc["files"]["retrieval"]).read())
        zero_shot = json.loads(open(enc["files"]["zero_shot"]).read())
        grounding = json.loads(open(enc["files"]["grounding"]).read())
        assert enc["i2t_R@1"] == retrieval["test"]["i2t_R@1"]
        assert enc["t2i_R@1"] == retrieval["test"]["t2i_R@1"]
        assert enc["retrieval_chance_R@1"] == pytest.approx(1 / retrieval["num_pairs"])
        assert enc["zero_shot_auroc"] == zero_shot["test"]["auroc"]
        assert enc["pointing_game"] == grounding["test"]["pointing_game"]
        assert enc["pointing_game_gain"] == grounding["test"]["pointing_game_gain"]
        assert enc["sentence_specificity"] == grounding["test"]["sentence_specificity"]
        assert enc["attention_direction"] == grounding["attention_direction"] == "image_to_text"
    pre, rnd = results["encoders"]["pretrained"], results["encoders"]["random"]
    assert f"| zero-shot macro AUROC (%) | {100 * pre['zero_shot_auroc']:.1f} | {100 * rnd['zero_shot_auroc']:.1f} |" \
        in text
    assert f"| pointing game (%) | {100 * pre['pointing_game']:.1f} | {100 * rnd['pointing_game']:.1f} |" in text
    assert (f"| pointing game − uniform (points, 95 % CI) | {100 * pre['pointing_game_gain']:+.1f} ± "
            f"{100 * pre['pointing_game_gain_ci95']:.1f} |") in text
    from cgns.downstream.grounding import format_specificity
    assert f"| sentence specificity (points, 95 % CI) | {format_specificity(pre)} | {format_specificity(rnd)} | 0 |" \
        in text
    for mode in ("protocol", "standardized"):
        for init in ("pretrained", "random"):
            for fraction in ("0.1", "1.0"):
                entry = results["probes"][mode][init][fraction]
                on_disk = json.loads(open(entry["file"]).read())
                assert entry["auroc"] == on_disk["summary"]["auroc"]
                assert on_disk["standardize_features"] is (mode == "standardized")
    assert "standardised features" in text and "protocol (E.1)" in text
    # on a machine with 2+ cores the probes ran two at a time, each job in its own process and log
    if (os.cpu_count() or 1) >= 2:
        assert len(list((out / "logs" / "probes").glob("*.log"))) == 8

    # the console reads as a report: the phases in order, the final table last, no probe bars
    console = capsys.readouterr()
    printed = console.out
    positions = [printed.index(f"[{k}/5]") for k in range(1, 6)]
    assert positions == sorted(positions)
    assert printed.rstrip().splitlines()[-1].startswith("total ")
    assert printed.index("Results") > positions[-1]
    assert "features train" not in console.err and "retrieval images" not in console.err
    records = [json.loads(line) for line in open(os.path.join(out, "cgns", "pretrain", "metrics.jsonl"))]
    assert any("reconstruction_loss" in r for r in records if r.get("split") == "train")


def test_probe_jobs_below_one_is_refused(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--probe_jobs", "0"])
    assert "--probe_jobs must be at least 1" in capsys.readouterr().err


def test_parallel_probe_failure_names_its_log(tmp_path):
    done = []
    logs = [str(tmp_path / "ok.log"), str(tmp_path / "bad.log")]
    with pytest.raises(RuntimeError, match="bad.log"):
        demo.run_parallel([["--help"], ["--task", "no_such_task"]], logs, 2, done.append)
    assert done == [0]                      # the good job still finished and was counted
    assert "no_such_task" in open(logs[1]).read()


def test_separation_known_answers():
    same = demo.separation([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert same == {"difference": 0.0, "p_value": 1.0, "separates": False, "ci95": (0.0, 0.0)}
    apart = demo.separation([0.80, 0.81, 0.79], [0.50, 0.51, 0.49])
    assert apart["separates"] and apart["difference"] == pytest.approx(0.30)
    assert apart["p_value"] < 1e-3
    # equal variances 1e-4 and n = 3: SE = sqrt(2e-4 / 3), df = 4, t_0.975(4) = 2.7764
    half = 2.7764451 * (2e-4 / 3) ** 0.5
    assert apart["ci95"] == pytest.approx((0.30 - half, 0.30 + half), abs=1e-6)
    noisy = demo.separation([0.60, 0.70, 0.50], [0.55, 0.65, 0.62])
    assert not noisy["separates"] and noisy["p_value"] > 0.5
    assert demo.separation([0.5], [0.4])["separates"] is None  # one seed: no statement


def test_ablation_table_states_each_component():
    def run(value, seed):
        return {"i2t_R@1": value, "t2i_R@1": value, "zero_shot_auroc": 0.5 + value, "pointing_game": 0.2,
                "probe_auroc": 0.6 + value, "retrieval_chance_R@1": 0.008, "uniform_pointing_game": 0.15,
                "seed": seed}

    result = {"fraction": 0.1, "seeds": [0, 1, 2], "probe_seeds": [0], "runs": {
        "CGNS (full)": [run(v, s) for s, v in enumerate((0.10, 0.11, 0.12))],
        "no CM-MIR": [run(v, s) for s, v in enumerate((0.10, 0.12, 0.11))],
        "random init": [run(v, s) for s, v in enumerate((0.008, 0.009, 0.010))],
    }}
    table = demo.ablation_table(result)
    assert "| CGNS (full) | 11.0 ± 1.0 | 11.0 ± 1.0 | 61.0 ± 1.0 | 20.0 ± 0.0 | 71.0 ± 1.0 | n/a |" in table
    cm_mir = next(line for line in table.splitlines() if line.startswith("* **cross-modal masked"))
    assert "i2t R@1 (%): Δ +0.0 [" in cm_mir and "], within noise" in cm_mir
    random_line = next(line for line in table.splitlines() if line.startswith("* **pretraining itself"))
    assert "i2t R@1 (%): Δ +10.1 [" in random_line and "], separates (full better" in random_line
    assert "no clustering" not in table  # variants that were not run get no statement


@pytest.mark.slow
def test_ablation_tiny_end_to_end(tmp_path, monkeypatch):
    out = tmp_path / "ablation"
    result = demo.main(["--ablation", "--output_dir", str(out), "--ablation_variants", "CGNS (full)", "random init",
                        "--ablation_seeds", "0", "1", "--seeds", "0", "--probe_max_epochs", "2", *TINY_PRETRAIN])
    assert (out / "ablation.md").exists() and (out / "ablation.json").exists()
    assert (out / "ablation_clustering.png").exists()
    assert [r["seed"] for r in result["runs"]["CGNS (full)"]] == [0, 1]
    assert result["runs"]["random init"][0]["pretrain_dir"] is None
    assert "* **pretraining itself** (full vs random init)" in (out / "ablation.md").read_text()
    # an interrupted ablation resumes: finished runs are read back from their summary.json, nothing is redone
    def refuse(*args, **kwargs):
        raise AssertionError("a finished ablation run was run again")

    monkeypatch.setattr(demo, "pretrain", refuse)
    monkeypatch.setattr(demo, "export_untrained", refuse)
    monkeypatch.setattr(demo, "evaluate_encoder", refuse)
    again = demo.main(["--ablation", "--output_dir", str(out), "--ablation_variants", "CGNS (full)", "random init",
                       "--ablation_seeds", "0", "1", "--seeds", "0", "--probe_max_epochs", "2", *TINY_PRETRAIN])
    assert again["table"] == result["table"]
