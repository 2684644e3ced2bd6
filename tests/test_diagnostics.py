"""Per-block diagnostics: complete after a run, kept for the finished blocks of an interrupted one, and equal to
errors computed directly on the models."""
from __future__ import annotations

import pytest
import torch

from lowbit.cli import main
from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.diagnostics import diagnostic_windows, read_blocks
from lowbit.loading import load_model
from lowbit.recipe import parse_recipe
from lowbit.run import blocks_log_path, run_recipe
from lowbit.steps.rtn import RTN

LINEARS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"}


def _recipe(model, steps=("rtn",), n_samples=4):
    return parse_recipe({"model": str(model), "weights": {"bits": 3, "granularity": "group", "group_size": 32},
                         "steps": list(steps), "threads": 1, "evaluation": None,
                         "calibration": {"n_samples": n_samples, "seq_len": 64}})


def _block0_output(model, ids):
    out = []
    handle = model.model.layers[0].register_forward_hook(lambda _m, _a, o: out.append(o[0] if isinstance(o, tuple)
                                                                                      else o))
    with torch.no_grad():
        for row in ids:
            model(row[None])
    handle.remove()
    return torch.cat(out)


@pytest.mark.parametrize("steps, n_samples", [(["rtn"], 12), ([{"brecq": {"iters": 2}}], 4)])
def test_blocks_file_complete_and_matches_models(tiny_llama, tmp_path, capsys, steps, n_samples):
    """Every block logged; block 0's output error equals the one measured between the saved and the FP model
    (FP path on the first 1024 tokens' windows for RTN, the whole FP path kept by BRECQ); weight errors match the weights."""
    recipe = _recipe(tiny_llama, steps, n_samples)
    out = tmp_path / "run"
    run_recipe(recipe, out, progress=False)
    assert not blocks_log_path(out).exists()
    rows = read_blocks(out)
    assert [r["index"] for r in rows] == [0, 1]
    assert all(set(r["weight_rel_error"]) == LINEARS and r["time_s"] > 0 and r["peak_rss_gb"] > 0 for r in rows)
    assert rows[0]["windows"] == (min(n_samples, diagnostic_windows(64)) if steps == ["rtn"] else n_samples)

    fp, tokenizer = load_model(str(tiny_llama))
    q, _ = load_model(str(out / "model"))
    cal = recipe.calibration
    ids = calibration_windows(tokenize(tokenizer, load_text(cal.data, cal.split)), cal.n_samples, cal.seq_len,
                              cal.seed)[: rows[0]["windows"]]
    y_fp, y_q = _block0_output(fp, ids), _block0_output(q, ids)
    assert rows[0]["output_rel_error"] == pytest.approx(((y_q - y_fp).norm() / y_fp.norm()).item(), rel=1e-4)
    assert 0 < rows[0]["output_rel_error"] < rows[1]["output_rel_error"] * 10
    w_fp = fp.model.layers[1].mlp.down_proj.weight
    w_q = q.model.layers[1].mlp.down_proj.weight
    assert rows[1]["weight_rel_error"]["mlp.down_proj"] == pytest.approx(
        ((w_q - w_fp).norm() / w_fp.norm()).item(), rel=1e-4)

    assert main(["report", str(out), "--blocks"]) == 0
    table = capsys.readouterr().out
    assert len(table.splitlines()) == 4 and f"{rows[1]['output_rel_error']:.4f}" in table


def test_interrupted_run_keeps_finished_blocks(tiny_llama, tmp_path, monkeypatch, capsys):
    on_block = RTN.on_block

    def stop_at_second_block(self, ctx):
        if ctx.index == 1:
            raise KeyboardInterrupt
        on_block(self, ctx)

    monkeypatch.setattr(RTN, "on_block", stop_at_second_block)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_recipe(tiny_llama), out, progress=False)
    assert not out.exists()
    # published beside the target, or (a run with a block checkpoint) kept in the resumable staging folder
    kept = [blocks_log_path(out)] if blocks_log_path(out).exists() else list(tmp_path.glob(".run.*/blocks.jsonl"))
    assert len(kept) == 1
    rows = read_blocks(kept[0])
    assert [r["index"] for r in rows] == [0]
    assert set(rows[0]["weight_rel_error"]) == LINEARS and rows[0]["output_rel_error"] > 0
    assert main(["report", str(kept[0]), "--blocks"]) == 0
    assert "| 0 |" in capsys.readouterr().out


def test_diagnostics_off_skips_every_forward_for_data_free_steps(tiny_llama, tmp_path, monkeypatch):
    """`diagnostics: false`: no blocks.jsonl, RTN never runs the model, and the weights equal a diagnosed run's."""
    from safetensors.torch import load_file

    import lowbit.pipeline as pipeline

    on = run_recipe(_recipe(tiny_llama), tmp_path / "on", progress=False)
    calls = []
    capture = pipeline.capture_block_inputs
    monkeypatch.setattr(pipeline, "capture_block_inputs", lambda *a, **k: calls.append(1) or capture(*a, **k))
    recipe = parse_recipe({**_recipe(tiny_llama).model_dump(), "diagnostics": False})
    off = run_recipe(recipe, tmp_path / "off", progress=False)
    assert calls == [] and not (off.out_dir / "blocks.jsonl").exists() and (on.out_dir / "blocks.jsonl").exists()
    w_on, w_off = (load_file(next((r.out_dir / "model").glob("*.safetensors"))) for r in (on, off))
    assert w_on.keys() == w_off.keys() and all(torch.equal(w_on[k], w_off[k]) for k in w_on)
