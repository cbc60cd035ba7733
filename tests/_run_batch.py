"""Several capscale runs, one after another, in one process (or one torchrun launch).

    python tests/_run_batch.py PLAN.json
    python -m torch.distributed.run --nproc_per_node=2 tests/_run_batch.py PLAN.json

``PLAN.json`` is a list of argument lists of :func:`capscale.cli.main` (the function
behind ``python -m capscale.run``); the interpreter, the imports and the launcher are
paid once for the whole batch. Under torchrun the batch joins the process group once
and every run uses it (as runs embedded in a caller's group do): a group left and
joined again within one launch would find the previous group's addresses in the
launcher's store. Before each run a marker line ``@@run N@@`` goes to stdout and
stderr (see ``_tiny_run.run_batch``); rank 0 writes the return codes to ``PLAN.json.rc``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def marker(i: int) -> str:
    return f"@@run {i}@@"


def batch_main(plan_path: str) -> int:
    import torch.distributed as dist

    from capscale.cli import main

    group = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if group:
        dist.init_process_group("gloo")
    plan = json.loads(Path(plan_path).read_text())
    codes = []
    for i, args in enumerate(plan):
        for stream in (sys.stdout, sys.stderr):
            print(f"\n{marker(i)}", file=stream, flush=True)
        codes.append(main(args))
        if group:
            dist.barrier()
    if os.environ.get("RANK", "0") == "0":
        Path(f"{plan_path}.rc").write_text(json.dumps(codes))
    if group:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from capscale.cli import exit_program

    exit_program(batch_main(sys.argv[1]))
