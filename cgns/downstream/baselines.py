"""Fill one row of the baseline tables (docs/baselines.md) for one CGNS export, e.g. a converted MGCA model.

    python -m cgns.downstream.baselines --model mgca-resnet50 --name "MGCA ResNet-50 (converted)" \
        --output_dir runs/mgca-resnet50 --table docs/baselines.md \
        --data_dir chexpert=/data/CheXpert-v1.0 rsna=/data/rsna \
        covidx=/data/covidx siim=/data/siim object_cxr=/data/object-cxr

Recipe: for every column of the two tables (linear probe on CheXpert / RSNA / COVIDx; segmentation on
SIIM / RSNA; detection on RSNA / Object-CXR) and every label fraction (1 / 10 / 100 %), run
``python -m cgns.downstream`` as a subprocess with the protocol's defaults (docs/linear_probe.md,
docs/segmentation.md, docs/detection.md) -> read its
``results.json`` -> format mean ± std over the seeds -> replace or append this export's row in the two
tables of ``--table`` (default ``<output_dir>/baselines.md``; rows go above the ``<!-- baselines:... -->``
markers; a file without them gets the tables appended). Relative paths are the caller's: the runs start in
the caller's working directory.

A run whose ``results.json`` already exists is reused (delete it, or pass ``--rerun``, to run again),
so an interrupted sweep resumes. A dataset without ``--data_dir`` is left out ("not run"), detection on
a ViT export is "n/a" (E.2 is ResNet-only), and a failed run is reported in its cell with the path of its
log, never silently dropped. Detection cells show the mAP with MGCA's evaluation quirks (the number the
published tables report) and, in brackets, the correct mAP.
"""
import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from typing import Dict, List, NamedTuple, Optional, Sequence

from cgns.processes import child_env

# python's -m flag joined with its module, one argv item: a cell's command is [python, TRAIN_ENTRY, *options]
TRAIN_ENTRY = "-mcgns.downstream"
PCTS = (0.01, 0.1, 1.0)


class Column(NamedTuple):
    """One dataset x protocol group of three table columns (one per label fraction)."""

    title: str
    task: str       # cgns evaluate --task
    dataset: str    # cgns evaluate --dataset
    dataset_task: str
    table: str      # "classification" or "dense"


COLUMNS = (
    Column("CheXpert", "classification", "chexpert", "classification", "classification"),
    Column("RSNA", "classification", "rsna", "classification", "classification"),
    Column("COVIDx", "classification", "covidx", "classification", "classification"),
    Column("SIIM", "segmentation", "siim", "segmentation", "dense"),
    Column("RSNA-seg", "segmentation", "rsna", "segmentation", "dense"),
    Column("RSNA-det", "detection", "rsna", "detection", "dense"),
    Column("Obj-CXR", "detection", "object_cxr", "detection", "dense"),
)
TABLES = {
    "classification": "Linear classification (CheXpert / RSNA: AUROC %, COVIDx: accuracy %)",
    "dense": "Segmentation (Dice %) and detection (mAP %: MGCA-quirked [correct])",
}


def marker(table: str) -> str:
    return f"<!-- baselines:{table} -->"


def table_header(table: str) -> str:
    titles = [c.title for c in COLUMNS if c.table == table]
    cells = " | ".join(f"{t} {100 * p:g} %" for t in titles for p in PCTS)
    return (f"| model | source | {cells} |\n"
            f"|---|---|{'---|' * (len(titles) * len(PCTS))}")


# --------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------

def run_dir(output_dir: str, column: Column, pct: float) -> str:
    return os.path.join(output_dir, f"{column.task}-{column.dataset}-{100 * pct:g}pct")


def train_command(args: argparse.Namespace, column: Column, pct: float) -> List[str]:
    """The ``python -m cgns.downstream`` command line of one cell."""
    return [sys.executable, args.train_entry, "--task", column.task, "--dataset", column.dataset,
            "--dataset_task", column.dataset_task, "--data_dir", args.data_dir[column.dataset],
            "--data_pct", f"{pct:g}", "--model", args.model, "--output_dir", run_dir(args.output_dir, column, pct),
            "--seeds", *map(str, args.seeds), "--quiet", *shlex.split(args.train_args)]


def run_command(command: List[str], log_path: str) -> int:
    """Run one protocol, its output to ``log_path``; returns the exit status."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=child_env()).returncode


def is_token_tower(model: str) -> bool:
    """True for a ViT export (read from its config.json; a hub id is assumed to be a ResNet)."""
    config_path = os.path.join(model, "config.json")
    if not os.path.isfile(config_path):
        return False
    with open(config_path) as f:
        architecture = json.load(f).get("vision_config", {}).get("architecture", "")
    return architecture.startswith(("vit_", "deit_"))


def format_mean_std(stat: Dict) -> str:
    """``{"mean": 0.761, "std": 0.012}`` -> ``"76.1 ± 1.2"``: cgns.downstream.common's format (a test keeps
    them equal), repeated so that the sweep itself never imports torch."""
    return "undefined" if stat["mean"] is None else f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def format_cell(results: Dict) -> str:
    """A run's results.json -> its table cell (detection: quirked mAP [correct mAP])."""
    summary = results["summary"]
    if results.get("task") == "detection":
        return f"{format_mean_std(summary['map_mgca'])} [{format_mean_std(summary['map'])}]"
    return format_mean_std(summary[results["metric"]])


def run_cell(args: argparse.Namespace, column: Column, pct: float, vit: bool) -> str:
    """Run (or reuse) one cell and return its text."""
    if column.task == "detection" and vit:
        return "n/a (ResNet only)"
    if column.dataset not in args.data_dir:
        return "not run"
    out = run_dir(args.output_dir, column, pct)
    results_path = os.path.join(out, "results.json")
    command = train_command(args, column, pct)
    print(f"[{column.title} {100 * pct:g} %] {shlex.join(command)}", flush=True)
    if args.dry_run:
        return "dry run"
    if args.rerun or not os.path.isfile(results_path):
        log_path = os.path.join(out, "train_downstream.log")
        status = run_command(command, log_path)
        if status != 0 or not os.path.isfile(results_path):
            print(f"  failed (exit status {status}); log: {log_path}", flush=True)
            return f"failed (exit {status}, {os.path.relpath(log_path, args.output_dir)})"
    with open(results_path) as f:
        cell = format_cell(json.load(f))
    print(f"  {cell}", flush=True)
    return cell


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------

def markdown_row(name: str, source: str, cells: Sequence[str]) -> str:
    return "| " + " | ".join([name, source, *cells]) + " |"


def insert_row(text: str, table: str, row: str) -> str:
    """``text`` with ``row`` above the table's marker, replacing an earlier measured row of the same name."""
    name_cell = row.split("|")[1].strip()
    lines = text.splitlines()
    if marker(table) not in lines:
        lines += ["", f"### {TABLES[table]} (measured here)", "", table_header(table), marker(table)]
    end = lines.index(marker(table))
    start = end
    while start > 0 and lines[start - 1].startswith("|"):
        start -= 1
    for i in range(start, end):
        cells = [c.strip() for c in lines[i].split("|")]
        # only an earlier measured row of this name is replaced, never a published one
        if len(cells) > 2 and cells[1] == name_cell and cells[2].startswith("measured here"):
            lines[i] = row
            break
    else:
        lines.insert(end, row)
    return "\n".join(lines) + "\n"


def update_table(path: str, rows: Dict[str, str]) -> None:
    text = open(path).read() if os.path.isfile(path) else "# Baselines under the same protocol\n"
    for table, row in rows.items():
        text = insert_row(text, table, row)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------

def parse_data_dirs(items: Sequence[str]) -> Dict[str, str]:
    known = {c.dataset for c in COLUMNS}
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in known:
            raise argparse.ArgumentTypeError(f"--data_dir takes DATASET=PATH with DATASET in {sorted(known)}, "
                                             f"got {item!r}")
        out[name] = path
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="CGNS export (folder or hub id), e.g. from convert_mgca")
    p.add_argument("--name", default=None, help="row label (default: the export's folder name)")
    p.add_argument("--output_dir", required=True, help="one sub-folder per run, with its results and log")
    p.add_argument("--data_dir", nargs="*", default=[], metavar="DATASET=PATH",
                   help="raw dataset folders: chexpert, rsna, covidx, siim, object_cxr (missing ones are not run)")
    p.add_argument("--tables", nargs="+", choices=sorted(TABLES), default=sorted(TABLES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--table", default=None,
                   help="markdown file whose tables get the row (in a clone: docs/baselines.md); default "
                        "<output_dir>/baselines.md")
    p.add_argument("--train_args", default="", help="extra `cgns evaluate` arguments, e.g. '--num_workers 8'")
    p.add_argument("--train_entry", default=TRAIN_ENTRY,
                   help="what python runs for a cell: -m<module> or a script path")
    p.add_argument("--rerun", action="store_true", help="run again even where results.json exists")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing, write no row")
    args = p.parse_args(argv)
    try:
        args.data_dir = parse_data_dirs(args.data_dir)
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    if args.name is None:
        args.name = os.path.basename(os.path.normpath(args.model))
    if args.table is None:
        args.table = os.path.join(args.output_dir, "baselines.md")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Run the sweep; returns ``{table: row}`` (also written into ``--table`` unless ``--dry_run``)."""
    args = parse_args(argv)
    vit = is_token_tower(args.model)
    source = (f"measured here: `{args.model}`, {datetime.date.today().isoformat()}, "
              f"seeds {' '.join(map(str, args.seeds))}")
    rows = {}
    for table in args.tables:
        cells = [run_cell(args, column, pct, vit) for column in COLUMNS if column.table == table for pct in PCTS]
        rows[table] = markdown_row(args.name, source, cells)
    if not args.dry_run:
        update_table(args.table, rows)
        print(f"rows written to {args.table}:")
    for row in rows.values():
        print(row)
    return rows


if __name__ == "__main__":
    main()

__all__ = ["main", "parse_args", "COLUMNS", "PCTS", "Column", "TRAIN_ENTRY", "train_command", "run_cell", "format_cell",
           "format_mean_std",
           "insert_row", "update_table", "markdown_row", "table_header", "is_token_tower"]
