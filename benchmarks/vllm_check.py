"""A compressed-tensors export scored by vLLM next to the run it came from, on the same token windows.

    python benchmarks/vllm_check.py windows RUN OUT      # lowbit's venv: OUT/windows.npy, OUT/simulated.json
    VLLM_PY benchmarks/vllm_check.py score EXPORT OUT    # vLLM's venv (GPU): OUT/vllm.json and the comparison

The first step writes the run's WikiText-2 test windows (non-overlapping, SEQ_LEN tokens, the first MAX_TOKENS)
and the simulated model's perplexity on them; the second loads the export in vLLM and takes every position's
log-probability of the actual next token from one prompt per window (`prompt_logprobs=0`, one generated token),
so both perplexities score the same positions (all but each window's first token). The vLLM step imports only
numpy and vllm: vLLM pins its own torch, so it lives in its own venv, without lowbit.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

SEQ_LEN = int(os.environ.get("SEQ_LEN", 2048))
MAX_TOKENS = int(os.environ.get("MAX_TOKENS", 8192))
TOLERANCE = float(os.environ.get("TOLERANCE", 0.02))  # relative perplexity difference accepted


def windows(run: Path, out: Path) -> None:
    """The run's evaluation windows and its simulated perplexity on them (lowbit's venv)."""
    import torch

    from lowbit.data import eval_windows, load_text, tokenize
    from lowbit.eval.perplexity import perplexity
    from lowbit.runfolder import load_run

    model, tokenizer, _ = load_run(run)
    ids = eval_windows(tokenize(tokenizer, load_text("wikitext2", "test")), SEQ_LEN, MAX_TOKENS)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "windows.npy", ids.numpy().astype(np.int64))
    with torch.no_grad():
        result = perplexity(model, ids, progress=False)
    (out / "simulated.json").write_text(json.dumps({"run": str(run), "ppl": result.ppl, "tokens": result.tokens}))
    print(f"{run}: simulated perplexity {result.ppl:.4f} on {result.tokens} tokens -> {out}")


def prompt_nll(prompt_logprobs: list, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] from vLLM's prompt_logprobs (entry 0 is None; entry i maps
    token ids to Logprob objects and holds ids[i] itself)."""
    total = 0.0
    for i in range(1, len(ids)):
        total -= prompt_logprobs[i][ids[i]].logprob
    return total, len(ids) - 1


def score(export: Path, out: Path) -> None:
    """Perplexity of the export in vLLM on OUT/windows.npy, compared with OUT/simulated.json (vLLM's venv)."""
    from vllm import LLM, SamplingParams

    ids = np.load(out / "windows.npy")
    llm = LLM(model=str(export), max_model_len=ids.shape[1] + 1, enforce_eager=True, gpu_memory_utilization=0.5)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outputs = llm.generate([{"prompt_token_ids": row.tolist()} for row in ids], params)
    nll, count = 0.0, 0
    for row, output in zip(ids, outputs):
        n, c = prompt_nll(output.prompt_logprobs, row.tolist())
        nll, count = nll + n, count + c
    simulated = json.loads((out / "simulated.json").read_text())
    ppl = math.exp(nll / count)
    rel = abs(ppl - simulated["ppl"]) / simulated["ppl"]
    result = {"export": str(export), "vllm_ppl": ppl, "simulated_ppl": simulated["ppl"], "tokens": count,
              "rel_diff": rel, "tolerance": TOLERANCE, "ok": rel <= TOLERANCE}
    (out / "vllm.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    if count != simulated["tokens"]:
        sys.exit(f"vLLM scored {count} positions, the simulated run {simulated['tokens']}: not the same windows")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("windows", "score"):
        sys.exit("usage: vllm_check.py windows RUN OUT | score EXPORT OUT")
    (windows if sys.argv[1] == "windows" else score)(Path(sys.argv[2]), Path(sys.argv[3]))
