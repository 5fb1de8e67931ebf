"""How long ``cgns --help`` and the subcommands' ``--help`` take: CPU seconds (user + system) of a fresh
``python -m cgns ...`` process, and its wall time (issue 27).

CPU seconds are what the command costs; on a shared machine the wall time also measures the queue for a core.

    python benchmarks/bench_cli_help.py [--repeats 3]
"""
import argparse
import os
import resource
import subprocess
import sys
import time

COMMANDS = (("--help",), ("prepare", "--help"), ("pretrain", "--help"), ("evaluate", "--help"))


def measure(argv, repeats: int):
    """(best CPU seconds, best wall seconds) of ``python -m cgns *argv`` over ``repeats`` runs."""
    cpu, wall = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "cgns", *argv], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(f"cgns {' '.join(argv)} failed: {done.stderr.decode()[-2000:]}")
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return min(cpu), min(wall)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print("| command | CPU s (best) | wall s (best) |\n|---|---|---|")
    for command in COMMANDS:
        cpu, wall = measure(command, args.repeats)
        print(f"| `cgns {' '.join(command)}` | {cpu:.2f} | {wall:.2f} |", flush=True)


if __name__ == "__main__":
    main()
