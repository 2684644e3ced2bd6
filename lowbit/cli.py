"""Command line: lowbit run | sensitivity | plan | synth | quantize | eval | report | export | backends | verify | steps. Expected failures print one line and exit with code 2."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable

from lowbit import gemm
from lowbit.errors import CheckFailed, LowbitError


def _cmd_run(args: argparse.Namespace) -> None:
    from lowbit import distributed
    from lowbit.recipe import load_recipe
    from lowbit.report import results_table
    from lowbit.run import run_recipe

    recipe = load_recipe(args.recipe, _placement(args) + [f"budget.{b}" for b in args.budget or []])
    if args.no_save:
        recipe = recipe.model_copy(update={"save": False})
    if args.dry_run:
        from lowbit.plan import plan_run, plan_table

        print(plan_table(plan_run(recipe, probe=not args.no_probe, progress=not args.quiet)))
        return
    try:
        result = run_recipe(recipe, Path(args.out) if args.out else None, progress=not args.quiet,
                            resume=Path(args.resume) if args.resume else None)
        if not distributed.is_main():  # under torchrun rank 0 reports
            return
    finally:
        distributed.shutdown()
    print(results_table([result.metrics]))
    if result.out_dir:
        print(f"saved to {result.out_dir}")


def _placement(args: argparse.Namespace) -> list[str]:
    """--set overrides plus the placement flags (--device, --max-memory, --stream) as overrides."""
    sets = list(args.set or [])
    for flag in ("device", "max_memory", "stream", "offload"):
        if getattr(args, flag, None) is not None:
            sets.append(f"{flag}={getattr(args, flag)}")
    return sets


def _cmd_plan(args: argparse.Namespace) -> None:
    from lowbit.plan import plan_run, plan_table
    from lowbit.recipe import load_recipe

    print(plan_table(plan_run(load_recipe(args.recipe, _placement(args)), probe=not args.no_probe,
                              progress=not args.quiet)))


def _add_placement(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (overrides the recipe's device)")
    parser.add_argument("--max-memory", help="memory budget, e.g. 4GB or cpu=8GB,cuda:0=20GB")
    parser.add_argument("--stream", choices=["auto", "true", "false"],
                        help="one block in memory at a time, read from and written to disk")
    parser.add_argument("--offload", choices=["auto", "none", "cpu", "disk"],
                        help="where calibration activations live: auto (by the memory budget), none (on the "
                             "device), cpu, or disk (memory-mapped)")


def _cmd_sensitivity(args: argparse.Namespace) -> None:
    import time

    import torch

    from lowbit.allocate import gptq_args
    from lowbit.data import calibration_windows, load_text, tokenize
    from lowbit.loading import load_model
    from lowbit.models import get_adapter
    from lowbit.recipe import candidate_formats, load_recipe
    from lowbit.runfolder import write_atomic
    from lowbit.sensitivity import METRICS, Candidate, heatmap, heldout_windows, measure, most_sensitive

    recipe = load_recipe(args.recipe, args.set or [])
    if recipe.weights is None:
        raise LowbitError("sensitivity measures weight formats: set weights in the recipe (its symmetry and observer "
                          "apply to the candidates)")
    metrics = list(METRICS) if args.metric == "all" else [m for m in args.metric.split(",") if m]
    if not metrics or any(m not in METRICS for m in metrics):
        raise LowbitError(f"--metric {args.metric!r}: give hessian, fisher, loss (comma-separated) or all")
    fmts = candidate_formats(recipe, [f for f in args.formats.split(",") if f])
    out = Path(args.out or f"runs/sensitivity-{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists():
        raise LowbitError(f"output folder {out} already exists: choose another --out or remove it")
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    model, tokenizer = load_model(recipe.model)
    adapter = get_adapter(model)
    cal = recipe.calibration
    tokens = tokenize(tokenizer, load_text(cal.text("sensitivity"), cal.split))
    calib_ids = calibration_windows(tokens, cal.n_samples, cal.seq_len, cal.seed)
    heldout = heldout_windows(tokens, cal.n_samples, cal.seq_len, args.heldout, cal.seed)
    plan = recipe.plan()
    table = measure(model, adapter, {n: Candidate(n, f.spec(), f.observer) for n, f in fmts.items()},
                    gptq_args(recipe), lambda n: plan.weight_spec_for(n) is not None, calib_ids, heldout,
                    metrics, cal.batch_size, progress=not args.quiet)
    out.mkdir(parents=True)
    write_atomic(out / "sensitivity.json", table.to_json())
    heatmap(table, out / "sensitivity.png", f"{recipe.model}: sensitivity per linear ({table.solver}, "
                                            f"{table.heldout_tokens} held-out tokens)")
    narrowest = min(fmts, key=lambda f: fmts[f].spec().bits)
    print(f"ten most sensitive linears in {narrowest}:")
    for name, vals in most_sensitive(table, narrowest):
        print(f"  {name:40s} " + "  ".join(f"{m} {v:.4g}" for m, v in vals.items()))
    for metric, rhos in table.spearman().items():
        print(f"spearman({metric}, loss): " + "  ".join(f"{fmt} {rho:.3f}" for fmt, rho in rhos.items()))
    print(f"saved to {out}")


def _cmd_quantize(args: argparse.Namespace) -> None:
    from lowbit.recipe import parse_recipe
    from lowbit.report import results_table
    from lowbit.run import run_recipe

    weights = None if args.wbits == 16 else {
        "bits": args.wbits, "format": args.wformat, "granularity": "group" if args.group_size else "channel",
        "group_size": args.group_size or None, "observer": args.observer}
    if weights and args.wformat == "int":  # FP formats are always symmetric
        weights["symmetric"] = args.sym
    acts = None if args.abits == 16 else {
        "bits": args.abits, "format": args.aformat, "symmetric": True,
        "granularity": "token" if not args.static_act else "tensor", "dynamic": not args.static_act}
    data = {"name": args.name or f"{'-'.join(args.method)}-w{args.wbits}a{args.abits}", "model": args.model,
            "weights": weights, "activations": acts, "steps": list(args.method), "save": not args.no_save,
            "calibration": {"n_samples": args.nsamples, "seq_len": args.calib_seq_len},
            "evaluation": {"max_tokens": args.max_tokens or None, "seq_len": args.seq_len}}
    if args.threads:
        data["threads"] = args.threads
    result = run_recipe(parse_recipe(data), Path(args.out) if args.out else None, progress=not args.quiet)
    print(results_table([result.metrics]))
    if result.out_dir:
        print(f"saved to {result.out_dir}")


def _cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from lowbit.eval import perplexity
    from lowbit.data import eval_windows, load_text, tokenize
    from lowbit.loading import load_model
    from lowbit.runfolder import is_run_folder, load_run

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model)
    is_run = is_run_folder(path)
    if args.real_kernels and not is_run:
        raise LowbitError(f"--real-kernels needs a run folder written by 'lowbit run' or 'lowbit quantize', "
                          f"not {args.model}")
    if args.tasks is not None:
        return _eval_tasks(args, path if is_run else None)
    if is_run:
        model, tokenizer, _ = load_run(path)
    else:
        model, tokenizer = load_model(args.model)
    windows = eval_windows(tokenize(tokenizer, load_text(args.data, args.split)), args.seq_len,
                           args.max_tokens or None)
    result = perplexity(model, windows, progress=not args.quiet)
    print(json.dumps({"model": args.model, **result.to_dict()}, indent=2))


def _eval_tasks(args: argparse.Namespace, run_dir: Path | None) -> None:
    """Task accuracy through lm-eval; a run folder's metrics.json gains the scores under "tasks"."""
    from lowbit.eval.tasks import evaluate_tasks, resolve_tasks
    from lowbit.report import tasks_table

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    include = [Path(p) for p in args.include_path or []]
    if not names:
        raise LowbitError("--tasks is empty: name at least one task, e.g. --tasks lambada_openai,piqa")
    resolve_tasks(names, args.task_source, include)  # fail on a bad name before the model loads
    if run_dir is not None:
        from lowbit.kernels.runtime import load_for_inference

        model, tokenizer, _ = load_for_inference(run_dir, "real" if args.real_kernels else "simulated")
    else:
        from lowbit.loading import load_model

        model, tokenizer = load_model(args.model)
    if args.quiet:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    scores = evaluate_tasks(model, tokenizer, names, args.limit, args.num_fewshot, args.batch_size,
                            args.task_source, include)
    kernels = "real" if args.real_kernels else "simulated"
    for row in scores.values():
        row["kernels"] = kernels
    print(tasks_table(scores))
    if run_dir is not None:
        from lowbit.runfolder import read_metrics, update_metrics

        metrics = read_metrics(run_dir)
        key = "tasks" if kernels == "simulated" else "tasks_real_kernels"
        metrics[key] = {**metrics.get(key, {}), **scores}
        update_metrics(run_dir, metrics)
        print(f"saved to {run_dir / 'metrics.json'}")


def _cmd_report(args: argparse.Namespace) -> None:
    from lowbit.diagnostics import blocks_table, read_blocks
    from lowbit.report import results_table
    from lowbit.runfolder import read_metrics

    if args.blocks:
        for run in args.runs:
            if len(args.runs) > 1:
                print(f"\n{run}")
            print(blocks_table(read_blocks(run)))
        return
    rows = [read_metrics(Path(run_dir)) for run_dir in args.runs]
    print(results_table(rows))
    if args.plot or args.html:
        from lowbit.plots import comparison_figure, write_html

        runs = [Path(r) for r in args.runs]
        fig = comparison_figure(runs, rows)
        if args.plot:
            fig.savefig(args.plot, dpi=120)
            print(f"plot written to {args.plot}")
        if args.html:
            write_html(Path(args.html), results_table(rows), fig, runs)
            print(f"page written to {args.html}")


def _cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from lowbit.kernels import kernel_table
    from lowbit.kernels.runtime import generate, load_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, plans = load_for_inference(args.run, args.kernels, args.compute_dtype)
    if plans and not args.quiet:
        print(kernel_table(plans), file=sys.stderr)
    print(generate(model, tokenizer, args.prompt, args.max_new_tokens))


def _cmd_kernels(args: argparse.Namespace) -> None:
    import torch

    from lowbit.kernels import kernel_table, memory_bytes
    from lowbit.kernels.check import check_run
    from lowbit.kernels.runtime import load_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check:
        result = check_run(args.run, args.data, args.split, args.seq_len, args.max_tokens, args.compute_dtype,
                           args.noise_floor)
        plans = result.pop("kernels")
        print(kernel_table(plans))
        print(json.dumps({"a": "simulated", "b": "real kernels", **result}, indent=2))
        return
    simulated, _, _ = load_for_inference(args.run, "simulated")
    real, _, plans = load_for_inference(args.run, "real", args.compute_dtype)
    print(kernel_table(plans))
    print(f"memory (parameters + buffers): simulated {memory_bytes(simulated) / 1e6:.1f} MB, "
          f"real kernels {memory_bytes(real) / 1e6:.1f} MB")


def _cmd_bench_speed(args: argparse.Namespace) -> None:
    from lowbit.kernels.bench import bench_speed, speed_table

    rows = bench_speed(args.model, tuple(args.configs), args.prompt_len, args.new_tokens, args.repeats,
                       args.warmup, args.threads)
    print(speed_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def _cmd_bench_layers(args: argparse.Namespace) -> None:
    from lowbit.kernels.bench import bench_layers, layers_table

    print(layers_table(bench_layers(args.out_features, args.in_features, repeats=args.repeats,
                                    threads=args.threads)))


def _cmd_bench_sparse(args: argparse.Namespace) -> None:
    from lowbit.kernels.sparse import bench_sparse, sparse_table

    print(sparse_table(bench_sparse(args.out_features, args.in_features, repeats=args.repeats,
                                    threads=args.threads)))


def _cmd_steps(_args: argparse.Namespace) -> None:
    from lowbit.steps import STEPS

    for name, cls in sorted(STEPS.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:14s} {doc}")


def _cmd_export(args: argparse.Namespace) -> None:
    from lowbit.export import export_run

    result = export_run(args.run, args.format, args.out, args.dtype)
    for note in result.notes if not args.quiet else ():
        print(note)
    print(f"exported to {result.path}")


def _cmd_backends(_args: argparse.Namespace) -> None:
    from lowbit.export.backends import backends_table

    print(backends_table())


def _cmd_verify(args: argparse.Namespace) -> None:
    import torch

    from lowbit.verify import verify

    torch.set_num_threads(args.threads or torch.get_num_threads())
    result = verify(args.run, args.export, args.data, args.split, args.seq_len, args.max_tokens or None,
                    progress=not args.quiet, engine=args.engine, threads=args.threads or 2)
    print(json.dumps({"run": args.run, "export": args.export, "engine": args.engine, **result.to_dict()}, indent=2))
    failed = []
    if result.top1_agreement < args.min_top1:
        failed.append(f"top-1 agreement {result.top1_agreement:.4f} < --min-top1 {args.min_top1}")
    if not result.ppl_rel_diff <= args.max_ppl_diff:
        failed.append(f"perplexity differs by {result.ppl_rel_diff:.4f} > --max-ppl-diff {args.max_ppl_diff}")
    if failed:
        raise CheckFailed(f"the export does not reproduce the run: {'; '.join(failed)}")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors in lowbit's style (exit code 2, no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"lowbit: error: {message} (see '{self.prog} --help')\n")


def _int_at_least(low: int):
    """An argparse type: a whole number >= `low` (hostile values fail at parsing, before any work)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _threads(text: str) -> int:
    """A thread count from 1 to 4 x the CPUs (more only thrashes; 100000 would hang thread creation)."""
    from lowbit.recipe import MAX_THREADS

    value = _int_at_least(1)(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THREADS} (4 x the CPU count), got {value}")
    return value


def _bits(text: str) -> int:
    """A bit width the formats support (2 to 8), or 16 for "keep FP"."""
    value = _int_at_least(0)(text)
    if not (2 <= value <= 8 or value == 16):
        raise argparse.ArgumentTypeError(f"must be 2 to 8, or 16 to keep FP, got {value}")
    return value


def _float_where(check: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """An argparse type: a number for which `check` holds (NaN fails every check), else the one-line `rule`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


_fraction = _float_where(lambda v: 0 <= v <= 1, "between 0 and 1")
_tolerance = _float_where(lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0")


POSITIVE, NONNEGATIVE = _int_at_least(1), _int_at_least(0)


def _text_arguments(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """The evaluation text options shared by eval and verify."""
    p.add_argument("--data", default="wikitext2")
    p.add_argument("--split", default="test")
    p.add_argument("--seq-len", type=POSITIVE, default=2048)
    p.add_argument("--max-tokens", type=NONNEGATIVE, default=max_tokens, help="0 = whole split")
    p.add_argument("--threads", type=_threads)
    p.add_argument("--quiet", action="store_true")


def _cmd_synth(args: argparse.Namespace) -> None:
    import torch

    from lowbit.synth import synth_model

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"wrote {synth_model(args.shape, args.out, args.seed, layers=args.layers)}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lowbit", description="Post-training compression of LLMs, block by block.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a YAML recipe: compress, evaluate, save")
    r.add_argument("recipe")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. weights.bits=3")
    r.add_argument("--out", help="output folder (default runs/NAME-TIMESTAMP)")
    r.add_argument("--no-save", action="store_true", help="evaluate only, write nothing")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run (its .partial folder)")
    r.add_argument("--dry-run", action="store_true", help="print the plan (memory, disk, time) and stop")
    r.add_argument("--no-probe", action="store_true", help="with --dry-run: no timed probe, no time estimate")
    r.add_argument("--budget", action="append", metavar="KEY=VALUE",
                   help="mixed precision under a budget: avg_bits=3.5 or size_mb=60 (also formats=[w3g64,w4g64], "
                        "metric=loss, sensitivity=TABLE.json)")
    _add_placement(r)
    r.set_defaults(fn=_cmd_run)

    pl = sub.add_parser("plan", help="peak memory per device, disk and estimated time of a recipe, before running")
    pl.add_argument("recipe")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key")
    pl.add_argument("--no-probe", action="store_true", help="no timed probe, no time estimate")
    pl.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_placement(pl)
    pl.set_defaults(fn=_cmd_plan)

    se = sub.add_parser("sensitivity", help="per-linear error of candidate formats: JSON table, heatmap, top ten")
    se.add_argument("recipe")
    se.add_argument("--formats", default="w2g64,w3g64,w4g64,w8", help="comma-separated candidate formats")
    se.add_argument("--metric", default="hessian,fisher", metavar="M[,M]",
                    help="hessian: Hessian-weighted output error (cheapest); fisher: the same weighted per output "
                         "channel by the loss's Fisher (one backward pass more); loss: loss increase (one eval per "
                         "layer and format); comma-separated, or all")
    se.add_argument("--heldout", type=POSITIVE, default=4, help="held-out calibration windows to measure on")
    se.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key")
    se.add_argument("--out", help="output folder (default runs/sensitivity-NAME-TIMESTAMP)")
    se.add_argument("--quiet", action="store_true")
    se.set_defaults(fn=_cmd_sensitivity)

    q = sub.add_parser("quantize", help="the same pipeline from flags, without writing YAML")
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--method", nargs="+", default=["rtn"], help="steps in order, e.g. awq gptq")
    q.add_argument("--wbits", type=_bits, default=4, help="weight bits (16 = keep FP)")
    q.add_argument("--wformat", choices=["int", "fp"], default="int")
    q.add_argument("--group-size", type=NONNEGATIVE, default=0, help="0 = per output channel")
    q.add_argument("--sym", action="store_true", help="symmetric weights (default asymmetric)")
    q.add_argument("--observer", choices=["minmax", "mse", "percentile"], default="minmax")
    q.add_argument("--abits", type=_bits, default=16, help="activation bits (16 = keep FP)")
    q.add_argument("--aformat", choices=["int", "fp"], default="int")
    q.add_argument("--static-act", action="store_true", help="static per-tensor activations (default dynamic per-token)")
    q.add_argument("--nsamples", type=POSITIVE, default=64)
    q.add_argument("--calib-seq-len", type=POSITIVE, default=512)
    q.add_argument("--seq-len", type=POSITIVE, default=2048, help="evaluation window")
    q.add_argument("--max-tokens", type=NONNEGATIVE, default=32768, help="evaluation token limit (0 = whole split)")
    q.add_argument("--threads", type=_threads)
    q.add_argument("--name")
    q.add_argument("--out")
    q.add_argument("--no-save", action="store_true")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(fn=_cmd_quantize)

    sy = sub.add_parser("synth", help="write a random-weight model of a real shape (bf16 shards) for memory/time tests")
    sy.add_argument("shape", choices=["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"])
    sy.add_argument("out", help="folder to create")
    sy.add_argument("--layers", type=POSITIVE, help="fewer decoder blocks than the real model")
    sy.add_argument("--seed", type=NONNEGATIVE, default=0)
    sy.add_argument("--threads", type=_threads)
    sy.add_argument("--quiet", action="store_true", help="no progress output")
    sy.set_defaults(fn=_cmd_synth)

    e = sub.add_parser("eval", help="perplexity, or task accuracy (--tasks, via lm-eval), of a model or run folder")
    e.add_argument("model")
    e.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. lambada_openai,piqa,winogrande,boolq,"
                   "hellaswag_text (offline copies: see tasks/README.md); without it, perplexity")
    e.add_argument("--limit", type=POSITIVE, help="examples per task (default all); report the standard error with it")
    e.add_argument("--num-fewshot", type=NONNEGATIVE, help="few-shot examples (default the task's, 0 for these)")
    e.add_argument("--real-kernels", action="store_true", help="score a run on its packed low-bit kernels")
    e.add_argument("--task-source", choices=["auto", "local", "hub"], default="auto",
                   help="standard names: local copies when offline (auto), always (local), or lm-eval's (hub)")
    e.add_argument("--include-path", action="append", metavar="DIR", help="another folder of task YAMLs")
    e.add_argument("--batch-size", type=POSITIVE, default=8, help="lm-eval batch size")
    _text_arguments(e, max_tokens=32768)
    e.set_defaults(fn=_cmd_eval)

    rp = sub.add_parser("report", help="side-by-side table of saved runs (their metrics.json)")
    rp.add_argument("runs", nargs="+")
    rp.add_argument("--blocks", action="store_true", help="per-block diagnostics (blocks.jsonl) instead")
    rp.add_argument("--plot", metavar="OUT.png", help="figure: quality vs size per method, block errors, time, memory")
    rp.add_argument("--html", metavar="OUT.html", help="a page with the table and the figure")
    rp.set_defaults(fn=_cmd_report)

    x = sub.add_parser("export", help="write a run in a serving engine's format (compressed-tensors, GGUF)")
    x.add_argument("run")
    x.add_argument("--format", required=True, help="compressed-tensors, gguf (each linear in the GGUF type the run "
                   "solved it on), gguf-q8_0 or gguf-q4_0 (see lowbit backends)")
    x.add_argument("--out", help="output folder or .gguf file (default: inside the run folder)")
    x.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of stored scales and unquantized tensors where the format leaves a choice")
    x.add_argument("--quiet", action="store_true", help="print only the export path (and errors)")
    x.set_defaults(fn=_cmd_export)

    b = sub.add_parser("backends", help="which formats and granularities each export target executes")
    b.set_defaults(fn=_cmd_backends)

    v = sub.add_parser("verify", help="compare a run's simulated model with its export: logits and perplexity")
    v.add_argument("run")
    v.add_argument("export")
    _text_arguments(v, max_tokens=16384)
    v.add_argument("--engine", choices=["transformers", "llama.cpp"], default="transformers",
                   help="what runs the export: transformers (loaded back in PyTorch) or llama.cpp (a .gguf file)")
    v.add_argument("--min-top1", type=_fraction, default=0.85,
                   help="fail (exit 1) if top-1 agreement is lower (default 0.85)")
    v.add_argument("--max-ppl-diff", type=_tolerance, default=0.02,
                   help="fail (exit 1) if |ppl_export - ppl_run| / ppl_run is larger (default 0.02)")
    v.set_defaults(fn=_cmd_verify)
    g = sub.add_parser("generate", help="greedy text generation from a run, on real low-bit kernels or simulated")
    g.add_argument("run", help="a run folder written by 'lowbit run' or 'lowbit quantize'")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=POSITIVE, default=32)
    g.add_argument("--kernels", choices=["real", "simulated"], default="real")
    g.add_argument("--compute-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="input dtype of the weight-only kernels (float32 is exact but slow in PyTorch 2.13)")
    g.add_argument("--threads", type=_threads)
    g.add_argument("--quiet", action="store_true", help="do not print which kernel each layer uses")
    g.set_defaults(fn=_cmd_generate)

    k = sub.add_parser("kernels", help="which real CPU kernel each layer of a run uses; --check compares with simulated")
    k.add_argument("run")
    k.add_argument("--check", action="store_true", help="logit difference, top-1 agreement, perplexity of both")
    k.add_argument("--noise-floor", action="store_true",
                   help="also compare the simulated model with itself under 1e-6 relative input noise")
    k.add_argument("--data", default="wikitext2")
    k.add_argument("--split", default="test")
    k.add_argument("--seq-len", type=POSITIVE, default=512)
    k.add_argument("--max-tokens", type=NONNEGATIVE, default=4096)
    k.add_argument("--compute-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    k.add_argument("--threads", type=_threads)
    k.set_defaults(fn=_cmd_kernels)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    bs = bsub.add_parser("speed", help="prefill and decode tokens/s and memory: FP32 vs real W8A16, W4A16, W8A8")
    bs.add_argument("--model", default="smollm2-135m")
    bs.add_argument("--configs", nargs="+", default=["fp32", "w8a16", "w4a16", "w8a8"])
    bs.add_argument("--prompt-len", type=POSITIVE, default=128)
    bs.add_argument("--new-tokens", type=POSITIVE, default=32)
    bs.add_argument("--repeats", type=POSITIVE, default=5)
    bs.add_argument("--warmup", type=NONNEGATIVE, default=1)
    bs.add_argument("--threads", type=_threads, default=1)
    bs.add_argument("--json", help="also write the rows as JSON to this file")
    bs.set_defaults(fn=_cmd_bench_speed)
    bl = bsub.add_parser("layers", help="ms per call of each packed layer type on one layer shape, 1 and 128 rows")
    bl.add_argument("--out-features", type=POSITIVE, default=1536)
    bl.add_argument("--in-features", type=POSITIVE, default=576)
    bl.add_argument("--repeats", type=POSITIVE, default=20)
    bl.add_argument("--threads", type=_threads, default=1)
    bl.set_defaults(fn=_cmd_bench_layers)
    bp = bsub.add_parser("sparse", help="ms per call of a pruned layer: CSR at 50-90%% unstructured vs dense (and 2:4 "
                                        "semi-structured vs dense on a CUDA GPU)")
    bp.add_argument("--out-features", type=POSITIVE, default=1536)
    bp.add_argument("--in-features", type=POSITIVE, default=576)
    bp.add_argument("--repeats", type=POSITIVE, default=20)
    bp.add_argument("--threads", type=_threads, default=1)
    bp.set_defaults(fn=_cmd_bench_sparse)

    s = sub.add_parser("steps", help="list the registered compression steps")
    s.set_defaults(fn=_cmd_steps)
    for command in commands(p).values():
        if "--quiet" not in command.format_usage():
            command.add_argument("--quiet", action="store_true", help="no progress or informational output")
    return p


def commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every leaf subcommand ("run", "bench speed", ...) by its full name, so options apply to all of them."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(commands(sub, f"{prefix}{name} ") or {f"{prefix}{name}": sub})
    return found


def _on_signal(signum, _frame):
    """SIGTERM (like SIGINT) unwinds the command, so every staging folder is removed on the way out."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Interrupted(signum)


class Interrupted(KeyboardInterrupt):
    """The command was stopped by a signal; carries its number for the exit code."""


def _log_handler(quiet: bool) -> logging.Handler:
    """Informational lines (lowbit's log) go to stderr unless --quiet; errors are printed by `main`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.CRITICAL + 1 if quiet else logging.INFO)
    logging.getLogger().addHandler(handler)
    logging.getLogger("lowbit").setLevel(logging.INFO)
    logging.raiseExceptions = False  # a full disk must not turn a log line into a traceback
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    return handler


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (one line, code 2) or --help (code 0)
        return exc.code if isinstance(exc.code, int) else 0
    handler = _log_handler(args.quiet)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # names and paths that are not valid UTF-8
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    stderr = sys.stderr
    try:  # with --quiet, libraries' progress bars and notices are dropped; lowbit's own error line is not
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO() if args.quiet else stderr):
            if args.quiet:
                warnings.simplefilter("ignore")
            return _dispatch(args, stderr)
    finally:
        logging.getLogger().removeHandler(handler)
        for signum, old in previous.items():
            signal.signal(signum, old)


def _one_line(message) -> str:
    """Messages quoted from libraries may span lines; the user gets one."""
    return " ".join(str(message).split())


def _dispatch(args: argparse.Namespace, stderr) -> int:
    """Run the command; every expected failure becomes one line on `stderr` and an exit code."""
    try:
        gemm.backend()  # a wrong LOWBIT_CPU_GEMM fails before anything loads
        args.fn(args)
    except CheckFailed as exc:
        print(f"lowbit: check failed: {_one_line(exc)}", file=stderr)
        return 1
    except LowbitError as exc:
        print(f"lowbit: error: {_one_line(exc)}", file=stderr)
        return 2
    except BrokenPipeError:  # the reader of our output went away (e.g. `lowbit backends | head`): not an error
        sys.stdout = open(os.devnull, "w")  # so the interpreter's final flush does not fail again
        return 0
    except OSError as exc:  # the environment failed (disk, permissions) where no step expected it
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"lowbit: error: {_one_line(exc.strerror or exc)}{where}: check free space and permissions there",
              file=stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if isinstance(exc, Interrupted) else signal.SIGINT
        kept = getattr(exc, "resumable", None)
        outcome = f"continue it with --resume {kept}" if kept else "unfinished output removed"
        print(f"lowbit: interrupted by {signal.Signals(signum).name}; {outcome}", file=stderr)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
