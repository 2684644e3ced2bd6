"""Figure: per-channel activation ranges (min and max over calibration tokens) of one block's linear inputs,
before and after each equivalent transformation, as a PNG.

    python benchmarks/act_ranges.py --steps smoothquant os osplus --out docs/act_ranges.png

Each transformation is a step name, optionally with YAML arguments ('osplus: {grid: 10}'), applied alone to a
fresh copy of the model and compressed as in the results tables (weights --wbits per channel, activations --abits
per token, so searches such as OS+'s threshold see the real trade-off; the first row is plain RTN). The activation
quantizers are switched off before measuring: the plot shows what each linear receives before it is quantized.
Only the blocks up to --block are compressed (the model is cut after it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import torch
import yaml
from torch import nn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lowbit.data import calibration_windows, load_text, tokenize  # noqa: E402
from lowbit.formats import QuantSpec  # noqa: E402
from lowbit.loading import load_model  # noqa: E402
from lowbit.models import get_adapter  # noqa: E402
from lowbit.pipeline import FormatPlan, compress  # noqa: E402
from lowbit.recipe import parse_recipe  # noqa: E402


def truncated_blocks(model: nn.Module, n: int) -> nn.ModuleList:
    """Keep only the first `n` decoder blocks in the model; returns the full list to put back."""
    adapter = get_adapter(model)
    parent_path, _, attr = adapter.blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    full = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(list(full)[:n]))
    return full


@torch.no_grad()
def input_ranges(model: nn.Module, block: nn.Module, rels: list[str], ids: torch.Tensor) -> dict:
    """Per-channel (min, max) of each listed module's input over all tokens of `ids`."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(rel):
        def fn(_m, args):
            flat = args[0].reshape(-1, args[0].shape[-1]).float()
            lo, hi = flat.amin(0), flat.amax(0)
            if rel in out:
                lo, hi = torch.minimum(out[rel][0], lo), torch.maximum(out[rel][1], hi)
            out[rel] = (lo, hi)
        return fn

    handles = [block.get_submodule(r).register_forward_pre_hook(hook(r)) for r in rels]
    try:
        for row in ids:
            model(row[None])
    finally:
        for h in handles:
            h.remove()
    return out


def measure(args, model: nn.Module, step_item, ids: torch.Tensor) -> dict:
    adapter = get_adapter(model)
    full = truncated_blocks(model, args.block + 1)
    steps = parse_recipe({"model": args.model, "steps": [step_item], "weights": None}).build_steps() if step_item else []
    plan = FormatPlan(weights=QuantSpec(bits=args.wbits, granularity="channel"),
                        activations=QuantSpec(bits=args.abits, granularity="token", dynamic=True))
    state = compress(model, adapter, plan, steps, ids, progress=False)
    for q in state.quantizers():
        q.enabled = False
    block = adapter.blocks(model)[args.block]
    ranges = input_ranges(model, block, sites(adapter), ids)
    truncated_blocks(model, len(full))
    return ranges


def sites(adapter) -> list[str]:
    """The first linear of the attention norm group (q/k/v input) and the MLP output linear (down_proj input)."""
    return [adapter.norm_groups[0].linears[0], adapter.mlp_out]


def label(item) -> str:
    return item if isinstance(item, str) else next(iter(item))


def plot(results: list[tuple[str, dict]], rels: list[str], titles: list[str], block: int, out: Path) -> None:
    fig, axes = plt.subplots(len(results), len(rels), figsize=(6.5 * len(rels), 2.3 * len(results)), squeeze=False)
    for i, (name, ranges) in enumerate(results):
        for j, rel in enumerate(rels):
            lo, hi = (t.numpy() for t in ranges[rel])
            ax = axes[i][j]
            ch = range(len(lo))
            ax.fill_between(ch, lo, hi, step="mid", color="tab:blue", alpha=0.6, linewidth=0)
            ax.plot(ch, hi, color="tab:red", linewidth=0.4, label="max")
            ax.plot(ch, lo, color="tab:green", linewidth=0.4, label="min")
            ax.axhline(0, color="black", linewidth=0.4)
            ax.set_xlim(0, len(lo) - 1)
            peak = max(abs(lo.min()), abs(hi.max()))
            ax.set_title(f"{name}: {titles[j]}  (max |x| = {peak:.1f})", fontsize=9)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel("value", fontsize=8)
            if i == len(results) - 1:
                ax.set_xlabel("channel", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Per-channel activation range (min..max over calibration tokens), block {block}", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", nargs="+", default=["smoothquant", "os", "osplus"],
                        help="step names, optionally 'name: {yaml args}'; each applied alone")
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--wbits", type=int, default=6, help="weight bits (per-channel) the blocks are rounded to")
    parser.add_argument("--abits", type=int, default=6, help="activation bits (per-token) the searches score with")
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/act_ranges.png"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    items = [yaml.safe_load(s) for s in args.steps]
    model, tokenizer = load_model(args.model)
    adapter = get_adapter(model)
    ids = calibration_windows(tokenize(tokenizer, load_text("wikitext2", "validation")), args.n_samples, args.seq_len)
    results = [("original (rtn)", measure(args, model, None, ids))]
    results += [(label(item), measure(args, load_model(args.model)[0], item, ids)) for item in items]
    rels = sites(adapter)
    titles = [f"input of {', '.join(r.split('.')[-1] for r in adapter.norm_groups[0].linears)}",
              f"input of {adapter.mlp_out.split('.')[-1]}"]
    plot(results, rels, titles, args.block, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
