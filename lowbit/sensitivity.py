"""Per-layer sensitivity to candidate weight formats, measured on held-out calibration windows.

Three metrics per linear and format: `hessian`, the cheapest, tr((W-Q) H (W-Q)ᵀ) with H = 2 XᵀX / N the
held-out Hessian that GPTQ's collection gives (twice the mean squared output error per token); `fisher`, the
same output error per output channel weighted by the diagonal Fisher of that channel (the mean squared gradient
of the loss with respect to it, from one backward pass of the full-precision model), a second-order estimate of
the loss increase that, unlike `hessian`, compares layers whose outputs matter differently to the loss; and
`loss`, the ground truth, the model's loss increase on the held-out windows when only that linear is quantized.
Q is what the recipe's solver makes of the weight: GPTQ (with the recipe's arguments, on the calibration
windows' Hessian) if the recipe has a `gptq` step, else round to nearest. Blocks get the same numbers with
all their linears quantized. The pass walks the full-precision model with the blockwise pipeline.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.data import window_starts
from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, fake_quant
from lowbit.models.base import Adapter
from lowbit.observers import observe
from lowbit.context import BlockContext, FormatPlan
from lowbit.pipeline import compress
from lowbit.steps.base import Step
from lowbit.steps.gptq import GPTQArgs, accumulate_hessians, gptq_quantize

METRICS = ("hessian", "fisher", "loss")
CHEAP = ("hessian", "fisher")  # estimates, compared with `loss` by rank correlation


@dataclass(frozen=True)
class Candidate:
    """A candidate weight format: its short name, spec and range observer."""

    name: str
    spec: QuantSpec
    observer: str

    def key(self) -> str:
        return f"{self.spec.describe()} {self.observer}"


@dataclass
class SensitivityTable:
    """Metric values by linear (or block) name, then metric, then candidate name; what the allocator reads."""

    formats: dict[str, str]  # candidate name -> spec and observer, e.g. "int4 g64 asym mse"
    solver: str
    heldout_tokens: int
    layers: dict[str, dict] = field(default_factory=dict)  # name -> {"shape": [out, in], metric: {fmt: value}}
    blocks: dict[str, dict] = field(default_factory=dict)  # name -> {metric: {fmt: value}}
    base_loss: float | None = None

    def metrics(self) -> list[str]:
        return [m for m in METRICS if any(m in row for row in self.layers.values())]

    def values(self, metric: str, names: Sequence[str], formats: Sequence[str], source: str = "table") -> np.ndarray:
        """[len(names), len(formats)] metric values; a missing entry is an error naming how to measure it."""
        out = np.empty((len(names), len(formats)))
        for i, name in enumerate(names):
            row = self.layers.get(name, {}).get(metric, {})
            for j, fmt in enumerate(formats):
                if fmt not in row:
                    raise LowbitError(f"sensitivity {source} has no {metric} value for {name} in {fmt}: rerun "
                                      f"lowbit sensitivity with --metric {metric} --formats {','.join(formats)}")
                out[i, j] = row[fmt]
        return out

    def spearman(self) -> dict[str, dict[str, float]]:
        """Rank correlation of each cheap metric with the ground truth over all linears, per format and pooled."""
        out = {}
        fmts = list(self.formats)
        for metric in CHEAP:
            names = [n for n, r in self.layers.items() if "loss" in r and metric in r]
            if names:
                c, lo = self.values(metric, names, fmts), self.values("loss", names, fmts)
                out[metric] = {f: spearman(c[:, j], lo[:, j]) for j, f in enumerate(fmts)}
                out[metric]["all"] = spearman(c.ravel(), lo.ravel())
        return out

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "spearman": self.spearman()}, indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        path = Path(path)
        if not path.is_file():
            raise LowbitError(f"sensitivity table {path} does not exist: write one with 'lowbit sensitivity RECIPE'")
        try:
            data = json.loads(path.read_text())
            data.pop("spearman", None)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise LowbitError(f"{path} is not a sensitivity table written by 'lowbit sensitivity' ({exc})") from None

    def check_formats(self, candidates: dict[str, Candidate], source: str) -> None:
        """Refuse a table measured with other formats than these candidates (same name, other spec)."""
        for name, cand in candidates.items():
            if self.formats.get(name) != cand.key():
                have = self.formats.get(name, "not measured")
                raise LowbitError(f"sensitivity {source} measured {name} as {have}, the recipe asks for {cand.key()}: "
                                  f"rerun lowbit sensitivity with this recipe")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties broken by order, which is exact for continuous values)."""
    ra, rb = np.argsort(np.argsort(a)).astype(float), np.argsort(np.argsort(b)).astype(float)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom else float("nan")


def solve_weight(w: torch.Tensor, h: torch.Tensor, cand: Candidate, gptq: GPTQArgs | None) -> torch.Tensor:
    """The dequantized weight the recipe's solver gives `w` in `cand`'s format."""
    if gptq is not None:
        observer = gptq.observer or cand.observer
        return gptq_quantize(w, h, cand.spec, observer, gptq.damp, gptq.block_size, gptq.act_order,
                             gptq.static_groups, diag_damp=gptq.diag_damp)[0]
    scale, zero = observe(w, cand.spec, cand.observer)
    return fake_quant(w, scale, zero, cand.spec)


def _solve_group(weights: dict[str, torch.Tensor], h: torch.Tensor | None, cand: Candidate,
                 gptq: GPTQArgs | None) -> dict[str, torch.Tensor]:
    """Linears sharing an input solved as one stacked matrix (rows are independent), as the GPTQ step does;
    per-tensor formats one by one."""
    if cand.spec.granularity == "tensor":
        return {rel: solve_weight(w, h, cand, gptq) for rel, w in weights.items()}
    q = solve_weight(torch.cat(list(weights.values())), h, cand, gptq)
    return dict(zip(weights, q.split([w.shape[0] for w in weights.values()])))


@torch.no_grad()
def suffix_loss(model: nn.Module, adapter: Adapter, start: int, hidden: torch.Tensor, ids: torch.Tensor,
                args: tuple, kwargs: dict, batch_size: int) -> float:
    """Mean next-token loss of `ids` when blocks start.. run on `hidden` (their inputs), then norm and head."""
    blocks, norm, head = adapter.blocks(model), adapter.final_norm(model), adapter.head(model)
    total, count = 0.0, 0
    for s in range(0, hidden.shape[0], batch_size):
        h = hidden[s: s + batch_size]
        for block in blocks[start:]:
            out = block(h, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        logits = head(norm(h))[:, :-1].float()
        target = ids[s: s + batch_size, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        count += target.numel()
    return total / count


class _Probe(Step):
    """Not a registered step: measures each block's linears in every candidate format, then restores them."""

    name = "sensitivity-probe"

    def __init__(self, table: SensitivityTable, candidates: dict[str, Candidate], gptq: GPTQArgs | None,
                 include: Callable[[str], bool], heldout_ids: torch.Tensor, metrics: Sequence[str], bar: tqdm,
                 fisher: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.table, self.candidates, self.gptq, self.include = table, candidates, gptq, include
        self.heldout_ids, self.metrics, self.bar, self.fisher = heldout_ids, tuple(metrics), bar, fisher

    @torch.no_grad()
    def on_block(self, ctx: BlockContext) -> None:
        n_cal = ctx.q_inputs.shape[0] - self.heldout_ids.shape[0]
        x_cal, x_ho = ctx.q_inputs[:n_cal], ctx.q_inputs[n_cal:]
        groups = [g for g in (tuple(r for r in grp if self.include(ctx.full_name(r)))
                              for grp in ctx.adapter.input_groups()) if g]
        if not groups:
            return
        h_cal = accumulate_hessians(ctx, groups, x_cal) if self.gptq is not None else {}
        h_ho = accumulate_hessians(ctx, groups, x_ho)
        solved: dict[str, dict[str, torch.Tensor]] = {}
        cheap = [m for m in CHEAP if m == "hessian" or m in self.metrics]
        block = {m: {f: 0.0 for f in self.candidates} for m in cheap}
        for group in groups:
            weights = {rel: ctx.block.get_submodule(rel).weight.data.float() for rel in group}
            h = h_ho[group[0]].double()
            for rel, w in weights.items():
                self.table.layers[ctx.full_name(rel)] = {"shape": list(w.shape), **{m: {} for m in cheap}}
                solved[rel] = {}
            for fname, cand in self.candidates.items():
                for rel, q in _solve_group(weights, h_cal.get(group[0]), cand, self.gptq).items():
                    d = (weights[rel] - q).double()
                    per_channel = ((d @ h) * d).sum(1)  # 2 x mean squared output error of each output channel
                    values = {"hessian": float(per_channel.sum())}
                    if "fisher" in cheap:  # dL ~ 1/2 sum_c F_c E[dy_c^2], E[dy_c^2] = per_channel / 2
                        values["fisher"] = float(0.25 * (self.fisher[ctx.full_name(rel)] * per_channel).sum())
                    for m in cheap:
                        self.table.layers[ctx.full_name(rel)][m][fname] = values[m]
                        block[m][fname] += values[m]
                    solved[rel][fname] = q
        self.table.blocks[ctx.name] = block
        self.bar.update(1)
        if "loss" in self.metrics:
            self._losses(ctx, x_ho, solved)

    def _losses(self, ctx: BlockContext, x_ho: torch.Tensor, solved: dict[str, dict[str, torch.Tensor]]) -> None:
        model = ctx.model_ctx.model

        def loss() -> float:
            value = suffix_loss(model, ctx.adapter, ctx.index, x_ho, self.heldout_ids, ctx.args, ctx.kwargs,
                                ctx.plan.batch_size)
            self.bar.update(1)
            return value

        if self.table.base_loss is None:
            self.table.base_loss = loss()
        base = self.table.base_loss
        originals = {rel: ctx.block.get_submodule(rel).weight.data.clone() for rel in solved}

        def swap(rels: Sequence[str], fname: str | None) -> None:
            for rel in rels:
                value = originals[rel] if fname is None else solved[rel][fname]
                ctx.block.get_submodule(rel).weight.data.copy_(value)

        block_loss = {}
        for fname in self.candidates:
            for rel in solved:
                swap([rel], fname)
                self.table.layers[ctx.full_name(rel)].setdefault("loss", {})[fname] = loss() - base
                swap([rel], None)
            swap(list(solved), fname)
            block_loss[fname] = loss() - base
            swap(list(solved), None)
        self.table.blocks[ctx.name]["loss"] = block_loss


def output_fisher(model: nn.Module, adapter: Adapter, include: Callable[[str], bool], ids: torch.Tensor,
                  batch_size: int) -> dict[str, torch.Tensor]:
    """Per linear, the mean over tokens of the squared gradient of the summed next-token loss of `ids` with
    respect to each output channel (the diagonal empirical Fisher of the linear's output), in float64.

    One forward and backward pass of the whole model (weights frozen, only activations need gradients)."""
    names = {lin: f"{adapter.block_name(i)}.{rel}" for i, block in enumerate(adapter.blocks(model))
             for rel, lin in adapter.linears(block).items() if include(f"{adapter.block_name(i)}.{rel}")}
    sums: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, _args, out: torch.Tensor) -> None:
        def accumulate(grad: torch.Tensor) -> None:
            g2 = grad.detach().double().pow(2).reshape(-1, grad.shape[-1]).sum(0)
            sums[names[module]] = sums.get(names[module], 0) + g2
        out.register_hook(accumulate)

    def needs_grad(_module: nn.Module, _args, out: torch.Tensor) -> torch.Tensor:
        return out.detach().requires_grad_(True)  # the graph starts at the embedding output

    handles = [lin.register_forward_hook(hook) for lin in names]
    handles.append(model.get_input_embeddings().register_forward_hook(needs_grad))
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for s in range(0, ids.shape[0], batch_size):
                batch = ids[s: s + batch_size]
                logits = model(batch).logits[:, :-1].float()
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                reduction="sum").backward()
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(True)
    tokens = ids.numel()
    return {name: sums[name] / tokens for name in names.values()}


def measure(model: nn.Module, adapter: Adapter, candidates: dict[str, Candidate], gptq: GPTQArgs | None,
            include: Callable[[str], bool], calib_ids: torch.Tensor, heldout_ids: torch.Tensor,
            metrics: Sequence[str] = ("hessian",), batch_size: int = 8, progress: bool = True) -> SensitivityTable:
    """The sensitivity table of every linear `include` accepts (model left unchanged)."""
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise LowbitError(f"unknown sensitivity metric {bad[0]!r}: choose from {', '.join(METRICS)} or all")
    table = SensitivityTable({n: c.key() for n, c in candidates.items()},
                             "gptq" if gptq is not None else "rtn", heldout_ids.numel())
    blocks = adapter.blocks(model)
    per_block = 1
    if "loss" in metrics:
        n_lin = len([r for r in adapter.linear_order if include(f"{adapter.block_name(0)}.{r}")])
        per_block += (n_lin + 1) * len(candidates)
    with tqdm(total=len(blocks) * per_block + ("loss" in metrics), desc="sensitivity", disable=not progress) as bar:
        fisher = output_fisher(model, adapter, include, heldout_ids, batch_size) if "fisher" in metrics else None
        probe = _Probe(table, candidates, gptq, include, heldout_ids, metrics, bar, fisher)
        compress(model, adapter, FormatPlan(batch_size=batch_size), [probe],
                 torch.cat([calib_ids, heldout_ids]), progress=False)
    return table


def heldout_windows(tokens: torch.Tensor, n_cal: int, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """`n` windows of the calibration text overlapping none of the `n_cal` calibration windows of that seed."""
    taken = window_starts(tokens.numel(), n_cal, seq_len, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    picked: list[int] = []
    for _ in range(1000 * n):
        s = int(torch.randint(0, tokens.numel() - seq_len, (1,), generator=gen))
        if all(abs(s - t) >= seq_len for t in taken + picked):
            picked.append(s)
            if len(picked) == n:
                return torch.stack([tokens[p: p + seq_len] for p in picked])
    raise LowbitError(f"the calibration text has no room for {n} held-out windows of {seq_len} tokens beside the "
                      f"calibration windows: lower the held-out windows or calibration.n_samples")


def most_sensitive(table: SensitivityTable, fmt: str, k: int = 10) -> list[tuple[str, dict[str, float]]]:
    """The k linears with the largest loss increase in format `fmt` (hessian error if loss was not measured)."""
    metric = next(m for m in ("loss", "fisher", "hessian") if m in table.metrics())
    rows = sorted(table.layers.items(), key=lambda kv: -kv[1][metric][fmt])
    return [(name, {m: row[m][fmt] for m in METRICS if m in row}) for name, row in rows[:k]]


def heatmap(table: SensitivityTable, path: str | Path, title: str = "") -> None:
    """PNG: a panel per format (rows) and metric (columns), linear type by block, log colour scale per metric."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm, SymLogNorm

    names, blocks = list(table.layers), list(table.blocks)
    rels = list(dict.fromkeys(n[len(_block_of(n, blocks)) + 1:] for n in names))
    metrics, fmts = table.metrics(), list(table.formats)
    fig, axes = plt.subplots(len(fmts), len(metrics), squeeze=False,
                             figsize=(len(metrics) * max(6.0, 0.25 * len(blocks) + 2.5),
                                      len(fmts) * (0.22 * len(rels) + 0.9) + 0.6))
    for mi, metric in enumerate(metrics):
        grids = []
        for fmt in fmts:
            grid = np.full((len(rels), len(blocks)), np.nan)
            for name in names:
                b = _block_of(name, blocks)
                grid[rels.index(name[len(b) + 1:]), blocks.index(b)] = table.layers[name][metric][fmt]
            grids.append(grid)
        allv = np.concatenate([g.ravel() for g in grids])
        allv = allv[np.isfinite(allv)]
        if metric in CHEAP:  # non-negative by construction: log scale
            pos = allv[allv > 0]
            norm = LogNorm(vmin=pos.min() if pos.size else 1e-12, vmax=max(pos.max() if pos.size else 1, 1e-12))
        else:
            span = np.abs(allv).max() if allv.size else 1.0
            norm = SymLogNorm(linthresh=max(span * 1e-3, 1e-6), vmin=-span, vmax=span)
        for fi, (fmt, grid) in enumerate(zip(fmts, grids)):
            ax = axes[fi, mi]
            im = ax.imshow(grid, aspect="auto", cmap="viridis" if metric in CHEAP else "RdBu_r", norm=norm,
                           interpolation="nearest")
            ax.set_yticks(range(len(rels)), rels if mi == 0 else [], fontsize=7)
            ax.set_xticks(range(len(blocks)), [b.rsplit(".", 1)[-1] for b in blocks], fontsize=6)
            label = {"hessian": "output error tr(ΔHΔᵀ)", "loss": "loss increase (nats/token)",
                     "fisher": "Fisher-weighted output error (nats/token, est.)"}[metric]
            ax.set_title(f"{fmt}: {label}", fontsize=8, loc="left")
            fig.colorbar(im, ax=ax, pad=0.01, fraction=0.04).ax.tick_params(labelsize=6)
        axes[-1, mi].set_xlabel("block", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98 if title else 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _block_of(name: str, blocks: list[str]) -> str:
    return next(b for b in blocks if name.startswith(b + "."))
