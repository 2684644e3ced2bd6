"""lowbit's side of the peer harness (runs in lowbit's venv).

  python benchmarks/peers/to_run.py windows RECIPE OUT.pt [--set KEY=VALUE ...]
      the calibration windows a lowbit run of RECIPE uses (same data, count, length, seed)
  python benchmarks/peers/to_run.py import RECIPE PEER_DIR OUT_RUN [--set KEY=VALUE ...]
      a peer's output (save_dequantized in common.py) as a lowbit run folder: the peer's model, metrics.json with
      perplexity on each of RECIPE's evaluation texts (the FP baseline from lowbit's cache), size of RECIPE's weight format,
      the peer's quantization time and peak memory, and blocks.jsonl with the per-block output error against the FP
      path on the first 8 calibration windows and each linear's weight error against the FP weight (per-block
      time and memory are not known for peers: null). `lowbit report` and `lowbit eval --tasks` then work on it.
      A recipe with dynamic activations (e.g. W8A8 per token) gets those quantizers on every block linear's
      input, as lowbit's own run of that recipe has them, so the peer is scored as simulated W8A8.
      The run has no quant_state parameters (the peer's scales are not imported), so it cannot be exported.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from lowbit.actquant import ActQuantizer
from lowbit.calibration import calibration_set
from lowbit.diagnostics import diagnostic_windows, rel_error
from lowbit.errors import LowbitError
from lowbit.loading import load_model, resolve_model_path
from lowbit.models import get_adapter
from lowbit.recipe import load_recipe
from lowbit.report import model_size
from lowbit.run import baseline_ppl, evaluate_texts, text_metrics
from lowbit.runfolder import save_state
from lowbit.state import QuantState, WeightRecord


def windows(recipe_path: str, out: str, overrides: list[str]) -> None:
    recipe = load_recipe(recipe_path, overrides)
    model, tokenizer = load_model(recipe.model)
    ids = calibration_set(model, tokenizer, resolve_model_path(recipe.model), recipe.calibration, progress=False)
    torch.save(ids, out)
    print(f"{tuple(ids.shape)} windows -> {out}; FP model folder: {resolve_model_path(recipe.model)}")


def _block_outputs(model, adapter, ids: torch.Tensor) -> list[torch.Tensor]:
    outs: list[list[torch.Tensor]] = [[] for _ in adapter.blocks(model)]
    hooks = [b.register_forward_hook(lambda _m, _a, o, i=i: outs[i].append(o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(adapter.blocks(model))]
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in hooks:
        h.remove()
    return [torch.cat(o) for o in outs]


def _activation_quantizers(recipe, model, adapter) -> dict[str, ActQuantizer]:
    """Dynamic input quantizers on every block linear, as a lowbit run of `recipe` attaches them."""
    spec = recipe.plan().activations
    if spec is None:
        return {}
    if not spec.dynamic:
        raise LowbitError("peer import supports dynamic activation quantization only: the peer's static scales are "
                          "not imported")
    return {f"{adapter.block_name(i)}.{rel}": ActQuantizer(spec)
            for i, block in enumerate(adapter.blocks(model)) for rel in adapter.linears(block)}


def import_run(recipe_path: str, peer_dir: str, out: str, overrides: list[str]) -> None:
    recipe = load_recipe(recipe_path, overrides)
    peer = json.loads((Path(peer_dir) / "peer_metrics.json").read_text())
    spec, acts = recipe.plan().weights, recipe.plan().activations
    peer_acts = peer.get("act_bits")
    if ((peer["bits"], peer["group_size"] or None, peer["symmetric"]) != (spec.bits, spec.group_size, spec.symmetric)
            or peer_acts != (acts.bits if acts else None)):
        raise LowbitError(f"peer format {peer['bits']} bits g{peer['group_size']} sym={peer['symmetric']} "
                          f"activations {peer_acts} differs from the recipe's {spec.describe()} "
                          f"activations {acts.describe() if acts else None}")
    torch.set_num_threads(recipe.threads or 2)
    fp, tokenizer = load_model(recipe.model)
    model, _ = load_model(peer_dir)
    adapter = get_adapter(model)
    state = QuantState()
    for i, block in enumerate(adapter.blocks(model)):
        for rel in adapter.linears(block):
            state.weights[f"{adapter.block_name(i)}.{rel}"] = WeightRecord(spec, torch.empty(0), torch.empty(0))
    saved = QuantState(input_quantizers=_activation_quantizers(recipe, model, adapter))
    saved.install(model)
    metrics = {"name": f"{peer['tool'].split()[0]}-{peer['method']}", "model": recipe.model,
               "steps": [f"{peer['tool'].split()[0]}:{peer['method']}"], "weights": spec.describe(),
               "activations": acts.describe() if acts else "fp", "threads": peer.get("threads"), "tool": peer["tool"],
               "size_fp16_mb": model_size(model, None) / 1e6, "size_mb": model_size(model, state) / 1e6,
               "quant_time_s": peer["quant_time_s"], "peak_rss_gb": peer["peak_rss_gb"]}
    metrics |= text_metrics("ppl_fp", baseline_ppl(fp, tokenizer, resolve_model_path(recipe.model), recipe,
                                                   progress=False))
    metrics |= text_metrics("ppl", evaluate_texts(model, tokenizer, recipe.evaluation, "perplexity (peer)",
                                                  progress=False))

    ids = calibration_set(fp, tokenizer, resolve_model_path(recipe.model), recipe.calibration, progress=False)
    ids = ids[:diagnostic_windows(ids.shape[1])]
    y_fp, y_q = _block_outputs(fp, get_adapter(fp), ids), _block_outputs(model, adapter, ids)
    fp_blocks = get_adapter(fp).blocks(fp)
    rows = []
    for i, block in enumerate(adapter.blocks(model)):
        fp_lin = get_adapter(fp).linears(fp_blocks[i])
        errors = {rel: rel_error(lin.weight.data, fp_lin[rel].weight.data)
                  for rel, lin in sorted(adapter.linears(block).items())}
        rows.append({"index": i, "name": adapter.block_name(i), "output_rel_error": rel_error(y_q[i], y_fp[i]),
                     "windows": ids.shape[0], "weight_rel_error": errors, "time_s": None, "peak_rss_gb": None})

    out_dir = Path(out)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        shutil.copytree(peer_dir, tmp / "model")
        save_state(saved, tmp)
        (tmp / "recipe.yaml").write_text(Path(recipe_path).read_text())
        (tmp / "blocks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ppl = ", ".join(f"{t} {r['ppl']:.3f} (FP {metrics['ppl_fp_texts'][t]['ppl']:.3f})"
                    for t, r in metrics["ppl_texts"].items())
    print(json.dumps({k: metrics[k] for k in ("name", "size_mb", "quant_time_s", "peak_rss_gb")}),
          f"ppl {ppl} -> {out_dir}")


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="lowbit's side of the peer harness (see the module docstring)")
    cli.add_argument("command", choices=["windows", "import"])
    cli.add_argument("paths", nargs="+", help="windows: RECIPE OUT.pt; import: RECIPE PEER_DIR OUT_RUN")
    cli.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, as lowbit run")
    a = cli.parse_args()
    if len(a.paths) != {"windows": 2, "import": 3}[a.command]:
        cli.error(f"{a.command} takes {'RECIPE OUT.pt' if a.command == 'windows' else 'RECIPE PEER_DIR OUT_RUN'}")
    try:
        {"windows": windows, "import": import_run}[a.command](*a.paths, a.set)
    except LowbitError as exc:
        sys.exit(f"error: {exc}")
