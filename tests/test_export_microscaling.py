"""Microscaling and block-scaled exports: MXFP4, NVFP4, MXFP8 and FP8 2-D blocks in compressed-tensors' own
formats carry the run's codes and scales exactly and reload on the CPU as the simulated model."""
import json

import pytest
import torch
from compressed_tensors.compressors.mx_utils import decompress_mx_scale
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from safetensors.torch import load_file

from lowbit.cli import main
from lowbit.export import export_run
from lowbit.runfolder import load_run
from lowbit.verify import compare, load_exported

FP8_BLOCK = {"format": "fp", "bits": 8, "block": [32, 32]}
FP8_GROUP_ACTS = {"format": "fp", "bits": 8, "group_size": 32, "dynamic": True}
NAME = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("weights, acts, fmt, strategy", [
    ({"format": "mxfp4"}, None, "mxfp4-pack-quantized", "group"),
    ({"format": "nvfp4"}, None, "nvfp4-pack-quantized", "tensor_group"),
    ({"format": "mxfp8"}, None, "mxfp8-quantized", "group"),
    (FP8_BLOCK, FP8_GROUP_ACTS, "float-quantized", "block"),
])
def test_export_is_the_run_and_reloads(make_run, tmp_path, text_windows, weights, acts, fmt, strategy):
    run = make_run(weights, acts)
    out = export_run(run, "compressed-tensors", tmp_path / "ct", dtype="float32").path
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qconfig["config_groups"]["group_0"]
    assert qconfig["format"] == fmt and group["weights"]["strategy"] == strategy
    simulated, _, state = load_run(run)
    rec = state.weights[NAME]
    weight = simulated.get_submodule(NAME).weight
    tensors = load_file(str(out / "model.safetensors"))
    codes = rec.codes(weight)
    if fmt.endswith("pack-quantized"):  # fp4 nibbles, unpacked with compressed-tensors' helper
        stored = unpack_fp4_from_uint8(tensors[f"{NAME}.weight_packed"], *weight.shape, dtype=torch.float32)
    else:
        stored = tensors[f"{NAME}.weight"].float()
    assert torch.equal(stored, codes)
    scale = tensors[f"{NAME}.weight_scale"]
    if fmt.startswith("mx"):  # E8M0 exponents: exactly the run's power-of-two scales
        assert scale.dtype == torch.uint8 and torch.equal(decompress_mx_scale(scale).float(), rec.scale)
    elif fmt.startswith("nv"):  # FP8 block scales divided by the FP32 tensor scale are the run's scales
        gs = tensors[f"{NAME}.weight_global_scale"]
        assert scale.dtype == torch.float8_e4m3fn and torch.equal(gs.float().reshape(1), rec.global_scale)
        torch.testing.assert_close(scale.float() / gs.float(), rec.scale, rtol=1e-6, atol=0)
        # fused linears share one tensor scale (vLLM runs q/k/v and gate/up with one)
        qkv = [tensors[f"model.layers.1.self_attn.{p}_proj.weight_global_scale"] for p in "qkv"]
        assert torch.equal(qkv[0], qkv[1]) and torch.equal(qkv[0], qkv[2])
    else:  # block scales [ceil(out / 32), in / 32], with per-token-group FP8 activations
        assert tuple(scale.shape) == (-(-weight.shape[0] // 32), weight.shape[1] // 32)
        assert (group["input_activations"]["strategy"], group["input_activations"]["group_size"]) == ("group", 32)
    comparison = compare(simulated, load_exported(out), text_windows)
    if fmt.startswith("nv"):  # compressed-tensors divides the FP8 block scale by the tensor scale in bfloat16
        assert comparison.ppl_rel_diff < 0.005 and comparison.top1_agreement > 0.9
    else:  # power-of-two and float32 scales: the reloaded model is the simulated one
        assert comparison.max_logit_diff < 1e-4 and comparison.top1_agreement == 1.0


def test_verify_cli_passes_on_nvfp4(make_run, tmp_path, capsys):
    run = make_run({"format": "nvfp4"})
    out = export_run(run, "compressed-tensors", tmp_path / "ct").path
    capsys.readouterr()
    assert main(["verify", str(run), str(out), "--max-tokens", "512", "--seq-len", "128"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 508 and result["ppl_rel_diff"] < 0.005 and result["top1_agreement"] > 0.9


def test_plain_fp4_groups_have_no_compressed_tensors_format(make_run, tmp_path, capsys):
    run = make_run({"format": "fp", "bits": 4, "group_size": 32})
    capsys.readouterr()
    assert main(["export", str(run), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: cannot export to compressed-tensors: weights fp4-e2m1") and \
        err.count("\n") == 1


@pytest.mark.parametrize("weights, acts", [({"format": "nvfp4", "observer": "mse"}, None),
                                           ({**FP8_BLOCK, "observer": "mse"}, FP8_GROUP_ACTS)])
def test_gptq_act_order_mse_runs_export_as_solved(tiny_llama, tmp_path, text_windows, weights, acts):
    from lowbit.recipe import parse_recipe
    from lowbit.run import run_recipe

    recipe = parse_recipe({"model": str(tiny_llama), "weights": weights, "activations": acts, "threads": 1,
                           "steps": [{"gptq": {"act_order": True}}], "evaluation": None,
                           "calibration": {"n_samples": 4, "seq_len": 64}})
    run = tmp_path / "run"
    run_recipe(recipe, run, progress=False)
    # the exporter refuses codes other than the run's; float32 keeps everything else exact too
    out = export_run(run, "compressed-tensors", tmp_path / "ct", dtype="float32").path
    simulated, _, _ = load_run(run)
    comparison = compare(simulated, load_exported(out), text_windows)
    if weights.get("format") == "nvfp4":  # bfloat16 division of the FP8 block scale by the tensor scale
        assert comparison.ppl_rel_diff < 0.005 and comparison.top1_agreement > 0.9
    else:
        assert comparison.max_logit_diff < 1e-4 and comparison.top1_agreement == 1.0
