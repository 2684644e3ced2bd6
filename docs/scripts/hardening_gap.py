"""Why learned rounding needs enough steps: the gap between the soft weights training minimized and the hardened ones.

Quantizes the first K blocks of the embedded model with each given step (16 calibration windows of 128 tokens) and
prints the per-token relative MSE of the hidden state after block K against FP on 8 held-out windows; for
reconstruction steps also, per block, the training loss at the first and last step, the loss with the final soft
weights and with the hardened ones (mean of 4 batches), and the fraction of rounding variables still soft.
Run: PYTHONPATH=. python docs/scripts/hardening_gap.py K BITS GROUP STEP[,key=value...] ...
e.g. PYTHONPATH=. python docs/scripts/hardening_gap.py 4 2 64 rtn gptq brecq brecq,iters=50
"""
import sys
import time

import torch

import lowbit.reconstruction as R
from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.formats import QuantSpec
from lowbit.loading import load_model
from lowbit.models import get_adapter
from lowbit.pipeline import FormatPlan, capture_block_inputs, compress
from lowbit.steps import get_step

torch.set_num_threads(1)
K, BITS, GROUP = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) or None
model, tok = load_model("smollm2-135m")
ids = calibration_windows(tokenize(tok, load_text("wikitext2", "validation")), 24, 128, 0)
calib, held = ids[:16], ids[16:]
model.model.layers = model.model.layers[:K]
fp_state = {k: v.clone() for k, v in model.state_dict().items()}


def hidden() -> torch.Tensor:
    adapter = get_adapter(model)
    x, args, kwargs = capture_block_inputs(model, adapter, held)
    with torch.no_grad():
        for block in adapter.blocks(model):
            x = block(x, *args, **kwargs)
            x = x[0] if isinstance(x, tuple) else x
    return x


ref = hidden()
train = R.optimize
lines: list[str] = []


def optimize_and_measure(mods, batch_loss, args, extra_params=(), extra_lr=0.0):
    """The library's training loop, then the loss with soft and with hardened weights on the same 4 batches."""
    history = train(mods, batch_loss, args, extra_params, extra_lr)
    soft_v = [m.v.data.clone() for m in mods]
    undecided = sum(m.undecided().sum().item() for m in mods) / sum(m.v.numel() for m in mods)
    with torch.no_grad():
        soft = sum(batch_loss(torch.Generator().manual_seed(i)).item() for i in range(4)) / 4
        for m in mods:
            m.v.data = torch.where(m.v.data >= 0, 100.0, -100.0)
        hard = sum(batch_loss(torch.Generator().manual_seed(i)).item() for i in range(4)) / 4
    for m, v in zip(mods, soft_v):
        m.v.data = v
    lines.append(f"first={history[0]:.4g} last={history[-1]:.4g} soft={soft:.4g} hard={hard:.4g} "
                 f"undecided={undecided:.3f}")
    return history


R.optimize = optimize_and_measure
spec = QuantSpec(BITS, symmetric=False, group_size=GROUP)
for config in sys.argv[4:]:
    name, *pairs = config.split(",")
    kwargs = {k: (float(v) if "." in v or "e" in v else int(v)) if v[0].isdigit() else v
              for k, v in (p.split("=") for p in pairs)}
    model.load_state_dict(fp_state)
    lines.clear()
    t = time.perf_counter()
    compress(model, get_adapter(model), FormatPlan(weights=spec), [get_step(name)(get_step(name).Args(**kwargs))], calib,
             progress=False)
    h = hidden()
    err = (((h - ref) ** 2).sum(-1) / (ref ** 2).sum(-1)).mean()
    print(f"{config:28s} rel_mse={err:.5f} wall={time.perf_counter() - t:.0f}s", flush=True)
    for line in lines:
        print("   ", line, flush=True)
