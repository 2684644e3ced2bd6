"""GPTQ vs RTN output error on real layers of the embedded model (docs/results.md, issue 3).

Block 0, Hessian from the first 8/16/32 of 40 validation windows (512 tokens), error ||X(Q-W)^T||^2 on the last 8
windows, printed as a ratio to RTN for damp 0.01/0.1 with and without act-order. Run: PYTHONPATH=. python docs/scripts/gptq_layer_error.py
"""
import sys

import torch
sys.path.insert(0, "tests")
torch.set_num_threads(1)
from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.formats import QuantSpec, fake_quant
from lowbit.loading import load_model
from lowbit.observers import observe
from lowbit.steps.gptq import accumulate_hessians, gptq_quantize
from solver_utils import block_contexts

model, tok = load_model("smollm2-135m")
ids = calibration_windows(tokenize(tok, load_text("wikitext2", "validation")), 40, 512, 0)
spec = QuantSpec(4, symmetric=False, group_size=64)
ctx = next(block_contexts(model, spec, ids))
allx = ctx.q_inputs
test = allx[32:]
for n in (8, 16, 32):
    ctx.q_inputs = allx[:n]
    for group in [("self_attn.q_proj",), ("mlp.down_proj",)]:
        h = accumulate_hessians(ctx, [group])[group[0]]
        feats = []
        ctx.collect([group[0]], lambda _r, x, _o: feats.append(x.reshape(-1, x.shape[-1])), x=test, stop_early=True)
        x = torch.cat(feats)
        w = ctx.block.get_submodule(group[0]).weight.data
        s, z = observe(w, spec)
        base = ((x @ (fake_quant(w, s, z, spec) - w).T) ** 2).mean().item()
        out = []
        for ao in (False, True):
            for d in (0.01, 0.1):
                q, _, _ = gptq_quantize(w, h, spec, damp=d, act_order=ao)
                out.append(f"ao{int(ao)}-d{d}={((x @ (q - w).T) ** 2).mean().item() / base:.3f}")
        print(n, group[0], " ".join(out), flush=True)
