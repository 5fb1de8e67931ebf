"""train_downstream.py's command line: typed HfArgumentParser dataclasses, Trainer pass-through, refusals.

Only parsing and one tiny resume run (resnet18 at 64 px, 12 training images): a few seconds.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import data_scripts  # noqa: E402
from cgns.downstream import protocols as downstream  # noqa: E402
from cgns.downstream import cli as td  # noqa: E402
from cgns.downstream import classification  # noqa: E402
from cgns.downstream.arguments import argument_dataclasses, build_parser  # noqa: E402
from cgns.downstream.common import training_arguments  # noqa: E402
from modeling_cgns import CGNSForImageClassification, CGNSImageProcessor  # noqa: E402
from tiny import tiny_config  # noqa: E402

BASE = ["--dataset", "synthetic_cxr", "--model", "m", "--output_dir", "o"]
SPEC = data_scripts.TaskSpec("multi_label_classification", ("a", "b"), "auroc")


def test_every_option_has_help_and_the_dispatch_table_names_every_task():
    parser = build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 25
    assert [a.dest for a in options if not (a.help or "").strip()] == []
    assert set(td.TASKS) == set(downstream.PROTOCOLS) >= {"classification", "detection", "segmentation"}
    for task in downstream.PROTOCOLS:   # each entry is a module with run(args) and DEFAULTS
        module = downstream.protocol(task)
        assert callable(module.run) and isinstance(module.DEFAULTS, dict)
    with pytest.raises(ValueError, match="unknown downstream task"):
        downstream.protocol("nope")


def test_specs_match_the_protocols_and_the_library():
    """cgns.downstream.specs spells out what the parser needs without importing the protocols: each protocol module
    uses exactly its ARGUMENTS and DEFAULTS, and the constants copied from modeling_cgns are the library's."""
    from cgns.downstream import specs
    from modeling_cgns.modeling_cgns import ATTENTION_DIRECTIONS, DEFAULT_ATTENTION_DIRECTION
    from modeling_cgns.modeling_classification import INITS
    from modeling_cgns.modeling_detection import CLASS_LOSS_NORMALIZATIONS

    assert tuple(downstream.PROTOCOLS) == specs.TASKS
    for task in specs.TASKS:
        module = downstream.protocol(task)
        assert module.ARGUMENTS is specs.TASK_ARGUMENTS[task] and module.DEFAULTS is specs.TASK_DEFAULTS[task]
    assert specs.INITS == INITS and specs.CLASS_LOSS_NORMALIZATIONS == CLASS_LOSS_NORMALIZATIONS
    assert specs.ATTENTION_DIRECTIONS == ATTENTION_DIRECTIONS
    assert specs.DEFAULT_ATTENTION_DIRECTION == DEFAULT_ATTENTION_DIRECTION


def test_evaluate_help_imports_no_protocol_and_no_torch():
    """`cgns evaluate --help` builds the whole parser from specs (BENCHMARKS.md: 6.3 s -> 0.7 s)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from cgns.cli import main\n"
            "try:\n    main(['evaluate', '--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers.trainer', 'cgns.downstream.classification',\n"
            "                           'cgns.downstream.embeddings', 'data_scripts') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    assert "--selection_metric" in out and "--cluster_batch_size" in out and "--attention_direction" in out
    assert "HEAVY []" in out, out[-500:]


def test_help_states_the_per_task_defaults(capsys):
    with pytest.raises(SystemExit):
        td.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "classification 100, detection 50, segmentation 50" in out
    assert "segmentation 0.05" in out  # E.3's weight decay


def test_arguments_are_typed_dataclasses():
    fields = {f.name: f.type for dtype in argument_dataclasses() for f in dtype.__dataclass_fields__.values()}
    assert fields["data_pct"] is float and fields["gradient_accumulation_steps"] is int
    args = td.parse_args(BASE + ["--seeds", "3", "4", "--lr", "1e-3", "--dataset_options", "num_images=20",
                                 "flag=true", "name=abc"])
    assert args.seeds == [3, 4] and args.lr == 1e-3 and isinstance(args.lr, float)
    assert args.dataset_options == {"num_images": 20, "flag": True, "name": "abc"}
    assert (args.mode, args.max_epochs, args.batch_size, args.weight_decay) == ("cached", 100, 48, 1e-6)


def test_trainer_options_reach_training_arguments(tmp_path):
    args = td.parse_args(BASE + ["--no_cache", "--report_to", "tensorboard", "--bf16", "--max_grad_norm", "0",
                                 "--gradient_accumulation_steps", "3", "--dataloader_num_workers", "2"])
    training = training_arguments(args, str(tmp_path), seed=0)
    assert training.report_to == ["tensorboard"] and training.max_grad_norm == 0.0
    assert training.bf16 and training.gradient_accumulation_steps == 3 and training.dataloader_num_workers == 2
    assert not training.save_only_model   # image modes keep optimiser state so that a run can be resumed
    # the old spelling still works and feeds the same field
    assert td.parse_args(BASE + ["--num_workers", "4"]).num_workers == 4
    cached = training_arguments(td.parse_args(BASE + ["--num_workers", "4"]), str(tmp_path), seed=0)
    assert cached.dataloader_num_workers == 0 and cached.save_only_model and cached.report_to == []
    assert cached.max_grad_norm == 1.0   # the Trainer's default, listed in docs/linear_probe.md


@pytest.mark.parametrize("extra, message", [
    (["--max_epochs", "0"], "--max_epochs: must be >= 1"),
    (["--batch_size", "0"], "--batch_size: must be >= 1"),
    (["--patience", "0"], "--patience: must be >= 1"),
    (["--lr", "0"], "--lr: must be > 0"),
    (["--augment", "--no_cache"], "not allowed with argument --augment"),
    (["--resume_from_checkpoint", "true"], "cached-features mode keeps no checkpoint"),
    (["--no_cache", "--seeds", "0", "1", "--resume_from_checkpoint", "some/dir"], "belongs to one seed"),
    (["--dataset_options", "novalue"], "key=value"),
])
def test_bad_values_exit_with_one_line_naming_the_option(extra, message, capsys):
    with pytest.raises(SystemExit) as info:
        td.parse_args(BASE + extra)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_max_epochs_zero_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        td.main(BASE[:-1] + [str(out), "--max_epochs", "0"])
    assert "--max_epochs" in capsys.readouterr().err
    assert not out.exists()   # no results.json with the AUROC of an untrained head


def test_detection_refuses_trainer_only_options():
    for extra in (["--bf16"], ["--gradient_accumulation_steps", "2"], ["--report_to", "tensorboard"],
                  ["--max_grad_norm", "0"]):
        args = td.parse_args(["--task", "detection"] + BASE + extra)
        with pytest.raises(ValueError, match="Trainer option"):
            td.check_task(args)
    td.check_task(td.parse_args(["--task", "detection"] + BASE + ["--dataloader_num_workers", "1"]))


def tiny_split_dict(n=(12, 4, 4)):
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(),
                                  "labels": datasets.List(datasets.Value("float32"), length=2)})
    splits = {}
    for name, count in zip(("train", "validation", "test"), n):
        labels = (rng.random((count, 2)) < 0.5).astype(np.float32)
        labels[0], labels[1] = 1.0, 0.0
        splits[name] = datasets.Dataset.from_dict(
            {"image": [rng.integers(0, 256, (64, 64), dtype=np.uint8) for _ in range(count)],
             "labels": labels.tolist()}, features=features)
    return datasets.DatasetDict(splits)


def test_resume_from_checkpoint_continues_an_image_mode_run(tmp_path):
    """--no_cache run of 2 epochs, then --resume_from_checkpoint true: the Trainer restarts at the end."""
    torch.manual_seed(0)
    model = CGNSForImageClassification(tiny_config(num_labels=2, problem_type="multi_label_classification"))
    processor = CGNSImageProcessor(image_size=64, resize_size=72)
    splits = classification.build_datasets(model, tiny_split_dict(), processor, SPEC.problem_type, "uncached")
    common = BASE[:-1] + [str(tmp_path), "--no_cache", "--batch_size", "4", "--max_epochs", "2", "--quiet"]
    first = classification.train_probe(model, splits, SPEC, td.parse_args(common), seed=0,
                                       output_dir=str(tmp_path))
    head = model.classifier.weight.detach().clone()
    assert first.state.global_step == 6
    checkpoints = os.listdir(tmp_path / "checkpoints")
    assert any(name.startswith("checkpoint-") for name in checkpoints)
    resumed = classification.train_probe(model, splits, SPEC,
                                         td.parse_args(common + ["--resume_from_checkpoint", "true"]),
                                         seed=0, output_dir=str(tmp_path))
    # resumed at step 6 of 6: no further step, and the best head restored is the first run's
    assert resumed.state.global_step == 6
    assert len([log for log in resumed.state.log_history if "eval_loss" in log]) == 2
    torch.testing.assert_close(model.classifier.weight, head)


__all__ = []
