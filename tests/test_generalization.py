"""Quality outside the calibration text: evaluation on several texts, calibration mixes and self-generated text."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from lowbit import selfgen
from lowbit.calibration import calibration_set, window_counts
from lowbit.data import calibration_windows, eval_windows, load_text, tokenize
from lowbit.errors import LowbitError
from lowbit.eval import perplexity
from lowbit.export.base import export_run
from lowbit.formats import storage_bits
from lowbit.loading import load_model
from lowbit.recipe import CalibrationConfig, parse_recipe
from lowbit.report import results_table
from lowbit.run import run_recipe
from lowbit.runfolder import load_run

EVAL = {"seq_len": 64, "max_tokens": 256}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_lambada_text_is_derived_from_the_shipped_task_file():
    """test/valid are rows 0-1599 / 1600-3199 of LAMBADA's test file, as the README says (some novels recur
    across passages: under 1% of the long lines are shared)."""
    rows = [json.loads(line)["text"] for line in
            gzip.open(Path(__file__).parents[1] / "tasks/lambada_openai/lambada_test.jsonl.gz", "rt")]
    test, valid = load_text("lambada", "test"), load_text("lambada", "validation")
    assert test == "\n\n".join(rows[:1600]) + "\n" and valid == "\n\n".join(rows[1600:3200]) + "\n"
    lines = [{line for line in text.splitlines() if len(line) > 80} for text in (test, valid)]
    assert len(lines[0] & lines[1]) < 0.01 * len(lines[0])
    assert "@-@" not in test  # not WikiText's tokenized markup


def test_every_text_is_evaluated_and_reported(tiny_dirs, tokenizer, cache):
    recipe = parse_recipe({"model": tiny_dirs["llama"], "threads": 1, "save": False, "evaluation": EVAL,
                           "calibration": {"n_samples": 2, "seq_len": 64}})
    assert recipe.evaluation.texts() == ["wikitext2", "lambada"]
    result = run_recipe(recipe, progress=False)
    m = result.metrics
    assert list(m["ppl_texts"]) == list(m["ppl_fp_texts"]) == ["wikitext2", "lambada"]
    assert m["ppl"] == m["ppl_texts"]["wikitext2"] and m["ppl_fp"]["ppl"] == m["ppl_fp_texts"]["wikitext2"]["ppl"]
    ids = eval_windows(tokenize(tokenizer, load_text("lambada", "test")), 64, 256)  # max_tokens applies per text
    assert m["ppl_texts"]["lambada"]["ppl"] == pytest.approx(perplexity(result.model, ids, progress=False).ppl,
                                                             rel=1e-6)
    assert m["ppl_texts"]["lambada"]["tokens"] == m["ppl_texts"]["wikitext2"]["tokens"] == 4 * 63
    assert m["ppl_texts"]["lambada"]["ppl"] != m["ppl_texts"]["wikitext2"]["ppl"]
    table = results_table([m])
    assert "ppl lambada" in table.splitlines()[0] and "ppl FP wikitext2" in table.splitlines()[0]
    lam = m["ppl_texts"]["lambada"]["ppl"] / m["ppl_fp_texts"]["lambada"]["ppl"] - 1
    assert f"({lam:+.1%})" in table.splitlines()[2]


def test_single_text_form_still_works(tiny_dirs, cache):
    recipe = parse_recipe({"model": tiny_dirs["llama"], "threads": 1, "save": False, "calibration": {
        "n_samples": 2, "seq_len": 64}, "evaluation": {**EVAL, "data": "wikitext2"}})
    m = run_recipe(recipe, progress=False).metrics
    assert list(m["ppl_texts"]) == ["wikitext2"] and m["ppl"] == m["ppl_texts"]["wikitext2"]
    old = {k: v for k, v in m.items() if not k.endswith("_texts")}  # a metrics.json from before several texts
    assert results_table([old]).splitlines()[0].startswith("| method | weights | activations | ppl FP | ppl |")


@pytest.mark.parametrize("weights,n,expect", [([0.5, 0.5], 64, [32, 32]), ([0.75, 0.25], 8, [6, 2]),
                                              ([1 / 3] * 3, 16, [6, 5, 5]), ([0.1, 0.9], 4, [0, 4]), ([0.1, 0.9], 5, [1, 4])])
def test_window_counts_are_exact(weights, n, expect):
    assert window_counts(weights, n) == expect and sum(expect) == n


def test_mix_takes_each_sources_share_of_its_own_windows(tiny_dirs, tokenizer):
    model, _ = load_model(tiny_dirs["llama"])
    cal = CalibrationConfig(data=[{"wikitext2": 0.75}, {"lambada": 0.25}], n_samples=8, seq_len=32, seed=3)
    ids = calibration_set(model, tokenizer, tiny_dirs["llama"], cal, progress=False)
    wiki = calibration_windows(tokenize(tokenizer, load_text("wikitext2", "validation")), 6, 32, 3)
    lam = calibration_windows(tokenize(tokenizer, load_text("lambada", "validation")), 2, 32, 3)
    rows = sorted(map(tuple, ids.tolist()))
    assert rows == sorted(map(tuple, torch.cat([wiki, lam]).tolist()))
    assert not torch.equal(ids, torch.cat([wiki, lam]))  # interleaved, not one source after the other
    single = CalibrationConfig(n_samples=8, seq_len=32, seed=3)  # one source: the windows of before
    assert torch.equal(calibration_set(model, tokenizer, tiny_dirs["llama"], single, progress=False),
                       calibration_windows(tokenize(tokenizer, load_text("wikitext2", "validation")), 8, 32, 3))


def test_self_generated_text_is_seeded_and_cached(tiny_dirs, tokenizer, cache, monkeypatch):
    model, _ = load_model(tiny_dirs["llama"])
    cal = CalibrationConfig(data="self", n_samples=10, seq_len=16, seed=1)
    first = calibration_set(model, tokenizer, tiny_dirs["llama"], cal, progress=False)
    assert first.shape == (10, 16) and first.max() < len(tokenizer)
    assert len(set(map(tuple, first.tolist()))) == 10
    assert not set(first[:, 0].tolist()) & set(tokenizer.all_special_ids)
    assert len(list((cache / "selfgen").glob("*.pt"))) == 2  # two chunks of 8
    # the model's own text is likelier under the model than the tiny model's random-walk baseline would be
    nll_self = perplexity(model, first, progress=False).nll
    assert nll_self < torch.log(torch.tensor(float(len(tokenizer)))).item()

    def no_sampling(*_args, **_kwargs):
        raise AssertionError("sampled again instead of reading the cache")

    monkeypatch.setattr(selfgen, "sample", no_sampling)
    again = calibration_set(model, tokenizer, tiny_dirs["llama"], cal, progress=False)
    fewer = calibration_set(model, tokenizer, tiny_dirs["llama"], cal.model_copy(update={"n_samples": 4}),
                            progress=False)
    assert torch.equal(again, first) and torch.equal(fewer, first[:4])
    monkeypatch.undo()
    other = calibration_set(model, tokenizer, tiny_dirs["llama"], cal.model_copy(update={"seed": 2}),
                            progress=False)
    assert not torch.equal(other, first)


def test_self_generated_text_matches_the_model_distribution(tiny_dirs, tokenizer):
    """Sampling follows the model: a model whose next-token distribution is one token writes only that token."""
    model, _ = load_model(tiny_dirs["llama"])
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
        model.lm_head.bias = torch.nn.Parameter(torch.full((model.config.vocab_size,), -1e4))
        model.lm_head.bias[7] = 0
    ids = selfgen.sample(model, torch.tensor([3, 5]), 6, torch.Generator().manual_seed(0))
    assert ids.tolist() == [[3] + [7] * 5, [5] + [7] * 5]


@pytest.mark.parametrize("data,message", [
    ([{"wikitext2": 0.5}, {"lambada": 0.4}], "sum to 0.9, not 1"),
    ([{"wikitext2": 0.5}, {"wikitext2": 0.5}], "names a source twice"),
    ([{"wikitext2": 0.5, "lambada": 0.5}], "one-key entries"),
    ([{"wikitext2": 1.5}, {"lambada": -0.5}], "must be > 0"),
])
def test_bad_mixes_are_one_line_errors(data, message):
    with pytest.raises(LowbitError, match=message):
        parse_recipe({"calibration": {"data": data}})


def test_mix_too_small_and_budget_without_one_text_are_errors(tiny_dirs, tokenizer):
    model, _ = load_model(tiny_dirs["llama"])
    cal = CalibrationConfig(data=[{"wikitext2": 0.9}, {"lambada": 0.1}], n_samples=4, seq_len=16)
    with pytest.raises(LowbitError, match="leaves no window for lambada"):
        calibration_set(model, tokenizer, tiny_dirs["llama"], cal, progress=False)
    with pytest.raises(LowbitError, match="budget needs one calibration text"):
        cal.text("budget")
    with pytest.raises(LowbitError, match="evaluation.data lists"):
        parse_recipe({"evaluation": {"data": ["wikitext2", "wikitext2"]}})


# --- the head and the embedding at equal size after a rotation unties them ---

W8 = {"bits": 8, "symmetric": True, "granularity": "channel"}
ROTATED = {"threads": 1, "evaluation": None, "calibration": {"n_samples": 4, "seq_len": 64},
           "weights": {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 32},
           "steps": [{"rotate": {"online_down": False}}, "gptq"]}


def test_rotated_head_and_embedding_in_8_bits_are_counted_and_reload(tiny_llama, tmp_path):
    base = run_recipe(parse_recipe({**ROTATED, "model": str(tiny_llama), "save": False}), progress=False)
    out = tmp_path / "run"
    result = run_recipe(parse_recipe({**ROTATED, "model": str(tiny_llama), "head": W8, "embedding": W8}), out,
                        progress=False)
    model, state = result.model, result.state
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # the rotation untied them
    for name, module in (("lm_head", model.lm_head), ("model.embed_tokens", model.model.embed_tokens)):
        codes = state.weights[name].codes(module.weight, name)
        assert codes.abs().max() <= 127 and codes.abs().max() >= 100  # 8-bit symmetric, range used per row
        assert state.weights[name].scale.numel() == module.weight.shape[0]  # one scale per token row
    spec = state.weights["lm_head"].spec
    saved = 2 * (model.lm_head.weight.numel() * 16 - storage_bits(spec, tuple(model.lm_head.weight.shape))) / 8
    assert (base.metrics["size_mb"] - result.metrics["size_mb"]) * 1e6 == pytest.approx(saved, rel=1e-9)
    reloaded, _, loaded_state = load_run(out)
    assert set(loaded_state.weights) >= {"lm_head", "model.embed_tokens"}
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        # and the quantized head is close to the rotated FP head: output within 8-bit rounding of the logits
        ref = base.model(ids).logits
    assert (model(ids).logits - ref).abs().max() < 0.05 * ref.abs().max()
    with pytest.raises(LowbitError, match="compressed-tensors stores quantized linear layers only"):
        export_run(out, "compressed-tensors")


def test_tied_head_takes_one_format_for_both_names(tiny_llama):
    recipe = {"model": str(tiny_llama), "threads": 1, "evaluation": None, "save": False,
              "calibration": {"n_samples": 2, "seq_len": 64}}
    fp = run_recipe(parse_recipe(recipe), progress=False)
    result = run_recipe(parse_recipe({**recipe, "head": W8}), progress=False)
    model = result.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {"lm_head", "model.embed_tokens"} <= set(result.state.weights)
    shape = tuple(model.lm_head.weight.shape)
    saved = (math.prod(shape) * 16 - storage_bits(result.state.weights["lm_head"].spec, shape)) / 8  # counted once
    assert (fp.metrics["size_mb"] - result.metrics["size_mb"]) * 1e6 == pytest.approx(saved, rel=1e-9)
    with pytest.raises(LowbitError, match="shares its weight with the embedding"):
        run_recipe(parse_recipe({**recipe, "head": W8, "embedding": {**W8, "bits": 6}}), progress=False)
    with pytest.raises(LowbitError, match="lm_head takes a weight format"):
        run_recipe(parse_recipe({**recipe, "head": {"bits": 8, "granularity": "token", "dynamic": True}}),
                   progress=False)
