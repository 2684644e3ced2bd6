"""Where decoder blocks live while the pipeline walks them: device placement, streaming, checkpoints.

`BlockIO` is called by `pipeline.compress` around each block. The default keeps the whole model in memory on
the CPU. With a device, the block being compressed and the calibration activations live there, the rest on
the CPU. With a `reader`, blocks are read from the safetensors shards when reached and, once compressed,
written to `out_dir` as HF shards and freed, and their quantization state is moved to files in `spill_dir`
(memory-mapped back). With `checkpoints`, every finished block ends in an atomic
checkpoint, and `begin` continues from the newest one when `resume` is set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lowbit.activations import ActivationStore
from lowbit.checkpoint import Checkpoints
from lowbit.errors import LowbitError
from lowbit.files import write_error
from lowbit import distributed, streaming

if TYPE_CHECKING:
    from lowbit.pipeline import BlockContext, ModelContext


class ProbeDone(Exception):
    """Raised after `stop_after` blocks, to time a short probe of the pipeline."""


@dataclass
class BlockIO:
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    reader: streaming.ShardReader | None = None  # stream blocks from these shards
    out_dir: Path | None = None  # streamed: where finished blocks are written (the output model folder)
    checkpoints: Checkpoints | None = None
    resume: bool = False
    stop_after: int | None = None
    store: ActivationStore | None = None  # where calibration activations live (default: on `device`)
    spill_dir: Path | None = None  # streamed: where finished blocks' quantization state is kept (default: out_dir)

    def __post_init__(self) -> None:
        if self.store is None:
            self.store = ActivationStore("device", self.device)

    @property
    def streamed(self) -> bool:
        return self.reader is not None

    def begin(self, mctx: "ModelContext", inputs: torch.Tensor, fp_inputs: torch.Tensor | None, args: tuple,
              kwargs: dict) -> tuple[int, torch.Tensor, torch.Tensor | None, tuple, dict]:
        """Block to start at and its inputs (from the newest checkpoint when resuming), placed on the device."""
        start = 0
        if self.streamed:  # embeddings, norm and head are not needed again until evaluation or `finish`
            streaming.free_rest(mctx.model, mctx.adapter)
        if self.resume:
            resumed = self.checkpoints.load()
            start = resumed.finished
            bs = mctx.plan.batch_size  # a checkpoint holds every rank's windows: keep this rank's
            inputs = distributed.shard(resumed.inputs, bs).to(inputs.dtype)
            fp_inputs = None if resumed.fp_inputs is None else distributed.shard(resumed.fp_inputs, bs)
            _merge_state(mctx, resumed.state, start)
            if self.streamed:
                for i in range(start):
                    self._spill(mctx.state, mctx.adapter.block_name(i) + ".")
            else:
                for i, path in resumed.block_files.items():
                    streaming.load_tensors(mctx.model, load_file(str(path)), self.dtype)
        if self.resume or self.store.place == "device":  # (captured inputs are already in an offload store)
            same = fp_inputs is inputs
            inputs = self.store.put(inputs)
            fp_inputs = inputs if same else None if fp_inputs is None else self.store.put(fp_inputs)
        return start, inputs, fp_inputs, to_device(args, self.device), to_device(kwargs, self.device)

    def load(self, mctx: "ModelContext", index: int) -> None:
        """Make block `index` resident on the device."""
        if self.streamed:
            streaming.load_block(mctx.model, mctx.adapter, self.reader, index, self.dtype, self.device)
        elif self.device.type != "cpu":
            mctx.adapter.blocks(mctx.model)[index].to(self.device)

    def done(self, ctx: "BlockContext", inputs: torch.Tensor, fp_inputs: torch.Tensor | None) -> None:
        """Block `ctx.index` is compressed and `inputs` are the next block's: write, free, checkpoint."""
        try:
            self._write(ctx, inputs, fp_inputs)
        except (OSError, SafetensorError) as exc:
            raise LowbitError(f"writing the run failed: {write_error(exc)} (after block {ctx.index}): free some "
                              f"space or choose another --out") from None
        if self.stop_after is not None and ctx.index + 1 >= self.stop_after:
            raise ProbeDone

    def _write(self, ctx: "BlockContext", inputs: torch.Tensor, fp_inputs: torch.Tensor | None) -> None:
        model, n = ctx.model_ctx.model, len(ctx.adapter.blocks(ctx.model_ctx.model))
        names = [f"{ctx.name}.{k}" for k in ctx.block.state_dict()]
        if self.streamed:
            for name, p in ctx.block.named_parameters():
                if not torch.isfinite(p).all():
                    raise LowbitError(f"parameter {ctx.name}.{name} has non-finite values after compression; "
                                      f"not saving it")
            file = streaming.write_shard(self.out_dir, ctx.index, n + 1, streaming.module_tensors(model, names))
            if self.checkpoints is not None and distributed.is_main():
                self.checkpoints.record_block(self.out_dir / file)
            streaming.free(ctx.block)
        else:
            if self.device.type != "cpu":
                ctx.block.to("cpu")
            if self.checkpoints is not None and distributed.is_main():
                directory = self.checkpoints.block_dir()
                file = streaming.write_shard(directory, ctx.index, n + 1, streaming.module_tensors(model, names))
                self.checkpoints.record_block(directory / file)
        if self.checkpoints is not None:  # every rank's windows, in one checkpoint that rank 0 writes
            bs = ctx.plan.batch_size
            inputs = distributed.gather(inputs, bs)
            fp_inputs = None if fp_inputs is None else distributed.gather(fp_inputs, bs)
            if distributed.is_main():
                self.checkpoints.save(ctx.index + 1, inputs, fp_inputs, ctx.state, ctx.name + ".")
        if self.streamed:
            self._spill(ctx.state, ctx.name + ".")

    def _spill(self, state, prefix: str) -> None:
        directory = self.spill_dir or self.out_dir
        directory.mkdir(parents=True, exist_ok=True)
        state.spill(prefix, directory / f".state-{prefix}pt")

    def finish(self, model: torch.nn.Module, adapter, load: bool = True) -> None:
        """Streamed: copy the tensors outside the blocks (unchanged: streamed steps change only blocks) into the
        last shard, chunk by chunk, write the index, and load them back into the model if `load` (evaluation
        needs them; otherwise they stay placeholders, tied as the checkpoint says, like the written blocks)."""
        if not self.streamed:
            return
        n = len(adapter.blocks(model))
        streaming.copy_shard(self.out_dir, n, n + 1, self.reader, streaming.rest_names(adapter, self.reader.names()),
                             self.dtype)
        streaming.write_index(self.out_dir)
        if load:
            streaming.load_rest(model, adapter, self.reader, self.dtype)
        else:
            streaming.tie_head(model, adapter, self.reader)


def _merge_state(mctx: "ModelContext", loaded, finished: int) -> None:
    """Take the finished blocks' quantization state from a checkpoint, keep the fresh one for the rest."""
    prefixes = tuple(mctx.adapter.block_name(i) + "." for i in range(finished))
    state = mctx.state
    state.weights.update(loaded.weights)
    state.transforms.update(loaded.transforms)
    state.masks.update(loaded.masks)
    for kind in ("input_quantizers", "output_quantizers"):
        table = getattr(state, kind)
        for name, q in getattr(loaded, kind).items():
            if name.startswith(prefixes):
                q.enabled = True
                table[name] = q


def to_device(value: Any, device: torch.device) -> Any:
    """Move tensors inside (nested) tuples, lists and dicts to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
