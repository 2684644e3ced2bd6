"""Automatic mixed precision: one candidate format per linear, minimising the predicted loss under a size budget.

The predicted loss is the sum over linears of a sensitivity metric (lowbit.sensitivity). Costs are the bits
the size column counts (`formats.storage_bits`: codes, scales, zero points). The multiple-choice knapsack is
solved exactly by dynamic programming over the budget in units of the greatest common divisor of the cost
differences; only if that grid would be too large are costs rounded up to a coarser unit (still within budget,
optimal for the rounded costs; the unit is reported).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import reduce
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import check_shape, storage_bits
from lowbit.report import model_size
from lowbit.sensitivity import Candidate, SensitivityTable, heldout_windows, measure

if TYPE_CHECKING:
    from lowbit.recipe import Recipe

MAX_CELLS = 150_000_000  # DP table entries (int8 choices) before costs are coarsened


@dataclass(frozen=True)
class Knapsack:
    """A solved multiple-choice knapsack: one choice index per item."""

    choice: list[int]
    cost: int
    value: float
    exact: bool
    unit: int  # budget grid in cost units (the gcd of cost differences when exact)


def solve_mck(costs: np.ndarray, values: np.ndarray, budget: int, max_cells: int = MAX_CELLS) -> Knapsack:
    """Minimise Σ values[i, c_i] subject to Σ costs[i, c_i] <= budget (integer costs), one choice per row."""
    costs = np.asarray(costs, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    n, k = costs.shape
    base = costs.min(1)
    extra = costs - base[:, None]
    room = budget - int(base.sum())
    if room < 0:
        raise ValueError("budget below the cheapest assignment")
    room = min(room, int(extra.max(1).sum()))
    unit = reduce(math.gcd, (int(e) for e in extra.ravel() if e), 0) or 1
    exact = n * (room // unit + 1) <= max_cells
    if not exact:
        unit = math.ceil(n * (room + 1) / max_cells)
    steps = -(-extra // unit)  # rounded up: any solution on the grid is within the real budget
    cap = room // unit
    best = np.zeros(cap + 1)
    picks = np.zeros((n, cap + 1), dtype=np.int8)
    for i in range(n):
        new = np.full(cap + 1, np.inf)
        for j in range(k):
            s = int(steps[i, j])
            if s > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[s:] = best[: cap + 1 - s] + values[i, j]
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = j
        best = new
    b, choice = cap, [0] * n
    for i in range(n - 1, -1, -1):
        choice[i] = int(picks[i, b])
        b -= int(steps[i, choice[i]])
    cost = int(sum(costs[i, c] for i, c in enumerate(choice)))
    return Knapsack(choice, cost, float(sum(values[i, c] for i, c in enumerate(choice))), exact, unit)


@dataclass(frozen=True)
class Allocation:
    """The chosen format per linear and what it costs, as the run records it."""

    formats: dict[str, str]  # linear name -> candidate name
    budget_bits: int
    bits: int  # stored bits of the allocated linears, counted like the size column
    n_weights: int
    predicted: float  # Σ metric over linears
    metric: str
    exact: bool
    unit_bits: int

    @property
    def avg_bits(self) -> float:
        return self.bits / self.n_weights

    def describe(self) -> str:
        counts = {f: list(self.formats.values()).count(f) for f in dict.fromkeys(sorted(self.formats.values()))}
        return f"mixed {self.avg_bits:.2f} b/w: " + ", ".join(f"{c} {f}" for f, c in counts.items())

    def to_dict(self) -> dict:
        return {**asdict(self), "avg_bits": self.avg_bits}


def budget_bits(budget, linears: dict[str, nn.Linear], model: nn.Module) -> int:
    """The bits the allocated linears may use: avg_bits x their weights, or size_mb minus everything else at the
    size column's 16 bits."""
    n_weights = sum(m.weight.numel() for m in linears.values())
    if budget.avg_bits is not None:
        return math.floor(budget.avg_bits * n_weights + 1e-6)
    rest = model_size(model, None) * 8 - 16 * n_weights
    return math.floor(budget.size_mb * 8e6 - rest + 1e-6)


def allocate(table: SensitivityTable, candidates: dict[str, Candidate], linears: dict[str, nn.Linear],
             model: nn.Module, budget, metric: str, source: str = "table") -> Allocation:
    """Solve the knapsack for `linears` over `candidates` with `table`'s metric under `budget`."""
    names, fmts = list(linears), list(candidates)
    values = table.values(metric, names, fmts, source)
    costs = np.array([[round(storage_bits(candidates[f].spec, tuple(linears[n].weight.shape))) for f in fmts]
                      for n in names], dtype=np.int64)
    limit = budget_bits(budget, linears, model)
    n_weights = sum(m.weight.numel() for m in linears.values())
    lo, hi = int(costs.min(1).sum()), int(costs.max(1).sum())
    asked = f"avg_bits={budget.avg_bits}" if budget.avg_bits is not None else f"size_mb={budget.size_mb}"
    rest_mb = (model_size(model, None) * 8 - 16 * n_weights) / 8e6

    def bounds(bits: int) -> str:
        return f"{bits / n_weights:.3f} bits per weight, {bits / 8e6 + rest_mb:.2f} MB"

    if limit < lo:
        cheapest = fmts[int(np.argmin(costs.sum(0)))]
        raise LowbitError(f"budget {asked} is below the smallest candidate assignment (all {cheapest}: {bounds(lo)}): "
                          f"raise the budget or add a narrower format")
    if limit > hi:
        widest = fmts[int(np.argmax(costs.sum(0)))]
        raise LowbitError(f"budget {asked} is above the largest candidate assignment (all {widest}: {bounds(hi)}): "
                          f"lower the budget to at most that or add a wider format")
    sol = solve_mck(costs, values, limit)
    return Allocation({n: fmts[c] for n, c in zip(names, sol.choice)}, limit, sol.cost, n_weights, sol.value, metric,
                      sol.exact, sol.unit)


def allocate_recipe(recipe: "Recipe", model: nn.Module, adapter, tokens: torch.Tensor, calib_ids: torch.Tensor,
                    progress: bool = True) -> tuple["Recipe", Allocation]:
    """Measure (or read) the sensitivity, allocate, and return the recipe with the assignment as a plain
    `layers:` map (budget removed, so the resolved recipe reruns exactly this assignment)."""
    from lowbit.recipe import candidate_formats

    budget = recipe.budget
    fmts = candidate_formats(recipe)
    candidates = {n: Candidate(n, f.spec(), f.observer) for n, f in fmts.items()}
    plan = recipe.plan()
    linears = {f"{adapter.block_name(i)}.{rel}": lin for i, block in enumerate(adapter.blocks(model))
               for rel, lin in adapter.linears(block).items()
               if plan.weight_spec_for(f"{adapter.block_name(i)}.{rel}") is not None}
    for name, lin in linears.items():
        for cand in candidates.values():
            check_shape(lin.weight.shape, cand.spec, f"{name} (candidate {cand.name})")
    if budget.sensitivity:
        table, source = SensitivityTable.load(budget.sensitivity), f"table {budget.sensitivity}"
        table.check_formats(candidates, source)
    else:
        heldout = heldout_windows(tokens, recipe.calibration.n_samples, recipe.calibration.seq_len, budget.heldout,
                                  recipe.calibration.seed)
        table, source = measure(model, adapter, candidates, gptq_args(recipe), lambda n: n in linears, calib_ids,
                                heldout, [budget.metric], recipe.calibration.batch_size, progress), "measurement"
    alloc = allocate(table, candidates, linears, model, budget, budget.metric, source)
    layers = {**recipe.layers, **{n: fmts[f] for n, f in alloc.formats.items()}}
    return recipe.model_copy(update={"layers": layers, "budget": None}), alloc


def gptq_args(recipe: "Recipe"):
    """The arguments of the recipe's first `gptq` step (the solver the sensitivity imitates), or None for RTN."""
    from lowbit.steps.gptq import GPTQArgs

    for sc in recipe.steps:
        if sc.name == "gptq":
            return GPTQArgs(**sc.args)
    return None
