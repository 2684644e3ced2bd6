"""What each export target can execute, so an impossible export or recipe fails before any work starts.

A target offers one or more `Scheme`s (a kind of quantized linear its engine runs); a layer is exportable
if one scheme accepts every property of its weight and activation formats. Errors name the first
unsupported property and the targets that do support it.
"""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit import gguf_types
from lowbit.formats import QuantSpec

ANY = None  # a scheme field set to ANY accepts every value


@dataclass(frozen=True)
class Scheme:
    """One kind of quantized linear a target executes: accepted weight and activation formats."""

    name: str
    weights: tuple[str, ...]  # e.g. "int4", "fp8-e4m3"
    symmetry: tuple[str, ...] | None  # "symmetric" / "asymmetric" (integer weights), ANY
    granularity: tuple[str, ...] | None  # "per-tensor", "per-channel", "group 128", ...; ANY
    activations: tuple[str, ...]  # act_key values, "none" = weight-only
    note: str = ""

    def accepts(self, prop: str, value: str) -> bool:
        """True if `value` is allowed; an allowed entry ending in '*' accepts any value with that prefix."""
        allowed = {"weights": self.weights, "weight symmetry": self.symmetry,
                   "weight granularity": self.granularity, "activations": self.activations}[prop]
        return allowed is ANY or any(value == a or (a.endswith("*") and value.startswith(a[:-1])) for a in allowed)


@dataclass(frozen=True)
class Target:
    name: str
    engine: str
    schemes: tuple[Scheme, ...]


_GROUPS = ("group 32", "group 64", "group 128")
_INT8_ACTS = ("int8 dynamic per-token", "int8 static per-tensor")
_FP8_ACTS = ("fp8-e4m3 dynamic per-token", "fp8-e4m3 static per-tensor")
_GGUF_NOTE = "exact for symmetric per-channel or groups of a multiple of 32; other grids are re-fit per block of 32"

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("compressed-tensors", "vLLM, SGLang", (
        Scheme("pack-quantized", ("int4", "int8"), ("symmetric", "asymmetric"), ("per-channel", *_GROUPS), ("none",),
               "W4A16 / W8A16"),
        Scheme("int-quantized", ("int8",), ("symmetric",), ("per-channel", "per-tensor"), _INT8_ACTS, "W8A8"),
        Scheme("float-quantized", ("fp8-e4m3",), ANY, ("per-channel", "per-tensor", "block *"),
               ("none", *_FP8_ACTS, "fp8-e4m3 dynamic group *"),
               "FP8; block weights (DeepSeek-style) with per-token-group activations of the block's width"),
        Scheme("mxfp4-pack-quantized", ("mxfp4",), ANY, ANY, ("none",), "W4A16 MXFP4"),
        Scheme("nvfp4-pack-quantized", ("nvfp4",), ANY, ANY, ("none",),
               "W4A16 NVFP4; one per-tensor scale per fused q/k/v and gate/up"),
        Scheme("mxfp8-quantized", ("mxfp8",), ANY, ANY, ("none",), "W8A16 MXFP8"),
    )),
    Target("gguf-q8_0", "llama.cpp", (Scheme("Q8_0", ("int8", "gguf-q8_0"), ANY, ANY, ("none",), _GGUF_NOTE),)),
    Target("gguf-q4_0", "llama.cpp", (Scheme("Q4_0", ("int4", "gguf-q4_0"), ANY, ANY, ("none",), _GGUF_NOTE),)),
    Target("gguf", "llama.cpp", (Scheme("GGUF types", tuple(f"gguf-{n}" for n in gguf_types.names()), ANY, ANY,
                                        ("none",), "exact: each tensor in the GGUF type the run solved it on "
                                                   "(K-quant rows not a multiple of 256 use llama.cpp's fallback)"),)),
)}


def weight_key(spec: QuantSpec) -> str:
    """A GGUF type (gguf-q4_k, ...), a named microscaling format (mxfp4, ...) or the element type (int4, fp8-e4m3, ...)."""
    if spec.gguf is not None:
        return f"gguf-{spec.gguf}"
    return spec.name or spec.element_key


def act_key(spec: QuantSpec | None) -> str:
    """'none', or e.g. 'int8 dynamic per-token' (' asymmetric' appended when it is)."""
    if spec is None:
        return "none"
    key = f"{weight_key(spec)} {'dynamic' if spec.dynamic else 'static'} {spec.granularity_key}"
    return key if spec.symmetric or spec.format == "fp" else f"{key} asymmetric"


def layer_properties(weights: QuantSpec, acts: QuantSpec | None) -> list[tuple[str, str]]:
    props = [("weights", weight_key(weights))]
    if weights.format == "int":
        props.append(("weight symmetry", "symmetric" if weights.symmetric else "asymmetric"))
    props += [("weight granularity", weights.granularity_key), ("activations", act_key(acts))]
    return props


def supporting_targets(prop: str, value: str) -> list[str]:
    return [t.name for t in TARGETS.values() if any(s.accepts(prop, value) for s in t.schemes)]


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise LowbitError(f"unknown export target {name!r}: choose from {', '.join(TARGETS)}")
    return TARGETS[name]


def select_scheme(target: str, weights: QuantSpec | None, acts: QuantSpec | None, where: str = "") -> Scheme | None:
    """The scheme of `target` that runs a layer with these formats (None: the layer stays unquantized).

    Raises a one-line LowbitError naming the first unsupported property and the targets that support it.
    """
    tgt = get_target(target)
    at = f" ({where})" if where else ""
    if weights is None:
        if acts is not None:
            raise LowbitError(f"cannot export to {target}: activations {act_key(acts)} on a layer with unquantized "
                              f"weights{at} is not supported by any export target; quantize its weights too")
        return None
    props = layer_properties(weights, acts)
    candidates = []
    for scheme in tgt.schemes:
        missing = [(p, v) for p, v in props if not scheme.accepts(p, v)]
        if not missing:
            _check_block_acts(target, weights, acts, at)
            return scheme
        # report against the closest scheme, preferring one that runs the layer's activation format
        candidates.append((len(missing), not scheme.accepts("activations", act_key(acts)), missing, scheme))
    _, _, best_missing, best = min(candidates, key=lambda c: c[:2])
    prop, value = best_missing[0]
    others = [t for t in supporting_targets(prop, value) if t != target]
    allowed = {"weights": best.weights, "weight symmetry": best.symmetry, "weight granularity": best.granularity,
               "activations": best.activations}[prop]
    support = f"targets that support it: {', '.join(others)}" if others else "no export target supports it"
    raise LowbitError(f"cannot export to {target}: {prop} {value}{at} is not supported ({best.name} takes "
                      f"{' | '.join(allowed)}); {support}")


def _check_block_acts(target: str, weights: QuantSpec, acts: QuantSpec | None, at: str) -> None:
    """Engines quantize the activations of a block-scaled FP8 linear in per-token groups of the block's width."""
    if weights.granularity == "block" and acts is not None and acts.group_size != weights.block[1]:
        raise LowbitError(f"cannot export to {target}: activations {act_key(acts)}{at} must be per-token groups of "
                          f"the weight block's width {weights.block[1]} (set activations.group_size: "
                          f"{weights.block[1]}, dynamic: true)")


def check_transforms(target: str, transforms: dict[str, dict]) -> None:
    """Online transforms would have to run inside the engine; no target here can declare ours, so refuse."""
    for name, cfg in transforms.items():
        raise LowbitError(f"cannot export to {target}: online input transform {cfg.get('kind')!r} on {name} is not "
                          f"supported by any export target; use a recipe whose transforms fold into the weights")


SPARSE_TARGETS = {"compressed-tensors": "sparsity_config (format dense: zeros stored in place, structure recorded)"}


def check_sparsity(target: str, masks: dict) -> None:
    """A sparse run exports only where the format records its sparsity; GGUF has no notion of it."""
    if masks and target not in SPARSE_TARGETS:
        raise LowbitError(f"cannot export to {target}: sparsity ({len(masks)} pruned linears) is not representable "
                          f"in {target}; targets that support it: {', '.join(SPARSE_TARGETS)}")


def check_settings(target: str, settings) -> None:
    """Validate a recipe's formats (`context.FormatPlan`) against `target` before any work starts."""
    for spec in [settings.weights] + [spec for _, spec in settings.overrides]:
        select_scheme(target, spec, settings.activations, "recipe")


def backends_table() -> str:
    """Markdown table of every target's schemes: what the `lowbit backends` command prints."""
    rows = ["| target | engine | scheme | weights | symmetry | granularity | activations | note |",
            "|---|---|---|---|---|---|---|---|"]
    for t in TARGETS.values():
        for s in t.schemes:
            symmetry = "n/a" if all(w.startswith("fp") for w in s.weights) else ", ".join(s.symmetry or ("any",))
            cells = [t.name, t.engine, s.name, ", ".join(s.weights), symmetry,
                     ", ".join(s.granularity or ("any",)), ", ".join(s.activations), s.note]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
