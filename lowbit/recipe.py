"""Recipes as data: YAML -> validated `Recipe`. Unknown keys and wrong types are errors naming the key."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lowbit.context import FormatPlan
from lowbit.errors import LowbitError
from lowbit.export.backends import check_settings, select_scheme
from lowbit.formats import NAMED_FORMATS, QuantSpec
from lowbit.gguf_types import TYPES
from lowbit.devices import DEVICE_PATTERN
from lowbit.loading import EMBEDDED
from lowbit.outer import OuterFormat
from lowbit.sparsity import validate_order
from lowbit.steps import Step, build_step


MAX_THREADS = 4 * (os.cpu_count() or 1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_NAMED_NOTES = {"mxfp4": "fp4 e2m1 in groups of 32 with E8M0 scales", "nvfp4": "fp4 e2m1 in groups of 16 with "
                "FP8 e4m3 scales and an FP32 per-tensor scale", "mxfp8": "fp8 e4m3 in groups of 32 with E8M0 scales"}
_FORMAT_FIELDS = ("bits", "symmetric", "granularity", "group_size", "fp_variant", "block")


class FormatConfig(_Strict):
    """A number format (see `lowbit.formats.QuantSpec`) plus the observer that picks its range.

    `format` is int, fp, or a named microscaling format (mxfp4, nvfp4, mxfp8) that fixes every other format field.
    """

    bits: int = 4
    format: Literal["int", "fp", "mxfp4", "nvfp4", "mxfp8", "gguf"] = "int"
    type: str | None = None  # format gguf: a llama.cpp type or mix (q4_0, q4_k, q6_k, q4_k_m, ...; see lowbit.gguf_types)
    symmetric: bool = True
    granularity: Literal["tensor", "channel", "group", "token", "block"] = "channel"
    group_size: int | None = None
    block: tuple[int, int] | None = None  # 2-D weight tiles [rows, columns] sharing one scale, e.g. [128, 128]
    dynamic: bool = False
    fp_variant: Literal["e4m3", "e5m2", "e2m1"] | None = None
    observer: Literal["minmax", "mse", "percentile"] = "minmax"
    clip_ratio: float = Field(1.0, gt=0, le=1)  # dynamic activations only: shrink each token's range (QuaRot: 0.9)

    @model_validator(mode="after")
    def _consistent(self) -> "FormatConfig":
        given = self.model_fields_set
        if self.format in NAMED_FORMATS:
            extra = [k for k in _FORMAT_FIELDS if k in given]
            if extra:
                raise ValueError(f"{extra[0]} does not apply to format {self.format} ({_NAMED_NOTES[self.format]}); "
                                 f"remove it")
            return self
        if self.fp_variant is not None and self.format != "fp":
            raise ValueError(f"fp_variant: {self.fp_variant} contradicts format: {self.format} (a variant names an FP "
                             f"format): set format: fp or remove fp_variant")
        if self.format == "fp" and "symmetric" in given and not self.symmetric:
            raise ValueError("symmetric: false contradicts format: fp (FP formats are symmetric): remove one of them")
        if self.group_size is not None and "granularity" in given and self.granularity not in ("group", "channel"):
            raise ValueError(f"group_size: {self.group_size} contradicts granularity: {self.granularity}: "
                             f"use granularity: group or remove group_size")
        return self

    def spec(self) -> QuantSpec:
        if self.format == "gguf" or self.type is not None:
            if self.format != "gguf" or self.type is None:
                raise LowbitError("a GGUF format is written {format: gguf, type: q4_k} (both keys): e.g. type q4_0, "
                                  "q8_0, q4_k, q6_k or the mix q4_k_m")
            fixed = sorted(self.model_fields_set & {"bits", "symmetric", "fp_variant", "block"})
            if fixed:
                raise LowbitError(f"a GGUF format takes {', '.join(fixed)} from its type {self.type!r}: remove them")
            return QuantSpec(gguf=self.type, granularity="group", group_size=self.group_size)
        if self.format in NAMED_FORMATS:
            return QuantSpec.named(self.format, dynamic=self.dynamic)
        return QuantSpec(bits=self.bits, format=self.format, symmetric=self.symmetric, granularity=self.granularity,
                         group_size=self.group_size, dynamic=self.dynamic, fp_variant=self.fp_variant, block=self.block)


_FORMAT_NAME = re.compile(r"w([2-8])(?:g(\d+))?(?:-(sym|asym))?")
DEFAULT_CANDIDATES = ["w2g64", "w3g64", "w4g64", "w8"]


def format_from_name(name: str, base: FormatConfig | None) -> FormatConfig:
    """A candidate weight format from its short name (w4g64, w8, w3g128-sym, fp8, mxfp4, q4_0, ...); symmetry and
    observer default to the recipe's weights."""
    base = base or FormatConfig(symmetric=False)
    common = {"observer": base.observer}
    if name in TYPES:  # one llama.cpp block type per tensor (q4_0, q8_0, q4_k, q6_k, ...)
        return FormatConfig(format="gguf", type=name)
    if name == "fp8":
        return FormatConfig(bits=8, format="fp", **common)
    if name in NAMED_FORMATS:
        return FormatConfig(format=name, **common)
    m = _FORMAT_NAME.fullmatch(name)
    if m is None:
        raise LowbitError(f"unknown format name {name!r}: use w<bits>[g<group>][-sym|-asym] with bits 2-8 "
                          f"(e.g. w4g64, w8, w3g128-sym), fp8, {', '.join(NAMED_FORMATS)} or a GGUF type ({', '.join(TYPES)})")
    bits, group, sym = m.groups()
    symmetric = base.symmetric if base.format == "int" and sym is None else sym == "sym"
    return FormatConfig(bits=int(bits), symmetric=symmetric, group_size=int(group) if group else None, **common)


class BudgetConfig(_Strict):
    """Automatic mixed precision: one candidate format per linear, minimising the predicted loss under a size
    budget (average bits per quantized weight, or model megabytes as the size column counts them)."""

    avg_bits: float | None = Field(None, gt=0)
    size_mb: float | None = Field(None, gt=0)
    formats: list[str] = DEFAULT_CANDIDATES
    metric: Literal["hessian", "fisher", "loss"] = "fisher"  # predicted loss per layer (see lowbit.sensitivity)
    sensitivity: str | None = None  # a table written by `lowbit sensitivity` (else measured at the start of the run)
    heldout: int = Field(4, gt=0)  # held-out calibration windows the sensitivity is measured on

    @model_validator(mode="after")
    def _one_budget(self) -> "BudgetConfig":
        if (self.avg_bits is None) == (self.size_mb is None):
            raise ValueError("give exactly one of avg_bits or size_mb")
        if not self.formats:
            raise ValueError("give at least one candidate format")
        return self


class CalibrationConfig(_Strict):
    """Where the calibration windows come from: one source, or a weighted mix of sources ([{wikitext2: 0.5},
    {lambada: 0.5}]); a source is a text (see `lowbit.data.load_text`) or `self` (text the model writes)."""

    data: str | list[dict[str, float]] = "wikitext2"
    split: str = "validation"
    n_samples: int = Field(64, gt=0)
    seq_len: int = Field(512, gt=1)
    seed: int = 0
    batch_size: int = Field(8, gt=0)

    @field_validator("data")
    @classmethod
    def _mix(cls, value: str | list[dict[str, float]]) -> str | list[dict[str, float]]:
        """A mix lists each source once as {name: weight}, weights > 0 summing to 1."""
        if isinstance(value, str):
            return value
        if not value or any(len(item) != 1 for item in value):
            raise ValueError("a calibration mix is a list of one-key entries {source: weight}, e.g. "
                             "[{wikitext2: 0.5}, {lambada: 0.5}]")
        names = [name for item in value for name in item]
        if len(set(names)) < len(names):
            raise ValueError(f"calibration mix names a source twice ({', '.join(names)}): list each once")
        weights = [w for item in value for w in item.values()]
        if any(not w > 0 for w in weights):
            raise ValueError(f"calibration mix weights must be > 0, got {weights}")
        if abs(sum(weights) - 1) > 1e-6:
            raise ValueError(f"calibration mix weights sum to {sum(weights):g}, not 1: rescale them")
        return value

    def mix(self) -> list[tuple[str, float]]:
        """(source, weight) pairs; one source has weight 1."""
        if isinstance(self.data, str):
            return [(self.data, 1.0)]
        return [(name, w) for item in self.data for name, w in item.items()]

    def text(self, why: str) -> str:
        """The one calibration text, for uses that need held-out windows of it (`why` says which)."""
        if not isinstance(self.data, str) or self.data == "self":
            raise LowbitError(f"{why} needs one calibration text, not {self.data!r}: set calibration.data to a text "
                              f"such as wikitext2")
        return self.data


DEFAULT_TEXTS = ["wikitext2", "lambada"]  # in domain (the calibration text's) and out of domain (novels)


class EvaluationConfig(_Strict):
    """Perplexity on one text or several (each scored on its own; seq_len and max_tokens apply to each)."""

    data: str | list[str] = DEFAULT_TEXTS
    split: str = "test"
    seq_len: int = Field(2048, gt=1)
    max_tokens: int | None = Field(32768, gt=1)
    batch_size: int = Field(1, gt=0)
    baseline: bool = True  # also evaluate the uncompressed model (cached per model and settings)

    @field_validator("data")
    @classmethod
    def _texts(cls, value: str | list[str]) -> str | list[str]:
        """A list names each text once, at least one."""
        if isinstance(value, list) and (not value or len(set(value)) < len(value)):
            raise ValueError(f"evaluation.data lists {value}: give at least one text, each once")
        return value

    def texts(self) -> list[str]:
        """The evaluation texts in order; the first is the one `ppl` in metrics.json reports."""
        return [self.data] if isinstance(self.data, str) else list(self.data)

    def for_text(self, text: str) -> "EvaluationConfig":
        """These settings for one of the texts."""
        return self.model_copy(update={"data": text})


class StepConfig(_Strict):
    name: str
    args: dict[str, Any] = {}


class Recipe(_Strict):
    name: str = "run"
    model: str = EMBEDDED
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the checkpoint's own
    device: str = Field("auto", pattern=DEVICE_PATTERN)  # auto: the first GPU if any, else cpu
    stream: bool | Literal["auto"] = "auto"  # one block in memory at a time, from and to disk (auto: if too big)
    max_memory: str | None = None  # budget per device, e.g. "4GB" or "cpu=8GB,cuda:0=20GB" (see lowbit.plan)
    offload: Literal["auto", "none", "cpu", "disk"] = "auto"  # calibration activations: auto = by the budget
    threads: int | None = Field(None, gt=0, le=MAX_THREADS)
    seed: int = 0
    weights: FormatConfig | None = FormatConfig(bits=4, symmetric=False, granularity="group", group_size=64)
    activations: FormatConfig | None = None
    layers: dict[str, FormatConfig | None] = {}
    head: FormatConfig | None = None  # the LM head's format (None: kept in 16 bits), see lowbit.outer
    embedding: FormatConfig | None = None  # the input token embedding's format (per row = per token)
    steps: list[StepConfig] = [StepConfig(name="rtn")]
    calibration: CalibrationConfig = CalibrationConfig()
    evaluation: EvaluationConfig | None = EvaluationConfig()
    save: bool = True
    diagnostics: bool = True  # per-block errors in blocks.jsonl; false: data-free steps skip every forward pass
    target: str | None = None  # export target the formats must fit (see `lowbit backends`), checked up front
    budget: BudgetConfig | None = None  # choose `layers` automatically (replaced by the chosen map when run)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        """Run names become folder names: keep letters, digits, '.', '_', '+', '-'; no path separators, no '..'."""
        safe = re.sub(r"[^A-Za-z0-9._+-]+", "-", value).strip(".-")[:100]
        return safe or "run"

    @field_validator("steps", mode="before")
    @classmethod
    def _steps_from_yaml(cls, value: Any) -> Any:
        """Accept the YAML shapes `- rtn` and `- gptq: {damp: 0.01}` besides {name, args}."""
        if not isinstance(value, list):
            return value
        out = []
        for item in value:
            if isinstance(item, str):
                out.append({"name": item})
            elif isinstance(item, dict) and len(item) == 1 and "name" not in item:
                (name, args), = item.items()
                out.append({"name": name, "args": args or {}})
            else:
                out.append(item)
        return out

    def plan(self) -> FormatPlan:
        """The run's formats plan; refuses format combinations no step can honour."""
        acts = self.activations.spec() if self.activations else None
        if acts is not None and acts.gguf is not None:
            raise LowbitError("GGUF types are weight formats (llama.cpp quantizes activations itself): remove "
                              "activations.format: gguf")
        if acts is not None and acts.granularity == "block":
            raise LowbitError("activations cannot use 2-D blocks: use per-token groups (group_size: 128, dynamic: true)")
        if acts is not None and acts.scale_format == "e4m3":
            raise LowbitError("activations: nvfp4 needs a calibrated per-tensor scale, which lowbit does not implement; "
                              "use mxfp4 or mxfp8 (dynamic: true) or fp8")
        if acts is not None and not acts.dynamic and acts.granularity != "tensor":
            raise LowbitError("static activation quantization is per-tensor: set activations.granularity: tensor, "
                              "or dynamic: true for per-token")
        if acts is not None and not acts.dynamic and self.activations.clip_ratio != 1:
            raise LowbitError("activations.clip_ratio applies to dynamic activations; static ranges are chosen by "
                              "activations.observer (mse or percentile to clip)")
        for key, fmt in [("weights", self.weights), *((f"layers.{p}", f) for p, f in self.layers.items())]:
            if fmt is not None and fmt.clip_ratio != 1:
                raise LowbitError(f"{key}.clip_ratio is for activations only: clip weights with {key}.observer: mse")
        if self.budget is not None and self.weights is None:
            raise LowbitError("budget allocates weight formats: set weights (its symmetry and observer apply to the "
                              "candidates) or remove budget")
        return FormatPlan(
            weights=self.weights.spec() if self.weights else None,
            weight_observer=self.weights.observer if self.weights else "minmax",
            activations=acts,
            act_observer=self.activations.observer if self.activations else "minmax",
            act_clip_ratio=self.activations.clip_ratio if self.activations else 1.0,
            overrides=tuple((p, f.spec() if f else None) for p, f in self.layers.items()),
            batch_size=self.calibration.batch_size,
        )

    def outer_formats(self) -> tuple[OuterFormat | None, OuterFormat | None]:
        """The head's and the embedding's formats with their observers."""
        return tuple(OuterFormat(f.spec(), f.observer) if f is not None else None for f in (self.head, self.embedding))

    def build_steps(self) -> list[Step]:
        steps = [build_step(sc.name, sc.args, f"steps[{i}].{sc.name}") for i, sc in enumerate(self.steps)]
        validate_order(steps)
        return steps


def _format_validation(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"recipe error at {where or 'top level'}: {err['msg'].removeprefix('Value error, ')}{more}"


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b.c=value` overrides (value parsed as YAML; list items addressed by index)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise LowbitError(f"--set expects key=value (e.g. weights.bits=3), got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise LowbitError(f"--set {key}: the value is not valid YAML ({getattr(exc, 'problem', None) or exc}): "
                              f"quote it or fix it") from None
        parts = key.split(".")
        node: Any = data
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[_index(part, key, node)]
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            node[_index(last, key, node)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise LowbitError(f"--set {key}: {'.'.join(parts[:-1])} is not a mapping")
    return data


def _index(part: str, key: str, node: list) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise LowbitError(f"--set {key}: {part!r} is not a valid index into a list of {len(node)} items")
    return int(part)


def parse_recipe(data: dict) -> Recipe:
    try:
        recipe = Recipe(**data)
    except ValidationError as exc:
        raise LowbitError(_format_validation(exc)) from None
    except TypeError as exc:
        raise LowbitError(f"recipe error: {exc}") from None
    plan = recipe.plan()
    _check_solvers(plan, recipe.build_steps())
    if recipe.target is not None:
        check_settings(recipe.target, plan)
    if recipe.budget is not None:
        candidate_formats(recipe)
    return recipe


def candidate_formats(recipe: Recipe, names: list[str] | None = None) -> dict[str, FormatConfig]:
    """The budget's candidate formats by name, each checked against the recipe's export target."""
    names = names if names is not None else recipe.budget.formats
    out = {}
    for name in names:
        fmt = format_from_name(name, recipe.weights)
        if recipe.target is not None:
            try:
                select_scheme(recipe.target, fmt.spec(), recipe.activations.spec() if recipe.activations else None)
            except LowbitError as exc:
                raise LowbitError(f"candidate format {name} cannot be served by target {recipe.target} "
                                  f"({str(exc).split(': ', 1)[-1]}): drop it from the candidate formats") from None
        out[name] = fmt
    if len(set(map(str, out.values()))) < len(out):
        raise LowbitError(f"candidate formats {', '.join(names)} name the same format twice: list each once")
    return out


GGUF_SOLVERS = ("rtn", "gptq", "awq", "sparsegpt")  # their scales come from the observers, which know GGUF grids


def _check_solvers(plan: FormatPlan, steps: list[Step]) -> None:
    """Refuse up front the solvers a weight format rules out: NVFP4's per-tensor scale is shared by fused linears
    (only rtn and gptq solve with it); GGUF types need the observers' two-level scales (GGUF_SOLVERS)."""
    specs = [plan.weights, *(spec for _, spec in plan.overrides)]
    if any(spec is not None and spec.scale_format == "e4m3" for spec in specs):
        other = next((s.name for s in steps if s.solves_weights and s.name not in ("rtn", "gptq")), None)
        if other is not None:
            raise LowbitError(f"step {other} cannot solve nvfp4 weights (their per-tensor scale is shared by fused "
                              f"linears): use rtn or gptq, or another weight format")
    if any(spec is not None and spec.gguf is not None for spec in specs):
        other = next((s.name for s in steps if s.solves_weights and s.name not in GGUF_SOLVERS), None)
        if other is not None:
            raise LowbitError(f"step {other} cannot solve GGUF weights (it learns scales or roundings off llama.cpp's "
                              f"grid): use {', '.join(GGUF_SOLVERS)}")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a YAML recipe; every problem is a one-line LowbitError."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"recipe file {path} does not exist: give the path to a YAML recipe (see recipes/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise LowbitError(f"recipe {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}): save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise LowbitError(f"recipe {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise LowbitError(f"recipe {path} must be a YAML mapping (keys like model, weights, steps)")
    return parse_recipe(apply_overrides(data, list(overrides)))


def recipe_to_yaml(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json")
    data["steps"] = [{s["name"]: s["args"]} for s in data["steps"]]
    return yaml.safe_dump(data, sort_keys=False)
