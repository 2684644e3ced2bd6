"""GGUF table, scoring: every exported run in OUT scored by llama.cpp on the runs' evaluation windows, llama.cpp's
own quantizer as the anchor, and llama.cpp's decode speed next to `lowbit bench speed`, all in one sitting.

Usage (under the bench lock, after benchmarks/gguf_runs.sh has written the runs): python benchmarks/gguf_score.py OUT
Writes OUT/scores.json (one row per GGUF) and OUT/bench_speed.json; prints the markdown table.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from lowbit.data import eval_windows, load_text, tokenize
from lowbit.kernels.bench import bench_speed
from lowbit.llamacpp import LlamaCpp, perplexity, write_llamacpp_quantized
from lowbit.loading import load_model
from lowbit.verify import verify

SEQ_LEN, MAX_TOKENS, THREADS = 2048, 8192, 2
ANCHORS = ("q4_0", "q4_k", "q4_k_m", "q6_k", "q8_0")


def decode_speed(path: Path, prompt: list[int], threads: int = THREADS) -> float:
    """Median llama.cpp decode tokens/s over 3 repeats (after one warm-up): 32 greedy steps after a 128-token prompt."""
    with LlamaCpp(path, n_ctx=256, threads=threads) as engine:
        speeds = [engine.decode_speed(prompt, 32) for _ in range(4)][1:]
    return statistics.median(speeds)


def main(out: Path) -> None:
    torch.set_num_threads(THREADS)
    model, tokenizer = load_model("smollm2-135m")
    windows = eval_windows(tokenize(tokenizer, load_text("wikitext2", "test")), SEQ_LEN, MAX_TOKENS)
    prompt = tokenize(tokenizer, load_text("wikitext2", "validation"))[:128].tolist()
    rows = []
    for run in sorted(p for p in out.iterdir() if (p / "gguf.gguf").exists()):
        result = verify(run, run / "gguf.gguf", seq_len=SEQ_LEN, max_tokens=MAX_TOKENS, engine="llama.cpp",
                        threads=THREADS)
        rows.append({"gguf": str(run / "gguf.gguf"), "source": run.name, "simulated_ppl": result.ppl_a,
                     "llamacpp_ppl": result.ppl_b, "top1_agreement": result.top1_agreement,
                     "size_mb": (run / "gguf.gguf").stat().st_size / 1e6})
        print(rows[-1], flush=True)
    anchors = out / "llamacpp-own"
    anchors.mkdir(exist_ok=True)
    for type_name in ("f16", *ANCHORS):
        path = anchors / f"{type_name}.gguf"
        if not path.exists():
            types = write_llamacpp_quantized(model, tokenizer, path, None if type_name == "f16" else type_name)
            print(type_name, types, flush=True)
        score = perplexity(path, windows, threads=THREADS)
        rows.append({"gguf": str(path), "source": f"llama.cpp-{type_name}", "simulated_ppl": None,
                     "llamacpp_ppl": score.perplexity, "top1_agreement": None, "size_mb": path.stat().st_size / 1e6})
        print(rows[-1], flush=True)
    for row in rows:  # one sitting: all decode speeds together, then lowbit's kernels
        row["decode_tok_s"] = decode_speed(Path(row["gguf"]), prompt)
        row["decode_tok_s_1thread"] = decode_speed(Path(row["gguf"]), prompt, threads=1)
        print(row["source"], row["decode_tok_s"], row["decode_tok_s_1thread"], flush=True)
    (out / "scores.json").write_text(json.dumps(rows, indent=1))
    speed = bench_speed(threads=THREADS, repeats=3, warmup=1, prompt_len=128, new_tokens=32)
    (out / "bench_speed.json").write_text(json.dumps(speed, indent=1))
    print(json.dumps(speed, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
