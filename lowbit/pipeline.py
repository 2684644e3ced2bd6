"""The blockwise compression pipeline.

Calibration windows are embedded and the inputs of the first decoder block captured; then, block by
block, the recipe's steps run on that block alone, any weight no solver handled is rounded to nearest,
static activation quantizers are calibrated, and the now-quantized block's output becomes the next
block's input. Only one block's activations are held at a time (two when a step needs the FP path).
"""
from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.actquant import ActQuantizer
from lowbit.blockio import BlockIO
from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, check_shape, fake_quant
from lowbit.models.base import Adapter
from lowbit.observers import observe
from lowbit.state import QuantState, WeightRecord

if TYPE_CHECKING:
    from lowbit.steps.base import Step


@dataclass(frozen=True)
class Settings:
    """Formats that apply to the whole run; `overrides` maps glob patterns of linear names to a spec (or None: keep FP)."""

    weights: QuantSpec | None = None
    weight_observer: str = "minmax"
    activations: QuantSpec | None = None
    act_observer: str = "minmax"
    act_clip_ratio: float = 1.0  # dynamic activation ranges shrunk by this factor
    overrides: tuple[tuple[str, QuantSpec | None], ...] = ()
    batch_size: int = 8

    def weight_spec_for(self, name: str) -> QuantSpec | None:
        spec = self.weights
        for pattern, override in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                spec = override
        return spec


@dataclass
class ModelContext:
    """What a model-level step sees: the model, its adapter, the run's formats and calibration token windows."""

    model: nn.Module
    adapter: Adapter
    settings: Settings
    state: QuantState
    calib_ids: torch.Tensor
    steps: tuple["Step", ...] = ()  # the recipe's steps in order (a step may defer to a later one)


@dataclass
class BlockContext:
    """What a block-level step sees and may change: one decoder block, its calibration inputs and formats.

    `q_inputs` are the block's inputs on the quantized path (outputs of the already-compressed blocks);
    `fp_inputs` / `fp_outputs` are the full-precision path's, kept only when a step asks for them.
    """

    model_ctx: ModelContext
    index: int
    block: nn.Module
    q_inputs: torch.Tensor
    args: tuple
    kwargs: dict
    fp_inputs: torch.Tensor | None = None
    fp_outputs: torch.Tensor | None = None
    quantized: set[str] = field(default_factory=set)

    @property
    def adapter(self) -> Adapter:
        return self.model_ctx.adapter

    @property
    def settings(self) -> Settings:
        return self.model_ctx.settings

    @property
    def state(self) -> QuantState:
        return self.model_ctx.state

    @property
    def name(self) -> str:
        return self.adapter.block_name(self.index)

    def full_name(self, rel: str) -> str:
        return f"{self.name}.{rel}"

    def linears(self) -> dict[str, nn.Linear]:
        return self.adapter.linears(self.block)

    def weight_spec(self, rel: str) -> QuantSpec | None:
        return self.settings.weight_spec_for(self.full_name(rel))

    def is_quantized(self, rel: str) -> bool:
        return rel in self.quantized

    def set_quantized_weight(self, rel: str, weight: torch.Tensor, spec: QuantSpec,
                             scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Store a solver's dequantized weight in the block and record its quantization parameters."""
        linear = self.block.get_submodule(rel)
        if not torch.isfinite(weight).all():
            raise LowbitError(f"quantizing {self.full_name(rel)} produced non-finite weights: raise the solver's "
                              f"damping or use a different observer")
        linear.weight.data.copy_(weight.to(linear.weight.dtype))
        self.state.weights[self.full_name(rel)] = WeightRecord(spec, scale.detach().float().cpu(),
                                                               zero.detach().float().cpu())
        self.quantized.add(rel)

    def act_quantizers(self) -> dict[str, ActQuantizer]:
        """Input quantizers of this block's linears, by relative name."""
        prefix = self.name + "."
        return {n[len(prefix):]: q for n, q in self.state.inputs.items() if n.startswith(prefix)}

    @contextlib.contextmanager
    def act_quant(self, enabled: bool = True, rels: Sequence[str] | None = None) -> Iterator[None]:
        """Temporarily switch this block's activation quantizers on or off (only the inputs of `rels` if given)."""
        if rels is None:
            quantizers = self.state.quantizers(self.name + ".")
        else:
            quantizers = [q for rel, q in self.act_quantizers().items() if rel in rels]
        before = [q.enabled for q in quantizers]
        for q in quantizers:
            q.enabled = enabled
        try:
            yield
        finally:
            for q, b in zip(quantizers, before):
                q.enabled = b

    def run(self, x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        """Block (or a replacement `module` with the same call signature) on one batch of inputs."""
        out = (module or self.block)(x, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def forward(self, x: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Block outputs for all calibration inputs `x` (default: the quantized-path inputs), in batches."""
        x = self.q_inputs if x is None else x
        bs = batch_size or self.settings.batch_size
        return torch.cat([self.run(x[i: i + bs]) for i in range(0, x.shape[0], bs)])

    @torch.no_grad()
    def collect(self, rels: Sequence[str], fn: Callable[[str, torch.Tensor, torch.Tensor | None], None],
                x: torch.Tensor | None = None, stop_early: bool = False) -> None:
        """Run the block over inputs `x` and call fn(rel, layer_input, layer_output) for each listed module.

        Used to accumulate statistics (Hessians, activation ranges) without storing every layer's input.
        `stop_early` passes only inputs (layer_output is None) and ends each batch's forward as soon as every
        listed module has received its input, so neither the last module nor the rest of the block runs.
        The input is what the module computes on: after its online transforms and activation quantizer.
        """
        x = self.q_inputs if x is None else x
        seen: set[str] = set()
        wanted = len(set(rels))

        def pre_hook(rel: str, args: tuple) -> None:
            fn(rel, args[0], None)
            seen.add(rel)
            if len(seen) == wanted:
                raise _Stop

        def hook(rel: str, args: tuple, out) -> None:
            fn(rel, args[0], out[0] if isinstance(out, tuple) else out)

        modules = [(rel, self.block.get_submodule(rel)) for rel in rels]
        if stop_early:
            handles = [m.register_forward_pre_hook(lambda _m, args, rel=rel: pre_hook(rel, args)) for rel, m in modules]
        else:
            handles = [m.register_forward_hook(lambda _m, args, out, rel=rel: hook(rel, args, out))
                       for rel, m in modules]
        bs = self.settings.batch_size
        try:
            for i in range(0, x.shape[0], bs):
                seen.clear()
                try:
                    self.run(x[i: i + bs])
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()


def rtn_linear(ctx: BlockContext, rel: str, linear: nn.Linear, spec: QuantSpec, observer: str) -> None:
    """Round a linear's weight to nearest with the observer's range and record it."""
    w = linear.weight.data.float()
    scale, zero = observe(w, spec, observer)
    ctx.set_quantized_weight(rel, fake_quant(w, scale, zero, spec), spec, scale, zero)


def validate(model: nn.Module, adapter: Adapter, settings: Settings) -> None:
    """Check every block linear against its format before any work starts (e.g. group size vs width)."""
    for i, block in enumerate(adapter.blocks(model)):
        for rel, linear in adapter.linears(block).items():
            name = f"{adapter.block_name(i)}.{rel}"
            spec = settings.weight_spec_for(name)
            if spec is not None:
                check_shape(linear.weight.shape, spec, name)
            if settings.activations is not None and settings.activations.granularity == "group":
                check_shape(linear.weight.shape, settings.activations, f"the input of {name}")


class _Stop(Exception):
    pass


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
        raise _Stop


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: Adapter, ids: torch.Tensor) -> tuple[torch.Tensor, tuple, dict]:
    """Inputs of the first decoder block for each window, and the extra arguments the block is called with.

    Windows run one at a time so captured arguments (masks, rotary embeddings) have batch size 1 and
    broadcast over any batch the pipeline later forms.
    """
    blocks = adapter.blocks(model)
    catcher = _Catcher(blocks[0])
    blocks[0] = catcher
    try:
        for row in ids:
            try:
                model(row[None], use_cache=False)
            except _Stop:
                pass
    finally:
        blocks[0] = catcher.block
    return torch.cat(catcher.hidden), catcher.args, catcher.kwargs


def install_act_quantizers(ctx: BlockContext) -> None:
    """Give every linear of the block an input quantizer (disabled until the block's steps are done)."""
    spec = ctx.settings.activations
    if spec is None:
        return
    for rel in ctx.linears():
        name = ctx.full_name(rel)
        if name not in ctx.state.inputs:
            q = ActQuantizer(spec, ctx.settings.act_observer, clip_ratio=ctx.settings.act_clip_ratio)
            q.enabled = False
            ctx.state.inputs[name] = q


@torch.no_grad()
def calibrate_act_quantizers(ctx: BlockContext) -> None:
    """Fix static activation ranges on the quantized-path inputs, then switch every quantizer on."""
    quantizers = ctx.state.quantizers(ctx.name + ".")
    static = [q for q in quantizers if not q.spec.dynamic and q.scale is None]
    if static:
        for q in static:
            q.calibrating = True
        ctx.forward()
        for q in static:
            q.finish_calibration()
    for q in quantizers:
        q.enabled = True


def compress(model: nn.Module, adapter: Adapter, settings: Settings, steps: Sequence["Step"],
             calib_ids: torch.Tensor, progress: bool = True, io: BlockIO | None = None) -> QuantState:
    """Run `steps` over the model block by block; returns what was added beyond the weights.

    `io` decides where blocks live (device, streamed from disk) and checkpoints finished ones."""
    io = io or BlockIO()
    validate(model, adapter, settings)
    mctx = ModelContext(model, adapter, settings, QuantState(), calib_ids, tuple(steps))
    for step in steps:
        step.before_blocks(mctx)
    acts = settings.activations
    calibrate = any(s.needs_calibration for s in steps) or (acts is not None and not acts.dynamic)
    if calibrate:
        inputs, args, kwargs = capture_block_inputs(model, adapter, calib_ids)
    else:  # nothing reads activations: skip every forward pass
        inputs, args, kwargs = torch.empty(0), (), {}
    fp_inputs = inputs if any(s.needs_fp_targets for s in steps) else None
    start, inputs, fp_inputs, args, kwargs = io.begin(mctx, inputs, fp_inputs, args, kwargs)
    blocks = adapter.blocks(model)
    for i in tqdm(range(start, len(blocks)), desc="compressing blocks", disable=not progress,
                  initial=start, total=len(blocks)):
        io.load(mctx, i)
        ctx = BlockContext(mctx, i, blocks[i], inputs, args, kwargs, fp_inputs=fp_inputs)
        if fp_inputs is not None:
            ctx.fp_outputs = ctx.forward(fp_inputs)
        install_act_quantizers(ctx)
        mctx.state.install(model, ctx.name + ".")
        for step in steps:
            step.on_block(ctx)
        mctx.state.install(model, ctx.name + ".")
        for rel, linear in ctx.linears().items():
            spec = ctx.weight_spec(rel)
            if spec is not None and not ctx.is_quantized(rel):
                rtn_linear(ctx, rel, linear, spec, settings.weight_observer)
        calibrate_act_quantizers(ctx)
        inputs = ctx.forward() if calibrate else inputs
        fp_inputs = ctx.fp_outputs
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
