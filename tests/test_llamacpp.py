"""llama.cpp (the xllamacpp wheel) runs lowbit's GGUF exports: its perplexity and greedy choices match the simulated run."""
import numpy as np
import pytest
import torch

from lowbit.export import export_run
from lowbit.runfolder import load_run
from lowbit.verify import verify

pytest.importorskip("xllamacpp")
from lowbit.llamacpp import LlamaCpp  # noqa: E402


def test_llamacpp_scores_a_q4_0_export_like_the_simulated_run(make_run, tmp_path, text_windows):
    run = make_run({"format": "gguf", "type": "q4_0"})
    path = export_run(run, "gguf", tmp_path / "m.gguf").path
    result = verify(run, path, engine="llama.cpp", seq_len=128, max_tokens=384)
    print(f"llama.cpp Q4_0: {result}")
    assert result.tokens == 381
    assert result.ppl_rel_diff < 0.02 and result.top1_agreement > 0.95
    simulated, _, _ = load_run(run)
    prompt = text_windows[0, :16].tolist()
    with LlamaCpp(path, n_ctx=64) as engine:
        got = engine.greedy(prompt, 12)
        lp = engine.token_logprobs(text_windows[0, :64].tolist())
    ref = simulated.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, 16:].tolist()
    assert got[:8] == ref[:8]
    with torch.no_grad():
        logits = simulated(text_windows[:1, :64]).logits[0, :-1].log_softmax(-1)
    expect = logits.gather(1, text_windows[0, 1:64, None])[:, 0].double().numpy()
    assert np.abs(lp - expect).max() < 0.1 and abs(lp.mean() - expect.mean()) < 0.01


@pytest.mark.slow
def test_llamacpp_continues_the_embedded_q4_0_export_like_lowbit_generate(tmp_path):
    """The embedded model on Q4_0 by RTN: llama.cpp's greedy continuation is `lowbit generate --kernels simulated`'s
    (the run's float32 model, whose weights are exactly the file's), word for word through the first 22 of 24
    tokens (llama.cpp rounds activations to 8 bits inside Q4_0 dot products, so a late near-tie may flip)."""
    from lowbit.kernels.runtime import generate, load_for_inference
    from lowbit.recipe import parse_recipe
    from lowbit.run import run_recipe

    recipe = parse_recipe({"weights": {"format": "gguf", "type": "q4_0"}, "threads": 2, "evaluation": None,
                           "calibration": {"n_samples": 2, "seq_len": 128}, "target": "gguf"})
    run = tmp_path / "run"
    run_recipe(recipe, run, progress=False)
    path = export_run(run, "gguf", tmp_path / "m.gguf").path
    model, tokenizer, _ = load_for_inference(run, "simulated")
    prompt = "The capital of France is"
    expected = generate(model, tokenizer, prompt, 24)
    with LlamaCpp(path, n_ctx=64) as engine:
        got = engine.greedy(tokenizer(prompt)["input_ids"], 24)
    print(f"lowbit: {expected!r}\nllama.cpp: {tokenizer.decode(got)!r}")
    assert tokenizer(expected)["input_ids"][:22] == got[:22]


def test_qwen2_exports_with_its_biases_and_runs_in_llamacpp(tiny_dirs, tmp_path, text_windows):
    """The adapter names every Qwen2 tensor for GGUF (q/k/v biases included, no q/k row interleave)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.recipe import parse_recipe
    from lowbit.run import run_recipe

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"], dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "qwen2")
    AutoTokenizer.from_pretrained(tiny_dirs["qwen2"]).save_pretrained(tmp_path / "qwen2")
    recipe = parse_recipe({"model": str(tmp_path / "qwen2"), "weights": {"format": "gguf", "type": "q8_0"},
                           "threads": 1, "evaluation": None, "calibration": {"n_samples": 2, "seq_len": 64},
                           "target": "gguf"})
    run_recipe(recipe, tmp_path / "run", progress=False)
    path = export_run(tmp_path / "run", "gguf", tmp_path / "m.gguf").path
    import gguf
    reader = gguf.GGUFReader(path)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "qwen2"
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.bias", "blk.1.attn_v.bias"} <= names
    result = verify(tmp_path / "run", path, engine="llama.cpp", seq_len=128, max_tokens=384)
    print(f"llama.cpp qwen2 Q8_0: {result}")
    assert result.ppl_rel_diff < 0.01 and result.max_logit_diff < 0.5


def test_architectures_without_a_gguf_name_are_refused(tiny_dirs, tmp_path):
    from lowbit.errors import LowbitError
    from lowbit.recipe import parse_recipe
    from lowbit.run import run_recipe

    recipe = parse_recipe({"model": tiny_dirs["opt"], "weights": {"format": "gguf", "type": "q8_0"}, "threads": 1,
                           "evaluation": None, "calibration": {"n_samples": 2, "seq_len": 64}})
    run_recipe(recipe, tmp_path / "run", progress=False)
    with pytest.raises(LowbitError, match="no llama.cpp architecture for 'opt'"):
        export_run(tmp_path / "run", "gguf", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_verify_cli_with_the_llamacpp_engine(make_run, tmp_path, capsys):
    import json

    from lowbit.cli import main

    run = make_run({"format": "gguf", "type": "q4_0"})
    path = export_run(run, "gguf", tmp_path / "m.gguf").path
    capsys.readouterr()
    code = main(["verify", str(run), str(path), "--engine", "llama.cpp", "--seq-len", "128", "--max-tokens", "256",
                 "--quiet"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["engine"] == "llama.cpp" and out["tokens"] == 254 and out["ppl_rel_diff"] < 0.02
    code = main(["verify", str(run), str(tmp_path / "model.safetensors"), "--engine", "llama.cpp", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("lowbit: error: llama.cpp runs .gguf files") and len(err) == 1
