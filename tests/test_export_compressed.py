"""compressed-tensors export: the folder loads with transformers (+ compressed-tensors) and is the simulated model."""
import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.export import export_run
from lowbit.runfolder import load_run, load_state, save_state
from lowbit.verify import compare, load_exported

W4_ASYM_G32 = {"bits": 4, "symmetric": False, "group_size": 32}
W4_SYM_G32 = {"bits": 4, "symmetric": True, "group_size": 32}
W8_CHANNEL = {"bits": 8, "symmetric": True, "granularity": "channel"}
A8_TOKEN = {"bits": 8, "symmetric": True, "granularity": "token", "dynamic": True}


def test_asymmetric_w4_float32_export_is_bit_exact(make_run, tmp_path, text_windows):
    run = make_run(W4_ASYM_G32)
    out = export_run(run, "compressed-tensors", tmp_path / "ct", dtype="float32").path
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qconfig["config_groups"]["group_0"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    assert qconfig["quantization_status"] == "compressed" and qconfig["ignore"] == ["lm_head"]
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert group["weights"] | {} == {**group["weights"], "num_bits": 4, "type": "int", "symmetric": False,
                                     "strategy": "group", "group_size": 32}
    # the packed codes are the run's codes (shifted to compressed-tensors' signed range)
    simulated, _, state = load_run(run)
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    weight = simulated.get_submodule(name).weight
    codes = unpack_from_int32(tensors[f"{name}.weight_packed"], 4, weight.shape)
    assert torch.equal(codes.float(), state.weights[name].codes(weight) - 8)
    comparison = compare(simulated, load_exported(out), text_windows)
    assert comparison.max_logit_diff < 1e-4 and comparison.top1_agreement == 1.0


@pytest.mark.parametrize("weights, acts, fmt", [
    (W4_SYM_G32, None, "pack-quantized"),
    (W8_CHANNEL, A8_TOKEN, "int-quantized"),
    (W8_CHANNEL, {"bits": 8, "symmetric": True, "granularity": "tensor"}, "int-quantized"),
    ({"bits": 8, "format": "fp", "granularity": "channel"}, None, "float-quantized"),
])
def test_bfloat16_export_loads_with_transformers_and_matches(make_run, tmp_path, text_windows, weights, acts, fmt):
    run = make_run(weights, acts)
    out = export_run(run, "compressed-tensors", tmp_path / "ct").path
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == fmt
    if acts:
        act_args = qconfig["config_groups"]["group_0"]["input_activations"]
        assert (act_args["strategy"], act_args["dynamic"]) == (acts["granularity"], acts.get("dynamic", False))
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert exported.model.layers[0].self_attn.q_proj.quantization_scheme.format == fmt
    simulated, _, _ = load_run(run)
    comparison = compare(simulated, exported, text_windows)
    # bfloat16 scales and embeddings (and, for W8A8, compressed-tensors' CPU emulation scaling activations by
    # amax/127.5 where we and vLLM's kernel use amax/127) are the only differences from the simulated model;
    # the random tiny model's near-flat logits make its top-1 token fragile
    assert comparison.ppl_rel_diff < 0.005
    assert comparison.top1_agreement > 0.9
    assert comparison.mean_logit_diff < 0.02 * simulated(text_windows[:1]).logits.std().item() + 0.02


def test_w4a4_is_refused_without_leaving_a_folder(make_run, tmp_path, capsys):
    run = make_run({"bits": 4, "granularity": "channel"}, {"bits": 4, "granularity": "token", "dynamic": True})
    out = tmp_path / "ct"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "compressed-tensors", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: cannot export to compressed-tensors: activations int4 dynamic per-token")
    assert err.count("\n") == 1 and not out.exists() and not list(tmp_path.iterdir())


def test_online_transform_is_refused(make_run, tmp_path):
    run = make_run(W4_SYM_G32)
    copy = tmp_path / "run"
    copy.mkdir()
    for f in run.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    (copy / "model").symlink_to(run / "model")
    (copy / "manifest.json").unlink()  # a hand-edited folder: no manifest to contradict
    meta = json.loads((copy / "quant_state.json").read_text())
    meta["transforms"] = {"model.layers.0.mlp.down_proj": {"kind": "hadamard"}}
    (copy / "quant_state.json").write_text(json.dumps(meta))
    with pytest.raises(LowbitError, match="online input transform 'hadamard' on model.layers.0.mlp.down_proj"):
        export_run(copy, "compressed-tensors")
    assert not (copy / "compressed-tensors").exists()


def test_failure_while_writing_leaves_nothing(make_run, tmp_path):
    """A weight moved off its recorded grid is detected mid-export; the partial folder is removed."""
    run = make_run(W4_SYM_G32)
    state = load_state(run)
    name = "model.layers.1.self_attn.o_proj"
    bad = tmp_path / "run"
    bad.mkdir()
    for f in ("quant_state.json", "recipe.yaml", "metrics.json"):
        (bad / f).write_bytes((run / f).read_bytes())
    state.weights[name].scale = state.weights[name].scale * 1.37
    save_state(state, bad)
    (bad / "model").symlink_to(run / "model")
    with pytest.raises(LowbitError, match=f"the weight of {name} is off its quantization grid"):
        export_run(bad, "compressed-tensors", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_mixed_precision_groups_by_layer_name(tiny_llama, tmp_path, text_windows):
    from lowbit.recipe import parse_recipe
    from lowbit.run import run_recipe

    recipe = parse_recipe({"model": str(tiny_llama), "weights": W4_SYM_G32, "threads": 1, "evaluation": None,
                           "layers": {"*.down_proj": W8_CHANNEL, "*.layers.0.self_attn.o_proj": None},
                           "calibration": {"n_samples": 2, "seq_len": 64}, "target": "compressed-tensors"})
    run_recipe(recipe, tmp_path / "run", progress=False)
    out = export_run(tmp_path / "run", "compressed-tensors").path
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "pack-quantized"  # both groups pack; 8-bit is W8A16
    bits = {g["weights"]["num_bits"]: g["targets"] for g in qconfig["config_groups"].values()}
    assert bits[8] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"] and len(bits[4]) == 11
    assert qconfig["ignore"] == ["model.layers.0.self_attn.o_proj", "lm_head"]
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    simulated, _, _ = load_run(tmp_path / "run")
    assert compare(simulated, exported, text_windows).ppl_rel_diff < 0.005


def test_verify_command_reports_agreement(make_run, tmp_path, capsys):
    run = make_run(W4_ASYM_G32)
    out = export_run(run, "compressed-tensors", tmp_path / "ct", dtype="float32").path
    capsys.readouterr()
    assert main(["verify", str(run), str(out), "--seq-len", "128", "--max-tokens", "256", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == 254 and report["top1_agreement"] == 1.0 and report["max_logit_diff"] < 1e-4
    assert abs(report["ppl_a"] - report["ppl_b"]) < 1e-3 * report["ppl_a"]
