"""The backend-constraints view: which targets run which formats, and one-line errors naming the property."""
import pytest

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.export.backends import backends_table, select_scheme
from lowbit.formats import QuantSpec
from lowbit.recipe import parse_recipe

W4G128 = QuantSpec(4, symmetric=False, granularity="group", group_size=128)
W8 = QuantSpec(8, granularity="channel")
A8 = QuantSpec(8, granularity="token", dynamic=True)


def test_schemes_chosen_per_format():
    assert select_scheme("compressed-tensors", W4G128, None).name == "pack-quantized"
    assert select_scheme("compressed-tensors", W8, A8).name == "int-quantized"
    assert select_scheme("compressed-tensors", QuantSpec(8, format="fp"), None).name == "float-quantized"
    assert select_scheme("gguf-q4_0", W4G128, None).name == "Q4_0"
    assert select_scheme("gguf-q8_0", W8, None).name == "Q8_0"
    assert select_scheme("gguf-q8_0", None, None) is None


@pytest.mark.parametrize("target, weights, acts, words", [
    ("gguf-q4_0", QuantSpec(3, granularity="group", group_size=32), None, ["weights int3", "no export target"]),
    ("gguf-q4_0", W8, None, ["weights int8", "compressed-tensors, gguf-q8_0"]),
    ("compressed-tensors", QuantSpec(4, granularity="channel"), QuantSpec(4, granularity="token", dynamic=True),
     ["activations int4 dynamic per-token", "no export target"]),
    ("gguf-q8_0", W8, A8, ["activations int8 dynamic per-token", "targets that support it: compressed-tensors"]),
    ("compressed-tensors", QuantSpec(4, granularity="group", group_size=16), None,
     ["weight granularity group 16", "gguf-q8_0, gguf-q4_0"]),
    ("compressed-tensors", QuantSpec(8, symmetric=False), A8, ["weight symmetry asymmetric", "gguf-q8_0"]),
])
def test_unsupported_property_is_named_with_supporting_targets(target, weights, acts, words):
    with pytest.raises(LowbitError) as err:
        select_scheme(target, weights, acts, "layer.x")
    message = str(err.value)
    assert "\n" not in message and f"cannot export to {target}" in message and "(layer.x)" in message
    for word in words:
        assert word in message


def test_recipe_target_is_checked_before_any_work():
    base = {"model": "no/such-model", "weights": {"bits": 4, "group_size": 32}}
    parse_recipe({**base, "target": "gguf-q4_0"})
    with pytest.raises(LowbitError, match="weights int3"):
        parse_recipe({**base, "weights": {"bits": 3, "group_size": 32}, "target": "gguf-q4_0"})
    with pytest.raises(LowbitError, match="unknown export target 'tensorrt'"):
        parse_recipe({**base, "target": "tensorrt"})
    with pytest.raises(LowbitError, match="activations int8"):
        parse_recipe({**base, "layers": {"*.down_proj": None}, "target": "gguf-q4_0",
                      "activations": {"bits": 8, "granularity": "token", "dynamic": True}})


def test_backends_command_prints_every_target(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == backends_table()
    for name in ("| compressed-tensors |", "| gguf-q8_0 |", "| gguf-q4_0 |", "int8 dynamic per-token"):
        assert name in out


BLOCK_FP8 = QuantSpec(8, format="fp", block=(128, 64))


def test_microscaling_and_block_schemes():
    ct = "compressed-tensors"
    assert select_scheme(ct, QuantSpec.named("mxfp4"), None).name == "mxfp4-pack-quantized"
    assert select_scheme(ct, QuantSpec.named("nvfp4"), None).name == "nvfp4-pack-quantized"
    assert select_scheme(ct, QuantSpec.named("mxfp8"), None).name == "mxfp8-quantized"
    assert select_scheme(ct, BLOCK_FP8, QuantSpec(8, format="fp", group_size=64, dynamic=True)).name == "float-quantized"
    with pytest.raises(LowbitError, match=r"must be per-token groups of the weight block's width 64 \(set"):
        select_scheme(ct, BLOCK_FP8, QuantSpec(8, format="fp", group_size=128, dynamic=True), "recipe")
    with pytest.raises(LowbitError, match="weights fp4-e2m1 .* no export target supports it"):
        select_scheme(ct, QuantSpec(4, format="fp", group_size=32), None)
    with pytest.raises(LowbitError, match="weights mxfp4 .* targets that support it: compressed-tensors"):
        parse_recipe({"model": "no/such-model", "weights": {"format": "mxfp4"}, "target": "gguf-q4_0"})
