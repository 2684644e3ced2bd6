import json

import pytest
import yaml

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec
from lowbit.recipe import apply_overrides, load_recipe, parse_recipe, recipe_to_yaml


def _write(tmp_path, data) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


def test_steps_shapes_and_overrides(tmp_path):
    path = _write(tmp_path, {"steps": ["rtn"], "weights": {"bits": 4, "group_size": 64}})
    recipe = load_recipe(path, ["weights.bits=3", "calibration.n_samples=8", "evaluation=null"])
    assert recipe.weights.bits == 3 and recipe.plan().weights.granularity == "group"
    assert recipe.calibration.n_samples == 8 and recipe.evaluation is None
    assert [s.name for s in recipe.steps] == ["rtn"]
    assert recipe.plan().weights.group_size == 64


@pytest.mark.parametrize("data,match", [
    ({"wieghts": {"bits": 4}}, "recipe error at wieghts: Extra inputs"),
    ({"weights": {"bits": "four"}}, "recipe error at weights.bits"),
    ({"steps": ["nope"]}, "unknown step 'nope'"),
    ({"steps": [{"rtn": {"observer": "magic"}}]}, r"steps\[0\].rtn.observer"),
    ({"weights": {"bits": 3, "format": "fp"}}, "no 3-bit FP format"),
    ({"activations": {"bits": 8, "granularity": "token"}}, "static activation quantization is per-tensor"),
    ({"weights": {"bits": 4, "clip_ratio": 0.9}}, "weights.clip_ratio is for activations only"),
    ({"activations": {"bits": 8, "granularity": "tensor", "clip_ratio": 0.9}}, "applies to dynamic activations"),
    ({"activations": {"bits": 4, "granularity": "token", "dynamic": True, "clip_ratio": 1.5}},
     "activations.clip_ratio"),
])
def test_recipe_errors_name_the_key(tmp_path, data, match):
    with pytest.raises(LowbitError, match=match):
        load_recipe(_write(tmp_path, data))


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(LowbitError, match="not valid YAML line"):
        load_recipe(_write(tmp_path, "weights: [1, 2"))
    with pytest.raises(LowbitError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_set_requires_key_value():
    with pytest.raises(LowbitError, match="key=value"):
        apply_overrides({}, ["weights.bits"])


def _cli(capsys, *argv) -> tuple[int, str]:
    """Exit code and the last stderr line, which must be the whole one-line error (no traceback)."""
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()[-1] if err.strip() else ""


def test_cli_missing_model_path(capsys):
    code, err = _cli(capsys, "eval", "./no/such/model")
    assert code == 2 and err.startswith("lowbit: error: model path ./no/such/model does not exist")


def test_cli_unsupported_architecture(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    path = _write(tmp_path, {"model": str(tmp_path / "gpt2"), "save": False, "evaluation": None})
    code, err = _cli(capsys, "run", path, "--quiet")
    assert code == 2 and err.startswith("lowbit: error: unsupported architecture 'gpt2'")


def test_cli_malformed_recipe(capsys, tmp_path):
    code, err = _cli(capsys, "run", _write(tmp_path, {"steps": [{"rtn": {"foo": 1}}]}))
    assert code == 2 and "steps[0].rtn.foo" in err


def test_cli_impossible_formats(capsys, tiny_dirs):
    code, err = _cli(capsys, "quantize", "--model", tiny_dirs["llama"], "--wbits", "3", "--wformat", "fp", "--no-save")
    assert code == 2 and "no 3-bit FP format" in err
    code, err = _cli(capsys, "quantize", "--model", tiny_dirs["llama"], "--group-size", "48", "--no-save", "--quiet")
    assert code == 2 and "group size 48 does not divide the width 64" in err


def test_cli_quantize_saves_run_and_eval_reloads(capsys, tiny_dirs, tmp_path):
    out = tmp_path / "run"
    code = main(["quantize", "--model", tiny_dirs["opt"], "--wbits", "4", "--group-size", "32", "--abits", "8",
                 "--nsamples", "4", "--calib-seq-len", "64", "--seq-len", "128", "--max-tokens", "512",
                 "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| rtn | int4 g32 asym | int8 token sym dynamic |" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ppl"]["tokens"] == 4 * 127
    assert {p.name for p in out.iterdir()} >= {"model", "metrics.json", "recipe.yaml", "run.log",
                                               "quant_state.json", "quant_state.safetensors"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    code = main(["eval", str(out), "--seq-len", "128", "--max-tokens", "512", "--quiet"])
    assert code == 0
    reloaded = json.loads(capsys.readouterr().out)
    assert reloaded["ppl"] == pytest.approx(metrics["ppl"]["ppl"], rel=1e-4)


def test_cli_quantize_16_bits_keeps_the_fp_model(capsys, tiny_dirs, tmp_path):
    """`--wbits 16` (the FP reference run a comparison evaluates tasks on): nothing quantized, perplexity = FP's."""
    code = main(["quantize", "--model", tiny_dirs["llama"], "--wbits", "16", "--nsamples", "2", "--calib-seq-len", "32",
                 "--seq-len", "128", "--max-tokens", "512", "--out", str(tmp_path / "fp"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "fp" / "metrics.json").read_text())
    assert metrics["ppl"]["ppl"] == pytest.approx(metrics["ppl_fp"]["ppl"], rel=1e-6)


def test_failed_run_leaves_no_folder(capsys, tiny_dirs, tmp_path):
    out = tmp_path / "run"
    code = main(["quantize", "--model", tiny_dirs["llama"], "--group-size", "48", "--out", str(out), "--quiet"])
    assert code == 2
    assert list(tmp_path.iterdir()) == []


def test_report_table(capsys, tmp_path):
    code, err = _cli(capsys, "report", str(tmp_path))
    assert code == 2 and "has no metrics.json" in err


@pytest.mark.parametrize("weights, activations, steps, words", [
    ({"format": "mxfp4", "group_size": 16}, None, ["rtn"], "at weights: group_size does not apply to format mxfp4"),
    ({"format": "fp", "bits": 8, "block": [128]}, None, ["rtn"], "weights.block.1"),
    ({"format": "fp", "bits": 8, "block": [128, 128]}, {"format": "fp", "bits": 8, "block": [1, 128]}, ["rtn"],
     "activations cannot use 2-D blocks"),
    ({"format": "nvfp4"}, {"format": "nvfp4", "dynamic": True}, ["rtn"], "activations: nvfp4 needs a calibrated"),
    ({"format": "nvfp4"}, None, ["awq"], "step awq cannot solve nvfp4 weights"),
])
def test_microscaling_recipe_errors_are_one_line(weights, activations, steps, words):
    with pytest.raises(LowbitError) as err:
        parse_recipe({"weights": weights, "activations": activations, "steps": steps})
    assert words in str(err.value) and "\n" not in str(err.value)


def test_named_formats_and_blocks_parse():
    recipe = parse_recipe({"weights": {"format": "nvfp4", "observer": "mse"}, "steps": ["gptq"]})
    assert recipe.plan().weights == QuantSpec.named("nvfp4") and recipe.plan().weight_observer == "mse"
    recipe = parse_recipe({"weights": {"format": "fp", "bits": 8, "block": [128, 64]},
                           "activations": {"format": "fp", "bits": 8, "group_size": 64, "dynamic": True}})
    assert recipe.plan().weights.describe() == "fp8-e4m3 block 128x64"
    assert parse_recipe(yaml.safe_load(recipe_to_yaml(recipe))).plan() == recipe.plan()


def test_closed_stdout_is_not_an_error():
    """`lowbit backends | head -1`: the reader leaving early ends the command quietly with exit 0."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "lowbit", "backends"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the interpreter has imported lowbit and printed anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and "error" not in err and "Traceback" not in err
