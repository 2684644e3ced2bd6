"""Why gamma migration can hurt per-token quantization: quantization error of each norm group's linears with and
without the norm weight gamma folded into them, separated into activation and weight error.

    python benchmarks/gamma_migration_error.py --bits 6

For every block and norm group (FP model, real calibration text): relative error of the group's stacked linear
output when only the activations are quantized (per-token, dynamic) and when only the weights are (per channel),
for x -> W x (original) and x / gamma -> (W gamma) (x / gamma) (after migration).
"""
from __future__ import annotations

import argparse

import torch

from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.formats import QuantSpec, quantize_dynamic
from lowbit.loading import load_model
from lowbit.models import get_adapter


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=int, default=6)
    parser.add_argument("--n-samples", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    adapter = get_adapter(model)
    ids = calibration_windows(tokenize(tokenizer, load_text("wikitext2", "validation")), args.n_samples, 512)
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for i, block in enumerate(adapter.blocks(model)):
        for group in adapter.norm_groups:
            handles.append(block.get_submodule(group.norm).register_forward_hook(
                lambda _m, _a, out, key=(i, group.norm): inputs.setdefault(key, []).append(out.reshape(-1, out.shape[-1]))))
    model(ids)
    for h in handles:
        h.remove()
    act = QuantSpec(bits=args.bits, granularity="token", dynamic=True)
    wspec = QuantSpec(bits=args.bits, granularity="channel")
    totals: dict[str, list[float]] = {}
    for (i, norm_name), xs in inputs.items():
        block = adapter.blocks(model)[i]
        group = next(g for g in adapter.norm_groups if g.norm == norm_name)
        x = torch.cat(xs)
        gamma = block.get_submodule(norm_name).weight.float()
        w = torch.cat([block.get_submodule(r).weight.float() for r in group.linears])
        y = x @ w.T
        xm, wm = x / gamma, w * gamma
        row = [rel(quantize_dynamic(x, act) @ w.T, y), rel(quantize_dynamic(xm, act) @ wm.T, y),
               rel(x @ quantize_dynamic(w, wspec).T, y), rel(xm @ quantize_dynamic(wm, wspec).T, y)]
        totals.setdefault(norm_name, []).append(row)
    print(f"mean relative output error over {len(adapter.blocks(model))} blocks, {args.bits}-bit")
    print("| norm group | act. quant, original | act. quant, gamma migrated | weight quant, original | "
          "weight quant, gamma migrated |")
    print("|---|---|---|---|---|")
    for name, rows in totals.items():
        mean = torch.tensor(rows).mean(0).tolist()
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in mean) + " |")


if __name__ == "__main__":
    main()
