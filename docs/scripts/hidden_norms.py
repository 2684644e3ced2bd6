"""Hidden-state norm per position of the FP embedded model: shows the attention-sink token whose hidden state is
~100x larger than the others from block 12 on (why reconstruction uses a per-token relative loss; docs/results.md).
Run: PYTHONPATH=. python docs/scripts/hidden_norms.py
"""
import torch

from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.loading import load_model

torch.set_num_threads(1)
model, tok = load_model("smollm2-135m")
ids = calibration_windows(tokenize(tok, load_text("wikitext2", "validation")), 2, 128, 0)
with torch.no_grad():
    out = model(ids, output_hidden_states=True)
print("| hidden state after block | norm, first token | median norm, other tokens | first token's share of squared norm |")
print("|---|---|---|---|")
for i, h in enumerate(out.hidden_states):
    n = h.norm(dim=-1)
    share = (n[:, 0] ** 2).sum() / (n ** 2).sum()
    print(f"| {i} | {n[:, 0].mean():.1f} | {n[:, 1:].median():.1f} | {share:.3f} |")
