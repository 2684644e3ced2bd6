"""Block-level proxy for comparing weight solvers quickly (docs/results.md, issue 3).

Quantizes only the first K=4 blocks of the embedded model with 16 calibration windows and reports the per-token
relative MSE of the hidden state after block K against FP, on 8 held-out validation windows of 512 tokens.
Run: PYTHONPATH=. python docs/scripts/solvers_proxy.py [--w3ch] [CONFIG ...]   (default: every config below;
--w3ch: int3 asymmetric per-channel weights instead of int4 g64)
"""
import sys
import time

import torch
torch.set_num_threads(1)
from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.formats import QuantSpec
from lowbit.loading import load_model
from lowbit.models import get_adapter
from lowbit.pipeline import FormatPlan, compress, capture_block_inputs
from lowbit.steps import get_step
K = 4
model0, tok = load_model("smollm2-135m")
layers = model0.model.layers
ids = calibration_windows(tokenize(tok, load_text("wikitext2", "validation")), 24, 512, 0)
calib, held = ids[:16], ids[16:]
def hidden(model):
    ad = get_adapter(model)
    x, a, kw = capture_block_inputs(model, ad, held)
    with torch.no_grad():
        for b in ad.blocks(model)[:K]:
            x = b(x, *a, **kw); x = x[0] if isinstance(x, tuple) else x
    return x
model0.model.layers = layers[:K]
sd = {k: v.clone() for k, v in model0.state_dict().items()}
ref = hidden(model0)
GPTQ = {"damp": 0.01, "act_order": False, "true_sequential": True, "observer": "minmax"}  # GPTQ's defaults when this table was measured
configs = {
 "rtn": [("rtn", {})],
 "rtn-mse": [("rtn", {"observer": "mse"})],
 "gptq-seq": [("gptq", GPTQ)],
 "gptq-all": [("gptq", {**GPTQ, "true_sequential": False})],
 "gptq-seq-ao": [("gptq", {**GPTQ, "act_order": True})],
 "gptq-seq-ao-mse": [("gptq", {**GPTQ, "act_order": True, "observer": "mse"})],
 "awq": [("awq", {"n_grid": 10})],
 "awq+gptq-ao": [("awq", {"n_grid": 10}), ("gptq", {**GPTQ, "act_order": True})],
 "lwc-e2-lr0.005": [("lwc", {"epochs": 2, "lr": 0.005})],
 "lwc-e2-lr0.05": [("lwc", {"epochs": 2, "lr": 0.05})],
 "lwc-e5-lr0.05-bs1": [("lwc", {"epochs": 5, "lr": 0.05, "batch_size": 1})],
 "lwc-e5-lr0.01-bs1": [("lwc", {"epochs": 5, "lr": 0.01, "batch_size": 1})],
 "adaround": [("adaround", {})],
 "adaround-lr0.01": [("adaround", {"lr": 0.01})],
 "adaround-lr0.01-it200": [("adaround", {"lr": 0.01, "iters": 200})],
 "brecq": [("brecq", {})],
}
configs = {k: v for k, v in configs.items() if k in sys.argv[1:]} or configs
W3CH = "--w3ch" in sys.argv
for bits in ((3,) if W3CH else (4,)):
    for obs in ("minmax",):  # the weights' default observer; configs override it per step
        spec = QuantSpec(bits, symmetric=False) if W3CH else QuantSpec(bits, symmetric=False, group_size=64)
        for name, steps in configs.items():
            model0.load_state_dict(sd)
            t = time.perf_counter()
            st = [get_step(n)(get_step(n).Args(**a)) for n, a in steps]
            compress(model0, get_adapter(model0), FormatPlan(weights=spec, weight_observer=obs), st, calib, progress=False)
            h = hidden(model0)
            err = (((h - ref) ** 2).sum(-1) / (ref ** 2).sum(-1)).mean()
            print(f"W{bits} {'ch' if W3CH else 'g64'} {obs:6s} {name:14s} rel_mse={err:.5f} wall={time.perf_counter() - t:.0f}s", flush=True)
