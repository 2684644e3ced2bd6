"""Data-parallel calibration under `torchrun`: which windows this process holds, and the one way to combine.

Launched by `torchrun` (RANK / WORLD_SIZE / MASTER_ADDR set), every process holds the whole model and a strided
shard of the calibration windows in whole forward batches: of N ranks, rank r takes batches r, r + N, r + 2N, ...
so each rank computes every one of its batches exactly as a single process would. A step that accumulates
a statistic over calibration data (a Hessian, a range, a search loss, a gradient) computes it on its shard and
combines it with `reduce`, so every rank sees the statistic of all windows and takes the same decision. Without
`torchrun` nothing is initialized and every function here is the identity of a single process.

Collectives time out after LOWBIT_DIST_TIMEOUT seconds (default 1800): a rank that dies or hangs ends every
other rank with a one-line error instead of a hang.
"""
from __future__ import annotations

import atexit
import datetime
import os
import re
from typing import Iterable, Literal

import torch
import torch.distributed as dist

from lowbit.errors import LowbitError

TIMEOUT_ENV = "LOWBIT_DIST_TIMEOUT"
Op = Literal["sum", "min", "max"]
_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without torchrun)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this process writes results (rank 0, or the only process)."""
    return rank() == 0


def timeout_s() -> float:
    """The collective timeout in seconds, from LOWBIT_DIST_TIMEOUT."""
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise LowbitError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds: set it to e.g. 600")
    return value


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group `torchrun` describes in the environment (Gloo on CPU, NCCL on CUDA); returns the
    device this rank works on (cuda:LOCAL_RANK for CUDA). Without torchrun (WORLD_SIZE unset or 1): no-op."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as exc:
        raise LowbitError(f"could not join the torchrun process group ({_first_line(exc)}): check --nnodes, "
                          f"--rdzv-endpoint and that every node can reach it") from None
    atexit.register(shutdown)  # a group left alive at exit can abort the process (Gloo's threads still joinable)
    return device


def shutdown() -> None:
    """Leave the process group (at the end of a run)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RankLost(LowbitError):
    """A collective failed: another rank died or timed out (the run was interrupted, not refused)."""


def _failed(what: str, exc: BaseException) -> RankLost:
    reason = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(exc)).split(". ")[0][:160]  # without the backend's source path
    return RankLost(f"rank {rank()}: {what} across ranks failed ({reason}): another rank died or did not answer "
                    f"within {TIMEOUT_ENV}={timeout_s():g} s; see that rank's error")


def _comm_device() -> torch.device:
    """Where tensors must be to travel: the current GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def reduce(t: torch.Tensor, op: Op = "sum") -> torch.Tensor:
    """`t` combined over all ranks (sum, min or max), the same on every rank; `t` itself in a single process."""
    if not active():
        return t
    buf = t.detach().to(_comm_device()).contiguous().clone()
    try:
        dist.all_reduce(buf, _OPS[op])
    except (RuntimeError, dist.DistBackendError) as exc:
        raise _failed("combining a statistic", exc) from None
    return buf.to(t.device)


def reduce_float(value: float, op: Op = "sum") -> float:
    """A Python number combined over all ranks (in float64)."""
    return float(reduce(torch.tensor(value, dtype=torch.float64), op)) if active() else value


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks (after backward, before the optimizer step), so every rank
    takes the same step."""
    if not active():
        return
    n = world_size()
    for p in params:
        if p.grad is not None:
            p.grad.copy_(reduce(p.grad) / n)


def barrier() -> None:
    """Wait for every rank (e.g. before rank 0 publishes the run folder)."""
    if not active():
        return
    try:
        dist.barrier()
    except (RuntimeError, dist.DistBackendError) as exc:
        raise _failed("waiting for every rank", exc) from None


def _owned(n: int, batch: int, r: int) -> list[int]:
    """Indices, among `n` windows cut into batches of `batch`, of those rank `r` holds."""
    return [g for g in range(n) if (g // batch) % world_size() == r]


def shard(windows: torch.Tensor, batch: int = 1) -> torch.Tensor:
    """This rank's share of the windows: every N-th batch of `batch` windows, so leading subsets spread evenly."""
    return windows[_owned(windows.shape[0], batch, rank())] if active() else windows


def leading(n: int | None, batch: int = 1) -> int | None:
    """How many of this rank's windows are among the first `n` windows of the whole set (None: all of them)."""
    return n if n is None or not active() else len(_owned(n, batch, rank()))


def gather(local: torch.Tensor, batch: int = 1) -> torch.Tensor:
    """Every rank's windows in their original order, from shards cut by `shard` (of a whole set or of its first
    windows), on every rank."""
    if not active():
        return local
    device = _comm_device()  # (activations offloaded to host memory or disk travel through it)
    try:
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
        dist.all_gather(sizes, torch.tensor([local.shape[0]], device=device))
        sizes = [int(s) for s in sizes]
        padded = torch.zeros(max(sizes), *local.shape[1:], dtype=local.dtype, device=device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise _failed("gathering calibration activations", exc) from None
    total = sum(sizes)
    out = torch.empty(total, *local.shape[1:], dtype=local.dtype, device=device)
    for r, (part, size) in enumerate(zip(parts, sizes)):
        out[_owned(total, batch, r)] = part[:size]
    return out


def broadcast_text(text: str | None) -> str | None:
    """Rank 0's string (e.g. a folder it chose), on every rank."""
    if not active():
        return text
    box = [text]
    try:
        dist.broadcast_object_list(box, src=0)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise _failed("sharing a path", exc) from None
    return box[0]
