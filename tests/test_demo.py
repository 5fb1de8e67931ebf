"""A tiny end-to-end run of the demo pipeline: synthetic data -> accelerate launch pretraining -> probes."""
import json
import os

import demo


def test_demo_pipeline_end_to_end(tmp_path):
    out = tmp_path / "demo"
    summary = demo.main([
        "--output_dir", str(out), "--fractions", "0.1", "1", "--seeds", "0", "--probe_max_epochs", "2",
        "--pretrain_args", "--num_images", "40", "--image_size", "64", "--projection_dim", "32",
        "--num_clusters", "4", "--decoder_channels", "16", "8", "--per_device_train_batch_size", "8",
        "--max_text_length", "48", "--stage1_epochs", "1", "--stage2_epochs", "1", "--logging_steps", "1",
        "--report_to", "none",
    ])
    for name in ("results.md", "results.json", "results.png"):
        assert (out / name).exists(), name
    assert (out / "cgns" / "pretrain" / "final" / "model.safetensors").exists()
    results = json.loads((out / "results.json").read_text())
    for init in ("pretrained", "random"):
        for fraction in ("0.1", "1.0"):
            stat = results["auroc"][init][fraction]
            assert stat["mean"] is None or 0.0 <= stat["mean"] <= 1.0
    assert set(results["retrieval"]) == {"i2t_acc1", "i2t_acc5", "t2i_acc1", "t2i_acc5"}
    assert results["retrieval"]["i2t_acc1"] is not None
    text = (out / "results.md").read_text()
    assert "CGNS-pretrained" in text and "random init" in text and "AUROC @ 10 % labels" in text
    assert summary["table"] in text
    records = [json.loads(line) for line in open(os.path.join(out, "cgns", "pretrain", "metrics.jsonl"))]
    assert any("reconstruction_loss" in r for r in records if r.get("split") == "train")
