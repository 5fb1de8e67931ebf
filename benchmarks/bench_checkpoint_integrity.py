"""What the checkpoint manifest costs: sealing a checkpoint at save time and verifying it before a resume.

Writes a checkpoint-shaped folder of random bytes (``model.safetensors`` of ``--model_mb``, ``optimizer.bin`` of
twice that, as Adam keeps two moments per parameter, ``scheduler.bin``, ``random_states_0.pkl`` and
``trainer_state.json``), then times, median of ``--repeats``:

* ``sha256``: hashing the model file alone (the rate per MB);
* ``write_manifest``: fsync + SHA-256 of every file + the manifest, what ``save_checkpoint`` adds to a save
  (the files were just written, so they are read back from the page cache);
* ``verify_checkpoint``: what ``--resume_from_checkpoint`` adds before ``load_state``;
* ``check_structure``: the header and CRC checks a checkpoint of an earlier version (no manifest) gets.

    python benchmarks/bench_checkpoint_integrity.py                      # 100 MB model, 300 MB in all
    python benchmarks/bench_checkpoint_integrity.py --model_mb 560       # ResNet-50 + BERT-base (~140 M params)
"""
import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import zipfile


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_mb", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write the folder (default: a temporary one)")
    return p.parse_args(argv)


def _write_safetensors(path, megabytes):
    """A valid safetensors file with one float32 tensor of random bytes."""
    n = megabytes * 2 ** 20 // 4
    header = json.dumps({"weight": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for _ in range(megabytes):
            f.write(os.urandom(2 ** 20))


def _write_archive(path, megabytes):
    """A zip archive with one stored member, as ``torch.save`` writes them."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        with archive.open("archive/data/0", "w", force_zip64=True) as member:
            for _ in range(megabytes):
                member.write(os.urandom(2 ** 20))


def build(folder, model_mb):
    os.makedirs(folder, exist_ok=True)
    _write_safetensors(os.path.join(folder, "model.safetensors"), model_mb)
    _write_archive(os.path.join(folder, "optimizer.bin"), 2 * model_mb)
    _write_archive(os.path.join(folder, "scheduler.bin"), 1)
    _write_archive(os.path.join(folder, "random_states_0.pkl"), 1)
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump({"global_step": 1, "manifest": "manifest.json"}, f)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    from cgns.pretraining.checkpointing import check_structure, file_sha256, verify_checkpoint, write_manifest

    args = parse_args(argv)
    root = tempfile.mkdtemp(dir=args.dir)
    folder = os.path.join(root, "step_1")
    try:
        build(folder, args.model_mb)
        total_mb = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) / 2 ** 20
        model = os.path.join(folder, "model.safetensors")
        sha = timed(lambda: file_sha256(model), args.repeats)
        seal = timed(lambda: write_manifest(folder), args.repeats)
        verify = timed(lambda: verify_checkpoint(folder), args.repeats)
        os.remove(os.path.join(folder, "manifest.json"))
        with open(os.path.join(folder, "trainer_state.json"), "w") as f:
            json.dump({"global_step": 1}, f)
        structure = timed(lambda: check_structure(folder), args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"model_mb": args.model_mb, "checkpoint_mb": round(total_mb, 1),
              "sha256_model_s": round(sha, 3), "sha256_mb_per_s": round(args.model_mb / sha),
              "write_manifest_s": round(seal, 3), "verify_checkpoint_s": round(verify, 3),
              "check_structure_s": round(structure, 3)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
