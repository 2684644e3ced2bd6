"""Learned rounding shared by AdaRound, BRECQ and QDrop: a soft-rounding weight quantizer and the training loop.

Each quantized weight is scale * (clamp(floor(W / scale) + h(V) + zero) - zero) with a learned V per weight and
the rectified sigmoid h(V) = clip(1.2 * sigmoid(V) - 0.1, 0, 1). Training minimizes an output reconstruction
error plus lambda * sum(1 - |2h - 1|^beta), beta annealed from 20 to 2 after a warm-up, which drives every h
to 0 or 1; hardening then picks floor or ceil for each weight (Nagel et al. 2020, "Up or Down?").
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils import parametrize

from lowbit import distributed
from lowbit.actquant import ActQuantizer
from lowbit.context import BlockContext, frozen
from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, group_view
from lowbit.observers import observe

if TYPE_CHECKING:
    from lowbit.steps.base import Step

Loss = Literal["token_relative", "mse"]
log = logging.getLogger("lowbit")
UNDECIDED_WARN = 0.1  # warn when more than this fraction of rounding variables is still soft at hardening
_ZETA, _GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid: h = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)


class ReconArgs(BaseModel):
    """Settings shared by the reconstruction steps (a StepArgs, spelled out because lowbit.steps imports us).

    Defaults fit a 2-core CPU: few steps, so a large learning rate (run times in docs/results.md). With a GPU use
    the papers' settings: iters=20000, batch_size=32, lr=1e-3 (BRECQ/QDrop), lam=0.01, beta 20 -> 2, warmup=0.2,
    act_lr=4e-5, 1024 samples."""

    model_config = ConfigDict(extra="forbid")

    iters: int = Field(200, ge=0)  # optimizer steps per reconstructed unit (a linear or a block); too few leave
    # rounding variables soft at hardening (logged per block; docs/reconstruction.md)
    batch_size: int = Field(1, gt=0)  # calibration windows per step
    lr: float = Field(0.05, gt=0)  # Adam learning rate of the rounding variables V
    lam: float = Field(0.01, ge=0)  # weight of the rounding regularizer
    beta_start: float = Field(20.0, gt=0)  # regularizer exponent at the end of the warm-up ...
    beta_end: float = Field(2.0, gt=0)  # ... annealed linearly to this value at the last step
    warmup: float = Field(0.2, ge=0, lt=1)  # fraction of steps without the regularizer
    n_samples: int | None = Field(None, gt=0)  # use only the first n calibration windows (default: all)
    init: str | dict[str, dict] = "fractional"  # "fractional" (h(V) = fractional part) or a weight-solving step,
    # by name ("gptq") or with its arguments ({gptq: {act_order: true}})
    observer: Literal["minmax", "mse", "percentile"] | None = None  # weight range; default: the recipe's
    loss: Loss = "token_relative"  # or "mse": plain squared error, dominated by outlier tokens (see output_error);
    # AdaRound's default is "mse" (lowbit.steps.adaround)
    seed: int = 0


@dataclass(frozen=True)
class Schedule:
    """Regularizer weight and exponent at each step: off during the warm-up, then beta decays linearly."""

    iters: int
    lam: float
    beta_start: float
    beta_end: float
    warmup: float

    def at(self, step: int) -> tuple[float, float]:
        start = int(self.warmup * self.iters)
        if step < start:
            return 0.0, self.beta_start
        frac = (step - start) / max(1, self.iters - start)
        return self.lam, self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1.0 - frac)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with rectified_sigmoid(V) = h for h in (0, 1) (kept off the clipped ends so gradients flow)."""
    p = ((h.clamp(0.01, 0.99) - _GAMMA) / (_ZETA - _GAMMA))
    return torch.log(p / (1 - p))


class SoftRounding(nn.Module):
    """Parametrization of a linear weight: floor(W / scale) plus a learned rounding offset h(V) in [0, 1].

    `initial_h` defaults to the fractional part of W / scale, so the soft weight starts at W (up to clipping).
    """

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor,
                 initial_h: torch.Tensor | None = None, pruned: torch.Tensor | None = None):
        super().__init__()
        if spec.format != "int":
            raise LowbitError(f"learned rounding needs an integer weight format, got {spec.describe()}")
        self.spec, self.shape = spec, weight.shape
        g = group_view(weight.detach().float(), spec)
        self.register_buffer("scale", scale.detach().float().reshape(g.shape[0], -1))
        self.register_buffer("zero", zero.detach().float().reshape(g.shape[0], -1))
        scaled = g / self.scale
        self.register_buffer("floor", torch.floor(scaled))
        h0 = scaled - self.floor if initial_h is None else group_view(initial_h.float(), spec)
        self.v = nn.Parameter(inverse_rectified_sigmoid(h0))
        # pruned weights (sparsity mask) stay exactly zero whatever their rounding variable does
        self.register_buffer("keep", None if pruned is None else ~pruned)

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def _weight(self, offset: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(self.floor + offset + self.zero, self.spec.qmin, self.spec.qmax)
        w = ((q - self.zero) * self.scale).reshape(self.shape)
        return w if self.keep is None else w * self.keep

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self._weight(self.h()).to(original.dtype)

    @torch.no_grad()
    def undecided(self) -> torch.Tensor:
        """Boolean mask of the variables still soft (0.05 < h < 0.95): hardening moves these the most."""
        h = self.h()
        return (h > 0.05) & (h < 0.95)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        """The dequantized weight with each offset rounded to 0 or 1 (V >= 0 means round up)."""
        return self._weight((self.v >= 0).float())

    def scale_zero(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point in the core's natural shape (per channel [out, 1], per group [out, in/g])."""
        shape = (like.shape[0], -1)
        return self.scale.reshape(shape), self.zero.reshape(shape)


@torch.no_grad()
def solver_rounding(ctx: BlockContext, solver: Step, rels: list[str]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Run a weight-solving step (e.g. GPTQ) on the block as a trial and return, per linear, its offsets over
    floor(W / scale) as an initial h (0.1 / 0.9, clamped to floor or ceil) with the solver's scale and zero.
    The block and its quant state are rolled back afterwards, so reconstruction starts from the FP block."""
    linears = ctx.linears()
    fp = {rel: linears[rel].weight.data.float().clone() for rel in rels}
    out = {}
    with ctx.trial():
        solver.on_block(ctx)
        for rel in rels:
            rec = ctx.state.weights[ctx.full_name(rel)]
            w_fp = group_view(fp[rel], rec.spec)
            s, z = rec.scale.reshape(w_fp.shape[0], -1), rec.zero.reshape(w_fp.shape[0], -1)
            steps = torch.round(group_view(linears[rel].weight.data.float(), rec.spec) / s)  # codes - zero
            up = (steps - torch.floor(w_fp / s)) >= 1
            out[rel] = (torch.where(up, 0.9, 0.1).reshape(fp[rel].shape), rec.scale, rec.zero)
    return out


@contextlib.contextmanager
def soft_rounded(ctx: BlockContext, rels: list[str], args: ReconArgs,
                 initial: dict[str, tuple[torch.Tensor, ...]]) -> Iterator[dict[str, SoftRounding]]:
    """Give each listed linear a SoftRounding parametrization (started from `initial[rel]` = (h, scale, zero)
    if given, else from the observer's range and the fractional part); on exit, store the hardened weights
    through `set_quantized_weight`. Every other block parameter is frozen meanwhile."""
    linears = ctx.linears()
    mods: dict[str, SoftRounding] = {}
    with frozen(ctx.block):
        try:
            for rel in rels:
                w = linears[rel].weight.data
                spec = ctx.weight_spec(rel)
                if rel in initial:
                    h0, scale, zero = initial[rel]
                else:
                    (scale, zero), h0 = observe(w.float(), spec, args.observer or ctx.plan.weight_observer), None
                mods[rel] = SoftRounding(w, spec, scale, zero, h0, ctx.state.masks.get(ctx.full_name(rel)))
                parametrize.register_parametrization(linears[rel], "weight", mods[rel], unsafe=True)
            yield mods
        finally:
            for rel in mods:
                parametrize.remove_parametrizations(linears[rel], "weight", leave_parametrized=False)
    for rel, mod in mods.items():
        scale, zero = mod.scale_zero(linears[rel].weight)
        ctx.set_quantized_weight(rel, mod.hard_weight(), mod.spec, scale, zero)


def report_undecided(where: str, mods: list[SoftRounding], iters: int) -> float:
    """Log the fraction of a block's rounding variables still soft at hardening; warn when it is large, since the
    hard weights then differ from the ones the loss was minimized for."""
    n = sum(m.v.numel() for m in mods)
    frac = sum(m.undecided().sum().item() for m in mods) / max(1, n)
    log.info("%s: %.1f%% of rounding variables undecided at hardening", where, 100 * frac)
    if frac > UNDECIDED_WARN:
        log.warning("%s: %.0f%% of rounding variables still soft after %d steps; hardening will move them: "
                    "raise iters", where, 100 * frac, iters)
    return frac


def initial_rounding(ctx: BlockContext, rels: list[str], init: "Step | None") -> dict[str, tuple[torch.Tensor, ...]]:
    """Starting point of the rounding: empty for "fractional" (no init step), else the init step's solution."""
    return {} if init is None or not rels else solver_rounding(ctx, init, rels)


def optimize(mods: list[SoftRounding], batch_loss: Callable[[torch.Generator], torch.Tensor], args: ReconArgs,
             extra_params: list[nn.Parameter] = (), extra_lr: float = 0.0) -> list[float]:
    """Adam on the rounding variables (and optional extra parameters, e.g. LSQ step sizes); returns the
    reconstruction loss of every step. `batch_loss` draws its batch from the generator it is given."""
    groups = [{"params": [m.v for m in mods], "lr": args.lr}]
    if extra_params:
        groups.append({"params": list(extra_params), "lr": extra_lr})
    opt = torch.optim.Adam(groups)
    schedule = Schedule(args.iters, args.lam, args.beta_start, args.beta_end, args.warmup)
    gen = torch.Generator().manual_seed(args.seed)
    history: list[float] = []
    if not mods:
        return history
    for step in range(args.iters):
        rec = batch_loss(gen)
        lam, beta = schedule.at(step)
        loss = rec + lam * sum(m.regularizer(beta) for m in mods) if lam > 0 else rec
        opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(p for g in groups for p in g["params"])  # the same step on every rank
        opt.step()
        history.append(rec.item())
    return history


def output_error(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                 loss: Loss = "token_relative") -> torch.Tensor:
    """Squared error summed over features (optionally weighted element-wise), averaged over tokens; with
    `token_relative`, each token's error is divided by its target's squared norm first.

    Why relative: in trained LLMs the first token of a window (an attention sink) can carry almost all of a block
    output's squared norm, so a plain MSE fits the rounding to that one token and wrecks the rest (docs/results.md
    measures it on the embedded model). Default of BRECQ and QDrop."""
    err = (pred.float() - target.float()).pow(2)
    if weight is not None:
        err = err * weight
    err = err.sum(-1)
    if loss == "token_relative":
        err = err / target.float().pow(2).sum(-1).clamp_min(1e-12)
    return err.mean()


def pick(x: torch.Tensor, gen: torch.Generator, batch_size: int) -> torch.Tensor:
    """Indices of a random batch of rows of `x`."""
    return torch.randperm(x.shape[0], generator=gen)[:batch_size]


def reconstruct_layers(ctx: BlockContext, args: ReconArgs, init: "Step | None" = None) -> dict[str, list[float]]:
    """AdaRound: each linear on its own output, in execution order, with inputs from the quantized path
    (so later layers see earlier layers' hardened weights); target = FP weight times the same input."""
    histories = {}
    x_all = ctx.first_windows(args.n_samples)
    rels = ctx.pending()
    initial = initial_rounding(ctx, rels, init)
    trained: list[SoftRounding] = []
    for rel in rels:
        linear = ctx.linears()[rel]
        inputs: list[torch.Tensor] = []
        ctx.collect([rel], lambda _r, x, _y: inputs.append(x.detach()), x_all)
        x = torch.cat(inputs)
        w_fp, bias = linear.weight.data.clone(), linear.bias
        with soft_rounded(ctx, [rel], args, initial) as mods:
            def batch_loss(gen: torch.Generator) -> torch.Tensor:
                xb = x[pick(x, gen, args.batch_size)]
                return output_error(linear(xb), F.linear(xb, w_fp, bias), loss=args.loss)
            histories[rel] = optimize(list(mods.values()), batch_loss, args)
        trained += mods.values()
    if trained:
        report_undecided(ctx.name, trained, args.iters)
    return histories


class BlockReconArgs(ReconArgs):
    act_lr: float = Field(1e-3, ge=0)  # Adam learning rate of static activation step sizes (LSQ)


@contextlib.contextmanager
def drop_activations(quantizers: list[ActQuantizer], p: float, gen: torch.Generator) -> Iterator[None]:
    """QDrop: each quantizer's output element is replaced by its FP input with probability p."""
    def hook(_mod, args, out):
        return torch.where(torch.rand(out.shape, generator=gen) < p, args[0], out)
    handles = [q.register_forward_hook(hook) for q in quantizers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def reconstruct_block(ctx: BlockContext, args: BlockReconArgs, init: "Step | None" = None, *, quantize_acts: bool,
                      drop: float | None = None, use_fp_inputs: bool = False,
                      fisher: torch.Tensor | None = None) -> list[float]:
    """BRECQ / QDrop: all of the block's rounding variables (and static activation step sizes, by LSQ)
    trained together on the block output against the FP block's output `ctx.fp_outputs`.

    Inputs are the quantized-path inputs, or the FP ones if `use_fp_inputs`; with `drop` set, inputs and
    every activation quantizer's output are mixed element-wise with their FP values (QDrop)."""
    if ctx.fp_outputs is None:
        raise LowbitError("block reconstruction needs FP targets: the step must set needs_fp_targets")
    rels = ctx.pending()
    n = args.n_samples
    q_in, fp_in, target = (ctx.first_windows(n, t) for t in (ctx.q_inputs, ctx.fp_inputs, ctx.fp_outputs))
    initial = initial_rounding(ctx, rels, init)
    quantizers = ctx.state.quantizers(ctx.name + ".") if quantize_acts else []
    if quantizers:
        ctx.calibrate_activations()
    steps_sizes = [q.scale for q in quantizers if q.scale is not None]
    drop_gen = torch.Generator().manual_seed(args.seed + 1)
    weights = fisher[:distributed.leading(n, ctx.plan.batch_size)] if fisher is not None else None
    for s in steps_sizes:
        s.requires_grad_(True)
    try:
        with soft_rounded(ctx, rels, args, initial) as mods, ctx.act_quant(quantize_acts), \
                (drop_activations(quantizers, drop, drop_gen) if drop is not None else contextlib.nullcontext()):
            def batch_loss(gen: torch.Generator) -> torch.Tensor:
                idx = pick(q_in, gen, args.batch_size)
                x = ctx.on_device(fp_in[idx] if use_fp_inputs else q_in[idx])
                if drop is not None:
                    mask = torch.rand(x.shape, generator=drop_gen).to(x.device) < drop
                    x = torch.where(mask, ctx.on_device(fp_in[idx]), x)
                w = None if weights is None else ctx.on_device(weights[idx])
                return output_error(ctx.run(x), ctx.on_device(target[idx]), w, args.loss)
            history = optimize(list(mods.values()), batch_loss, args, steps_sizes, args.act_lr)
    finally:
        for s in steps_sizes:
            s.requires_grad_(False)
    report_undecided(ctx.name, list(mods.values()), args.iters)
    return history
