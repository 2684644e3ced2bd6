"""The peer harness's import (benchmarks/peers/to_run.py): a peer's weights become a lowbit run scored exactly as
lowbit's own run of the same recipe, activation quantizers included."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from lowbit.errors import LowbitError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "peers"))
import to_run  # noqa: E402


@pytest.mark.parametrize("acts", [None, {"bits": 8, "symmetric": True, "granularity": "token", "dynamic": True}])
def test_imported_peer_scores_like_lowbit_run(tiny_llama, tmp_path, acts):
    """A 'peer' whose weights are lowbit's own RTN run's scores the same perplexity once imported (W4 g32 weight-only,
    and W8A8 with dynamic per-token activations, which the import must attach as the run does)."""
    from lowbit.data import load_text
    from lowbit.run import run_recipe
    from lowbit.recipe import load_recipe

    text = tmp_path / "text.txt"
    text.write_text(load_text("wikitext2", "test")[:20000])
    weights = ({"bits": 8, "symmetric": True, "granularity": "channel"} if acts else
               {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 32})
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "name": "peer-check", "model": str(tiny_llama), "threads": 1, "weights": weights, "activations": acts,
        "steps": ["rtn"], "calibration": {"data": str(text), "n_samples": 2, "seq_len": 32},
        "evaluation": {"data": str(text), "seq_len": 64, "max_tokens": 1024}}))
    ours = run_recipe(load_recipe(recipe_file), tmp_path / "ours", progress=False)

    peer = tmp_path / "peer"
    shutil.copytree(ours.out_dir / "model", peer)
    fmt = {"bits": weights["bits"], "group_size": weights.get("group_size", 0), "symmetric": weights["symmetric"],
           "act_bits": acts["bits"] if acts else None}
    (peer / "peer_metrics.json").write_text(json.dumps(
        {"tool": "fake 0.0", "method": "rtn", **fmt, "quant_time_s": 1.0, "peak_rss_gb": 1.0}))
    to_run.import_run(str(recipe_file), str(peer), str(tmp_path / "imported"), [])
    metrics = json.loads((tmp_path / "imported" / "metrics.json").read_text())
    assert metrics["ppl"]["ppl"] == pytest.approx(ours.metrics["ppl"]["ppl"], rel=1e-6)
    assert metrics["activations"] == ours.metrics["activations"]

    from lowbit.runfolder import load_run
    _, _, state = load_run(tmp_path / "imported")
    assert len(state.input_quantizers) == (14 if acts else 0)  # 7 linears in each of 2 blocks

    (peer / "peer_metrics.json").write_text(json.dumps(
        {"tool": "fake 0.0", "method": "rtn", **fmt, "act_bits": None if acts else 8, "quant_time_s": 1.0,
         "peak_rss_gb": 1.0}))
    with pytest.raises(LowbitError, match="differs from the recipe"):
        to_run.import_run(str(recipe_file), str(peer), str(tmp_path / "mismatch"), [])
