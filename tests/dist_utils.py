"""Run a test body on several CPU processes over gloo (TP/PP/DP tests).

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, sets up
``torch.distributed`` (gloo, a free localhost port), calls ``fn(rank, world_size,
*args)`` in each, and returns the list of per-rank return values (they must be
picklable; move tensors to CPU). An exception on any rank fails the test with
that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Pickle in-band: tensors sent through a Queue are shared by file descriptor,
        # which breaks (ConnectionResetError) when the worker exits before the parent reads.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # report every failure, including assertion errors
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


class WorldOfOne:
    """``initialize_parallel`` in the pytest process (a world of one on a free port), torn down after.

    ``kw``: :class:`nemo_kd.parallel.ParallelConfig` fields (default: ``seed=5``).
    """

    def __init__(self, **kw):
        self.kw = kw or {"seed": 5}

    def __enter__(self):
        from nemo_kd.parallel import ParallelConfig, initialize_parallel

        self.old = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        initialize_parallel(ParallelConfig(**self.kw))
        return self

    def __exit__(self, *exc):
        from nemo_kd.parallel import destroy_parallel

        destroy_parallel()
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
