"""One compression run: load, calibrate, compress block by block, evaluate, and write one output folder."""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from lowbit import __version__
from lowbit.allocate import allocate_recipe
from lowbit.context import FormatPlan
from lowbit.data import calibration_windows, eval_windows, load_text, tokenize
from lowbit.errors import LowbitError
from lowbit.eval import perplexity
from lowbit.files import check_utf8_path, publish, staging_path, sweep_leftovers, write_atomic, write_error
from lowbit.loading import cache_dir, empty_model, load_model, resolve_model_path
from lowbit.models import get_adapter
from lowbit.pipeline import check_finite, compress, validate
from lowbit.recipe import EvaluationConfig, Recipe, recipe_to_yaml
from lowbit.report import model_size
from lowbit.runfolder import new_run_id, save_run, seal_run
from lowbit.sparsity import sparsity_report
from lowbit.state import QuantState

log = logging.getLogger("lowbit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunResult:
    metrics: dict
    out_dir: Path | None
    model: nn.Module
    state: QuantState


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def evaluate_ppl(model: nn.Module, tokenizer, cfg: EvaluationConfig, desc: str, progress: bool = True) -> dict:
    tokens = tokenize(tokenizer, load_text(cfg.data, cfg.split))
    windows = eval_windows(tokens, cfg.seq_len, cfg.max_tokens)
    return perplexity(model, windows, cfg.batch_size, progress=progress, desc=desc).to_dict()


def _baseline_key(model_path: str, recipe: Recipe) -> str:
    """Identify an FP baseline by model files, eval settings, dtype and library versions."""
    parts = [model_path, recipe.dtype, recipe.evaluation.model_dump_json(), torch.__version__]
    path = Path(model_path)
    if path.is_dir():
        for f in sorted(path.glob("*")):
            if f.suffix in (".json", ".safetensors", ".bin"):
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    if recipe.evaluation.data != "wikitext2":
        data = Path(recipe.evaluation.data)
        parts.append(f"{data.stat().st_mtime_ns}" if data.exists() else "")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def baseline_ppl(model: nn.Module, tokenizer, model_path: str, recipe: Recipe, progress: bool) -> dict:
    """Perplexity of the uncompressed model, cached on disk since it is the same for every recipe."""
    cache = cache_dir() / "baselines"
    key_file = cache / f"{_baseline_key(model_path, recipe)}.json"
    try:
        result = json.loads(key_file.read_text(encoding="utf-8"))
        if isinstance(result, dict) and "ppl" in result:
            return {**result, "cached": True}
    except (OSError, ValueError):
        pass  # missing or damaged: evaluate again and rewrite it
    result = evaluate_ppl(model, tokenizer, recipe.evaluation, "perplexity (FP)", progress)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(cache)
        write_atomic(key_file, json.dumps(result))
    except OSError as exc:
        log.warning("could not cache the FP perplexity in %s (%s)", cache, exc.strerror or exc)
    return {**result, "cached": False}


def default_out_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_before_loading(recipe: Recipe, plan: FormatPlan) -> int:
    """Check the formats against the model's shapes from its config alone; returns the bytes a save will need."""
    empty = empty_model(recipe.model, DTYPES[recipe.dtype])
    validate(empty, get_adapter(empty), plan)
    params = {id(p): p.numel() * p.element_size() for p in empty.parameters()}
    return int(sum(params.values()) * 1.05) + 64 * 2**20  # model, plus tokenizer, state and log


def _staging_folder(out_dir: Path, explicit: bool, need_bytes: int) -> Path:
    """Create the hidden folder a run writes into, after checking the target and its free space."""
    check_utf8_path(out_dir, "output folder")
    if explicit and (out_dir.exists() or out_dir.is_symlink()):
        raise LowbitError(f"output folder {out_dir} already exists: choose another --out or remove it")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(out_dir.parent)
        staging = staging_path(out_dir)
        staging.mkdir()
        free = shutil.disk_usage(out_dir.parent).free
    except OSError as exc:
        raise LowbitError(f"cannot write the output folder {out_dir}: {exc.strerror or exc} "
                          f"({exc.filename or out_dir.parent}): choose a writable --out") from None
    if free < need_bytes:
        staging.rmdir()
        raise LowbitError(f"{out_dir.parent} has {free / 1e6:.0f} MB free but the run needs about "
                          f"{need_bytes / 1e6:.0f} MB: free some space or choose another --out")
    return staging


def run_recipe(recipe: Recipe, out_dir: Path | None = None, progress: bool = True) -> RunResult:
    """Compress and evaluate per `recipe`; if `recipe.save`, write everything into `out_dir` atomically.

    Without an explicit `out_dir` the folder is runs/NAME-TIMESTAMP, suffixed -2, -3, ... if a concurrent run
    took that name first. An interrupted run leaves at most a hidden staging folder that names its process."""
    plan = recipe.plan()
    steps = recipe.build_steps()
    need_bytes = check_before_loading(recipe, plan)
    staging = None
    if recipe.save:
        explicit = out_dir is not None
        out_dir = Path(out_dir) if explicit else default_out_dir(recipe)
        staging = _staging_folder(out_dir, explicit, need_bytes)
    handler = _log_to(staging)
    try:
        result = _run(recipe, plan, steps, staging, progress)
        if staging is not None:
            logging.getLogger("lowbit").removeHandler(handler)
            handler.close()
            seal_run(staging, result.metrics["run_id"])
            result.out_dir = publish(staging, out_dir, unique=not explicit)
        return result
    except BaseException:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if handler is not None:
            logging.getLogger("lowbit").removeHandler(handler)
            handler.close()


def _log_to(directory: Path | None) -> logging.Handler | None:
    if directory is None:
        return None
    handler = logging.FileHandler(directory / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("lowbit")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def _run(recipe: Recipe, plan: FormatPlan, steps: list, tmp_dir: Path | None, progress: bool) -> RunResult:
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    log.info("lowbit %s, torch %s, %s, %d threads", __version__, torch.__version__, platform.machine(),
             torch.get_num_threads())
    model_path = resolve_model_path(recipe.model)
    model, tokenizer = load_model(recipe.model, DTYPES[recipe.dtype])
    adapter = get_adapter(model)
    log.info("model %s (%s adapter), %d blocks", recipe.model, adapter.name, len(adapter.blocks(model)))
    metrics: dict = {"run_id": new_run_id(), "name": recipe.name, "model": recipe.model, "steps": [s.name for s in recipe.steps],
                     "weights": plan.weights.describe() if plan.weights else "fp",
                     "activations": plan.activations.describe() if plan.activations else "fp",
                     "threads": torch.get_num_threads(), "size_fp16_mb": model_size(model, None) / 1e6}
    if recipe.evaluation and recipe.evaluation.baseline:
        metrics["ppl_fp"] = baseline_ppl(model, tokenizer, model_path, recipe, progress)
        log.info("FP perplexity %.4f over %d tokens", metrics["ppl_fp"]["ppl"], metrics["ppl_fp"]["tokens"])

    cal = recipe.calibration
    cal_tokens = tokenize(tokenizer, load_text(cal.data, cal.split))
    calib_ids = calibration_windows(cal_tokens, cal.n_samples, cal.seq_len, cal.seed)
    if recipe.budget is not None:
        recipe, allocation = allocate_recipe(recipe, model, adapter, cal_tokens, calib_ids, progress)
        plan = recipe.plan()
        metrics["weights"] = allocation.describe()
        metrics["allocation"] = allocation.to_dict()
        log.info("allocated %s (predicted %s %.4g, %s)", allocation.describe(), allocation.metric,
                 allocation.predicted, "exact" if allocation.exact else f"costs rounded to {allocation.unit_bits} bits")
    start = time.perf_counter()
    state = compress(model, adapter, plan, steps, calib_ids, progress=progress)
    metrics["quant_time_s"] = time.perf_counter() - start
    metrics["peak_rss_gb"] = peak_rss_gb()
    check_finite(model)
    metrics["size_mb"] = model_size(model, state) / 1e6
    sparsity = sparsity_report(model, adapter, state)
    if sparsity is not None:
        metrics["sparsity"] = sparsity
        log.info("sparsity %.4f%% of %d block weights; per layer %s", 100 * sparsity["overall"], sparsity["weights"],
                 sparsity["layers"])
    log.info("compressed in %.1f s, peak RSS %.2f GB", metrics["quant_time_s"], metrics["peak_rss_gb"])

    if recipe.evaluation:
        metrics["ppl"] = evaluate_ppl(model, tokenizer, recipe.evaluation, "perplexity (compressed)", progress)
        log.info("compressed perplexity %.4f", metrics["ppl"]["ppl"])
    if tmp_dir is not None:
        try:
            save_run(tmp_dir, recipe_to_yaml(recipe), metrics, model, tokenizer, state)
        except (OSError, SafetensorError) as exc:
            raise LowbitError(f"writing the run failed: {write_error(exc)} (in {tmp_dir.parent}): free some space "
                              f"or choose another --out; nothing was saved") from None
    return RunResult(metrics, None, model, state)
