"""The ``cgns`` console command (installed by ``pip install cm-cgns``; see setup.cfg ``console_scripts``).

::

    cgns prepare <dataset> ...   build a dataset's Arrow files + manifest (data_scripts.<dataset>)
    cgns pretrain ...            CM-CGNS pretraining (cgns.pretraining; train_pretrain.py in a clone)
    cgns evaluate ...            downstream protocols (cgns.downstream; train_downstream.py in a clone)
    cgns visualize ...           loss curves of a pretraining run (metrics.jsonl -> PNG)
    cgns demo ...                the whole pipeline on the synthetic data (cgns.experiments.demo; `make demo`)

Every subcommand documents its options with ``cgns <command> --help``. The work is done by the
same ``main(argv)`` functions as ``python -m cgns.pretraining`` etc., imported only when chosen (so
``cgns --help`` is fast).
"""
import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

# data_scripts.DATASETS, spelled out: importing data_scripts loads every builder (datasets, torch, transformers:
# seconds) only to list the names in `cgns prepare --help` (tests/test_console.py checks the two agree)
PREPARE_DATASETS = ("synthetic_cxr", "mimic_cxr", "chexpert", "rsna", "covidx", "siim", "object_cxr", "ms_cxr",
                    "iu_xray")
HELP_FLAGS = ("-h", "--help")

COMMANDS = {
    "prepare": "build a dataset's Arrow files and manifest from its published files (data_scripts)",
    "pretrain": "CM-CGNS image-report pretraining, two stages, exports final/ (cgns.pretraining)",
    "evaluate": "downstream protocols on an export: linear probe, segmentation, detection, retrieval, zero-shot, "
                "grounding, visualize (cgns.downstream)",
    "visualize": "plot the loss curves of a pretraining run (its metrics.jsonl) to a PNG",
    "demo": "the whole pipeline on the embedded synthetic data, offline on a CPU (make demo; cgns.experiments)",
}


def _exit_code(result) -> int:
    return result if isinstance(result, int) else 0


def prepare(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cgns prepare", description=COMMANDS["prepare"] + ". The options after the dataset name are the "
        "dataset builder's own: see `cgns prepare <dataset> --help`.")
    parser.add_argument("dataset", choices=PREPARE_DATASETS, help="which dataset to build")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the builder's options (--data_dir, "
                        "--output_dir, --task, ...)")
    args = parser.parse_args(argv)
    import data_scripts

    return _exit_code(data_scripts.dataset_module(args.dataset).main(args.options))


def _run_main(main: Callable[[List[str]], object], prog: str, argv: Sequence[str]) -> int:
    # The parsers take their usage line from sys.argv[0]: show `cgns <command>` there.
    saved, sys.argv[0] = sys.argv[0], prog
    try:
        main(list(argv))    # returns a summary dict
    finally:
        sys.argv[0] = saved
    return 0


def pretrain(argv: Sequence[str]) -> int:
    if any(flag in argv for flag in HELP_FLAGS):
        # the options are the argument dataclasses': no need to import the recipe (torch, accelerate, the model)
        from cgns.pretraining.arguments import parse_args as main
    else:
        from cgns.pretraining.cli import main

    return _run_main(main, "cgns pretrain", argv)


def evaluate(argv: Sequence[str]) -> int:
    if any(flag in argv for flag in HELP_FLAGS):
        # the options are the argument dataclasses (cgns.downstream.specs): no protocol, torch or Trainer import
        from cgns.downstream.arguments import parse_args as main
    else:
        from cgns.downstream.cli import main

    return _run_main(main, "cgns evaluate", argv)


def demo(argv: Sequence[str]) -> int:
    from cgns.experiments.demo import main

    return _run_main(main, "cgns demo", argv)


def visualize(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="cgns visualize", description=COMMANDS["visualize"] + ".")
    parser.add_argument("run", help="a pretraining output_dir (holding metrics.jsonl) or a metrics.jsonl file")
    parser.add_argument("--output", default=None,
                        help="PNG to write; default loss_curves.png beside metrics.jsonl")
    args = parser.parse_args(argv)
    metrics = os.path.join(args.run, "metrics.jsonl") if os.path.isdir(args.run) else args.run
    if not os.path.isfile(metrics):
        parser.error(f"no metrics file at {metrics!r} (pass a pretraining output_dir or its metrics.jsonl)")
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(metrics)), "loss_curves.png")
    from cgns.pretraining.plots import plot_loss_curves

    path = plot_loss_curves(metrics, output)
    print(path)
    return 0


DISPATCH: Dict[str, Callable[[Sequence[str]], int]] = {
    "prepare": prepare, "pretrain": pretrain, "evaluate": evaluate, "visualize": visualize, "demo": demo}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cgns", description="CM-CGNS: chest X-ray image-report pretraining and evaluation on the Hugging Face "
        "stack.", epilog="Run `cgns <command> --help` for the options of a command.")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, text in COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in DISPATCH:
        build_parser().parse_args(argv[:1])      # prints the usage (or the help) and exits
    return DISPATCH[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "COMMANDS", "DISPATCH", "PREPARE_DATASETS", "build_parser"]
