"""`make demo`: the whole CGNS pipeline on the embedded synthetic chest X-rays, offline, on a CPU.

1. generate the synthetic image-report pairs and their labels (data_scripts.synthetic_cxr);
2. pretrain with ``accelerate launch train_pretrain.py --config configs/demo.json`` (two stages,
   clustering on) and export ``final/`` with ``save_pretrained``;
3. linear-probe the export at 1 %, 10 % and 100 % of the training labels, and a randomly initialised
   tower of the same architecture the same way (train_downstream.py, cached features, Trainer);
4. print the table (macro AUROC per label fraction, pretrained vs random, retrieval acc@1) and write
   ``<output_dir>/results.md``, ``results.json`` and ``results.png`` (loss curves per term, AUROC vs labels).

``--ablation`` (``make ablation``) repeats steps 2-3 with parts of the objective switched off (no
clustering, no CM-MIR, global loss only) and prints the ablation table.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.abspath(__file__))
FRACTIONS = (0.01, 0.1, 1.0)
ABLATIONS = {
    "CGNS (full)": [],
    "no clustering": ["--use_clustering", "false"],
    "no CM-MIR": ["--use_reconstruction", "false"],
    "global loss only": ["--use_clustering", "false", "--use_reconstruction", "false",
                         "--local_image_loss_weight", "0", "--local_text_loss_weight", "0"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.json"))
    p.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "demo"))
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="probe seeds (mean ± std)")
    p.add_argument("--ablation", action="store_true", help="also run the objective ablations")
    p.add_argument("--ablation_fraction", type=float, default=0.1)
    p.add_argument("--probe_max_epochs", type=int, default=100)
    p.add_argument("--num_processes", type=int, default=1,
                   help="pretraining processes (>1 starts a real multi-process gloo run on CPU)")
    p.add_argument("--pretrain_args", nargs=argparse.REMAINDER, default=[],
                   help="extra train_pretrain.py overrides, e.g. --pretrain_args --num_images 200 --stage1_epochs 1")
    return p.parse_args(argv)


def banner(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def read_config(path: str) -> Dict:
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def override(args: List[str], key: str, default):
    """Value of ``--key`` in an override list, else ``default``."""
    flag = f"--{key}"
    return type(default)(args[args.index(flag) + 1]) if flag in args else default


# --------------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------------

def generate_data(config: Dict, cache_dir: str, pretrain_args: List[str]) -> Dict:
    import data_scripts

    # render at the size the pretraining script renders (its resize size), so every step shares one cache
    image_size = override(pretrain_args, "image_size", int(config.get("image_size", 224)))
    render_size = int(config.get("render_size") or round(image_size * 256 / 224))
    options = dict(num_images=override(pretrain_args, "num_images", int(config.get("num_images", 2000))),
                   image_size=override(pretrain_args, "render_size", render_size))
    for task in ("pretraining", "classification"):
        dd = data_scripts.load_cgns_dataset("synthetic_cxr", task=task, cache_dir=cache_dir, **options)
        print(f"synthetic_cxr/{task}: " + ", ".join(f"{split}={len(ds)}" for split, ds in dd.items()), flush=True)
    return options


def pretrain(config_path: str, output_dir: str, cache_dir: str, extra: List[str], num_processes: int) -> str:
    """``accelerate launch train_pretrain.py --config ...``; returns the export folder."""
    import torch

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        # `--cpu --num_processes 2` would silently start ONE process (ENVIRONMENT.md)
        launcher += ["--multi_gpu", "--num_processes", str(num_processes)]
    else:
        launcher += ["--num_processes", "1"] + ([] if torch.cuda.is_available() else ["--cpu"])
    command = launcher + [os.path.join(ROOT, "train_pretrain.py"), "--config", config_path,
                          "--output_dir", output_dir, "--cache_dir", cache_dir] + extra
    print("$ " + " ".join(command[1:]).replace("-m accelerate.commands.launch", "accelerate launch"), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    return os.path.join(output_dir, "final")


def probe(model_dir: str, init: str, fraction: float, output_dir: str, cache_dir: str, data_options: Dict,
          seeds: List[int], max_epochs: int) -> Dict:
    import train_downstream

    argv = ["--task", "classification", "--dataset", "synthetic_cxr", "--data_pct", str(fraction),
            "--model", model_dir, "--init", init, "--output_dir", output_dir, "--cache_dir", cache_dir,
            "--max_epochs", str(max_epochs), "--seeds", *map(str, seeds),
            "--dataset_options", *(f"{k}={v}" for k, v in data_options.items())]
    print(f"$ python train_downstream.py {' '.join(argv)}", flush=True)
    return train_downstream.main(argv)


def last_eval_metrics(pretrain_dir: str) -> Dict:
    records = read_metrics(pretrain_dir)
    evals = [r for r in records if r.get("split") == "eval"]
    return evals[-1] if evals else {}


def read_metrics(pretrain_dir: str) -> List[Dict]:
    path = os.path.join(pretrain_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def auroc(result: Dict) -> Dict:
    return result["summary"]["auroc"]


# --------------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------------

def fmt(stat: Dict) -> str:
    from downstream.common import format_mean_std

    return format_mean_std(stat)


def results_table(probes: Dict, fractions: List[float], retrieval: Dict) -> str:
    header = "| encoder | " + " | ".join(f"AUROC @ {100 * f:g} % labels" for f in fractions) + " |"
    lines = [header, "|---|" + "---|" * len(fractions)]
    for init, name in (("pretrained", "CGNS-pretrained"), ("random", "random init")):
        lines.append(f"| {name} | " + " | ".join(fmt(auroc(probes[init][f])) for f in fractions) + " |")
    deltas = []
    for f in fractions:
        a, b = auroc(probes["pretrained"][f])["mean"], auroc(probes["random"][f])["mean"]
        deltas.append("n/a" if a is None or b is None else f"{100 * (a - b):+.1f}")
    lines.append("| difference (points) | " + " | ".join(deltas) + " |")
    acc = retrieval.get("i2t_acc1"), retrieval.get("t2i_acc1")
    batch = retrieval.get("retrieval_candidates")
    chance = f" (chance {100 / batch:.1f} %)" if batch else ""
    if acc[0] is not None:
        lines.append("")
        lines.append(f"Validation retrieval acc@1 of the pretrained model: image→report {100 * acc[0]:.1f} %, "
                     f"report→image {100 * acc[1]:.1f} %{chance}.")
    return "\n".join(lines)


def plot(pretrain_dir: str, probes: Dict, fractions: List[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(pretrain_dir) if r.get("split") == "train"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for term in ("loss", "global_loss", "local_image_loss", "local_text_loss", "reconstruction_loss"):
        points = [(r["step"], r[term]) for r in records if r.get(term) is not None and "step" in r]
        if points:
            ax1.plot(*zip(*points), label=term)
    ax1.set_xlabel("optimiser step")
    ax1.set_ylabel("training loss")
    ax1.set_title("CGNS pretraining (stage 2 adds CM-MIR)")
    ax1.legend(fontsize=8)
    for init, name in (("pretrained", "CGNS-pretrained"), ("random", "random init")):
        means = [auroc(probes[init][f])["mean"] for f in fractions]
        stds = [auroc(probes[init][f])["std"] or 0.0 for f in fractions]
        xs = [100 * f for f in fractions]
        ys = [float("nan") if m is None else m for m in means]
        ax2.errorbar(xs, ys, yerr=stds, marker="o", capsize=3, label=name)
    ax2.set_xscale("log")
    ax2.set_xlabel("% of training labels")
    ax2.set_ylabel("test macro AUROC (5 findings)")
    ax2.set_title("Linear probe on the frozen image encoder")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------

def run_pipeline(args, name: str, extra: List[str], fractions: List[float], data_options: Dict,
                 cache_dir: str, random_probes: Optional[Dict] = None) -> Dict:
    run_dir = os.path.join(args.output_dir, name)
    pretrain_dir = os.path.join(run_dir, "pretrain")
    banner(f"[{name}] pretraining (two stages) with accelerate launch")
    start = time.time()
    export = pretrain(args.config, pretrain_dir, cache_dir, args.pretrain_args + extra, args.num_processes)
    pretrain_seconds = time.time() - start
    probes = {"pretrained": {}, "random": dict(random_probes or {})}
    for init in ("pretrained", "random"):
        for f in fractions:
            if f in probes[init]:
                continue
            banner(f"[{name}] linear probe: {init} encoder, {100 * f:g} % of the labels")
            probes[init][f] = probe(export, init, f, os.path.join(run_dir, "probe", f"{init}_{f:g}"), cache_dir,
                                    data_options, args.seeds, args.probe_max_epochs)
    return {"probes": probes, "retrieval": last_eval_metrics(pretrain_dir), "pretrain_dir": pretrain_dir,
            "export": export, "pretrain_seconds": pretrain_seconds}


def main(argv=None) -> Dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, ROOT)
    started = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    config = read_config(args.config)
    cache_dir = os.path.join(args.output_dir, "data")

    banner("CGNS demo: synthetic chest X-rays -> two-stage pretraining -> linear probes (CPU, offline)")
    data_options = generate_data(config, cache_dir, args.pretrain_args)

    main_run = run_pipeline(args, "cgns", [], args.fractions, data_options, cache_dir)
    table = results_table(main_run["probes"], args.fractions, main_run["retrieval"])
    plot(main_run["pretrain_dir"], main_run["probes"], args.fractions, os.path.join(args.output_dir, "results.png"))
    loss_curves = os.path.join(main_run["pretrain_dir"], "loss_curves.png")
    if os.path.exists(loss_curves):
        shutil.copy(loss_curves, os.path.join(args.output_dir, "loss_curves.png"))
    elapsed = time.time() - started
    summary = {"table": table, "seconds_total": elapsed, "seconds_pretrain": main_run["pretrain_seconds"],
               "export": main_run["export"],
               "auroc": {init: {str(f): auroc(main_run["probes"][init][f]) for f in args.fractions}
                         for init in ("pretrained", "random")},
               "retrieval": {k: main_run["retrieval"].get(k) for k in ("i2t_acc1", "i2t_acc5", "t2i_acc1",
                                                                        "t2i_acc5")}}

    ablation_table = None
    if args.ablation:
        f = args.ablation_fraction
        rows = []
        random_probe = {f: main_run["probes"]["random"][f]} if f in main_run["probes"]["random"] else {}
        for name, extra in ABLATIONS.items():
            result = main_run if not extra and f in main_run["probes"]["pretrained"] else None
            if result is None:
                result = run_pipeline(args, "ablation_" + name.replace(" ", "_").replace("(", "").replace(")", ""),
                                      extra, [f], data_options, cache_dir, random_probes=random_probe)
            random_probe = {f: result["probes"]["random"][f]}
            acc = result["retrieval"].get("i2t_acc1")
            rows.append(f"| {name} | {fmt(auroc(result['probes']['pretrained'][f]))} | "
                        f"{'n/a' if acc is None else f'{100 * acc:.1f}'} |")
        rows.append(f"| random init (no pretraining) | {fmt(auroc(random_probe[f]))} | – |")
        ablation_table = (f"| objective | AUROC @ {100 * f:g} % labels | val retrieval i2t acc@1 (%) |\n|---|---|---|\n"
                          + "\n".join(rows))
        summary["ablation_table"] = ablation_table

    with open(os.path.join(args.output_dir, "results.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    with open(os.path.join(args.output_dir, "results.md"), "w") as fh:
        fh.write("# CGNS demo results (synthetic_cxr, CPU)\n\n")
        fh.write(f"Test macro AUROC over the 5 CheXpert-style findings, linear probe on the frozen image encoder, "
                 f"mean ± std over seeds {args.seeds}.\n\n{table}\n\n")
        if ablation_table:
            fh.write(f"## Ablation\n\n{ablation_table}\n\n")
        fh.write(f"Main pipeline {elapsed / 60:.1f} min (pretraining {main_run['pretrain_seconds'] / 60:.1f} min). "
                 f"Plots: results.png, loss_curves.png. Export: {main_run['export']}\n")
    banner("Results")
    print(table)
    if ablation_table:
        print("\nAblation\n" + ablation_table)
    print(f"\ntotal {(time.time() - started) / 60:.1f} min; written {os.path.join(args.output_dir, 'results.md')} "
          f"and results.png")
    return summary


if __name__ == "__main__":
    main()
