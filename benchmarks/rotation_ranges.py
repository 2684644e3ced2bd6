"""Figure: per-channel max |x| of one block's q_proj and down_proj inputs before and after rotation.

Usage: PYTHONPATH=. python benchmarks/rotation_ranges.py [BLOCK] [OUT_PNG]   (one 512-token WikiText-2 window)
"""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lowbit.data import load_text, tokenize  # noqa: E402
from lowbit.loading import load_model  # noqa: E402
from lowbit.models import get_adapter  # noqa: E402
from lowbit.pipeline import FormatPlan, ModelContext  # noqa: E402
from lowbit.state import QuantState  # noqa: E402
from lowbit.steps.rotation import RotationArgs, rotate_model  # noqa: E402


def input_ranges(model, block, rels, ids) -> dict[str, torch.Tensor]:
    """Per-channel max |input| of each listed linear of `block` (after any online transform)."""
    out, handles = {}, []
    for rel in rels:
        def hook(_m, args, _o, rel=rel):
            out[rel] = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
        handles.append(block.get_submodule(rel).register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return out


def main(index: int = 5, path: str = "docs/rotation_ranges.png") -> None:
    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2-135m")
    adapter = get_adapter(model)
    ids = tokenize(tokenizer, load_text("wikitext2", "validation"))[:512][None]
    rels = ["self_attn.q_proj", adapter.mlp_out]
    block = adapter.blocks(model)[index]
    before = input_ranges(model, block, rels, ids)
    rotate_model(ModelContext(model, adapter, FormatPlan(), QuantState(), ids), RotationArgs())
    after = input_ranges(model, block, rels, ids)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, rel in zip(axes, rels):
        ax.plot(before[rel].numpy(), lw=0.7, label="original")
        ax.plot(after[rel].numpy(), lw=0.7, label="rotated")
        ax.set_yscale("log")
        ax.set_title(f"block {index} {rel} input")
        ax.set_xlabel("channel")
        ax.set_ylabel("max |x| over 512 tokens")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print({rel: (float(before[rel].max()), float(after[rel].max())) for rel in rels})


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5, sys.argv[2] if len(sys.argv) > 2 else "docs/rotation_ranges.png")
