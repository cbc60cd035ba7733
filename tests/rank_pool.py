"""Two gloo ranks started once per test session, shared by the 2-rank checks.

``run(fn, *args)`` runs ``fn(rank, world, *args)`` on both ranks of a process group that
stays up between calls, and returns both results ``[rank 0's, rank 1's]``. A 2-rank
check on a tiny model spends most of its time starting two interpreters and importing
torch, transformers, DeepSpeed and capscale (several seconds of CPU per process); the
pool pays that once for the whole session instead of once per check.

Each rank is set up as the checks' own spawned ranks were: ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` / ``MASTER_*``, ``CAPSCALE_CPU=1``, ``DS_ACCELERATOR=cpu``, one torch
thread, and a default process group (gloo) that ``capscale.distributed.init_distributed``
finds and uses. Before every call the torch RNG is re-seeded with the seed a fresh
process starts with. A rank that raises (or dies, or a call that runs past its timeout)
ends the pool: the error is raised here with the rank's traceback, both ranks are
killed (the other may be blocked in a collective) and the next call starts a new pool.
The ranks are killed at the end of the session (conftest.py) or when pytest exits.
"""

from __future__ import annotations

import atexit
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

WORLD = 2
_pool: Pool | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world: int, port: int, inbox: Any, outbox: Any, parent: int) -> None:
    """One rank: join the group, then run the calls that arrive until told to stop."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CAPSCALE_CPU="1",
                      DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    import datetime

    import torch
    import torch.distributed as dist

    fresh_seed = torch.initial_seed()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    while True:
        try:
            call = inbox.get(timeout=5)
        except queue.Empty:
            if os.getppid() != parent:  # pytest is gone
                os._exit(1)
            continue
        if call is None:
            break
        fn, args = call
        torch.manual_seed(fresh_seed)
        try:
            outbox.put((rank, True, fn(rank, world, *args)))
        except BaseException:
            outbox.put((rank, False, traceback.format_exc()))
            os._exit(1)  # the group may be out of step now: this pool is done
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


class Pool:
    def __init__(self) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.inboxes = [ctx.Queue() for _ in range(WORLD)]
        self.outbox = ctx.Queue()
        port = _free_port()
        self.procs = [ctx.Process(target=_serve, daemon=True,
                                  args=(r, WORLD, port, self.inboxes[r], self.outbox,
                                        os.getpid()))
                      for r in range(WORLD)]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable[..., Any], args: tuple, timeout: float) -> list[Any]:
        for box in self.inboxes:
            box.put((fn, args))
        results: dict[int, Any] = {}
        end = time.monotonic() + timeout
        while len(results) < WORLD:
            try:
                rank, ok, value = self.outbox.get(timeout=1)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead or time.monotonic() > end:
                    self.kill()
                    raise AssertionError(
                        f"{fn.__name__} on 2 ranks: rank(s) {dead} died (exit codes "
                        f"{[self.procs[r].exitcode for r in dead]})" if dead else
                        f"{fn.__name__} on 2 ranks: no result after {timeout:.0f} s") from None
                continue
            if not ok:
                self.kill()
                raise AssertionError(f"{fn.__name__} failed on rank {rank}:\n{value}")
            results[rank] = value
        return [results[r] for r in range(WORLD)]

    def close(self) -> None:
        for box in self.inboxes:
            box.put(None)
        for p in self.procs:
            p.join(timeout=30)
        self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)


def run(fn: Callable[..., Any], *args: Any, timeout: float = 1200) -> list[Any]:
    """``fn(rank, 2, *args)`` on the session's two ranks (started on first use)."""
    global _pool
    if _pool is None:
        _pool = Pool()
    pool = _pool
    try:
        return pool.run(fn, args, timeout)
    except BaseException:
        _pool = None  # killed: the next call starts a fresh pool
        pool.kill()
        raise


def close() -> None:
    """Stop the ranks (end of the session)."""
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None


atexit.register(close)
