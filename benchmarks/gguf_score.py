"""GGUF table, scoring: exported runs scored by llama.cpp on the runs' evaluation windows, llama.cpp's own quantizer
as the anchor, and (--speed) llama.cpp's decode speed of every GGUF next to `lowbit bench speed`, in one sitting.

Usage (under the bench lock, see benchmarks/gguf_runs.sh):
  python benchmarks/gguf_score.py OUT TYPE...   score OUT/{rtn,gptq}-TYPE/gguf.gguf and llama.cpp's own TYPE (f16: float)
                                                on WikiText-2 and LAMBADA test
  python benchmarks/gguf_score.py OUT --speed   decode tokens/s of every scored GGUF, then lowbit bench speed
  python benchmarks/gguf_score.py OUT --table   the markdown table of docs/results.md from what is measured
Rows accumulate in OUT/scores.json (a GGUF already scored is skipped); speeds go to OUT/speed.json.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

SEQ_LEN, MAX_TOKENS, THREADS = 2048, 8192, 2
TEXTS = ("wikitext2", "lambada")  # in domain, out of domain (docs/results.md, "Quality outside the calibration text")
SCORE_THREADS = 1  # perplexity does not depend on it; llama.cpp's spinning 2-thread pool stalls on a loaded machine


def decode_speed(path: Path, prompt: list[int], threads: int = THREADS) -> float:
    """Median llama.cpp decode tokens/s over 3 repeats (after one warm-up): 32 greedy steps after a 128-token prompt."""
    from lowbit.llamacpp import LlamaCpp

    with LlamaCpp(path, n_ctx=256, threads=threads) as engine:
        speeds = [engine.decode_speed(prompt, 32) for _ in range(4)][1:]
    return statistics.median(speeds)


def score(out: Path, types: list[str]) -> None:
    from lowbit.data import eval_windows, load_text, tokenize
    from lowbit.llamacpp import perplexity, write_llamacpp_quantized
    from lowbit.loading import load_model
    from lowbit.verify import verify

    path_rows = out / "scores.json"
    rows = json.loads(path_rows.read_text()) if path_rows.exists() else []
    done = {(r["gguf"], text_of(r)) for r in rows}
    model, tokenizer = load_model("smollm2-135m")
    windows = {text: eval_windows(tokenize(tokenizer, load_text(text, "test")), SEQ_LEN, MAX_TOKENS) for text in TEXTS}

    def add(row: dict) -> None:
        rows.append(row)
        print(row, flush=True)
        path_rows.write_text(json.dumps(rows, indent=1))

    for type_name in types:
        for solver in ("rtn", "gptq"):
            run = out / f"{solver}-{type_name}"
            gguf = run / "gguf.gguf"
            for text in TEXTS:
                if gguf.exists() and (str(gguf), text) not in done:
                    result = verify(run, gguf, data=text, seq_len=SEQ_LEN, max_tokens=MAX_TOKENS, engine="llama.cpp",
                                    threads=SCORE_THREADS)
                    add({"gguf": str(gguf), "source": run.name, "text": text, "simulated_ppl": result.ppl_a,
                         "llamacpp_ppl": result.ppl_b, "top1_agreement": result.top1_agreement,
                         "tokens": result.tokens, "size_mb": gguf.stat().st_size / 1e6})
        anchor = out / "llamacpp-own" / f"{type_name}.gguf"
        if all((str(anchor), text) in done for text in TEXTS):
            continue
        anchor.parent.mkdir(exist_ok=True)
        types_written = write_llamacpp_quantized(model, tokenizer, anchor, None if type_name == "f16" else type_name)
        for text in TEXTS:
            result = perplexity(anchor, windows[text], threads=SCORE_THREADS)
            add({"gguf": str(anchor), "source": f"llama.cpp-{type_name}", "text": text, "simulated_ppl": None,
                 "llamacpp_ppl": result.perplexity, "top1_agreement": None, "tokens": result.tokens,
                 "size_mb": anchor.stat().st_size / 1e6, "types": types_written})


def text_of(row: dict) -> str:
    """The text a score row was measured on (rows written before LAMBADA was scored are WikiText-2's)."""
    return row.get("text", "wikitext2")


def speed(out: Path) -> None:
    """One sitting: llama.cpp decode speed of every scored GGUF on 2 threads (and 1), then lowbit's packed kernels."""
    from lowbit.data import load_text, tokenize
    from lowbit.kernels.bench import bench_speed
    from lowbit.loading import load_model

    _, tokenizer = load_model("smollm2-135m")
    prompt = tokenize(tokenizer, load_text("wikitext2", "validation"))[:128].tolist()
    rows = json.loads((out / "scores.json").read_text())
    speeds = {}
    for row in {r["source"]: r for r in rows}.values():
        speeds[row["source"]] = {"threads_2": decode_speed(Path(row["gguf"]), prompt),
                                 "threads_1": decode_speed(Path(row["gguf"]), prompt, threads=1)}
        print(row["source"], speeds[row["source"]], flush=True)
    speeds["lowbit bench speed"] = bench_speed(threads=THREADS, repeats=3, warmup=1, prompt_len=128, new_tokens=32)
    (out / "speed.json").write_text(json.dumps(speeds, indent=1))
    print(json.dumps(speeds["lowbit bench speed"], indent=1))


def table(out: Path) -> str:
    """Markdown rows: each GGUF's types, size, simulated and llama.cpp perplexity and top-1 agreement on each text,
    and decode speed once measured (--speed)."""
    rows = json.loads((out / "scores.json").read_text())
    speeds = json.loads((out / "speed.json").read_text()) if (out / "speed.json").exists() else {}
    by_source: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_source.setdefault(r["source"], {})[text_of(r)] = r
    header = ("| GGUF | made by | size MB | simulated ppl (WikiText-2 / LAMBADA) | llama.cpp ppl (WikiText-2 / LAMBADA) "
              "| top-1 agreement (WikiText-2 / LAMBADA) |")
    lines = [header + (" llama.cpp decode tok/s (2 threads / 1) |" if speeds else ""),
             "|---|---|---|---|---|---|" + ("---|" if speeds else "")]

    def cells(by_text: dict[str, dict], key: str, fmt: str) -> str:
        values = [by_text[t][key] if t in by_text else None for t in TEXTS]
        return " / ".join(format(v, fmt) if v is not None else "-" for v in values)

    for source in sorted(by_source, key=lambda s: (s.split("-", 1)[-1], s)):
        by_text = by_source[source]
        r = next(iter(by_text.values()))
        maker = {"rtn": "lowbit RTN", "gptq": "lowbit GPTQ act-order + mse"}.get(source.split("-")[0],
                                                                               "llama.cpp's quantizer")
        if source == "llama.cpp-f16":
            maker = "llama.cpp, from the float model"
        kind = source.split("-", 1)[1].upper()
        line = (f"| {kind} | {maker} | {r['size_mb']:.1f} | {cells(by_text, 'simulated_ppl', '.3f')} "
                f"| {cells(by_text, 'llamacpp_ppl', '.3f')} | {cells(by_text, 'top1_agreement', '.3f')} |")
        if speeds:
            sp = speeds.get(source)
            line += f" {sp['threads_2']:.1f} / {sp['threads_1']:.1f} |" if sp else " not measured |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(THREADS)
    if sys.argv[2:] == ["--table"]:
        print(table(Path(sys.argv[1])))
    elif sys.argv[2:] == ["--speed"]:
        speed(Path(sys.argv[1]))
    else:
        score(Path(sys.argv[1]), sys.argv[2:])
