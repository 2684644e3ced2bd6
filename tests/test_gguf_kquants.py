"""GGUF K-quants: solvers round onto llama.cpp's super-block grids, the export carries those exact codes and
scales, rows that are not a multiple of 256 fall back as llama.cpp's quantizer does, and llama.cpp agrees."""
import gguf
import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.export import export_run
from lowbit.export.gguf_blocks import pack
from lowbit.export.gguf_file import rope_row_order
from lowbit.formats import dequantize, quantize
from lowbit.gguf_types import TYPES, block_params, resolve, type_spec, uses_more_bits
from lowbit.observers import observe
from lowbit.recipe import parse_recipe
from lowbit.run import run_recipe
from lowbit.runfolder import load_run


def test_q4_k_scales_and_mins_hand_computed():
    """Eight sub-block ranges -> 6-bit scales and mins under fp16 d/dmin, as llama.cpp stores them."""
    lo = torch.tensor([[-0.30, -0.10, 0.0, -0.05, -0.2, 0.0, -0.01, -0.6]])
    hi = torch.tensor([[0.60, 0.20, 0.15, 0.0, 0.1, 0.0, 0.02, 0.3]])
    scale, zero = block_params(lo, hi, TYPES["q4_k"])
    # ranges / 15 = .06 .02 .01 .00333 .02 0 .002 .06; d = fp16(.06 / 63) = 1997 * 2^-21
    d = 1997 * 2.0 ** -21
    assert scale[0].tolist() == pytest.approx([d * k for k in (63, 21, 11, 4, 21, 1, 2, 63)], rel=1e-7)
    # mins .3 .1 0 .05 .2 0 .01 .6; dmin = fp16(.6 / 63) = 1248 * 2^-17
    dmin = 1248 * 2.0 ** -17
    assert (zero * scale)[0].tolist() == pytest.approx([dmin * k for k in (32, 11, 0, 5, 21, 0, 1, 63)], rel=1e-6)


def test_q6_k_signed_scales_hand_computed():
    lo = torch.tensor([[-0.30, -0.10, 0.0, -0.05, -0.2, 0.0, -0.01, -0.6]]).repeat(1, 2)
    hi = torch.tensor([[0.60, 0.20, 0.15, 0.0, 0.1, 0.0, 0.02, 0.3]]).repeat(1, 2)
    scale, zero = block_params(lo, hi, TYPES["q6_k"])
    d = 1278 * 2.0 ** -23  # fp16(max|x| / 31 / 127)
    assert scale[0, :8].tolist() == pytest.approx([d * k for k in (127, 42, 32, 11, 42, 1, 4, 127)], rel=1e-7)
    assert (zero == 0).all()


@pytest.mark.parametrize("name", sorted(TYPES))
def test_every_type_packs_to_what_the_reference_dequantizer_reads(name):
    """Codes from the minmax and MSE observers, packed, decode in gguf's reference code to the fake-quantized weight."""
    spec = type_spec(name)
    torch.manual_seed(0)
    w = torch.randn(6, 512) * 0.05
    w[:, :3] *= 10
    w[0, :256] = 0  # an all-zero super-block
    w[1] = w[1].abs()  # no negative values: mins of 0
    for observer in ("minmax", "mse"):
        scale, zero = observe(w, spec, observer)
        codes = quantize(w, scale, zero, spec)
        assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
        data = pack(codes, scale, zero, TYPES[name], "w")
        got = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name.upper()])
        np.testing.assert_allclose(got, dequantize(codes, scale, zero, spec).numpy(), rtol=0, atol=1e-6)
        assert (dequantize(codes, scale, zero, spec) - w).abs().max() < 0.6 * w.abs().max() / 2 ** (spec.bits - 2)


def test_mix_and_width_fallback_rules():
    # llama.cpp's use_more_bits for 30 layers: first and last eighth, and every third layer between
    assert [i for i in range(30) if uses_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert resolve("q4_k_m", "attn_v", 0, 30, 1536) == "q6_k"
    assert resolve("q4_k_m", "attn_v", 3, 30, 1536) == "q4_k"
    assert resolve("q4_k_m", "attn_q", 0, 30, 1536) == "q4_k"
    assert resolve("q4_k_m", "ffn_down", 0, 30, 576) == "q8_0"  # Q6_K's fallback
    assert resolve("q4_k", "attn_q", 0, 30, 576) == "q5_0"
    assert resolve("q5_k", "attn_q", 0, 30, 576) == "q5_1"
    assert resolve("q6_k", "attn_q", 0, 30, 576) == "q8_0"
    with pytest.raises(LowbitError, match=r"multiple of 256 \(or of 32 for its fallback Q5_0\), got a row of 100"):
        resolve("q4_k", "attn_q", 0, 30, 100)


def test_recipe_syntax_and_errors():
    base = {"model": "x", "evaluation": None}
    spec = parse_recipe({**base, "weights": {"format": "gguf", "type": "Q4_K"}}).plan().weights
    assert (spec.gguf, spec.bits, spec.symmetric, spec.group_size) == ("q4_k", 4, False, 32)
    with pytest.raises(LowbitError, match="unknown GGUF type 'q4_x'"):
        parse_recipe({**base, "weights": {"format": "gguf", "type": "q4_x"}})
    with pytest.raises(LowbitError, match="both keys"):
        parse_recipe({**base, "weights": {"format": "gguf"}})
    with pytest.raises(LowbitError, match="groups of 32, not 64"):
        parse_recipe({**base, "weights": {"format": "gguf", "type": "q4_k", "group_size": 64}})
    with pytest.raises(LowbitError, match="takes bits from its type"):
        parse_recipe({**base, "weights": {"format": "gguf", "type": "q4_k", "bits": 3}})
    with pytest.raises(LowbitError, match="step lwc cannot solve GGUF weights"):
        parse_recipe({**base, "weights": {"format": "gguf", "type": "q4_k"}, "steps": ["lwc"]})
    with pytest.raises(LowbitError, match="targets that support it: gguf"):
        parse_recipe({**base, "weights": {"format": "gguf", "type": "q4_k"}, "target": "compressed-tensors"})


@pytest.fixture(scope="module")
def tiny_256(tiny_llama, tmp_path_factory):
    """A 2-block Llama whose attention/gate/up rows are 256 wide (K-quant super-blocks) and down rows 384 (fallback)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.06, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p[:, :2] *= 6  # outlier input channels, so solvers have something to do
    path = tmp_path_factory.mktemp("tiny-256")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _run(model, tmp_path_factory, weights, steps=("rtn",)):
    recipe = parse_recipe({"model": str(model), "weights": weights, "steps": list(steps), "threads": 1,
                           "evaluation": None, "calibration": {"n_samples": 4, "seq_len": 64}, "target": "gguf"})
    out = tmp_path_factory.mktemp("run") / "run"
    run_recipe(recipe, out, progress=False)
    return out


CASES = [("q4_k", "rtn", "Q4_K", "Q5_0"), ("q4_k", "gptq", "Q4_K", "Q5_0"), ("q4_k", "awq", "Q4_K", "Q5_0"), ("q6_k", "rtn", "Q6_K", "Q8_0"),
         ("q5_k", "gptq", "Q5_K", "Q5_1"), ("q3_k", "rtn", "Q3_K", "Q4_0"), ("q2_k", "rtn", "Q2_K", "Q4_0")]


@pytest.mark.parametrize("gtype, solver, main, fallback", CASES)
def test_solved_kquant_export_is_exactly_the_run(tiny_256, tmp_path_factory, gtype, solver, main, fallback):
    steps = {"gptq": [{"gptq": {"act_order": True}}], "awq": ["awq"]}.get(solver, ["rtn"])
    run = _run(tiny_256, tmp_path_factory, {"format": "gguf", "type": gtype, "observer": "mse"}, steps)
    result = export_run(run, "gguf", run.parent / "m.gguf")
    assert f"{main} x 12 (rows of 256)" in result.notes[0]
    assert f"{fallback} x 2 (rows of 384: the K-quant fallback" in result.notes[0]
    simulated, _, state = load_run(run)
    tensors = {t.name: t for t in gguf.GGUFReader(result.path).tensors}
    for name, gname, rows in (("model.layers.1.mlp.up_proj", "blk.1.ffn_up.weight", None),
                              ("model.layers.0.self_attn.k_proj", "blk.0.attn_k.weight", rope_row_order(128, 2)),
                              ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight", None)):
        t = tensors[gname]
        weight = simulated.get_submodule(name).weight.detach()
        expect = weight if rows is None else weight[rows]
        assert t.tensor_type.name == (fallback if "down" in name else main)
        np.testing.assert_allclose(gguf.quants.dequantize(t.data, t.tensor_type), expect.numpy(), rtol=0, atol=2e-7)
        assert state.weights[name].codes(weight.float(), name) is not None  # on its recorded grid


def test_q4_k_m_mix_gives_attn_v_and_ffn_down_more_bits(tiny_256, tmp_path_factory):
    run = _run(tiny_256, tmp_path_factory, {"format": "gguf", "type": "q4_k_m"})
    path = export_run(run, "gguf", run.parent / "m.gguf").path
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    # 2 layers: n/8 = 0, 7n/8 = 1 -> layer 1 gets more bits; layer 0: (0 - 0) % 3 != 2
    assert (types["blk.0.attn_v.weight"], types["blk.1.attn_v.weight"]) == ("Q4_K", "Q6_K")
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == ("Q5_0", "Q8_0")
    assert types["blk.1.attn_q.weight"] == "Q4_K"


def test_gptq_on_the_q4_k_grid_beats_rtn_on_it(tiny_256, tmp_path_factory, text_windows):
    """The solver works on the K-quant grid itself: its rounding lowers the layer outputs' error."""
    from lowbit.verify import compare
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(tiny_256, dtype=torch.float32).eval()
    windows = text_windows[:, :128]
    ppl = {}
    for solver, steps in (("rtn", ["rtn"]), ("gptq", [{"gptq": {"act_order": True}}])):
        run = _run(tiny_256, tmp_path_factory, {"format": "gguf", "type": "q4_k", "observer": "mse"}, steps)
        ppl[solver] = compare(fp, load_run(run)[0], windows).mean_logit_diff
    assert ppl["gptq"] < ppl["rtn"]


def test_full_disk_while_writing_the_anchor_leaves_nothing(tiny_256, tmp_path, monkeypatch):
    """llama.cpp's float GGUF written onto a disk that fills half-way: a one-line error, and no file, partial or
    staged, at the path or beside it."""
    import errno
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.llamacpp import write_llamacpp_quantized

    def full(writer):
        writer.fout[0].write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    model = AutoModelForCausalLM.from_pretrained(tiny_256, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_256)
    with pytest.raises(LowbitError, match="No space left on device") as err:
        write_llamacpp_quantized(model, tokenizer, tmp_path / "f16.gguf", None)
    assert "nothing was written" in str(err.value) and list(tmp_path.iterdir()) == []


xllamacpp = pytest.importorskip("xllamacpp")


@pytest.mark.parametrize("gtype", ["q4_k", "q6_k", "q4_k_m"])
def test_llamacpp_runs_the_kquant_export_as_simulated(tiny_256, tmp_path_factory, gtype):
    from lowbit.verify import verify

    run = _run(tiny_256, tmp_path_factory, {"format": "gguf", "type": gtype})
    path = export_run(run, "gguf", run.parent / "m.gguf").path
    result = verify(run, path, engine="llama.cpp", seq_len=128, max_tokens=384)
    print(f"llama.cpp {gtype}: {result}")
    assert result.ppl_rel_diff < 0.01 and result.top1_agreement > 0.93


def test_llamacpp_own_quantizer_anchor(tiny_256, tmp_path, text_windows):
    """llama.cpp's own Q4_K of the float model (the table's anchor): same types and fallback as lowbit's, and its
    weights are close to the float ones, as a 4-bit quantizer's must be."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.llamacpp import perplexity, write_llamacpp_quantized

    model = AutoModelForCausalLM.from_pretrained(tiny_256, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_256)
    types = write_llamacpp_quantized(model, tokenizer, tmp_path / "q4_k.gguf", "q4_k")
    assert types == {"Q4_K (rows of 256)": 12, "Q5_0 (rows of 384)": 2}
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "q4_k.gguf").tensors}
    up = gguf.quants.dequantize(tensors["blk.0.ffn_up.weight"].data, gguf.GGMLQuantizationType.Q4_K)
    weight = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    assert np.abs(up - weight).max() < 0.1 * np.abs(weight).max()
    write_llamacpp_quantized(model, tokenizer, tmp_path / "f16.gguf", None)
    fp = perplexity(tmp_path / "f16.gguf", text_windows[:, :128]).perplexity
    q = perplexity(tmp_path / "q4_k.gguf", text_windows[:, :128]).perplexity
    with torch.no_grad():
        ref = torch.exp(torch.nn.functional.cross_entropy(model(text_windows[:, :128]).logits[:, :-1].flatten(0, 1),
                                                          text_windows[:, 1:128].flatten())).item()
    assert abs(fp - ref) / ref < 0.01 and q != fp and abs(q - fp) / fp < 0.1


def test_storage_bits_are_the_block_sizes():
    from lowbit.formats import storage_bits

    assert storage_bits(type_spec("q4_k"), (2, 512)) == 1024 * 4.5  # 144 bytes per 256 values
    assert storage_bits(type_spec("q6_k"), (2, 512)) == 1024 * 6.5625  # 210 bytes per 256
    assert storage_bits(type_spec("q4_0"), (2, 512)) == 1024 * 4.5  # 18 bytes per 32
