"""Data-parallel training on torch.distributed: the worker's context and the ``--nproc`` launcher.

A worker learns its place from the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); ``mtrank train --nproc N`` sets the same variables
for N local workers, so one code path serves both. Backend: NCCL when CUDA is present (one GPU per
local rank), gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

_joined = False
"""Set once this process has joined a process group (:func:`joined_group`)."""


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory, checkpoints and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over workers (float64 on the CPU in, out)."""
        if not self.distributed:
            return values
        t = values.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def from_environment() -> Context:
    """The context ``torchrun`` (or ``--nproc``) describes; joins the process group when there are
    several workers. A single process needs no environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1:
        return Context()
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    global _joined
    _joined = True
    return Context(rank=rank, world=world, device=device)


def shutdown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def joined_group() -> bool:
    """Whether this process joined a job's process group (it is one of several workers)."""
    return _joined


def exit_worker(status: int) -> NoReturn:
    """End a worker process with ``status``, its output flushed, without the interpreter's
    finalisation: gloo's C++ threads and what they hold outlive ``destroy_process_group``, and
    tearing them down at exit can abort the process (``terminate called without an active
    exception``, SIGABRT, with no Python frame left on the main thread: 1 in ~90 two-worker jobs
    on a loaded 2-core machine, after the worker's work was done). Everything a worker writes is
    closed before this point.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], nproc: int) -> int:
    """Run ``mtrank <argv>`` as ``nproc`` local workers (what ``torchrun --standalone
    --nproc_per_node nproc`` does) and return the job's exit status: 0, or the first failing
    worker's (the others are stopped then, so none waits for a dead peer); 128 + N, with a line
    naming the worker, for one killed by signal N."""
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = {
            **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        }
        out = None if rank == 0 else subprocess.DEVNULL
        procs.append(subprocess.Popen([sys.executable, "-m", "mtrank.cli", *argv], env=env, stdout=out))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                _stop(procs)
                rank, code = failed[0]
                if code < 0:  # killed by a signal: say which, and exit as a shell would report it
                    print(f"mtrank train: worker {rank} was killed by {signal.Signals(-code).name}", file=sys.stderr)
                    return 128 - code
                return code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(procs)
        return 130


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
