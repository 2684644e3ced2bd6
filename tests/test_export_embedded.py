"""One short check on the embedded SmolLM2-135M: its compressed-tensors export reproduces the simulated model."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from lowbit.data import eval_windows, load_text, tokenize
from lowbit.export import export_run
from lowbit.recipe import parse_recipe
from lowbit.run import run_recipe
from lowbit.runfolder import load_run
from lowbit.verify import compare

pytestmark = pytest.mark.slow


def test_embedded_w4a16_compressed_tensors_matches_simulated(tmp_path):
    recipe = parse_recipe({"weights": {"bits": 4, "symmetric": True, "group_size": 32}, "threads": 1,
                           "evaluation": None, "calibration": {"n_samples": 1, "seq_len": 64},
                           "target": "compressed-tensors"})
    run_recipe(recipe, tmp_path / "run", progress=False)
    out = export_run(tmp_path / "run", "compressed-tensors").path
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    simulated, tokenizer, _ = load_run(tmp_path / "run")
    windows = eval_windows(tokenize(tokenizer, load_text("wikitext2", "test")[:4000]), 256, 256)
    result = compare(simulated, exported, windows)
    print(f"embedded W4A16 compressed-tensors: {result}")
    assert result.ppl_rel_diff < 0.005 and result.top1_agreement > 0.95
