"""Diagnostic: relative output error of 4-bit per-channel RTN weights, ||X (Q(W) - W)^T|| / ||X W^T||, per linear of
blocks 2, 15, 28 on one 512-token window, before and after rotation. Usage: PYTHONPATH=. python benchmarks/rotation_weight_error.py"""
import torch
torch.set_num_threads(1)
from lowbit.data import load_text, tokenize
from lowbit.formats import QuantSpec, fake_quant
from lowbit.loading import load_model
from lowbit.models import get_adapter
from lowbit.observers import observe
from lowbit.pipeline import FormatPlan, ModelContext
from lowbit.state import QuantState
from lowbit.steps.rotation import RotationArgs, rotate_model
spec = QuantSpec(bits=4, granularity="channel", symmetric=True)
model, tok = load_model("smollm2-135m"); ad = get_adapter(model)
ids = tokenize(tok, load_text("wikitext2", "validation"))[:512][None]
def errs(blocks=(2, 15, 28)):
    res = {}
    for b in blocks:
        block = ad.blocks(model)[b]; xs = {}; hs = []
        for rel, lin in ad.linears(block).items():
            hs.append(lin.register_forward_hook(lambda m, a, o, rel=rel: xs.__setitem__(rel, a[0].detach().reshape(-1, a[0].shape[-1]))))
        with torch.no_grad(): model(ids)
        for h in hs: h.remove()
        for rel, lin in ad.linears(block).items():
            w = lin.weight.data; s, z = observe(w, spec); wq = fake_quant(w, s, z, spec)
            res[(b, rel)] = float((xs[rel] @ (wq - w).T).norm() / (xs[rel] @ w.T).norm())
    return res
before = errs()
rotate_model(ModelContext(model, ad, FormatPlan(), QuantState(), ids), RotationArgs())
after = errs()
for k in before: print(k, round(before[k], 4), round(after[k], 4))
