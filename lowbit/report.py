"""Size accounting and the side-by-side results table."""
from __future__ import annotations

from torch import nn

from lowbit.formats import storage_bits
from lowbit.state import QuantState


def model_size(model: nn.Module, state: QuantState | None) -> float:
    """Bytes to store the weights: quantized linears with their codes and every scale and zero point (16-bit
    scales, 8-bit e8m0 / e4m3 block scales, NVFP4's 32-bit tensor scale), every other parameter at 16 bits;
    tied parameters counted once."""
    records = state.weights if state else {}
    seen, total_bits = set(), 0.0
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            rec = records.get(name) if pname == "weight" else None
            total_bits += storage_bits(rec.spec, tuple(p.shape)) if rec else p.numel() * 16
    return total_bits / 8


def _by_text(m: dict, key: str) -> dict[str, dict]:
    """A run's perplexities by text (`key` is ppl or ppl_fp); runs from before several texts have one, unnamed."""
    return m.get(f"{key}_texts") or ({"": m[key]} if key in m else {})


def _texts(rows: list[dict]) -> list[str]:
    """Every evaluation text of the runs, in order; an unnamed single text shares the first column."""
    names = list(dict.fromkeys(t for m in rows for key in ("ppl", "ppl_fp") for t in _by_text(m, key)))
    named = [t for t in names if t]
    return named or [""]


def _ppl_cells(m: dict, text: str, first: bool) -> str:
    """' FP | compressed | Δppl (Δ%) |' for one text ('-' where the run lacks it)."""
    fp, q = (_by_text(m, k).get(text) or (_by_text(m, k).get("") if first else None) for k in ("ppl_fp", "ppl"))
    delta = f"{q['ppl'] - fp['ppl']:+.3f} ({q['ppl'] / fp['ppl'] - 1:+.1%})" if fp and q else "-"
    return "".join(f" {r['ppl']:.3f} |" if r else " - |" for r in (fp, q)) + f" {delta} |"


def results_table(rows: list[dict]) -> str:
    """Markdown table of runs: method, formats, perplexity (FP, compressed, change) on each evaluation text, size,
    time, peak memory, and the achieved sparsity of block linears when any run prunes."""
    sparse = any("sparsity" in m for m in rows)
    texts = _texts(rows)
    ppl_head = "".join(f" ppl FP{t} | ppl{t} | Δppl{t} |" for t in (f" {t}" if t else "" for t in texts))
    head = (f"| method | weights | activations |{ppl_head} size MB (FP16) | quant time s | "
            "peak RSS GB | eval tokens |" + (" sparsity |" if sparse else ""))
    tasks = list(dict.fromkeys(name for m in rows for name in m.get("tasks", {})))
    head += "".join(f" {name} |" for name in tasks)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in rows:
        tokens = m.get("ppl", m.get("ppl_fp", {})).get("tokens", "-")
        cells = "".join(f" {_task_cell(m['tasks'][t]) if t in m.get('tasks', {}) else '-'} |" for t in tasks)
        ppl = "".join(_ppl_cells(m, t, i == 0) for i, t in enumerate(texts))
        lines.append(f"| {'+'.join(m['steps'])} | {m['weights']} | {m['activations']} |{ppl} "
                     f"{m['size_mb']:.1f} ({m['size_fp16_mb']:.1f}) | "
                     f"{m['quant_time_s']:.1f} | {m['peak_rss_gb']:.2f} | {tokens} |"
                     + (f" {m['sparsity']['overall']:.2%} |" if "sparsity" in m else " - |" if sparse else "") + cells)
    return "\n".join(lines)


def _task_cell(row: dict) -> str:
    """'acc 41.2 ± 3.5 (n=200)': the task's headline metric in percent with its standard error."""
    from lowbit.eval.tasks import main_metric

    key, value, stderr = main_metric(row)
    scale = 100 if key.startswith("acc") else 1
    err = f" ± {stderr * scale:.1f}" if stderr is not None else ""
    return f"{key} {value * scale:.1f}{err} (n={row['samples']})"


def tasks_table(scores: dict[str, dict]) -> str:
    """Markdown table of one model's task scores: every metric with its standard error."""
    lines = ["| task | lm-eval task | source | n | metric | value | stderr |", "|---|---|---|---|---|---|---|"]
    for name, row in scores.items():
        for key, value in row.items():
            if isinstance(value, float) and not key.endswith("_stderr"):
                err = row.get(f"{key}_stderr")
                lines.append(f"| {name} | {row['task']} | {row['source']} | {row['samples']} | {key} | "
                             f"{value:.4f} | {'-' if err is None else f'{err:.4f}'} |")
    return "\n".join(lines)
