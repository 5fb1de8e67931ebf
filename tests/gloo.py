"""Run a function on several real gloo processes on this CPU and collect each rank's result."""
import datetime
import os
import socket
import tempfile

import torch

# fork: the children inherit the imported library instead of re-importing transformers (~10 s each)
START_METHOD = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, out_dir, fn, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    # a short collective timeout turns a rank that skips a collective into an error instead of a hang
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(fn(rank, world, *args), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world: int = 2, *args):
    """``[fn(rank, world, *args) for rank in range(world)]``, each call in its own process of one gloo group.

    ``fn`` must be a module-level function returning tensors (or containers of them); results travel through
    ``torch.save`` / ``torch.load(weights_only=True)``.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world, free_port(), out_dir, fn, args), nprocs=world, join=True,
                           start_method=START_METHOD)
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=True) for r in range(world)]


__all__ = ["run_on_ranks", "free_port", "START_METHOD"]
