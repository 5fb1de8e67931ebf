"""Pretraining throughput with the image tower in channels-last vs the default (contiguous) layout.

Runs ``python -m cgns.pretraining --config demo --max_steps N`` with ``--channels_last false`` and
``true`` (alternating, ``--repeats`` times each, same seed and data) and reads ``samples_per_second`` of the
logged training windows from each run's ``metrics.jsonl``. Two numbers per run: the first epoch (the frozen
text tower still runs on every new report) and the windows after it (text features cached, so the step is
the image tower, the heads and the losses). The peer is the same command without the flag, in the same
session; the ratio is what to read (the machine is shared).

    python benchmarks/bench_channels_last.py                 # demo config, 70 steps, 1 repeat
    python benchmarks/bench_channels_last.py --repeats 2 --output_json bench.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from cgns.pretraining.plots import read_metrics


def run_once(channels_last: bool, steps: int, config: str, cache_dir: str, workdir: str) -> dict:
    out = os.path.join(workdir, f"run_{'cl' if channels_last else 'plain'}")
    command = [sys.executable, "-m", "cgns.pretraining", "--config", config, "--output_dir", out,
               "--cache_dir", cache_dir, "--overwrite_output_dir", "true", "--max_steps", str(steps),
               "--do_eval", "false", "--log_level", "warning", "--report_to", "none",
               "--channels_last", str(channels_last).lower()]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    by_step, _ = read_metrics(os.path.join(out, "metrics.jsonl"))
    train = [by_step[step] for step in sorted(by_step) if "samples_per_second" in by_step[step]]
    first = [r["samples_per_second"] for r in train if r["epoch"] <= 1.0]
    later = [r["samples_per_second"] for r in train if r["epoch"] > 1.0]
    return {"first_epoch": statistics.median(first) if first else None,
            "later": statistics.median(later) if later else None}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="a packaged config by name or a JSON file")
    parser.add_argument("--steps", type=int, default=70, help="optimiser steps per run (demo: 50 per epoch)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cache_dir", default=os.path.abspath(os.path.join("outputs", "bench_cache")))
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    results = {"plain": [], "channels_last": []}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.repeats):
            for name, flag in (("plain", False), ("channels_last", True)):
                results[name].append(run_once(flag, args.steps, args.config, args.cache_dir, workdir))
                print(name, results[name][-1], flush=True)
    summary = {}
    for part in ("first_epoch", "later"):
        plain = statistics.median(r[part] for r in results["plain"] if r[part] is not None)
        last = statistics.median(r[part] for r in results["channels_last"] if r[part] is not None)
        summary[part] = {"plain_samples_per_s": plain, "channels_last_samples_per_s": last, "ratio": last / plain}
    report = {"config": args.config, "steps": args.steps, "repeats": args.repeats, "runs": results,
              "summary": summary}
    print(json.dumps(summary, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
