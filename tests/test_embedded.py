"""One real run on the embedded SmolLM2-135M: W8 per-channel RTN must stay within 1% of FP perplexity."""
import pytest

from lowbit.recipe import parse_recipe
from lowbit.run import run_recipe

pytestmark = pytest.mark.slow


def test_w8_rtn_within_one_percent_of_fp(embedded_path):
    recipe = parse_recipe({
        "name": "w8-rtn", "weights": {"bits": 8, "symmetric": True, "granularity": "channel"},
        "steps": ["rtn"], "calibration": {"n_samples": 2, "seq_len": 128}, "threads": 2,
        "evaluation": {"seq_len": 1024, "max_tokens": 4096}, "save": False})
    m = run_recipe(recipe, progress=False).metrics
    fp, q = m["ppl_fp"]["ppl"], m["ppl"]["ppl"]
    assert m["ppl"]["tokens"] == 4 * 1023
    assert 5 < fp < 60
    assert abs(q - fp) / fp < 0.01
    assert m["size_mb"] < 0.75 * m["size_fp16_mb"]
