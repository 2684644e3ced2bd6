"""Per-block diagnostics, written as each block finishes so that a run that dies keeps them.

For every decoder block: the relative output error of the compressed block against the full-precision
path (FP inputs through FP blocks, so it accumulates the error of all blocks so far), each linear's relative
weight error against the weight its quantizer received, the block's wall time and the process's peak
resident memory so far. One JSON object per line (blocks.jsonl).
"""
from __future__ import annotations

import json
import logging
import os
import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import torch

from lowbit import distributed
from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")
# calibration tokens the output error is measured on when no step keeps the whole FP path: the FP blocks run on
# the first windows holding them (at least one window); one block call on the CPU (docs/evaluation.md)
DIAG_TOKENS = 1024


def diagnostic_windows(seq_len: int) -> int:
    """How many leading calibration windows of `seq_len` tokens the output error is measured on."""
    return max(1, DIAG_TOKENS // seq_len)


@dataclass(frozen=True)
class BlockReport:
    index: int
    name: str
    output_rel_error: float  # ||y_q - y_fp|| / ||y_fp|| over `windows` calibration windows
    windows: int
    weight_rel_error: dict[str, float]  # linear -> ||W_q - W|| / ||W||
    time_s: float
    peak_rss_gb: float


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return ((a.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def block_report(index: int, name: str, q_out: torch.Tensor, fp_out: torch.Tensor,
                 weights: dict[str, torch.Tensor], fp_weights: dict[str, torch.Tensor], seconds: float) -> BlockReport:
    """The block's diagnostics from its outputs on both paths and its weights before and after quantization."""
    n = fp_out.shape[0]
    errors = {rel: rel_error(weights[rel], w) for rel, w in sorted(fp_weights.items())}
    if not distributed.active():
        return BlockReport(index, name, rel_error(q_out[:n], fp_out), n, errors, seconds, peak_rss_gb())
    ref = fp_out.float()  # under torchrun: the error over every rank's diagnostic windows
    sums = distributed.reduce(torch.stack([(q_out[:n].float() - ref).pow(2).sum(), ref.pow(2).sum(),
                                           torch.tensor(float(n))]).double())
    error = (sums[0].sqrt() / sums[1].sqrt().clamp_min(1e-30)).item()
    return BlockReport(index, name, error, int(sums[2]), errors, seconds, peak_rss_gb())


class BlockLog:
    """Appends one line per finished block, flushed and synced to disk at once; the file (any stale one
    removed first) appears with the first finished block, so a run failing before that leaves nothing."""

    def __init__(self, path: Path):
        self.path = path
        self._file: IO[str] | None = None
        self._broken = False
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass

    def __call__(self, report: BlockReport) -> None:
        if self._broken:
            return
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "w")
            self._file.write(json.dumps(asdict(report)) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:  # diagnostics must never fail the run they describe
            self._broken = True
            log.info("block diagnostics not written to %s: %s", self.path, exc)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_blocks(path: str | Path) -> list[dict]:
    """Rows of a blocks.jsonl file, or of the one in a run folder; a torn last line (killed mid-write) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "blocks.jsonl"
    if not path.is_file():
        raise LowbitError(f"no block diagnostics at {path}: give a run folder written by 'lowbit run' (without "
                          f"diagnostics: false) or the OUT.blocks.jsonl an interrupted or killed run leaves next to "
                          f"its output folder")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def blocks_table(rows: list[dict]) -> str:
    """Markdown table: one line per block, worst and mean linear weight error."""
    lines = ["| block | output rel. error | worst linear | its weight rel. error | mean weight rel. error | "
             "time s | peak RSS GB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        w = r["weight_rel_error"]
        worst = max(w, key=w.get) if w else "-"
        worst_err = f"{w[worst]:.4f}" if w else "-"
        mean = f"{sum(w.values()) / len(w):.4f}" if w else "-"
        lines.append(f"| {r['index']} | {r['output_rel_error']:.4f} | {worst} | {worst_err} | {mean} | "
                     f"{_num(r['time_s'])} | {_num(r['peak_rss_gb'])} |")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    """Two decimals, or '-' where a value is unknown (imported peer runs have no per-block time or memory)."""
    return "-" if value is None else f"{value:.2f}"
