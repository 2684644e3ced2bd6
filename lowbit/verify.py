"""Deployed equals simulated: run two models on the same token windows and compare their logits and perplexity.

`compare` works on any two causal LMs (simulated run vs an export, or vs real low-bit kernels);
`verify` loads a run and one of its exports and compares them on WikiText-2 (or another text).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Comparison:
    """Logit agreement of model b with model a over `tokens` scored positions, and both perplexities."""

    tokens: int
    ppl_a: float
    ppl_b: float
    max_logit_diff: float
    mean_logit_diff: float
    top1_agreement: float

    @property
    def ppl_rel_diff(self) -> float:
        return abs(self.ppl_b - self.ppl_a) / self.ppl_a

    def to_dict(self) -> dict:
        return {**asdict(self), "ppl_rel_diff": self.ppl_rel_diff}


@torch.no_grad()
def compare(model_a: nn.Module, model_b: nn.Module, windows: torch.Tensor, progress: bool = False,
            chunk: int = 256) -> Comparison:
    """Score each window [k, seq_len] with both models: logit differences, top-1 agreement, perplexities."""
    nll_a = nll_b = diff_sum = 0.0
    diff_max, agree, count, positions = 0.0, 0, 0, 0
    for row in tqdm(windows, desc="comparing", disable=not progress):
        ids = row[None]
        la = model_a(ids).logits[0, :-1].float()
        lb = model_b(ids).logits[0, :-1].float()
        if la.shape != lb.shape:
            raise LowbitError(f"the two models give logits of different shapes {tuple(la.shape)} and "
                              f"{tuple(lb.shape)}: they do not share a vocabulary")
        target = row[1:]
        for s in range(0, target.numel(), chunk):  # chunks of positions keep temporaries small at 49k vocab
            a, b, t = la[s: s + chunk], lb[s: s + chunk], target[s: s + chunk]
            nll_a += F.cross_entropy(a, t, reduction="sum").item()
            nll_b += F.cross_entropy(b, t, reduction="sum").item()
            diff = (a - b).abs()
            diff_max = max(diff_max, diff.max().item())
            diff_sum += diff.sum().item()
            count += diff.numel()
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        positions += target.numel()
    return Comparison(positions, math.exp(nll_a / positions), math.exp(nll_b / positions), diff_max,
                      diff_sum / count, agree / positions)


def load_exported(path: str | Path) -> nn.Module:
    """An exported model on the CPU in float32: a .gguf file (transformers' GGUF loader) or a
    compressed-tensors folder (transformers + compressed-tensors)."""
    from lowbit.export.compressed import load_compressed
    from lowbit.export.gguf_file import load_gguf
    from lowbit.loading import LOAD_ERRORS

    path = Path(path)
    try:
        if path.is_file() and path.suffix == ".gguf":
            return load_gguf(path)
        config = path / "config.json"
        if path.is_dir() and config.exists() and "quantization_config" in json.loads(config.read_text()):
            return load_compressed(path)
    except LOAD_ERRORS as exc:
        text = str(exc).strip()
        raise LowbitError(f"could not load the export {path} (is a file truncated or corrupt?): "
                          f"{text.splitlines()[0] if text else type(exc).__name__}; export the run again") from None
    raise LowbitError(f"{path} is not an export: give a .gguf file or a compressed-tensors folder written by "
                      f"'lowbit export'")


def check_provenance(run_dir: str | Path, export_path: str | Path) -> None:
    """Refuse an export that records another run (or another quantization state) than `run_dir`."""
    from lowbit.export.base import export_provenance
    from lowbit.runfolder import check_run_folder, provenance

    check_run_folder(Path(run_dir))
    if not Path(export_path).exists():
        raise LowbitError(f"export {export_path} does not exist: give the path 'lowbit export' printed")
    recorded = export_provenance(Path(export_path))
    if recorded is None:
        raise LowbitError(f"{export_path} records no lowbit provenance (not written by this lowbit version's "
                          f"'lowbit export'): export the run again")
    run = provenance(Path(run_dir))
    for key in ("quant_state_sha256", "run_id"):
        if recorded.get(key) != run[key]:
            raise LowbitError(f"{export_path} was exported from run {recorded.get('run_id')} (quant state "
                              f"{str(recorded.get('quant_state_sha256'))[:12]}), not from {run_dir} (run "
                              f"{run['run_id']}, quant state {run['quant_state_sha256'][:12]}): verify a run "
                              f"with its own export")


ENGINES = ("transformers", "llama.cpp")


def verify(run_dir: str | Path, export_path: str | Path, data: str = "wikitext2", split: str = "test",
           seq_len: int = 2048, max_tokens: int | None = 16384, progress: bool = False,
           engine: str = "transformers", threads: int = 2) -> Comparison:
    """Compare a run's simulated model with its export on the same token windows (after checking that the
    export was written from this run), the export run by `engine`: transformers (loaded back in PyTorch) or
    llama.cpp (a .gguf in llama.cpp's own kernels)."""
    from lowbit.data import eval_windows, load_text, tokenize
    from lowbit.runfolder import load_run

    if engine not in ENGINES:
        raise LowbitError(f"unknown engine {engine!r}: choose from {', '.join(ENGINES)}")
    if engine == "llama.cpp" and Path(export_path).suffix != ".gguf":
        raise LowbitError(f"llama.cpp runs .gguf files, not {export_path}: export with --format gguf")
    check_provenance(run_dir, export_path)
    simulated, tokenizer, _ = load_run(run_dir)
    if engine == "llama.cpp":
        from lowbit.llamacpp import LlamaCppLM
        exported = LlamaCppLM(export_path, n_ctx=seq_len, threads=threads)
    else:
        exported = load_exported(export_path)
    windows = eval_windows(tokenize(tokenizer, load_text(data, split)), seq_len, max_tokens)
    return compare(simulated, exported, windows, progress)
