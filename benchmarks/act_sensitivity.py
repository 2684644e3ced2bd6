"""Which linear inputs make low-bit activations fail: perplexity with the activation quantizers switched on for one
kind of linear input at a time (weights stay FP), after the given equivalent transformations.

    python benchmarks/act_sensitivity.py --steps rotate --abits 4 --clip-ratio 0.9

Prints one markdown row per kind of input (q/k/v, o_proj, gate/up, down_proj, all, none).
"""
from __future__ import annotations

import argparse

import torch

from lowbit.data import calibration_windows, eval_windows, load_text, tokenize
from lowbit.eval import perplexity
from lowbit.formats import QuantSpec
from lowbit.loading import EMBEDDED, load_model
from lowbit.models import get_adapter
from lowbit.pipeline import FormatPlan, compress
from lowbit.steps import get_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--steps", nargs="*", default=[], help="transformations applied first, e.g. rotate")
    parser.add_argument("--abits", type=int, default=4)
    parser.add_argument("--symmetric", action="store_true", help="symmetric activations (default asymmetric)")
    parser.add_argument("--format", choices=["int", "fp"], default="int", help="fp: 4-bit e2m1 / 8-bit e4m3")
    parser.add_argument("--group-size", type=int, help="one scale per group of this many channels of a token "
                        "(e.g. 16 or 32 as in NVFP4 / MXFP4); default: one per token")
    parser.add_argument("--clip-ratio", type=float, default=1.0)
    parser.add_argument("--n-samples", type=int, default=4, help="calibration windows of 512 tokens")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", nargs="*", help="only these rows (default: all of them)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    adapter = get_adapter(model)
    acts = QuantSpec(bits=args.abits, format=args.format, symmetric=args.symmetric or args.format == "fp",
                     granularity="group" if args.group_size else "token", group_size=args.group_size, dynamic=True)
    plan = FormatPlan(activations=acts, act_clip_ratio=args.clip_ratio)
    calib = calibration_windows(tokenize(tokenizer, load_text("wikitext2", "validation")), args.n_samples, 512)
    steps = [get_step(name)(get_step(name).Args()) for name in args.steps]
    state = compress(model, adapter, plan, steps, calib, progress=False)
    windows = eval_windows(tokenize(tokenizer, load_text("wikitext2", "test")), 2048, args.max_tokens)
    kinds = {"none": (), "q/k/v": adapter.norm_groups[0].linears,
             "o_proj": (adapter.attn_out,), "gate/up": adapter.norm_groups[1].linears,
             "down_proj": (adapter.mlp_out,), "all": tuple(adapter.linear_order)}
    if args.kinds:
        kinds = {k: v for k, v in kinds.items() if k in args.kinds}
    print(f"| {acts.describe()} inputs (after {'+'.join(args.steps) or 'nothing'}, clip {args.clip_ratio}) "
          f"| ppl ({windows.numel()} tokens) |")
    print("|---|---|")
    for kind, rels in kinds.items():
        for name, q in state.input_quantizers.items():
            q.enabled = any(name.endswith("." + rel) for rel in rels)
        ppl = perplexity(model, windows, progress=False).ppl
        print(f"| {kind} | {ppl:.3f} |", flush=True)


if __name__ == "__main__":
    main()
