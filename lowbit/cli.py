"""Command line: lowbit run | sensitivity | quantize | eval | report | export | backends | verify | steps. Expected failures print one line and exit with code 2."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lowbit.errors import LowbitError


def _cmd_run(args: argparse.Namespace) -> None:
    from lowbit.recipe import load_recipe
    from lowbit.report import results_table
    from lowbit.run import run_recipe

    recipe = load_recipe(args.recipe, (args.set or []) + [f"budget.{b}" for b in args.budget or []])
    if args.no_save:
        recipe = recipe.model_copy(update={"save": False})
    result = run_recipe(recipe, Path(args.out) if args.out else None, progress=not args.quiet)
    print(results_table([result.metrics]))
    if result.out_dir:
        print(f"saved to {result.out_dir}")


def _cmd_sensitivity(args: argparse.Namespace) -> None:
    import time

    import torch

    from lowbit.allocate import gptq_args
    from lowbit.data import calibration_windows, load_text, tokenize
    from lowbit.loading import load_model
    from lowbit.models import get_adapter
    from lowbit.recipe import candidate_formats, load_recipe
    from lowbit.runfolder import write_atomic
    from lowbit.sensitivity import Candidate, heatmap, heldout_windows, measure, most_sensitive

    recipe = load_recipe(args.recipe, args.set or [])
    if recipe.weights is None:
        raise LowbitError("sensitivity measures weight formats: set weights in the recipe (its symmetry and observer "
                          "apply to the candidates)")
    metrics = ["hessian", "loss"] if args.metric == "both" else [args.metric]
    fmts = candidate_formats(recipe, [f for f in args.formats.split(",") if f])
    out = Path(args.out or f"runs/sensitivity-{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists():
        raise LowbitError(f"output folder {out} already exists: choose another --out or remove it")
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    model, tokenizer = load_model(recipe.model)
    adapter = get_adapter(model)
    cal = recipe.calibration
    tokens = tokenize(tokenizer, load_text(cal.data, cal.split))
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
    narrowest = min(fmts, key=lambda f: fmts[f].bits)
    print(f"ten most sensitive linears in {narrowest}:")
    for name, vals in most_sensitive(table):
        print(f"  {name:40s} " + "  ".join(f"{m} {v:.4g}" for m, v in vals.items()))
    for fmt, rho in table.spearman().items():
        print(f"spearman(hessian, loss) {fmt}: {rho:.3f}")
    print(f"saved to {out}")


def _cmd_quantize(args: argparse.Namespace) -> None:
    from lowbit.recipe import parse_recipe
    from lowbit.report import results_table
    from lowbit.run import run_recipe

    weights = None if args.wbits >= 16 else {
        "bits": args.wbits, "format": args.wformat, "symmetric": args.sym,
        "granularity": "group" if args.group_size else "channel", "group_size": args.group_size or None,
        "observer": args.observer}
    acts = None if args.abits >= 16 else {
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
    if is_run_folder(path):
        model, tokenizer, _ = load_run(path)
    else:
        model, tokenizer = load_model(args.model)
    windows = eval_windows(tokenize(tokenizer, load_text(args.data, args.split)), args.seq_len,
                           args.max_tokens or None)
    result = perplexity(model, windows, progress=not args.quiet)
    print(json.dumps({"model": args.model, **result.to_dict()}, indent=2))


def _cmd_report(args: argparse.Namespace) -> None:
    from lowbit.report import results_table
    from lowbit.runfolder import read_metrics

    print(results_table([read_metrics(Path(run_dir)) for run_dir in args.runs]))


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


def _cmd_steps(_args: argparse.Namespace) -> None:
    from lowbit.steps import STEPS

    for name, cls in sorted(STEPS.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:14s} {doc}")


def _cmd_export(args: argparse.Namespace) -> None:
    from lowbit.export import export_run

    result = export_run(args.run, args.format, args.out, args.dtype)
    for note in result.notes:
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
                    progress=not args.quiet)
    print(json.dumps({"run": args.run, "export": args.export, **result.to_dict()}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Post-training compression of LLMs, block by block.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a YAML recipe: compress, evaluate, save")
    r.add_argument("recipe")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. weights.bits=3")
    r.add_argument("--out", help="output folder (default runs/NAME-TIMESTAMP)")
    r.add_argument("--no-save", action="store_true", help="evaluate only, write nothing")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--budget", action="append", metavar="KEY=VALUE",
                   help="mixed precision under a budget: avg_bits=3.5 or size_mb=60 (also formats=[w3g64,w4g64], "
                        "metric=loss, sensitivity=TABLE.json)")
    r.set_defaults(fn=_cmd_run)

    se = sub.add_parser("sensitivity", help="per-linear error of candidate formats: JSON table, heatmap, top ten")
    se.add_argument("recipe")
    se.add_argument("--formats", default="w2g64,w3g64,w4g64,w8", help="comma-separated candidate formats")
    se.add_argument("--metric", choices=["hessian", "loss", "both"], default="hessian",
                    help="hessian: Hessian-weighted output error (cheap); loss: loss increase (one eval per layer "
                         "and format)")
    se.add_argument("--heldout", type=int, default=4, help="held-out calibration windows to measure on")
    se.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key")
    se.add_argument("--out", help="output folder (default runs/sensitivity-NAME-TIMESTAMP)")
    se.add_argument("--quiet", action="store_true")
    se.set_defaults(fn=_cmd_sensitivity)

    q = sub.add_parser("quantize", help="the same pipeline from flags, without writing YAML")
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--method", nargs="+", default=["rtn"], help="steps in order, e.g. awq gptq")
    q.add_argument("--wbits", type=int, default=4, help="weight bits (16 = keep FP)")
    q.add_argument("--wformat", choices=["int", "fp"], default="int")
    q.add_argument("--group-size", type=int, default=0, help="0 = per output channel")
    q.add_argument("--sym", action="store_true", help="symmetric weights (default asymmetric)")
    q.add_argument("--observer", choices=["minmax", "mse", "percentile"], default="minmax")
    q.add_argument("--abits", type=int, default=16, help="activation bits (16 = keep FP)")
    q.add_argument("--aformat", choices=["int", "fp"], default="int")
    q.add_argument("--static-act", action="store_true", help="static per-tensor activations (default dynamic per-token)")
    q.add_argument("--nsamples", type=int, default=64)
    q.add_argument("--calib-seq-len", type=int, default=512)
    q.add_argument("--seq-len", type=int, default=2048, help="evaluation window")
    q.add_argument("--max-tokens", type=int, default=32768, help="evaluation token limit (0 = whole split)")
    q.add_argument("--threads", type=int)
    q.add_argument("--name")
    q.add_argument("--out")
    q.add_argument("--no-save", action="store_true")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(fn=_cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a local HF model folder or a lowbit run folder")
    e.add_argument("model")
    e.add_argument("--data", default="wikitext2")
    e.add_argument("--split", default="test")
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument("--max-tokens", type=int, default=32768, help="0 = whole split")
    e.add_argument("--threads", type=int)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(fn=_cmd_eval)

    rp = sub.add_parser("report", help="side-by-side table of saved runs (their metrics.json)")
    rp.add_argument("runs", nargs="+")
    rp.set_defaults(fn=_cmd_report)

    x = sub.add_parser("export", help="write a run in a serving engine's format (compressed-tensors, GGUF)")
    x.add_argument("run")
    x.add_argument("--format", required=True, help="compressed-tensors, gguf-q8_0 or gguf-q4_0 (see lowbit backends)")
    x.add_argument("--out", help="output folder or .gguf file (default: inside the run folder)")
    x.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of stored scales and unquantized tensors where the format leaves a choice")
    x.set_defaults(fn=_cmd_export)

    b = sub.add_parser("backends", help="which formats and granularities each export target executes")
    b.set_defaults(fn=_cmd_backends)

    v = sub.add_parser("verify", help="compare a run's simulated model with its export: logits and perplexity")
    v.add_argument("run")
    v.add_argument("export")
    v.add_argument("--data", default="wikitext2")
    v.add_argument("--split", default="test")
    v.add_argument("--seq-len", type=int, default=2048)
    v.add_argument("--max-tokens", type=int, default=16384, help="0 = whole split")
    v.add_argument("--threads", type=int)
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(fn=_cmd_verify)
    g = sub.add_parser("generate", help="greedy text generation from a run, on real low-bit kernels or simulated")
    g.add_argument("run", help="a run folder written by 'lowbit run' or 'lowbit quantize'")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--kernels", choices=["real", "simulated"], default="real")
    g.add_argument("--compute-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="input dtype of the weight-only kernels (float32 is exact but slow in PyTorch 2.13)")
    g.add_argument("--threads", type=int)
    g.add_argument("--quiet", action="store_true", help="do not print which kernel each layer uses")
    g.set_defaults(fn=_cmd_generate)

    k = sub.add_parser("kernels", help="which real CPU kernel each layer of a run uses; --check compares with simulated")
    k.add_argument("run")
    k.add_argument("--check", action="store_true", help="logit difference, top-1 agreement, perplexity of both")
    k.add_argument("--noise-floor", action="store_true",
                   help="also compare the simulated model with itself under 1e-6 relative input noise")
    k.add_argument("--data", default="wikitext2")
    k.add_argument("--split", default="test")
    k.add_argument("--seq-len", type=int, default=512)
    k.add_argument("--max-tokens", type=int, default=4096)
    k.add_argument("--compute-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    k.add_argument("--threads", type=int)
    k.set_defaults(fn=_cmd_kernels)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    bs = bsub.add_parser("speed", help="prefill and decode tokens/s and memory: FP32 vs real W8A16, W4A16, W8A8")
    bs.add_argument("--model", default="smollm2-135m")
    bs.add_argument("--configs", nargs="+", default=["fp32", "w8a16", "w4a16", "w8a8"])
    bs.add_argument("--prompt-len", type=int, default=128)
    bs.add_argument("--new-tokens", type=int, default=32)
    bs.add_argument("--repeats", type=int, default=5)
    bs.add_argument("--warmup", type=int, default=1)
    bs.add_argument("--threads", type=int, default=1)
    bs.add_argument("--json", help="also write the rows as JSON to this file")
    bs.set_defaults(fn=_cmd_bench_speed)
    bl = bsub.add_parser("layers", help="ms per call of each packed layer type on one layer shape, 1 and 128 rows")
    bl.add_argument("--out-features", type=int, default=1536)
    bl.add_argument("--in-features", type=int, default=576)
    bl.add_argument("--repeats", type=int, default=20)
    bl.add_argument("--threads", type=int, default=1)
    bl.set_defaults(fn=_cmd_bench_layers)

    s = sub.add_parser("steps", help="list the registered compression steps")
    s.set_defaults(fn=_cmd_steps)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        args.fn(args)
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
