"""llm-compressor's SparseGPT and Wanda on the embedded model with lowbit's calibration windows, for the side-by-side
rows of docs/results.md ("Sparsity"). Runs inside the peer venv (benchmarks/peers/llmcompressor_venv.sh), never in
lowbit's; the pruned model is saved as a plain HF folder and scored with `lowbit eval` (same evaluation windows).

  # in lowbit's venv: the embedded model folder and the calibration windows (64 x 512 of WikiText-2 validation)
  python -c "from lowbit.loading import embedded_model_path; print(embedded_model_path())"
  python benchmarks/peers/llmcompressor_sparsity.py windows OUT/calib.pt
  # in the peer venv
  ~/.cache/lowbit-peers/llmcompressor/bin/python benchmarks/peers/llmcompressor_sparsity.py prune MODEL OUT/calib.pt \
      --method sparsegpt --sparsity 0.5 --out OUT/llmc-sparsegpt-50
  lowbit eval OUT/llmc-sparsegpt-50
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def windows(out: str, n: int = 64, seq_len: int = 512, seed: int = 0) -> None:
    """Save lowbit's calibration windows (needs lowbit importable)."""
    from lowbit.data import calibration_windows, load_text, tokenize
    from lowbit.loading import load_model

    _, tokenizer = load_model("smollm2-135m")
    ids = calibration_windows(tokenize(tokenizer, load_text("wikitext2", "validation")), n, seq_len, seed)
    torch.save(ids, out)


def prune(model_path: str, calib: str, method: str, sparsity: float, mask: str, out: str, threads: int) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    ids = torch.load(calib)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    cls = SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier
    # lm_head is excluded as on lowbit's side (it is tied to embed_tokens in this model, so pruning it prunes the
    # embedding too). llm-compressor 0.14's pruning modifiers match `ignore` against "<target name>." with a
    # trailing dot (sgpt_base.py, on_calibration_start), so the exact name "lm_head" never matches and lm_head
    # (hence the tied embedding) was pruned; the regex form is what its own warning recommends.
    modifier = cls(sparsity=sparsity, mask_structure=mask, targets=["Linear"], ignore=["re:.*lm_head"])
    head = model.get_output_embeddings().weight
    fingerprint = (int((head == 0).sum()), float(head.abs().sum(dtype=torch.float64)))  # no clone (peak RSS)
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=modifier, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0])
    seconds = time.perf_counter() - start
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    achieved = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    head = model.get_output_embeddings().weight
    if (int((head == 0).sum()), float(head.abs().sum(dtype=torch.float64))) != fingerprint:
        raise SystemExit("llm-compressor changed lm_head (tied to embed_tokens): the comparison with lowbit, which "
                         "leaves it dense, would not be fair; not saving")
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_compressed=False)
    tokenizer.save_pretrained(out)
    import llmcompressor

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    (Path(out) / "peer_metrics.json").write_text(json.dumps({
        "tool": f"llmcompressor {llmcompressor.__version__}", "method": method, "sparsity": sparsity, "mask": mask,
        "prune_time_s": seconds, "peak_rss_gb": rss, "achieved_sparsity": achieved, "threads": threads}, indent=2))
    print(json.dumps({"prune_time_s": seconds, "peak_rss_gb": rss, "achieved_sparsity": achieved}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("windows")
    w.add_argument("out")
    r = sub.add_parser("prune")
    r.add_argument("model")
    r.add_argument("calib")
    r.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    r.add_argument("--sparsity", type=float, default=0.5)
    r.add_argument("--mask", default="0:0", help="0:0 = unstructured, 2:4 = semi-structured")
    r.add_argument("--out", required=True)
    r.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.cmd == "windows":
        windows(args.out)
    else:
        prune(args.model, args.calib, args.method, args.sparsity, args.mask, args.out, args.threads)


if __name__ == "__main__":
    main()
