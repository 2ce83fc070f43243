"""Helpers for the tests that spawn gloo process groups (tests/test_ddp.py, test_partial_ddp.py, test_queue.py)."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def finish_worker() -> None:
    """End a spawned worker whose results are written: wait for every rank, then exit at once.

    Tearing gloo down at process exit can abort the child ("terminate called without an active exception",
    SIGABRT) after all its work is done, which ``mp.spawn`` reports as a failure: about 1 run in 8 of
    tests/test_queue.py on this machine. ``os._exit`` skips that teardown; a worker that raised never gets here,
    so its traceback still reaches ``mp.spawn``.
    """
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
