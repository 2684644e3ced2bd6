"""GGUF export: the run's codes on llama.cpp's block grid, loadable by transformers' GGUF loader."""
import gguf
import numpy as np
import pytest
from transformers import AutoTokenizer

from lowbit.errors import LowbitError
from lowbit.export import export_run
from lowbit.export.gguf_file import exact_grid, rope_row_order
from lowbit.formats import QuantSpec
from lowbit.runfolder import load_run
from lowbit.verify import compare, load_exported


def _tensor(path, name):
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == name)
    return t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type)


def _expected(run, name, rows=None):
    """The run's codes times its scales rounded to fp16, in GGUF row order."""
    simulated, _, state = load_run(run)
    rec = state.weights[name]
    weight = simulated.get_submodule(name).weight
    codes = rec.codes(weight)
    scale = rec.scale.half().float().reshape(weight.shape[0], -1)
    expected = (codes.reshape(weight.shape[0], scale.shape[1], -1) * scale[..., None]).reshape(weight.shape)
    return expected if rows is None else expected[rows]


@pytest.mark.parametrize("weights, fmt, qtype", [
    ({"bits": 4, "symmetric": True, "group_size": 32}, "gguf-q4_0", gguf.GGMLQuantizationType.Q4_0),
    ({"bits": 8, "symmetric": True, "granularity": "channel"}, "gguf-q8_0", gguf.GGMLQuantizationType.Q8_0),
])
def test_compatible_grid_round_trips_exactly_and_loads(make_run, tmp_path, text_windows, weights, fmt, qtype):
    run = make_run(weights)
    result = export_run(run, fmt, tmp_path / "m.gguf", dtype="float32")
    assert "14 linears carry the run's codes exactly" in result.notes[0]
    kind, down = _tensor(result.path, "blk.1.ffn_down.weight")
    assert kind == qtype
    np.testing.assert_array_equal(down, _expected(run, "model.layers.1.mlp.down_proj").numpy())
    _, q = _tensor(result.path, "blk.0.attn_q.weight")
    np.testing.assert_array_equal(q, _expected(run, "model.layers.0.self_attn.q_proj", rope_row_order(64, 4)).numpy())

    simulated, tokenizer, _ = load_run(run)
    exported = load_exported(result.path)
    comparison = compare(simulated, exported, text_windows)
    print(f"{fmt}: {comparison}")
    assert comparison.ppl_rel_diff < 0.002 and comparison.top1_agreement > 0.98
    assert comparison.max_logit_diff < 0.05
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "The game 's 1,234 players said \"hello\" -- it's 3.5x better.\n = Valkyria Chronicles = \n"
    assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_incompatible_grid_is_refit_and_says_so(make_run, tmp_path, text_windows):
    run = make_run({"bits": 4, "symmetric": False, "group_size": 32})
    result = export_run(run, "gguf-q4_0", tmp_path / "m.gguf")
    assert any("RE-FIT" in note and "int4 g32 asym" in note for note in result.notes)
    simulated, _, _ = load_run(run)
    weight = simulated.get_submodule("model.layers.1.mlp.down_proj").weight.detach().float().numpy()
    _, down = _tensor(result.path, "blk.1.ffn_down.weight")
    np.testing.assert_array_equal(down, gguf.quants.dequantize(gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_0),
                                                               gguf.GGMLQuantizationType.Q4_0))
    comparison = compare(simulated, load_exported(result.path), text_windows)
    print(f"re-fit Q4_0: {comparison}")
    assert comparison.max_logit_diff > 0.05  # a second rounding: not the simulated model any more


@pytest.mark.parametrize("weights, acts, fmt, message", [
    ({"bits": 3, "symmetric": True, "group_size": 32}, None, "gguf-q4_0", "weights int3"),
    ({"bits": 8, "symmetric": True, "granularity": "channel"},
     {"bits": 8, "symmetric": True, "granularity": "token", "dynamic": True}, "gguf-q8_0",
     "activations int8 dynamic per-token .* targets that support it: compressed-tensors"),
])
def test_unrepresentable_runs_are_refused_without_a_file(make_run, tmp_path, weights, acts, fmt, message):
    run = make_run(weights, acts)
    with pytest.raises(LowbitError, match=message):
        export_run(run, fmt, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_exact_grid_rule():
    assert exact_grid(QuantSpec(4, granularity="channel"), 4)
    assert exact_grid(QuantSpec(4, granularity="group", group_size=128), 4)
    assert not exact_grid(QuantSpec(4, granularity="group", group_size=16), 4)
    assert not exact_grid(QuantSpec(4, symmetric=False, granularity="group", group_size=32), 4)
    assert not exact_grid(QuantSpec(8, granularity="channel"), 4)
