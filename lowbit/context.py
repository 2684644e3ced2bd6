"""What a step sees: the run's formats plan, the model context, and one decoder block's context.

`BlockContext` is the only way a step changes a block's quantization bookkeeping: it stores solved weights
(`set_quantized_weight`, `round_to_nearest`), lists the weights still to solve (`pending`), switches activation
quantizers, runs the block on its calibration inputs, and snapshots and rolls back the block with its quant state
(`snapshot`, `trial`) for a step that tries candidates.
"""
from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from lowbit import distributed
from lowbit.activations import ActivationStore
from lowbit.actquant import ActQuantizer
from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, fake_quant, global_scale, on_scale_grid
from lowbit.gguf_types import resolve, type_spec
from lowbit.models.base import Adapter
from lowbit.observers import observe
from lowbit.state import QuantState, WeightRecord


CPU_CALL_TOKENS = 1024  # tokens per block call on the CPU (docs/scale.md, "Compression time")


@dataclass(frozen=True)
class FormatPlan:
    """Formats that apply to the whole run; `overrides` maps glob patterns of linear names to a spec (None: keep FP)."""

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

    def linear_spec(self, adapter: Adapter, model: nn.Module, layer: int, rel: str,
                    linear: nn.Linear) -> QuantSpec | None:
        """One block linear's weight format: the plan's, with a GGUF type or mix resolved for this tensor."""
        spec = self.weight_spec_for(f"{adapter.block_name(layer)}.{rel}")
        if spec is None or spec.gguf is None:
            return spec
        gguf_name = adapter.gguf_block_name(rel) or rel
        return type_spec(resolve(spec.gguf, gguf_name, layer, len(adapter.blocks(model)), linear.in_features))


@dataclass
class ModelContext:
    """What a model-level step sees: the model, its adapter, the run's formats plan and calibration token windows."""

    model: nn.Module
    adapter: Adapter
    plan: FormatPlan
    state: QuantState
    calib_ids: torch.Tensor
    keep_fp_weights: bool = True  # keep each linear's weight before quantization (for block diagnostics)
    store: ActivationStore = field(default_factory=ActivationStore)  # where calibration activations live


def round_to_nearest(w: torch.Tensor, spec: QuantSpec, observer: str,
                     gs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight rounded to nearest on the observer's range: (dequantized weight, scale, zero); `gs`: NVFP4's
    per-tensor scale when it is shared (default: from `w`)."""
    w = w.detach().float()
    scale, zero = observe(w, spec, observer, gs=gs)
    return fake_quant(w, scale, zero, spec), scale, zero


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Turn off gradients of every parameter of `module` meanwhile (a step trains only what it adds)."""
    before = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in before:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


@dataclass
class BlockSnapshot:
    """A block's parameters and its entries in the run's quant state, as they were when taken."""

    params: dict[str, torch.Tensor]
    quantized: set[str]
    global_scales: dict[str, torch.Tensor]
    weights: dict[str, WeightRecord]
    transforms: dict[str, dict]
    input_quantizers: dict[str, ActQuantizer]
    output_quantizers: dict[str, ActQuantizer]
    ranges: list[tuple[ActQuantizer, nn.Parameter | None, torch.Tensor | None]]


@dataclass
class BlockContext:
    """What a block-level step sees and may change: one decoder block, its calibration inputs and formats.

    `q_inputs` are the block's inputs on the quantized path (outputs of the already-compressed blocks);
    `fp_inputs` / `fp_outputs` are the full-precision path's, kept only when a step asks for them.
    `rounds` tells a weight-solving step whether the pipeline gave it the final rounding of the pending weights
    (false for a step that defers to a later solver in the recipe).
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
    rounds: bool = True
    fp_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # each linear's weight before quantization
    global_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # NVFP4 per-tensor scales, by rel

    @property
    def adapter(self) -> Adapter:
        return self.model_ctx.adapter

    @property
    def plan(self) -> FormatPlan:
        return self.model_ctx.plan

    @property
    def state(self) -> QuantState:
        return self.model_ctx.state

    @property
    def name(self) -> str:
        return self.adapter.block_name(self.index)

    @property
    def head_dim(self) -> int:
        return self.adapter.head_dim(self.model_ctx.model)

    def full_name(self, rel: str) -> str:
        return f"{self.name}.{rel}"

    def linears(self) -> dict[str, nn.Linear]:
        return self.adapter.linears(self.block)

    def weight_spec(self, rel: str) -> QuantSpec | None:
        return self.plan.linear_spec(self.adapter, self.model_ctx.model, self.index, rel, self.block.get_submodule(rel))

    def is_quantized(self, rel: str) -> bool:
        return rel in self.quantized

    def pending(self, rels: Sequence[str] | None = None) -> list[str]:
        """The linears (of `rels`, default all, in that order) that get quantized and that no step has solved yet."""
        return [r for r in (self.linears() if rels is None else rels)
                if self.weight_spec(r) is not None and not self.is_quantized(r)]

    def global_scale(self, rel: str) -> torch.Tensor | None:
        """NVFP4's per-tensor scale of a linear (None for other formats), shared by the linears that read the same
        input with the same format: engines fuse q/k/v and gate/up and run each fusion with one scale. Fixed from
        their weights the first time one of them asks."""
        spec = self.weight_spec(rel)
        if spec is None or spec.scale_format != "e4m3":
            return None
        if rel not in self.global_scales:
            group = next((g for g in self.adapter.input_groups() if rel in g), (rel,))
            fused = [r for r in group if self.weight_spec(r) == spec]
            amax = torch.stack([self.block.get_submodule(r).weight.detach().float().abs().max() for r in fused]).max()
            for r in fused:
                self.global_scales[r] = global_scale(amax, spec)
        return self.global_scales[rel]

    def set_quantized_weight(self, rel: str, weight: torch.Tensor, spec: QuantSpec,
                             scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Store a solver's dequantized weight in the block and record its quantization parameters."""
        linear = self.block.get_submodule(rel)
        if not torch.isfinite(weight).all():
            raise LowbitError(f"quantizing {self.full_name(rel)} produced non-finite weights: raise the solver's "
                              f"damping or use a different observer")
        gs = self.global_scale(rel) if spec.scale_format == "e4m3" else None
        if not on_scale_grid(scale, spec, gs):
            raise LowbitError(f"the block scales of {self.full_name(rel)} are not {spec.scale_format} values (under its "
                              f"shared per-tensor scale, for nvfp4): quantize {spec.describe()} weights with rtn or gptq")
        if self.model_ctx.keep_fp_weights:
            self.fp_weights.setdefault(rel, linear.weight.detach().float().clone())
        linear.weight.data.copy_(weight.to(linear.weight.dtype))
        self.state.weights[self.full_name(rel)] = WeightRecord(spec, scale.detach().float().cpu(),
                                                               zero.detach().float().cpu(),
                                                               None if gs is None else gs.detach().float().cpu())
        self.quantized.add(rel)

    def round_to_nearest(self, rel: str, observer: str | None = None) -> None:
        """Solve one linear by rounding to nearest (observer default: the plan's)."""
        spec = self.weight_spec(rel)
        w, scale, zero = round_to_nearest(self.block.get_submodule(rel).weight, spec,
                                          observer or self.plan.weight_observer, self.global_scale(rel))
        self.set_quantized_weight(rel, w, spec, scale, zero)

    @contextlib.contextmanager
    def rounded(self, rels: Sequence[str] | None = None) -> Iterator[None]:
        """Temporarily round the pending linears (of `rels`, default all) to nearest, to score a candidate."""
        with self.trial():
            for rel in self.pending(rels):
                self.round_to_nearest(rel)
            yield

    def act_quantizers(self) -> dict[str, ActQuantizer]:
        """Input quantizers of this block's linears, by relative name."""
        prefix = self.name + "."
        return {n[len(prefix):]: q for n, q in self.state.input_quantizers.items() if n.startswith(prefix)}

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

    @torch.no_grad()
    def calibrate_activations(self) -> None:
        """Fix static activation ranges on the quantized-path inputs, then switch every quantizer on."""
        quantizers = self.state.quantizers(self.name + ".")
        static = [q for q in quantizers if not q.spec.dynamic and q.scale is None]
        if static:
            for q in static:
                q.calibrating = True
            self.forward()
            for q in static:
                q.finish_calibration()
        for q in quantizers:
            q.enabled = True

    def snapshot(self) -> BlockSnapshot:
        """The block's parameters and quant-state entries, to `restore` after trying a candidate."""
        prefix = self.name + "."

        def mine(table: dict) -> dict:
            return {n: v for n, v in table.items() if n.startswith(prefix)}

        st = self.state
        return BlockSnapshot(
            {k: v.detach().clone() for k, v in self.block.state_dict().items()}, set(self.quantized),
            dict(self.global_scales), mine(st.weights), {n: dict(c) for n, c in mine(st.transforms).items()}, mine(st.input_quantizers),
            mine(st.output_quantizers),
            [(q, None if q.scale is None else nn.Parameter(q.scale.detach().clone(), requires_grad=False),
              None if q.zero is None else q.zero.clone()) for q in st.quantizers(prefix)])

    def restore(self, snap: BlockSnapshot) -> None:
        """Put the block and its quant-state entries back as they were at `snap`, hooks included."""
        prefix = self.name + "."
        self.block.load_state_dict(snap.params)
        self.quantized.clear()
        self.quantized.update(snap.quantized)
        self.global_scales = dict(snap.global_scales)
        st = self.state
        for table, saved in ((st.weights, snap.weights), (st.transforms, snap.transforms),
                             (st.input_quantizers, snap.input_quantizers),
                             (st.output_quantizers, snap.output_quantizers)):
            for n in [n for n in table if n.startswith(prefix)]:
                del table[n]
            table.update(saved)
        for q, scale, zero in snap.ranges:
            q.scale, q.zero = scale, zero
        st.install(self.model_ctx.model, prefix)

    @contextlib.contextmanager
    def trial(self) -> Iterator[BlockSnapshot]:
        """Try something on the block: whatever happens inside (weights, folds, records, transforms) is undone."""
        snap = self.snapshot()
        try:
            yield snap
        finally:
            self.restore(snap)

    def on_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of (possibly offloaded) activations where the block computes."""
        return self.model_ctx.store.to_device(x)

    def call_windows(self, x: torch.Tensor) -> int:
        """Windows per block call. On the CPU a weight-only block runs CPU_CALL_TOKENS tokens at a time: its
        activations stay in the caches and each window's output is the same bits as in a larger batch (every
        operation is per window or per token), while activation quantizers may take ranges over a whole call and
        keep the plan's batches. Statistics always accumulate over the plan's batches (see `collect`)."""
        bs = self.plan.batch_size
        if self.model_ctx.store.device.type != "cpu" or any(
                q.enabled or q.calibrating for q in self.state.quantizers(self.name + ".")):
            return bs
        return max(1, min(bs, CPU_CALL_TOKENS // x.shape[1]))

    def run(self, x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        """Block (or a replacement `module` with the same call signature) on one batch of inputs."""
        out = (module or self.block)(self.on_device(x), *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def forward(self, x: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Block outputs for all calibration inputs `x` (default: the quantized-path inputs), in batches (no
        inputs: none out, as on a rank that holds none of a search's windows)."""
        x = self.q_inputs if x is None else x
        if x.shape[0] == 0:
            return x.clone()
        bs = batch_size or self.call_windows(x)
        store = self.model_ctx.store
        if store.place == "device":
            return torch.cat([self.run(x[i: i + bs]) for i in range(0, x.shape[0], bs)])
        out = None
        for i in range(0, x.shape[0], bs):
            y = self.run(x[i: i + bs])
            if out is None:
                out = store.empty((x.shape[0], *y.shape[1:]), y.dtype)
            out[i: i + bs] = y
        return out if out is not None else store.empty(tuple(x.shape), x.dtype)

    def first_windows(self, n: int | None, x: torch.Tensor | None = None) -> torch.Tensor:
        """The inputs (default: quantized path) of the first `n` calibration windows of the run that this process
        holds: all of them in a single process, its share under torchrun (see lowbit.distributed)."""
        return (self.q_inputs if x is None else x)[:distributed.leading(n, self.plan.batch_size)]

    def gathered_windows(self, n: int, x: torch.Tensor | None = None) -> torch.Tensor:
        """The inputs (default: quantized path) of the first `n` calibration windows of the run, on every rank: for a
        small search that needs every token at once (quantiles, sampled tokens) and then runs the same everywhere."""
        return distributed.gather(self.first_windows(n, x), self.plan.batch_size)

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
        parts: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}  # one plan batch's, by first call

        def pre_hook(rel: str, args: tuple) -> None:
            parts.setdefault(rel, []).append((args[0], None))
            seen.add(rel)
            if len(seen) == wanted:
                raise StopForward

        def hook(rel: str, args: tuple, out) -> None:
            parts.setdefault(rel, []).append((args[0], out[0] if isinstance(out, tuple) else out))

        modules = [(rel, self.block.get_submodule(rel)) for rel in rels]
        if stop_early:
            handles = [m.register_forward_pre_hook(lambda _m, args, rel=rel: pre_hook(rel, args)) for rel, m in modules]
        else:
            handles = [m.register_forward_hook(lambda _m, args, out, rel=rel: hook(rel, args, out))
                       for rel, m in modules]
        bs, step = self.plan.batch_size, self.call_windows(x)
        try:
            for i in range(0, x.shape[0], bs):
                end = min(i + bs, x.shape[0])
                for j in range(i, end, step):
                    seen.clear()
                    try:
                        self.run(x[j: min(j + step, end)])
                    except StopForward:
                        pass
                while parts:  # the plan's batch at once (the same sums whatever `step` is), freed as it goes
                    rel = next(iter(parts))
                    got = parts.pop(rel)
                    inp = got[0][0] if len(got) == 1 else torch.cat([a for a, _ in got])
                    out = got[0][1] if len(got) == 1 or got[0][1] is None else torch.cat([b for _, b in got])
                    del got
                    fn(rel, inp, out)
                    del inp, out
        finally:
            for h in handles:
                h.remove()


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has seen what it needs."""
