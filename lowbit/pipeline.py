"""The blockwise compression pipeline.

Calibration windows are embedded and the inputs of the first decoder block captured; then, block by
block, the recipe's steps run on that block alone (which of them rounds the weights follows from what each
declares: `rounding_plan`), any weight no solver handled is rounded to nearest,
static activation quantizers are calibrated, and the now-quantized block's output becomes the next
block's input. Only one block's activations are held at a time (two when a step needs the FP path).
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit import distributed
from lowbit.activations import ActivationStore
from lowbit.actquant import ActQuantizer
from lowbit.blockio import BlockIO
from lowbit.diagnostics import BlockReport, block_report, diagnostic_windows
from lowbit.context import BlockContext, FormatPlan, ModelContext, StopForward
from lowbit.errors import LowbitError
from lowbit.formats import check_shape
from lowbit.models.base import Adapter
from lowbit.state import QuantState
from lowbit.steps.base import Step


def validate(model: nn.Module, adapter: Adapter, plan: FormatPlan) -> None:
    """Check every block linear against its format before any work starts (e.g. group size vs width)."""
    for i, block in enumerate(adapter.blocks(model)):
        for rel, linear in adapter.linears(block).items():
            name = f"{adapter.block_name(i)}.{rel}"
            spec = plan.linear_spec(adapter, model, i, rel, linear)
            if spec is not None:
                check_shape(linear.weight.shape, spec, name)
            if plan.activations is not None and plan.activations.granularity == "group":
                check_shape(linear.weight.shape, plan.activations, f"the input of {name}")


def check_data_parallel(plan: FormatPlan) -> None:
    """Under torchrun, refuse what cannot be combined over ranks: static activation observers that keep samples."""
    acts = plan.activations
    if distributed.active() and acts is not None and not acts.dynamic and plan.act_observer != "minmax":
        raise LowbitError(f"the {plan.act_observer} observer of static activations keeps random samples of one "
                          f"process: use activations observer minmax under torchrun, or run in one process")


def rounding_plan(steps: Sequence[Step]) -> tuple[bool, ...]:
    """Per step, whether it rounds the weights still pending when it runs: a weight solver does, unless it
    defers to a later solver in the recipe (then it leaves them in full precision for that one)."""
    return tuple(s.solves_weights and not (s.defers_rounding and any(t.solves_weights for t in steps[i + 1:]))
                 for i, s in enumerate(steps))


class _Catcher(nn.Module):
    """Stands in for the first block to record its inputs, then stops the forward pass."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.hidden: list[torch.Tensor] = []
        self.args: tuple = ()
        self.kwargs: dict = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)

    def forward(self, hidden_states, *args, **kwargs):
        self.hidden.append(hidden_states.detach())
        self.args, self.kwargs = args, kwargs
        raise StopForward


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: Adapter, ids: torch.Tensor,
                         store: ActivationStore | None = None) -> tuple[torch.Tensor, tuple, dict]:
    """Inputs of the first decoder block for each window (in `store`, default: a CPU tensor), and the extra
    arguments the block is called with.

    Windows run one at a time so captured arguments (masks, rotary embeddings) have batch size 1 and
    broadcast over any batch the pipeline later forms.
    """
    blocks = adapter.blocks(model)
    catcher = _Catcher(blocks[0])
    blocks[0] = catcher
    inputs = None
    try:
        for k, row in enumerate(ids):
            try:
                model(row[None], use_cache=False)
            except StopForward:
                pass
            if store is not None and store.place != "device":  # offloaded: never all windows in host memory
                h = catcher.hidden.pop()
                if inputs is None:
                    inputs = store.empty((len(ids), *h.shape[1:]), h.dtype)
                inputs[k: k + 1] = h
    finally:
        blocks[0] = catcher.block
    if inputs is None:
        inputs = torch.cat(catcher.hidden)
    return inputs, catcher.args, catcher.kwargs


def install_act_quantizers(ctx: BlockContext) -> None:
    """Give every linear of the block an input quantizer (disabled until the block's steps are done)."""
    spec = ctx.plan.activations
    if spec is None:
        return
    for rel in ctx.linears():
        name = ctx.full_name(rel)
        if name not in ctx.state.input_quantizers:
            q = ActQuantizer(spec, ctx.plan.act_observer, clip_ratio=ctx.plan.act_clip_ratio)
            q.enabled = False
            ctx.state.input_quantizers[name] = q


def compress(model: nn.Module, adapter: Adapter, plan: FormatPlan, steps: Sequence[Step],
             calib_ids: torch.Tensor, progress: bool = True, io: BlockIO | None = None,
             on_block_done: Callable[[BlockReport], None] | None = None) -> QuantState:
    """Run `steps` over the model block by block; returns what was added beyond the weights.

    `io` decides where blocks live (device, streamed from disk) and checkpoints finished ones.
    `on_block_done` receives each finished block's diagnostics. Their output error reuses the FP path when a
    step keeps it, else runs the FP blocks on the first calibration windows only (`diagnostic_windows`)."""
    from lowbit.sparsity import check_masks, validate_order

    validate_order(steps)
    check_data_parallel(plan)
    io = io or BlockIO()
    validate(model, adapter, plan)
    adapter.prepare(model)
    mctx = ModelContext(model, adapter, plan, QuantState(), calib_ids, keep_fp_weights=on_block_done is not None,
                        store=io.store)
    rounds = rounding_plan(steps)
    for step in steps:
        step.before_blocks(mctx)
    acts = plan.activations
    needs_acts = any(s.needs_calibration for s in steps) or (acts is not None and not acts.dynamic)
    calibrate = needs_acts or on_block_done is not None  # diagnostics measure the block output error
    # this rank's share of the windows the diagnostics measure on
    diag_windows = distributed.leading(diagnostic_windows(calib_ids.shape[1]), plan.batch_size)
    if calibrate:  # diagnostics alone need only the windows they measure on
        inputs, args, kwargs = capture_block_inputs(model, adapter, calib_ids if needs_acts
                                                    else calib_ids[:diag_windows], io.store)
    else:  # nothing reads activations: skip every forward pass
        inputs, args, kwargs = torch.empty(0), (), {}
    fp_inputs = inputs if any(s.needs_fp_targets for s in steps) else None
    start, inputs, fp_inputs, args, kwargs = io.begin(mctx, inputs, fp_inputs, args, kwargs)
    # (after a resume the diagnostics' FP path restarts from the resumed block's inputs)
    diag_fp = inputs[:diag_windows] if on_block_done is not None and fp_inputs is None else None
    blocks = adapter.blocks(model)
    for i in tqdm(range(start, len(blocks)), desc="compressing blocks", disable=not progress,
                  initial=start, total=len(blocks)):
        began = time.perf_counter()
        io.load(mctx, i)
        ctx = BlockContext(mctx, i, blocks[i], inputs, args, kwargs, fp_inputs=fp_inputs)
        if fp_inputs is not None:
            ctx.fp_outputs = ctx.forward(fp_inputs)
        elif diag_fp is not None:
            diag_fp = ctx.forward(diag_fp)
        install_act_quantizers(ctx)
        mctx.state.install(model, ctx.name + ".")
        for step, r in zip(steps, rounds):
            step.on_block(replace(ctx, rounds=r))
            check_masks(ctx, step.name)
        mctx.state.install(model, ctx.name + ".")
        for rel in ctx.pending():
            ctx.round_to_nearest(rel)
        check_masks(ctx, "rtn")
        ctx.calibrate_activations()
        fp_inputs = ctx.fp_outputs
        last = i + 1 == len(blocks)
        if calibrate and not last:
            inputs = ctx.forward()
        elif calibrate:  # the last block's outputs feed only its diagnostics: the windows they compare
            reported = 0 if on_block_done is None else len(diag_fp if fp_inputs is None else fp_inputs)
            inputs = ctx.forward(inputs[:reported])
        if on_block_done is not None:
            weights = {rel: lin.weight.data for rel, lin in ctx.linears().items()}
            on_block_done(block_report(i, ctx.name, inputs, diag_fp if fp_inputs is None else fp_inputs, weights,
                                       ctx.fp_weights, time.perf_counter() - began))
        ctx.fp_weights.clear()  # float32 copies kept for the report: free them before the next block loads
        if last:  # no next block: the final checkpoint holds no inputs
            inputs, fp_inputs = inputs[:0], None if fp_inputs is None else fp_inputs[:0]
        io.done(ctx, inputs, fp_inputs)
    for step in steps:
        step.after_blocks(mctx)
    mctx.state.install(model)
    return mctx.state


def check_finite(model: nn.Module) -> None:
    """Refuse to save a model with NaN or infinite parameters, naming the first offender (streamed-out blocks,
    left on the meta device, were checked when written)."""
    for name, p in model.named_parameters():
        if not p.is_meta and not torch.isfinite(p).all():
            raise LowbitError(f"parameter {name} has non-finite values after compression; not saving it")
