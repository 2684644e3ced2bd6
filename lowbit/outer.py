"""The weights outside the decoder blocks: the LM head and the input token embedding, each rounded to nearest in
its own format after the blocks are compressed (e.g. 8 bits per row once a rotation has untied them, so the model
is no larger than with the tied 16-bit matrix). Both matrices are [vocab, hidden], so per-channel and per-group
formats mean per token row for either; a head still tied to the embedding gets one format for both names."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.context import round_to_nearest
from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, check_shape
from lowbit.models.base import Adapter
from lowbit.state import QuantState, WeightRecord


@dataclass(frozen=True)
class OuterFormat:
    """A format for the head or the embedding and the observer that picks its ranges."""

    spec: QuantSpec
    observer: str = "minmax"


def check_outer(model: nn.Module, adapter: Adapter, head: OuterFormat | None, embedding: OuterFormat | None) -> None:
    """Refuse, before any work, an outer format that cannot apply (GGUF types, activation-style formats, shapes)."""
    for name, fmt in ((adapter.head_path, head), (adapter.embedding_paths[0], embedding)):
        if fmt is None:
            continue
        if fmt.spec.gguf is not None or fmt.spec.dynamic or fmt.spec.granularity == "token":
            raise LowbitError(f"{name} takes a weight format (e.g. {{bits: 8, granularity: channel}}), not "
                              f"{fmt.spec.describe()}")
        check_shape(model.get_submodule(name).weight.shape, fmt.spec, name)


def outer_targets(model: nn.Module, adapter: Adapter, head: OuterFormat | None,
                  embedding: OuterFormat | None) -> dict[str, OuterFormat]:
    """Module name -> format of each outer weight to quantize; a tied head and embedding share one format."""
    tied = adapter.tied_head(model)
    if tied and head is not None and embedding is not None and head != embedding:
        raise LowbitError("the head shares its weight with the embedding in this model, so head and embedding "
                          "take one format: give the same format to both, or only one of them")
    targets: dict[str, OuterFormat] = {}
    if head is not None or (tied and embedding is not None):
        targets[adapter.head_path] = head or embedding
    if embedding is not None or (tied and head is not None):
        targets[adapter.embedding_paths[0]] = embedding or head
    return targets


def quantize_outer(model: nn.Module, adapter: Adapter, targets: dict[str, OuterFormat], state: QuantState) -> None:
    """Round each target's weight to nearest in place (a shared weight once) and record its format in `state`."""
    done = {}
    for name, fmt in targets.items():
        weight = model.get_submodule(name).weight
        if weight.is_meta:
            raise LowbitError(f"{name} is not in memory (streamed run): quantize the head and embedding with "
                              f"stream: false")
        if id(weight) not in done:
            w_q, scale, zero = round_to_nearest(weight.data, fmt.spec, fmt.observer)
            weight.data.copy_(w_q.to(weight.dtype))
            done[id(weight)] = (scale, zero)
        scale, zero = done[id(weight)]
        state.weights[name] = WeightRecord(fmt.spec, scale.clone(), zero.clone())  # saved once per name
