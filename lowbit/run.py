"""One compression run: load, calibrate, compress block by block, evaluate, and write one output folder."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from torch import nn

from lowbit import __version__
from lowbit.activations import ActivationStore
from lowbit.allocate import allocate_recipe
from lowbit.context import FormatPlan
from lowbit.calibration import calibration_set
from lowbit.data import SHIPPED, eval_windows, load_text, tokenize
from lowbit import distributed, gemm, streaming
from lowbit.blockio import BlockIO
from lowbit.checkpoint import Checkpoints
from lowbit.devices import resolve_device, resolve_dtype
from lowbit.diagnostics import BlockLog, BlockReport, peak_rss_gb
from lowbit.errors import LowbitError
from lowbit.eval import perplexity
from lowbit.eval.streamed import streamed_perplexity
from lowbit.files import (_STAGING, check_utf8_path, publish, resumable, staging_path, sweep_leftovers, write_atomic,
                          write_error)
from lowbit.loading import (cache_dir, empty_model, load_model, load_skeleton, model_file_stamps,
                            resolve_model_path)
from lowbit.models import get_adapter
from lowbit.outer import check_outer, outer_targets, quantize_outer
from lowbit.pipeline import check_finite, compress, validate
from lowbit.plan import memory_budget, plan_run
from lowbit.recipe import EvaluationConfig, Recipe, recipe_to_yaml
from lowbit.report import model_size
from lowbit.runfolder import new_run_id, save_run, seal_run
from lowbit.sparsity import sparsity_report
from lowbit.state import QuantState

log = logging.getLogger("lowbit")


@dataclass
class RunResult:
    metrics: dict
    out_dir: Path | None
    model: nn.Module
    state: QuantState


@dataclass
class Streamed:
    """A model evaluated block by block from shards (`reader`) instead of from memory."""

    reader: streaming.ShardReader
    dtype: torch.dtype
    device: torch.device
    state: QuantState | None = None


def evaluate_ppl(model: nn.Module, tokenizer, cfg: EvaluationConfig, desc: str, progress: bool = True,
                 streamed: Streamed | None = None) -> dict:
    """Perplexity on `cfg`'s one text."""
    tokens = tokenize(tokenizer, load_text(cfg.data, cfg.split))
    windows = eval_windows(tokens, cfg.seq_len, cfg.max_tokens)
    if streamed is not None:
        return streamed_perplexity(model, get_adapter(model), streamed.reader, windows, streamed.dtype,
                                   streamed.device, cfg.batch_size, streamed.state, progress, desc).to_dict()
    return perplexity(model, windows, cfg.batch_size, progress=progress, desc=desc).to_dict()


def evaluate_texts(model: nn.Module, tokenizer, cfg: EvaluationConfig, desc: str, progress: bool = True,
                   streamed: Streamed | None = None) -> dict[str, dict]:
    """Perplexity on each of `cfg`'s texts, by text."""
    return {text: evaluate_ppl(model, tokenizer, cfg.for_text(text), f"{desc} {text}", progress, streamed)
            for text in cfg.texts()}


def text_metrics(key: str, by_text: dict[str, dict]) -> dict:
    """metrics.json entries for one model's perplexities: `key` (the first text, as before) and `key`_texts."""
    return {key: next(iter(by_text.values())), f"{key}_texts": by_text}


def _baseline_key(model_path: str, recipe: Recipe, cfg: EvaluationConfig) -> str:
    """Identify an FP baseline by model files, eval settings of one text, dtype, library versions and CPU GEMM."""
    parts = [model_path, recipe.dtype, cfg.model_dump_json(), torch.__version__, gemm.backend()]
    parts += model_file_stamps(model_path)
    if cfg.data not in SHIPPED:
        data = Path(cfg.data)
        parts.append(f"{data.stat().st_mtime_ns}" if data.exists() else "")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def baseline_ppl(model: nn.Module, tokenizer, model_path: str, recipe: Recipe, progress: bool,
                 streamed: Streamed | None = None) -> dict[str, dict]:
    """Perplexity of the uncompressed model on each evaluation text, by text."""
    return {text: _baseline_text(model, tokenizer, model_path, recipe, recipe.evaluation.for_text(text), progress,
                                 streamed) for text in recipe.evaluation.texts()}


def _baseline_text(model: nn.Module, tokenizer, model_path: str, recipe: Recipe, cfg: EvaluationConfig,
                   progress: bool, streamed: Streamed | None) -> dict:
    """Perplexity of the uncompressed model on one text, cached on disk since it is the same for every recipe."""
    cache = cache_dir() / "baselines"
    key_file = cache / f"{_baseline_key(model_path, recipe, cfg)}.json"
    try:
        result = json.loads(key_file.read_text(encoding="utf-8"))
        cached = isinstance(result, dict) and "ppl" in result
    except (OSError, ValueError):
        cached = False  # missing or damaged: evaluate again and rewrite it
    if distributed.reduce_float(float(cached), "min"):  # under torchrun every rank evaluates or none does
        return {**result, "cached": True}
    result = evaluate_ppl(model, tokenizer, cfg, f"perplexity (FP) {cfg.data}", progress, streamed)
    if not distributed.is_main():
        return {**result, "cached": False}
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
    empty = empty_model(recipe.model, resolve_dtype(recipe.dtype, resolve_model_path(recipe.model)))
    adapter = get_adapter(empty)
    validate(empty, adapter, plan)
    context = adapter.context_length(empty)
    lengths = {"calibration.seq_len": recipe.calibration.seq_len,
               "evaluation.seq_len": recipe.evaluation.seq_len if recipe.evaluation else None}
    for key, n in lengths.items():
        if context and n and n > context:
            raise LowbitError(f"{key} {n} is longer than the model's context ({context} positions): use at most "
                              f"{context}")
    check_outer(empty, adapter, *recipe.outer_formats())
    params = {id(p): p.numel() * p.element_size() for p in empty.parameters()}
    return int(sum(params.values()) * 1.05) + 64 * 2**20  # model, plus tokenizer, state and log


def _staging_folder(out_dir: Path, explicit: bool, need_bytes: int) -> Path:
    """Create the hidden folder a run writes into, after checking the target and its free space."""
    check_utf8_path(out_dir, "output folder")
    if explicit and (out_dir.exists() or out_dir.is_symlink()):
        raise LowbitError(f"output folder {out_dir} already exists: choose another --out or remove it")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(out_dir.parent, keep=("blocks.jsonl",))
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


def blocks_log_path(out_dir: Path) -> Path:
    """Where an interrupted run's block diagnostics are kept: OUT.blocks.jsonl next to the output folder (while
    it runs they are in its own staging folder, so concurrent runs of one recipe never share the file)."""
    return out_dir.with_name(out_dir.name + ".blocks.jsonl")


def _resume_folder(path: Path) -> tuple[Path, Path]:
    """(staging folder now owned by this process, final folder) of an interrupted run.

    `path` is the staging folder the interrupted run named, or the output folder it was writing."""
    match = _STAGING.match(path.name)
    if match:
        candidates, out = [path], path.with_name(match["final"])
    else:
        candidates, out = sorted(path.parent.glob(f".{path.name}.lowbit-partial.*")), path
    candidates = [c for c in candidates if resumable(c)]
    if not candidates:
        raise LowbitError(f"no interrupted run with a checkpoint at {path}: give the folder that 'lowbit run' named "
                          f"when it was interrupted, or start the run again")
    if out.exists():
        raise LowbitError(f"{out} already exists, so the interrupted run cannot finish there: move it away")
    mine = staging_path(out)
    os.rename(max(candidates, key=lambda c: c.stat().st_mtime), mine)  # no sweep may take it while it runs
    return mine, out


def run_recipe(recipe: Recipe, out_dir: Path | None = None, progress: bool = True,
               resume: Path | None = None) -> RunResult:
    """Compress and evaluate per `recipe`; if `recipe.save`, write everything into `out_dir` atomically.

    Without an explicit `out_dir` the folder is runs/NAME-TIMESTAMP, suffixed -2, -3, ... if a concurrent run
    took that name first. An interrupted run leaves at most a hidden staging folder that names its process; if it
    holds a block checkpoint (and the run was interrupted or crashed, not refused with an error), `resume` (that
    folder or the output folder) continues it from there."""
    device = distributed.init_from_env(resolve_device(recipe.device))
    main = distributed.is_main()  # under torchrun only rank 0 writes the run folder, checkpoints and logs
    progress = progress and main
    if recipe.budget is not None and distributed.active():
        raise LowbitError("budget measures sensitivities in one process: run budget recipes without torchrun")
    plan = recipe.plan()
    steps = recipe.build_steps()
    need_bytes = check_before_loading(recipe, plan)
    # activations placed by the budget (--max-memory, else the memory free now); a budget that cannot be met is
    # refused before anything loads
    offload = plan_run(recipe, probe=False).offload
    staging, block_log = None, None
    explicit = out_dir is not None
    if resume is not None and main:
        staging, out_dir = _resume_folder(Path(resume))
        explicit = True
    elif recipe.save and main:
        out_dir = Path(out_dir) if explicit else default_out_dir(recipe)
        staging = _staging_folder(out_dir, explicit, need_bytes)
    if staging is not None and recipe.diagnostics:
        block_log = BlockLog(staging / "blocks.jsonl")
    handler = _log_to(staging)
    try:
        folder = distributed.broadcast_text(None if staging is None else str(staging))  # checkpoints, on every rank
        # every rank computes the block diagnostics (their sums are combined over ranks); rank 0 logs them
        diagnose = None if not recipe.diagnostics else block_log if main or folder is None else (lambda _report: None)
        result = _run(recipe, plan, steps, staging, progress, device, resume is not None, diagnose,
                      None if folder is None else Path(folder), offload)
        distributed.barrier()  # every rank finished: only now may rank 0 publish
        if staging is not None:
            logging.getLogger("lowbit").removeHandler(handler)
            handler.close()
            if block_log is not None:
                block_log.close()
            seal_run(staging, result.metrics["run_id"])
            result.out_dir = publish(staging, out_dir, unique=not explicit)
        return result
    except BaseException as exc:
        if staging is not None and staging.exists():
            if block_log is not None:
                block_log.close()
            logged = block_log is not None and block_log.path.exists()
            if resumable(staging) and (resume is not None or not isinstance(exc, LowbitError)
                                       or isinstance(exc, distributed.RankLost)):
                # interrupted or crashed (not refused), or a refused resume: never delete what may be resumed
                log.warning("unfinished run kept in %s: continue it with --resume %s", staging, staging)
                exc.resumable = str(staging)
                if logged:  # readable beside the output while the staging waits for --resume
                    copy = staging_path(blocks_log_path(out_dir))
                    shutil.copyfile(block_log.path, copy)
                    publish(copy, blocks_log_path(out_dir), unique=True)
            else:
                if logged:  # the finished blocks' diagnostics outlive the run
                    publish(block_log.path, blocks_log_path(out_dir), unique=True)
                shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if handler is not None:
            logging.getLogger("lowbit").removeHandler(handler)
            handler.close()
        if block_log is not None:
            block_log.close()


def _log_to(directory: Path | None) -> logging.Handler | None:
    if directory is None:
        return None
    handler = logging.FileHandler(directory / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("lowbit")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def use_streaming(recipe: Recipe, model_path: str, dtype: torch.dtype, steps: list) -> bool:
    """Stream blocks from disk when asked, or (auto) when the weights would take over half the CPU budget."""
    whole = [s.name for s in steps if s.needs_whole_model()]
    if recipe.stream is True:
        if whole:
            raise LowbitError(f"step {whole[0]} changes every block at once and cannot run one block in memory at "
                              f"a time: set stream: false (the whole model is then loaded)")
        streaming.ShardReader(model_path)
        return True
    path = Path(model_path)
    local = (path / streaming.INDEX).is_file() or (path / "model.safetensors").is_file()
    if recipe.stream is False or whole or not local:
        return False
    size = sum(streaming.ShardReader(model_path).nbytes(dtype).values())
    return size > memory_budget(recipe.max_memory, torch.device("cpu")) / 2


def shard_windows(calib_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """This rank's calibration windows under torchrun: whole forward batches, as many on every rank (so each rank
    computes its batches exactly as one process would, and learned steps take as many optimizer steps everywhere);
    all of them in a single process."""
    n, unit = calib_ids.shape[0], distributed.world_size() * batch
    if distributed.active() and n % unit:
        raise LowbitError(f"calibration n_samples {n} does not split into whole batches of {batch} over "
                          f"{distributed.world_size()} ranks: use a multiple of {unit} (e.g. --set "
                          f"calibration.n_samples={n + unit - n % unit}) or a smaller calibration.batch_size")
    return distributed.shard(calib_ids, batch)


def fingerprint(recipe: Recipe, model_path: str, stream: bool) -> str:
    """What a checkpoint must match to be resumed: everything that changes the compressed weights."""
    data = recipe.model_dump(mode="json", exclude={"name", "threads", "evaluation", "save", "device", "max_memory",
                                              "offload"})
    return hashlib.sha256(json.dumps([data, model_path, stream], sort_keys=True).encode()).hexdigest()[:32]


def _run(recipe: Recipe, plan: FormatPlan, steps: list, staging: Path | None, progress: bool,
         device: torch.device, resume: bool, block_log: Callable[[BlockReport], None] | None = None,
         checkpoint_dir: Path | None = None, offload: str = "device") -> RunResult:
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    log.info("lowbit %s, torch %s, %s, %d threads", __version__, torch.__version__, platform.machine(),
             torch.get_num_threads())
    model_path = resolve_model_path(recipe.model)
    dtype = resolve_dtype(recipe.dtype, model_path)
    stream = use_streaming(recipe, model_path, dtype, steps)
    if stream and any(recipe.outer_formats()):
        raise LowbitError("head and embedding formats need the whole model in memory: set stream: false")
    if stream and resume and distributed.active():
        raise LowbitError("a streamed run resumes in one process only (the other ranks' copies of the finished "
                          "blocks are gone): resume without torchrun, or set stream: false")
    reader = streaming.ShardReader(model_path) if stream else None
    if stream:
        model, tokenizer = load_skeleton(recipe.model, dtype)
        streaming.load_rest(model, get_adapter(model), reader, dtype, with_head=recipe.evaluation is not None)
    else:
        model, tokenizer = load_model(recipe.model, dtype)
    adapter = get_adapter(model)
    log.info("model %s (%s adapter), %d blocks, %s on %s%s", recipe.model, adapter.name, len(adapter.blocks(model)),
             str(dtype).removeprefix("torch."), device, ", streamed from disk" if stream else "")
    metrics: dict = {"run_id": new_run_id(), "name": recipe.name, "model": recipe.model, "steps": [s.name for s in recipe.steps],
                     "weights": plan.weights.describe() if plan.weights else "fp",
                     "activations": plan.activations.describe() if plan.activations else "fp",
                     "threads": torch.get_num_threads(), "cpu_gemm": gemm.backend(),
                     "size_fp16_mb": model_size(model, None) / 1e6,
                     "device": str(device), "dtype": str(dtype).removeprefix("torch."), "streamed": stream,
                     "ranks": distributed.world_size()}
    if recipe.evaluation and recipe.evaluation.baseline:
        source = Streamed(reader, dtype, device) if stream else None
        metrics |= text_metrics("ppl_fp", baseline_ppl(model, tokenizer, model_path, recipe, progress, source))
        for text, res in metrics["ppl_fp_texts"].items():
            log.info("FP perplexity %.4f over %d tokens of %s", res["ppl"], res["tokens"], text)

    cal = recipe.calibration
    calib_ids = shard_windows(calibration_set(model, tokenizer, model_path, cal, progress), cal.batch_size)
    if recipe.budget is not None:
        if stream:
            raise LowbitError("budget measures every linear's sensitivity on the model in memory: run it without "
                              "streaming (stream: false)")
        cal_tokens = tokenize(tokenizer, load_text(cal.text("budget"), cal.split))
        recipe, allocation = allocate_recipe(recipe, model, adapter, cal_tokens, calib_ids, progress)
        plan = recipe.plan()
        metrics["weights"] = allocation.describe()
        metrics["allocation"] = allocation.to_dict()
        log.info("allocated %s (predicted %s %.4g, %s)", allocation.describe(), allocation.metric,
                 allocation.predicted, "exact" if allocation.exact else f"costs rounded to {allocation.unit_bits} bits")
    with tempfile.TemporaryDirectory(prefix="lowbit-stream-") as scratch:
        out_model = (staging if staging is not None else Path(scratch)) / "model"
        if stream:
            out_model.mkdir(exist_ok=True)
        checkpoints = (Checkpoints(checkpoint_dir, fingerprint(recipe, model_path, stream))
                       if checkpoint_dir is not None else None)
        spill = (staging if staging is not None else Path(scratch)) / "state-spill"  # finished blocks' state
        io = BlockIO(device, dtype, reader, out_model if stream else None, checkpoints, resume,
                     store=ActivationStore(offload, device, staging), spill_dir=spill)
        start = time.perf_counter()
        state = compress(model, adapter, plan, steps, calib_ids, progress=progress, io=io, on_block_done=block_log)
        io.finish(model, adapter, load=recipe.evaluation is not None)
        quantize_outer(model, adapter, outer_targets(model, adapter, *recipe.outer_formats()), state)
        if checkpoints is not None and staging is not None:  # every block is in the output now: seal without them
            checkpoints.remove()
        metrics["quant_time_s"] = time.perf_counter() - start
        metrics["peak_rss_gb"] = peak_rss_gb()
        if device.type == "cuda":
            metrics["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        check_finite(model)
        metrics["size_mb"] = model_size(model, state) / 1e6
        sparsity = None if stream else sparsity_report(model, adapter, state)
        if sparsity is not None:
            metrics["sparsity"] = sparsity
            log.info("sparsity %.4f%% of %d block weights; per layer %s", 100 * sparsity["overall"],
                     sparsity["weights"], sparsity["layers"])
        log.info("compressed in %.1f s, peak RSS %.2f GB", metrics["quant_time_s"], metrics["peak_rss_gb"])

        if recipe.evaluation:
            source = Streamed(streaming.ShardReader(out_model), dtype, device, state) if stream else None
            metrics |= text_metrics("ppl", evaluate_texts(model, tokenizer, recipe.evaluation,
                                                          "perplexity (compressed)", progress, source))
            for text, res in metrics["ppl_texts"].items():
                log.info("compressed perplexity %.4f on %s", res["ppl"], text)
        if staging is not None:
            try:
                save_run(staging, recipe_to_yaml(recipe), metrics, model, tokenizer, state, model_written=stream)
            except (OSError, SafetensorError) as exc:
                raise LowbitError(f"writing the run failed: {write_error(exc)} (in {staging.parent}): free some "
                                  f"space or choose another --out; nothing was saved") from None
            shutil.rmtree(spill, ignore_errors=True)  # (saved; the state's mappings outlive the files)
    return RunResult(metrics, None, model, state)
