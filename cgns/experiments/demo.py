"""`make demo`: the whole CGNS pipeline on the embedded synthetic chest X-rays, offline, on a CPU.

Phases (one progress bar each, a short summary after each, the results table last):

1. data: generate the synthetic image-report pairs and their labels (data_scripts.synthetic_cxr);
2. pretraining: ``accelerate launch -m cgns.pretraining --config demo`` (two stages,
   clustering on), export ``final/`` with ``save_pretrained``; the same model before any training
   (same seed, same towers) is exported as the random-init baseline;
3. evaluation of both on the synthetic test split: image<->report retrieval (Recall@1/5/10),
   zero-shot classification from prompts (macro AUROC) and the pointing game of the local
   cross-attention (docs/evaluation.md);
4. linear probes of both frozen image encoders at 1 %, 10 % and 100 % of the training labels,
   protocol-faithful (docs/linear_probe.md) and on standardised features (``python -m cgns.downstream``,
   cached features);
5. report: ``<output_dir>/results.json`` (every number, read from the protocols' own results files),
   ``results.md`` (tables written from results.json), ``results.png`` (loss curves, retrieval /
   zero-shot / grounding, probes) and ``clustering.png`` (clustering diagnostics over training).

``--ablation`` (``make ablation``) instead pretrains every variant of ``ABLATIONS`` with each of
``--ablation_seeds`` (default 3 seeds), evaluates each on retrieval, zero-shot, grounding and the
probe, and writes ``ablation.md`` / ``ablation.json``: mean ± std per variant and, per component,
whether removing it separates from seed noise (Welch's t-test against the full model).
"""
import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from cgns.configs import config_path, read_config
from cgns.processes import child_env
from cgns.pretraining.plots import read_metrics

FRACTIONS = (0.01, 0.1, 1.0)
# variant -> pretraining overrides (None: no pretraining, the untrained model of the same seed)
ABLATIONS = {
    "CGNS (full)": [],
    "no clustering": ["--use_clustering", "false"],
    "no false-negative handling": ["--false_negative_handling", "bml", "--bml_weight", "0"],
    "no hard negatives": ["--use_hard_negatives", "false"],
    "no CM-MIR": ["--use_reconstruction", "false"],
    "global loss only": ["--use_clustering", "false", "--use_reconstruction", "false",
                         "--local_image_loss_weight", "0", "--local_text_loss_weight", "0"],
    "random init": None,
}
# what `make ablation` runs by default (--ablation_variants picks others, e.g. "no CM-MIR")
DEFAULT_ABLATIONS = ["CGNS (full)", "no clustering", "no false-negative handling", "no hard negatives",
                     "global loss only", "random init"]
# what each ablation row removes, for the per-component statement
COMPONENTS = {
    "no clustering": "the clustering (hard negatives and false-negative handling)",
    "no false-negative handling": "false-negative handling (removal from the denominator and BML)",
    "no hard negatives": "clustering-guided hard negatives",
    "no CM-MIR": "cross-modal masked image reconstruction",
    "global loss only": "all local terms (local alignment, clustering, CM-MIR)",
    "random init": "pretraining itself",
}
# the headline metrics of one evaluated model: (results.json key, label); all fractions, shown in %
METRICS = (
    ("i2t_R@1", "i2t R@1 (%)"), ("t2i_R@1", "t2i R@1 (%)"), ("zero_shot_auroc", "zero-shot AUROC (%)"),
    ("pointing_game", "pointing game (%)"), ("probe_auroc", "probe AUROC (%)"),
    ("fn_precision", "FN precision (%)"),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="demo", help="a packaged config by name or a JSON file")
    p.add_argument("--output_dir", default=os.path.join("outputs", "demo"))
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="probe seeds (mean ± std)")
    p.add_argument("--probe_max_epochs", type=int, default=100)
    p.add_argument("--probe_jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="probe runs side by side, each in its own process with cpu_count / probe_jobs threads "
                        "(a cached probe trains on one thread, so two use both cores of a 2-core machine); "
                        "1 runs them one after the other in this process (as --verbose does)")
    p.add_argument("--ablation", action="store_true", help="run the ablation (make ablation) instead of the demo")
    p.add_argument("--ablation_seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="pretraining seeds per ablation variant (mean ± std over them)")
    p.add_argument("--ablation_fraction", type=float, default=0.1, help="label fraction of the ablation's probe")
    p.add_argument("--ablation_variants", nargs="+", default=DEFAULT_ABLATIONS, choices=list(ABLATIONS),
                   metavar="VARIANT", help="subset of: " + ", ".join(ABLATIONS))
    p.add_argument("--num_processes", type=int, default=1,
                   help="pretraining processes (>1 starts a real multi-process gloo run on CPU)")
    p.add_argument("--verbose", action="store_true", help="show every log line of the steps")
    p.add_argument("--pretrain_args", nargs=argparse.REMAINDER, default=[],
                   help="extra pretraining overrides, e.g. --pretrain_args --num_images 200 --stage1_epochs 1")
    args = p.parse_args(argv)
    if args.probe_jobs < 1:
        p.error(f"--probe_jobs must be at least 1, got {args.probe_jobs}")
    # the child processes start in this working directory too, but absolute paths keep the files' records clear
    args.output_dir = os.path.abspath(args.output_dir)
    try:
        args.config = os.path.abspath(config_path(args.config))
    except FileNotFoundError as error:
        p.error(str(error))
    return args


# --------------------------------------------------------------------------------------------------
# console
# --------------------------------------------------------------------------------------------------

def banner(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def phase_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="job", dynamic_ncols=True, leave=True)


@contextlib.contextmanager
def quiet_step(verbose: bool, log_path: str):
    """Run an in-process step with its stdout/stderr (library bars, log lines) sent to ``log_path``."""
    if verbose:
        yield
        return
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        handler = logging.StreamHandler(log)
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            yield
        finally:
            root.removeHandler(handler)


def override(args: List[str], key: str, default):
    """Value of ``--key`` in an override list, else ``default``."""
    flag = f"--{key}"
    return type(default)(args[args.index(flag) + 1]) if flag in args else default


# --------------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------------

def generate_data(config: Dict, cache_dir: str, pretrain_args: List[str]) -> Dict:
    import data_scripts
    from modeling_cgns.processing_cgns import default_resize_size

    # render at the size the pretraining script renders (its resize size), so every step shares one cache
    image_size = override(pretrain_args, "image_size", int(config.get("image_size", 224)))
    render_size = int(config.get("render_size") or default_resize_size(image_size))
    # the lesion contrast the pretraining saw, for every downstream task of the demo
    options = dict(num_images=override(pretrain_args, "num_images", int(config.get("num_images", 2000))),
                   image_size=override(pretrain_args, "render_size", render_size),
                   lesion_contrast_scale=override(pretrain_args, "lesion_contrast_scale",
                                                  float(config.get("lesion_contrast_scale", 1.0))))
    sizes = {}
    for task in ("pretraining", "classification", "grounding"):
        dd = data_scripts.load_cgns_dataset("synthetic_cxr", task=task, cache_dir=cache_dir, **options)
        sizes[task] = {split: len(ds) for split, ds in dd.items()}
    return {"options": options, "sizes": sizes}


def pretrain(config_path: str, output_dir: str, cache_dir: str, extra: List[str], num_processes: int,
             verbose: bool, log_path: Optional[str] = None) -> str:
    """``accelerate launch -m cgns.pretraining --config ...``; returns the export folder. With ``log_path``
    the run's whole output (its progress bar included) goes to that file instead of the console."""
    import torch

    threads = max(1, (os.cpu_count() or 1) // max(1, num_processes))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(threads)]
    if num_processes > 1:
        # `--cpu --num_processes 2` would silently start ONE process (ENVIRONMENT.md)
        launcher += ["--multi_gpu", "--num_processes", str(num_processes)]
    else:
        launcher += ["--num_processes", "1"] + ([] if torch.cuda.is_available() else ["--cpu"])
    # a re-run of the demo replaces the previous one (pretraining refuses that without the flag)
    command = launcher + ["-m", "cgns.pretraining", "--config", config_path,
                          "--output_dir", output_dir, "--cache_dir", cache_dir, "--overwrite_output_dir", "true"]
    if not verbose:
        command += ["--log_level", "warning"]
    command += extra
    shown = "$ " + " ".join(command[1:]).replace("-m accelerate.commands.launch", "accelerate launch")
    env = child_env()
    if not verbose:
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"   # the towers' "Loading weights" / "Writing shards" bars
    if log_path is None:
        print(shown, flush=True)
        subprocess.run(command, check=True, env=env)
    else:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "a") as log:
            log.write(shown + "\n")
            log.flush()
            result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode:
            raise RuntimeError(f"pretraining failed (exit {result.returncode}); its output is in {log_path}")
    return os.path.join(output_dir, "final")


def export_untrained(config_path: str, extra: List[str], output_dir: str) -> str:
    """The model pretraining starts from (same config, overrides and seed), saved untrained:
    the random-init baseline of the encoder-only evaluations."""
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from cgns.pretraining.arguments import parse_args as parse_pretraining_args
    from cgns.pretraining.build import build_model, build_processor

    PartialState()  # the pretraining helpers log through accelerate, which needs its state
    # one process: pretraining's device_specific seed (seed + process index 0) is the seed itself

    config = parse_pretraining_args(["--config", config_path, "--output_dir", output_dir] + extra)
    set_seed(config.training.seed)
    model = build_model(config.model)
    processor = build_processor(model, config.model, config.data)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def run_downstream(argv: List[str]) -> Dict:
    from cgns.downstream.cli import main

    return main(argv)


def dataset_options_argv(data_options: Dict) -> List[str]:
    return ["--dataset_options", *(f"{k}={v}" for k, v in data_options.items())]


def evaluate_encoder(model_dir: str, output_dir: str, cache_dir: str, data_options: Dict) -> Dict:
    """Retrieval, zero-shot and grounding of one export on the synthetic test split; their results files
    go to ``output_dir/{retrieval,zero_shot,grounding}/results.json``."""
    common = ["--dataset", "synthetic_cxr", "--split", "test", "--model", model_dir, "--cache_dir", cache_dir,
              "--quiet", "true", *dataset_options_argv(data_options)]
    out = {}
    for task, dataset_task in (("retrieval", "grounding"), ("zero_shot", "classification"),
                               ("grounding", "grounding")):
        run_downstream(["--task", task, "--dataset_task", dataset_task,
                        "--output_dir", os.path.join(output_dir, task), *common])
        out[task] = os.path.join(output_dir, task, "results.json")
    return out


def probe_argv(model_dir: str, init: str, fraction: float, standardize: bool, output_dir: str, cache_dir: str,
               data_options: Dict, seeds: List[int], max_epochs: int) -> List[str]:
    return ["--task", "classification", "--dataset", "synthetic_cxr", "--data_pct", str(fraction),
            "--model", model_dir, "--init", init, "--output_dir", output_dir, "--cache_dir", cache_dir,
            "--max_epochs", str(max_epochs), "--seeds", *map(str, seeds), "--quiet", "true",
            "--standardize_features", str(standardize).lower(), *dataset_options_argv(data_options)]


def probe(model_dir: str, init: str, fraction: float, standardize: bool, output_dir: str, cache_dir: str,
          data_options: Dict, seeds: List[int], max_epochs: int) -> str:
    run_downstream(probe_argv(model_dir, init, fraction, standardize, output_dir, cache_dir, data_options, seeds,
                              max_epochs))
    return os.path.join(output_dir, "results.json")


def run_parallel(commands: List[Sequence[str]], log_paths: List[str], workers: int, on_done) -> None:
    """``python -m cgns.downstream <argv>`` for every argv, ``workers`` at a time, each with
    ``cpu_count // workers`` threads and its output in its log file; ``on_done(i)`` after command i ends.
    A failure stops the phase with the failing command's log named (the others still finish)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env = dict(child_env(), OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, HF_HUB_DISABLE_PROGRESS_BARS="1")

    def one(i: int) -> int:
        os.makedirs(os.path.dirname(log_paths[i]), exist_ok=True)
        with open(log_paths[i], "w") as log:
            return subprocess.run([sys.executable, "-m", "cgns.downstream", *commands[i]], env=env, stdout=log,
                                  stderr=subprocess.STDOUT).returncode

    failed = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(one, i): i for i in range(len(commands))}
        for future in as_completed(futures):
            i = futures[future]
            if future.result():
                failed.append(log_paths[i])
            else:
                on_done(i)
    if failed:
        raise RuntimeError(f"{len(failed)} probe job(s) failed; their output is in {', '.join(sorted(failed))}")


# --------------------------------------------------------------------------------------------------
# reading the results files (every number of the tables comes from here)
# --------------------------------------------------------------------------------------------------

def read_json(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)


def training_records(pretrain_dir: str, split: str = "train") -> List[Dict]:
    """The run's ``metrics.jsonl`` records of ``split`` (train | eval) in step order, a step re-logged after a
    resume counted once (its later record); ``[]`` without the file."""
    path = os.path.join(pretrain_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    by_step = read_metrics(path)[0 if split == "train" else 1]
    return [by_step[step] for step in sorted(by_step)]


def encoder_summary(files: Dict[str, str]) -> Dict:
    """The headline numbers of one evaluated model, read from its three results files."""
    retrieval = read_json(files["retrieval"])
    zero_shot = read_json(files["zero_shot"])
    grounding = read_json(files["grounding"])
    r, g = retrieval["test"], grounding["test"]
    return {
        "num_pairs": retrieval["num_pairs"], "retrieval_chance_R@1": 1.0 / retrieval["num_pairs"],
        **{key: r[key] for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10",
                                   "i2t_median_rank", "t2i_median_rank")},
        "zero_shot_auroc": zero_shot["test"]["auroc"], "zero_shot_auroc_per_class": zero_shot["test"]["auroc_per_class"],
        "pointing_game": g["pointing_game"], "uniform_pointing_game": g["uniform_pointing_game"],
        "pointing_game_gain": g["pointing_game_gain"], "pointing_game_gain_ci95": g["pointing_game_gain_ci95"],
        "sentence_specificity": g["sentence_specificity"], "sentence_specificity_ci95": g["sentence_specificity_ci95"],
        "specificity_images": g["specificity_images"],
        "attention_direction": grounding["attention_direction"],
        "attention_mass_in_box": g["attention_mass_in_box"],
        "uniform_attention_mass_in_box": g["uniform_attention_mass_in_box"], "grounding_queries": g["num_queries"],
        "files": files,
    }


def probe_summary(path: str) -> Dict:
    result = read_json(path)
    return {"auroc": result["summary"]["auroc"], "file": path}


# --------------------------------------------------------------------------------------------------
# tables and pictures (written from results.json only)
# --------------------------------------------------------------------------------------------------

def fmt(stat: Dict) -> str:
    from cgns.downstream.common import format_mean_std

    return format_mean_std(stat)


def retrieval_chance(summary: Dict, k: int) -> float:
    """Recall@k of a random ranking over the summary's test pairs."""
    return min(1.0, k * summary["retrieval_chance_R@1"])


def pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def format_specificity(summary: Dict) -> str:
    """Sentence specificity ``+d ± ci`` in points (``n/a`` without a pair of findings in different cells)."""
    from cgns.downstream.grounding import format_specificity as format_scores

    return format_scores(summary)


def gain(summary: Dict) -> str:
    """Pointing game minus its uniform baseline with the 95 % interval, in points."""
    return f"{100 * summary['pointing_game_gain']:+.1f} ± {100 * summary['pointing_game_gain_ci95']:.1f}"


def encoder_table(results: Dict) -> str:
    enc = results["encoders"]
    p, r = enc["pretrained"], enc["random"]
    lines = ["| synthetic test split | CGNS-pretrained | random init | chance / uniform |", "|---|---|---|---|"]
    for key, label in (("i2t_R@1", "image→report R@1 (%)"), ("t2i_R@1", "report→image R@1 (%)"),
                       ("i2t_R@5", "image→report R@5 (%)"), ("t2i_R@5", "report→image R@5 (%)")):
        base = pct(retrieval_chance(p, int(key[-1])))
        lines.append(f"| {label} | {pct(p[key])} | {pct(r[key])} | {base} |")
    lines.append(f"| image→report / report→image R@1 ÷ chance | {p['i2t_R@1'] / p['retrieval_chance_R@1']:.1f}x / "
                 f"{p['t2i_R@1'] / p['retrieval_chance_R@1']:.1f}x | {r['i2t_R@1'] / r['retrieval_chance_R@1']:.1f}x"
                 f" / {r['t2i_R@1'] / r['retrieval_chance_R@1']:.1f}x | 1.0x |")
    lines.append(f"| zero-shot macro AUROC (%) | {pct(p['zero_shot_auroc'])} | {pct(r['zero_shot_auroc'])} | 50.0 |")
    lines.append(f"| pointing game (%) | {pct(p['pointing_game'])} | {pct(r['pointing_game'])} | "
                 f"{pct(p['uniform_pointing_game'])} |")
    lines.append(f"| pointing game − uniform (points, 95 % CI) | {gain(p)} | {gain(r)} | 0 |")
    lines.append(f"| sentence specificity (points, 95 % CI) | {format_specificity(p)} | {format_specificity(r)} | 0 |")
    lines.append(f"| attention mass in box (%) | {pct(p['attention_mass_in_box'])} | {pct(r['attention_mass_in_box'])} | "
                 f"{pct(p['uniform_attention_mass_in_box'])} |")
    lines.append("")
    lines.append(f"{p['num_pairs']} test pairs (chance R@1 = 1/{p['num_pairs']}); {p['grounding_queries']} grounding "
                 f"queries (report sentences naming a drawn finding with a box; {p['attention_direction']} attention "
                 f"maps); sentence specificity over the {p['specificity_images']} images with two findings in "
                 f"different cells (own-finding hit minus the other sentence's map's hit; 0 for a map that ignores "
                 f"the sentence).")
    return "\n".join(lines)


def probe_table(results: Dict) -> str:
    fractions = results["fractions"]
    probes = results["probes"]
    lines = ["| linear probe (test macro AUROC, %) | " + " | ".join(f"{100 * f:g} % labels" for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    for mode, mode_name in (("protocol", "protocol (E.1)"), ("standardized", "standardised features")):
        for init, name in (("pretrained", "CGNS-pretrained"), ("random", "random init")):
            lines.append(f"| {name}, {mode_name} | "
                         + " | ".join(fmt(probes[mode][init][str(f)]["auroc"]) for f in fractions) + " |")
        deltas = []
        for f in fractions:
            a = probes[mode]["pretrained"][str(f)]["auroc"]["mean"]
            b = probes[mode]["random"][str(f)]["auroc"]["mean"]
            deltas.append("n/a" if a is None or b is None else f"{100 * (a - b):+.1f}")
        lines.append(f"| difference, {mode_name} (points) | " + " | ".join(deltas) + " |")
    return "\n".join(lines)


def plot_results(results: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = training_records(results["pretrain_dir"])
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    ax = axes[0]
    for term in ("loss", "global_loss", "local_image_loss", "local_text_loss", "reconstruction_loss"):
        points = [(r["step"], r[term]) for r in records if r.get(term) is not None and "step" in r]
        if points:
            ax.plot(*zip(*points), label=term)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    ax.set_title("CGNS pretraining (stage 2 adds CM-MIR)")
    ax.legend(fontsize=8)

    ax = axes[1]
    enc = results["encoders"]
    names = ["i2t R@1", "t2i R@1", "i2t R@5", "t2i R@5", "zero-shot\nAUROC", "pointing\ngame"]
    keys = ["i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", "zero_shot_auroc", "pointing_game"]
    p = enc["pretrained"]
    baselines = [retrieval_chance(p, 1)] * 2 + [retrieval_chance(p, 5)] * 2 + \
                [0.5, p["uniform_pointing_game"]]
    xs = list(range(len(keys)))
    ax.bar([x - 0.27 for x in xs], [100 * enc["pretrained"][k] for k in keys], width=0.27, label="CGNS-pretrained")
    ax.bar(xs, [100 * enc["random"][k] for k in keys], width=0.27, label="random init")
    ax.bar([x + 0.27 for x in xs], [100 * b for b in baselines], width=0.27, color="lightgray",
           label="chance / uniform")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("%")
    ax.set_title("Synthetic test split: retrieval, zero-shot, grounding")
    ax.legend(fontsize=8)

    ax = axes[2]
    fractions = results["fractions"]
    for mode, style in (("protocol", "-"), ("standardized", "--")):
        for init, name in (("pretrained", "CGNS-pretrained"), ("random", "random init")):
            stats = [results["probes"][mode][init][str(f)]["auroc"] for f in fractions]
            ys = [float("nan") if s["mean"] is None else 100 * s["mean"] for s in stats]
            err = [100 * (s["std"] or 0.0) for s in stats]
            ax.errorbar([100 * f for f in fractions], ys, yerr=err, marker="o", capsize=3, linestyle=style,
                        label=f"{name} ({'standardised' if mode == 'standardized' else 'E.1'})")
    ax.set_xscale("log")
    ax.set_xlabel("% of training labels")
    ax.set_ylabel("test macro AUROC (5 findings), %")
    ax.set_title("Linear probe on the frozen image encoder")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# panels of clustering.png: (title, [(metrics.jsonl key, line label), ...])
CLUSTER_PANELS = (
    ("false negatives found (train batches)", [("cluster/fn_precision", "precision"), ("cluster/fn_recall", "recall"),
                                              ("cluster/fn_base_rate", "base rate (random pair)")]),
    ("clusters", [("cluster/live_clusters", "live"), ("cluster/empty_clusters", "empty in the batch")]),
    ("share of the local text gradient", [("cluster/grad_share_false_negative", "false-negative handling"),
                                          ("cluster/grad_share_hard_negative", "hard negatives")]),
    ("assignments", [("cluster/largest_cluster_share", "largest cluster's share"), ("cluster/nmi", "NMI with meaning")]),
)


def plot_clustering(pretrain_dir: str, path: str) -> bool:
    """Clustering over training (from metrics.jsonl): false-negative precision / recall against the sentences'
    meanings beside the base rate, live clusters, gradient shares; False when the run logged none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = training_records(pretrain_dir)
    keys = [key for _, lines in CLUSTER_PANELS for key, _ in lines]
    series = {key: [(r["step"], r[key]) for r in records if key in r and "step" in r] for key in keys}
    if not any(series.values()):
        return False
    fig, axes = plt.subplots(1, len(CLUSTER_PANELS), figsize=(18, 4))
    for ax, (title, lines) in zip(axes, CLUSTER_PANELS):
        for key, label in lines:
            if series[key]:
                ax.plot(*zip(*series[key]), marker=".", label=label)
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        ax.legend(fontsize=7)
    fig.suptitle("Clustering over training, scored against the synthetic sentences' meanings (full CGNS run)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def pretrain_summary(pretrain_dir: str) -> Dict:
    train = training_records(pretrain_dir)
    evals = training_records(pretrain_dir, "eval")
    out = {"steps": train[-1]["step"] if train else 0}
    for term in ("global_loss", "local_image_loss", "local_text_loss"):
        values = [r[term] for r in train if r.get(term) is not None]
        if values:
            out[term] = {"first": values[0], "last": values[-1]}
    if evals:
        out["validation"] = {k: evals[-1].get(k) for k in ("i2t_acc1", "t2i_acc1", "global_loss", "fn_precision",
                                                            "fn_recall", "fn_base_rate", "nmi")}
    out["clustering"] = clustering_summary(train, evals)
    return out


def clustering_summary(train: List[Dict], evals: List[Dict]) -> Optional[Dict]:
    """False-negative precision / recall on the validation split at the end (and the base rate), the least live
    clusters at any logged step after initialisation, the gradient shares at the end; None without clustering."""
    live = [r["cluster/live_clusters"] for r in train if "cluster/live_clusters" in r]
    if not live:
        return None
    last = evals[-1] if evals else {}
    shares = [r for r in train if "cluster/grad_share_false_negative" in r]
    return {"fn_precision": last.get("fn_precision"), "fn_recall": last.get("fn_recall"),
            "fn_base_rate": last.get("fn_base_rate"), "nmi": last.get("nmi"), "min_live_clusters": min(live),
            "grad_share_false_negative": shares[-1]["cluster/grad_share_false_negative"] if shares else None,
            "grad_share_hard_negative": shares[-1]["cluster/grad_share_hard_negative"] if shares else None}


def clustering_line(summary: Optional[Dict], num_clusters: Optional[int]) -> str:
    """The results table's clustering line (validation split at the end of pretraining)."""
    if not summary or summary.get("fn_precision") is None:
        return "Clustering: not scored (no clustering, or no sentence meanings in the data)."
    k = f" of {num_clusters}" if num_clusters else ""
    return (f"Clustering (validation split, end of pretraining; docs/clustering.md): false-negative precision "
            f"{pct(summary['fn_precision'])} % at recall {pct(summary['fn_recall'])} % (a random pair shares a "
            f"meaning {pct(summary['fn_base_rate'])} % of the time), NMI with meaning {summary['nmi']:.2f}; at least "
            f"{summary['min_live_clusters']:.0f}{k} clusters live at every logged step; share of the local text "
            f"gradient: false-negative handling {pct(summary['grad_share_false_negative'])} %, hard negatives "
            f"{pct(summary['grad_share_hard_negative'])} %.")


def write_report(results: Dict, output_dir: str) -> str:
    """results.md (and the console table) from results.json's content."""
    cluster_text = clustering_line(results["pretraining"].get("clustering"), results.get("num_clusters"))
    table = encoder_table(results) + "\n\n" + probe_table(results) + "\n\n" + cluster_text
    with open(os.path.join(output_dir, "results.md"), "w") as fh:
        fh.write("# CGNS demo results (synthetic_cxr, CPU)\n\n")
        fh.write("Encoder-only evaluations on the synthetic test split (retrieval, zero-shot, grounding; "
                 "docs/evaluation.md), pretrained vs the same model before pretraining:\n\n")
        fh.write(encoder_table(results) + "\n\n")
        fh.write(f"Linear probes (test macro AUROC over the 5 CheXpert-style findings, mean ± std over seeds "
                 f"{results['probe_seeds']}), protocol-faithful (E.1) and on standardised features:\n\n")
        fh.write(probe_table(results) + "\n\n")
        fh.write(cluster_text + " Over training: clustering.png.\n\n")
        fh.write(f"Main pipeline {results['seconds_total'] / 60:.1f} min (pretraining "
                 f"{results['seconds_pretrain'] / 60:.1f} min). Plots: results.png, clustering.png, "
                 f"loss_curves.png. Export: {results['export']}\n")
    return table


# --------------------------------------------------------------------------------------------------
# main pipeline
# --------------------------------------------------------------------------------------------------

def run_demo(args, config: Dict, data: Dict, cache_dir: str, started: float) -> Dict:
    run_dir = os.path.join(args.output_dir, "cgns")
    pretrain_dir = os.path.join(run_dir, "pretrain")
    logs = os.path.join(args.output_dir, "logs")

    banner("[2/5] pretraining: two stages with accelerate launch (one bar; details in metrics.jsonl)")
    start = time.time()
    export = pretrain(args.config, pretrain_dir, cache_dir, args.pretrain_args, args.num_processes, args.verbose)
    pretrain_seconds = time.time() - start
    untrained = os.path.join(run_dir, "untrained")
    with quiet_step(args.verbose, os.path.join(logs, "untrained.log")):
        export_untrained(args.config, args.pretrain_args, untrained)
    ps = pretrain_summary(pretrain_dir)
    line = f"pretraining: {ps['steps']} steps in {pretrain_seconds / 60:.1f} min"
    for term in ("global_loss", "local_text_loss", "local_image_loss"):
        if term in ps:
            line += f"; {term} {ps[term]['first']:.2f} -> {ps[term]['last']:.2f}"
    print(line, flush=True)

    banner("[3/5] retrieval, zero-shot and grounding on the synthetic test split (pretrained, random init)")
    files = {}
    bar = phase_bar(2, "evaluation")
    for name, model_dir in (("pretrained", export), ("random", untrained)):
        with quiet_step(args.verbose, os.path.join(logs, f"evaluation_{name}.log")):
            files[name] = evaluate_encoder(model_dir, os.path.join(run_dir, "evaluation", name), cache_dir,
                                           data["options"])
        bar.update(1)
    bar.close()
    encoders = {name: encoder_summary(f) for name, f in files.items()}
    p = encoders["pretrained"]
    print(f"pretrained: R@1 i2t {pct(p['i2t_R@1'])} % / t2i {pct(p['t2i_R@1'])} % (chance "
          f"{pct(p['retrieval_chance_R@1'])} %), zero-shot AUROC {pct(p['zero_shot_auroc'])}, pointing game "
          f"{pct(p['pointing_game'])} % (uniform {pct(p['uniform_pointing_game'])} %, gain {gain(p)} points)",
          flush=True)

    banner(f"[4/5] linear probes at {', '.join(f'{100 * f:g} %' for f in args.fractions)} of the labels, "
           f"seeds {args.seeds}")
    probes = {"protocol": {"pretrained": {}, "random": {}}, "standardized": {"pretrained": {}, "random": {}}}
    # the two inits first, side by side: each job of an init after its first reads the features it cached
    jobs = [(mode, init, f) for f in args.fractions for mode in probes for init in ("pretrained", "random")]
    outs = [os.path.join(run_dir, "probe", f"{mode}_{init}_{f:g}") for mode, init, f in jobs]
    bar = phase_bar(len(jobs), "linear probes")
    if args.probe_jobs > 1 and not args.verbose:
        commands = [probe_argv(export, init, f, mode == "standardized", out, cache_dir, data["options"],
                               args.seeds, args.probe_max_epochs) for (mode, init, f), out in zip(jobs, outs)]
        logs_per_job = [os.path.join(logs, "probes", os.path.basename(out) + ".log") for out in outs]
        run_parallel(commands, logs_per_job, args.probe_jobs, lambda i: bar.update(1))
    else:
        for (mode, init, f), out in zip(jobs, outs):
            with quiet_step(args.verbose, os.path.join(logs, "probes.log")):
                probe(export, init, f, mode == "standardized", out, cache_dir, data["options"], args.seeds,
                      args.probe_max_epochs)
            bar.update(1)
    bar.close()
    for (mode, init, f), out in zip(jobs, outs):
        probes[mode][init][str(f)] = probe_summary(os.path.join(out, "results.json"))
    tenth = str(args.fractions[len(args.fractions) // 2])
    print("probe AUROC at " + f"{100 * float(tenth):g} % labels: " + ", ".join(
        f"{init} {fmt(probes['protocol'][init][tenth]['auroc'])}" for init in ("pretrained", "random")), flush=True)

    banner("[5/5] report")
    results = {
        "config": args.config, "pretrain_args": args.pretrain_args, "data": data, "export": export,
        "untrained_export": untrained, "pretrain_dir": pretrain_dir, "pretraining": ps,
        "seconds_pretrain": pretrain_seconds, "fractions": args.fractions, "probe_seeds": args.seeds,
        "encoders": encoders, "probes": probes,
        "num_clusters": read_json(os.path.join(export, "config.json")).get("num_clusters"),
    }
    results["seconds_total"] = time.time() - started
    with open(os.path.join(args.output_dir, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    # everything below reads results.json, not the variables above
    results = read_json(os.path.join(args.output_dir, "results.json"))
    plot_results(results, os.path.join(args.output_dir, "results.png"))
    plot_clustering(pretrain_dir, os.path.join(args.output_dir, "clustering.png"))
    loss_curves = os.path.join(pretrain_dir, "loss_curves.png")
    if os.path.exists(loss_curves):
        shutil.copy(loss_curves, os.path.join(args.output_dir, "loss_curves.png"))
    table = write_report(results, args.output_dir)
    results["table"] = table
    return results


# --------------------------------------------------------------------------------------------------
# ablation
# --------------------------------------------------------------------------------------------------

def variant_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def run_ablation(args, data: Dict, cache_dir: str) -> Dict:
    root = os.path.join(args.output_dir, "ablation")
    logs = os.path.join(args.output_dir, "logs")
    f = args.ablation_fraction
    runs: Dict[str, List[Dict]] = {}
    jobs = [(name, seed) for name in args.ablation_variants for seed in args.ablation_seeds]
    banner(f"ablation: {len(args.ablation_variants)} variants x {len(args.ablation_seeds)} pretraining seeds "
           f"({len(jobs)} runs), probe at {100 * f:g} % labels")
    bar = phase_bar(len(jobs), "ablation runs")
    for name, seed in jobs:
        extra = ABLATIONS[name]
        run_dir = os.path.join(root, variant_slug(name), f"seed_{seed}")
        done_file = os.path.join(run_dir, "summary.json")
        seed_args = args.pretrain_args + ["--seed", str(seed)]
        run_key = {"config": read_config(args.config), "pretrain_args": seed_args + (extra or []),
                   "untrained": extra is None, "probe_fraction": f, "probe_seeds": args.seeds,
                   "probe_max_epochs": args.probe_max_epochs}
        if os.path.isfile(done_file):
            # an interrupted `make ablation` picks up where it stopped: a finished run with the same settings is
            # read back, not redone (a run with other settings is redone)
            done = read_json(done_file)
            if done.get("run_key") == run_key:
                runs.setdefault(name, []).append(done)
                bar.update(1)
                continue
        start = time.time()
        if extra is None:
            with quiet_step(args.verbose, os.path.join(logs, "ablation.log")):
                model_dir = export_untrained(args.config, seed_args, os.path.join(run_dir, "untrained"))
            pretrain_dir = None
        else:
            # each run's own pretraining bar goes to the log too: the ablation's bar counts runs
            model_dir = pretrain(args.config, os.path.join(run_dir, "pretrain"), cache_dir, seed_args + extra,
                                 args.num_processes, args.verbose,
                                 None if args.verbose else os.path.join(logs, "ablation.log"))
            pretrain_dir = os.path.join(run_dir, "pretrain")
        with quiet_step(args.verbose, os.path.join(logs, "ablation.log")):
            files = evaluate_encoder(model_dir, os.path.join(run_dir, "evaluation"), cache_dir, data["options"])
            probe_file = probe(model_dir, "pretrained", f, False, os.path.join(run_dir, "probe"), cache_dir,
                               data["options"], args.seeds, args.probe_max_epochs)
        summary = encoder_summary(files)
        summary["probe_auroc"] = probe_summary(probe_file)["auroc"]["mean"]
        clustering = pretrain_summary(pretrain_dir).get("clustering") if pretrain_dir else None
        summary["fn_precision"] = clustering["fn_precision"] if clustering else None
        summary["fn_recall"] = clustering["fn_recall"] if clustering else None
        summary["fn_base_rate"] = clustering["fn_base_rate"] if clustering else None
        summary.update(seed=seed, pretrain_dir=pretrain_dir, seconds=time.time() - start, run_key=run_key)
        with open(done_file + ".tmp", "w") as fh:
            json.dump(summary, fh, indent=2)
        os.replace(done_file + ".tmp", done_file)
        runs.setdefault(name, []).append(summary)
        bar.update(1)
    bar.close()
    result = {"fraction": f, "seeds": args.ablation_seeds, "probe_seeds": args.seeds, "runs": runs}
    with open(os.path.join(args.output_dir, "ablation.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    result = read_json(os.path.join(args.output_dir, "ablation.json"))
    full_runs = runs.get("CGNS (full)") or []
    if full_runs and full_runs[0]["pretrain_dir"]:
        plot_clustering(full_runs[0]["pretrain_dir"], os.path.join(args.output_dir, "ablation_clustering.png"))
    table = ablation_table(result)
    with open(os.path.join(args.output_dir, "ablation.md"), "w") as fh:
        fh.write("# CGNS ablation (synthetic_cxr, CPU)\n\n" + table + "\n")
    result["table"] = table
    return result


def separation(full: Sequence[float], variant: Sequence[float]) -> Dict:
    """Welch's t-test of the full model against a variant (two-sided; p < 0.05 = separates from noise) and the
    95 % confidence interval of the difference of the means (Welch-Satterthwaite degrees of freedom)."""
    import math

    from scipy import stats

    a = [v for v in full if v is not None]
    b = [v for v in variant if v is not None]
    if len(a) < 2 or len(b) < 2:
        return {"difference": None, "p_value": None, "separates": None, "ci95": None}
    diff = float(sum(a) / len(a) - sum(b) / len(b))
    if max(a) == min(a) and max(b) == min(b):
        return {"difference": diff, "p_value": 0.0 if diff else 1.0, "separates": bool(diff), "ci95": (diff, diff)}
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    va, vb = stats.tvar(a) / len(a), stats.tvar(b) / len(b)
    df = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1) if va else 0.0) + (vb ** 2 / (len(b) - 1) if vb else 0.0))
    half = float(stats.t.ppf(0.975, df)) * math.sqrt(va + vb)
    return {"difference": diff, "p_value": p, "separates": p < 0.05, "ci95": (diff - half, diff + half)}


def ablation_table(result: Dict) -> str:
    from cgns.downstream.common import mean_std

    runs = result["runs"]
    header = "| variant | " + " | ".join(label for _, label in METRICS) + " |"
    lines = [header, "|---|" + "---|" * len(METRICS)]
    for name, records in runs.items():
        cells = []
        for key, _ in METRICS:
            stat = mean_std([r.get(key) for r in records])
            cells.append("n/a" if stat["mean"] is None else fmt(stat))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    first = next(iter(runs.values()))
    chance = first[0]["retrieval_chance_R@1"]
    uniform = mean_std([r["uniform_pointing_game"] for r in first])["mean"]
    base = mean_std([r.get("fn_base_rate") for r in first if r.get("fn_base_rate") is not None])["mean"]
    base_cell = "n/a" if base is None else f"{100 * base:.1f}"
    lines.append(f"| chance / uniform / base rate | {100 * chance:.1f} | {100 * chance:.1f} | 50.0 | {100 * uniform:.1f} | "
                 f"50.0 | {base_cell} |")
    lines.append("")
    lines.append(f"Mean ± std over pretraining seeds {result['seeds']} (probe at {100 * result['fraction']:g} % "
                 f"labels, probe seeds {result['probe_seeds']} averaged within each run).")
    statements = []
    full = runs.get("CGNS (full)")
    if full:
        for name, component in COMPONENTS.items():
            if name not in runs:
                continue
            parts = []
            for key, label in METRICS:
                s = separation([r.get(key) for r in full], [r.get(key) for r in runs[name]])
                if s["separates"] is None:
                    continue
                direction = "full better" if s["difference"] > 0 else "full worse"
                verdict = f"separates ({direction}, p = {s['p_value']:.3f})" if s["separates"] else \
                    f"within noise (p = {s['p_value']:.2f})"
                lo, hi = s["ci95"]
                parts.append(f"{label}: Δ {100 * s['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], {verdict}")
            statements.append(f"* **{component}** (full vs {name}): " + "; ".join(parts) + ".")
    if statements:
        lines.append("")
        lines.append("Per component, the difference full − variant with its 95 % confidence interval and Welch's "
                     "t-test (two-sided, p < 0.05 counts as separating from seed noise):")
        lines.append("")
        lines.extend(statements)
    return "\n".join(lines)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.verbose:
        logging.basicConfig(level=logging.WARNING)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    started = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    config = read_config(args.config)
    cache_dir = os.path.join(args.output_dir, "data")

    title = "ablation" if args.ablation else "demo"
    banner(f"[1/5] CGNS {title}: synthetic chest X-rays (CPU, offline)")
    with quiet_step(args.verbose, os.path.join(args.output_dir, "logs", "data.log")):
        data = generate_data(config, cache_dir, args.pretrain_args)
    print("synthetic_cxr: " + "; ".join(f"{task} " + ", ".join(f"{s}={n}" for s, n in splits.items())
                                        for task, splits in data["sizes"].items()), flush=True)

    if args.ablation:
        result = run_ablation(args, data, cache_dir)
        banner("Ablation")
        print(result["table"])
        print(f"\ntotal {(time.time() - started) / 60:.1f} min; written "
              f"{os.path.join(args.output_dir, 'ablation.md')}")
        return result

    results = run_demo(args, config, data, cache_dir, started)
    banner("Results")
    print(results["table"])
    print(f"\ntotal {(time.time() - started) / 60:.1f} min; written {os.path.join(args.output_dir, 'results.md')}, "
          f"results.png, clustering.png")
    return results


if __name__ == "__main__":
    main()
