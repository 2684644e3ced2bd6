"""One compression run: load, calibrate, compress block by block, evaluate, and write one output folder."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit import __version__
from lowbit.allocate import allocate_recipe
from lowbit.context import FormatPlan
from lowbit.data import calibration_windows, eval_windows, load_text, tokenize
from lowbit.errors import LowbitError
from lowbit.eval import perplexity
from lowbit.loading import cache_dir, load_model, resolve_model_path
from lowbit.models import get_adapter
from lowbit.pipeline import check_finite, compress
from lowbit.recipe import EvaluationConfig, Recipe, recipe_to_yaml
from lowbit.report import model_size
from lowbit.runfolder import save_run, write_atomic
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
    if key_file.exists():
        result = json.loads(key_file.read_text())
        result["cached"] = True
        return result
    result = evaluate_ppl(model, tokenizer, recipe.evaluation, "perplexity (FP)", progress)
    cache.mkdir(parents=True, exist_ok=True)
    write_atomic(key_file, json.dumps(result))
    return {**result, "cached": False}


def default_out_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_recipe(recipe: Recipe, out_dir: Path | None = None, progress: bool = True) -> RunResult:
    """Compress and evaluate per `recipe`; if `recipe.save`, write everything into `out_dir` atomically."""
    plan = recipe.plan()
    steps = recipe.build_steps()
    if recipe.save:
        out_dir = Path(out_dir or default_out_dir(recipe))
        if out_dir.exists():
            raise LowbitError(f"output folder {out_dir} already exists: choose another --out or remove it")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    else:
        tmp_dir = None
    handler = _log_to(tmp_dir)
    try:
        result = _run(recipe, plan, steps, tmp_dir, progress)
        if tmp_dir is not None:
            logging.getLogger("lowbit").removeHandler(handler)
            handler.close()
            os.replace(tmp_dir, out_dir)
            result.out_dir = out_dir
        return result
    except BaseException:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
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
    metrics: dict = {"name": recipe.name, "model": recipe.model, "steps": [s.name for s in recipe.steps],
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
    log.info("compressed in %.1f s, peak RSS %.2f GB", metrics["quant_time_s"], metrics["peak_rss_gb"])

    if recipe.evaluation:
        metrics["ppl"] = evaluate_ppl(model, tokenizer, recipe.evaluation, "perplexity (compressed)", progress)
        log.info("compressed perplexity %.4f", metrics["ppl"]["ppl"])
    if tmp_dir is not None:
        save_run(tmp_dir, recipe_to_yaml(recipe), metrics, model, tokenizer, state)
    return RunResult(metrics, None, model, state)
