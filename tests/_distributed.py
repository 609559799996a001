"""Running a check on two CPU processes (gloo on 127.0.0.1 through a rendezvous file).

One spawn runs the whole check (process start-up dominates the time). A failing rank writes its
traceback and makes the others fail fast (a 30 s collective timeout); the parent kills whatever is
left at its deadline, so a broken collective cannot hang the suite, and reports every rank's error.
"""

from __future__ import annotations

import datetime
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

WORLD_SIZE = 2

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def _entry(rank: int, check: Callable[[int, str], None], tmp_dir: str, world_size: int) -> None:
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{tmp_dir}/rendezvous",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=30),
        )
        try:
            torch.set_num_threads(1)
            check(rank, tmp_dir)
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:
        # torch reports one rank's error; keep every rank's for the parent's message
        Path(tmp_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_on_ranks(tmp_path: Path, check: Callable[[int, str], None], seconds: float = 120, world_size: int = WORLD_SIZE):
    """Runs ``check(rank, tmp_dir)`` (a module-level function: it is pickled) on ``world_size``
    spawned processes with the default process group initialised; fails the test with every
    rank's traceback, or after ``seconds``."""
    context = mp.start_processes(
        _entry, args=(check, str(tmp_path), world_size), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + seconds
    try:
        while not context.join(timeout=0.5):  # raises ProcessRaisedException if a rank failed
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish in {seconds} s")
    except ProcessException:
        errors = [
            f"--- rank {r} ---\n{(tmp_path / f'rank{r}.err').read_text()}"
            for r in range(world_size)
            if (tmp_path / f"rank{r}.err").exists()
        ]
        pytest.fail("\n".join(errors))
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
