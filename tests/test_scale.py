"""Real model sizes: streamed blocks from bf16 shards, device/dtype handling, checkpoints and resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.recipe import parse_recipe
from lowbit.run import run_recipe
from lowbit.streaming import ShardReader, write_tensors

ROOT = Path(__file__).resolve().parents[1]


def write_sharded(path: Path, tokenizer, layers: int = 3, hidden: int = 64, intermediate: int = 128,
                  dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A random Llama saved in `dtype` as several safetensors shards with an index (HF layout)."""
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.05)
                p[:, :2] *= 8
    model.to(dtype).save_pretrained(path, max_shard_size="200KB")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """A short text file for calibration and evaluation (tokenizing all of WikiText-2 would dominate the tests)."""
    from lowbit.data import load_text

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(load_text("wikitext2", "validation")[:30000])
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer) -> Path:
    path = write_sharded(tmp_path_factory.mktemp("sharded") / "model", tokenizer)
    assert (path / "model.safetensors.index.json").is_file()
    return path


TEXT: Path | None = None


@pytest.fixture(autouse=True)
def _short_text(text, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "TEXT", text)


def recipe(model: Path, **over) -> dict:
    data = {"model": str(model), "threads": 1, "weights": {"bits": 4, "group_size": 32}, "steps": ["gptq"],
            "calibration": {"data": str(TEXT), "n_samples": 4, "seq_len": 32, "batch_size": 2},
            "evaluation": {"data": str(TEXT), "seq_len": 64, "max_tokens": 256, "baseline": False}}
    data.update(over)
    return data


def tensors(run: Path) -> dict[str, torch.Tensor]:
    reader = ShardReader(run / "model")
    return reader.read(reader.names())


def mapped_file(t: torch.Tensor) -> str:
    """The file whose mapping holds `t`'s data ("", [heap] or the like for anonymous memory), from /proc/self/maps."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= ptr < high:
            return rest[4] if len(rest) > 4 else ""
    raise AssertionError(f"address {ptr:#x} is in no mapping")


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype
        assert torch.equal(ta[name], tb[name]), name


@pytest.mark.parametrize("steps,acts", [(["gptq"], None), (["awq", "rtn"], {"bits": 8, "granularity": "tensor"})])
def test_streamed_equals_in_memory(sharded, tmp_path, steps, acts):
    base = recipe(sharded, steps=steps, activations=acts)
    mem = run_recipe(parse_recipe({**base, "stream": False}), tmp_path / "mem", progress=False)
    streamed = run_recipe(parse_recipe({**base, "stream": True}), tmp_path / "str", progress=False)
    assert streamed.metrics["streamed"] and not mem.metrics["streamed"]
    assert streamed.metrics["dtype"] == "bfloat16"
    assert_same_weights(tmp_path / "mem", tmp_path / "str")
    for name in ("quant_state.json", "quant_state.safetensors"):
        assert (tmp_path / "mem" / name).read_bytes() == (tmp_path / "str" / name).read_bytes(), name
    assert streamed.metrics["ppl"]["ppl"] == mem.metrics["ppl"]["ppl"]
    # the finished blocks' scales and zero points were kept in files (mapped back), removed once saved
    assert streamed.state.weights and not (tmp_path / "str" / "state-spill").exists()
    for rec in streamed.state.weights.values():
        assert "state-spill/.state-model.layers." in mapped_file(rec.scale), mapped_file(rec.scale)
        assert "state-spill/.state-model.layers." in mapped_file(rec.zero)
    assert not any(mapped_file(rec.scale).startswith("/") for rec in mem.state.weights.values())
    index = json.loads((tmp_path / "str" / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 + 1  # one shard per block, one for the rest
    assert not any(p.is_meta for p in mem.model.parameters())
    assert all(p.is_meta for p in streamed.model.model.layers.parameters())  # blocks were freed
    bare = run_recipe(parse_recipe({**base, "stream": True, "evaluation": None}), tmp_path / "bare", progress=False)
    assert_same_weights(tmp_path / "mem", tmp_path / "bare")  # without evaluation the rest is copied, never loaded
    assert all(p.is_meta for p in bare.model.parameters())
    assert bare.metrics["size_mb"] == mem.metrics["size_mb"]  # the tied head counted once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copied_shard_holds_the_cast_tensors(tmp_path, dtype):
    """The rest shard is written chunk of rows by chunk of rows (64-byte chunks here: many per tensor); read back
    by safetensors it holds every tensor cast to the run's dtype, integers as they were."""
    from safetensors.torch import load_file, save_file
    from lowbit.streaming import copy_shard

    gen = torch.Generator().manual_seed(0)
    source = {"embed.weight": torch.randn(37, 24, generator=gen).bfloat16(), "norm.weight": torch.randn(24).bfloat16(),
              "cube": torch.randn(5, 3, 4, generator=gen).bfloat16(), "scalar": torch.tensor(1.5).bfloat16(),
              "ids": torch.arange(7)}
    (tmp_path / "in").mkdir()
    save_file(source, str(tmp_path / "in" / "model.safetensors"))
    name = copy_shard(tmp_path, 3, 4, ShardReader(tmp_path / "in"), list(source), dtype, chunk_bytes=64)
    assert name == "model-00004-of-00004.safetensors" and not list(tmp_path.glob(".*tmp"))
    copied = load_file(str(tmp_path / name))
    assert copied.keys() == source.keys()
    for key, t in source.items():
        want = t.to(dtype) if t.is_floating_point() else t
        assert copied[key].dtype == want.dtype and torch.equal(copied[key], want), key


def test_streamed_fp_perplexity_equals_in_memory(sharded, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    base = recipe(sharded, weights=None, steps=[], evaluation={"data": str(TEXT), "seq_len": 64, "max_tokens": 256})
    mem = run_recipe(parse_recipe({**base, "stream": False, "save": False}), progress=False)
    (tmp_path / "cache").rename(tmp_path / "cache-mem")
    streamed = run_recipe(parse_recipe({**base, "stream": True, "save": False}), progress=False)
    assert not streamed.metrics["ppl_fp"]["cached"]
    assert streamed.metrics["ppl_fp"]["ppl"] == mem.metrics["ppl_fp"]["ppl"]


_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from lowbit.blockio import BlockIO
    from lowbit.loading import load_model, load_skeleton
    from lowbit.models import get_adapter
    from lowbit.context import FormatPlan
    from lowbit.pipeline import compress
    from lowbit.formats import QuantSpec
    from lowbit.steps import get_step
    from lowbit import streaming
    torch.set_num_threads(1)

    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

    path, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    settings = FormatPlan(weights=QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64))
    if mode == "stream":
        reader = streaming.ShardReader(path)
        model, _ = load_skeleton(path, torch.float32)
        streaming.load_rest(model, get_adapter(model), reader, torch.float32)
        io = BlockIO(dtype=torch.float32, reader=reader, out_dir=Path(out))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    before = status("VmRSS")
    if mode != "stream":
        model, _ = load_model(path, torch.float32)
        io = None
    compress(model, get_adapter(model), settings, [get_step("rtn")()], ids, progress=False, io=io)
    print(json.dumps({"increase": status("VmHWM") - before}))
""")


def _peak_increase(model: Path, out: Path, mode: str) -> int:
    """Peak RSS over the RSS before blocks are loaded, in a fresh process (streamed: embeddings already in)."""
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(model), str(out), mode], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["increase"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux peak-RSS reset")
def test_streamed_peak_memory_is_bounded_by_a_block(tmp_path, tokenizer):
    """12 blocks of ~12.6 MB (float32): streaming them adds under six blocks' worth to the peak RSS (one block,
    its quantization temporaries, the shard being written and allocator slack, which varies from run to run),
    while loading the whole model adds at least half the blocks' total and twice the streamed increase."""
    layers, hidden, inter = 12, 512, 1536
    model = write_sharded(tmp_path / "deep", tokenizer, layers=layers, hidden=hidden, intermediate=inter,
                          dtype=torch.float32)
    block_bytes = (2 * hidden * hidden + 2 * hidden * hidden // 2 + 3 * hidden * inter + 2 * hidden) * 4
    streamed = _peak_increase(model, tmp_path / "out", "stream")
    assert streamed < 6 * block_bytes, (streamed, block_bytes)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) == layers
    in_memory = _peak_increase(model, tmp_path / "out-mem", "memory")
    assert in_memory > max(layers / 2 * block_bytes, 2 * streamed), (in_memory, streamed, block_bytes)


def _interrupt_at(monkeypatch, index: int) -> None:
    from lowbit.blockio import BlockIO

    original = BlockIO.load

    def load(self, mctx, i):
        if i == index:
            raise KeyboardInterrupt
        original(self, mctx, i)
    monkeypatch.setattr(BlockIO, "load", load)


@pytest.mark.parametrize("stream,offload", [(True, "none"), (False, "none"), (True, "disk")])
def test_resume_after_interruption_equals_uninterrupted(sharded, tmp_path, monkeypatch, stream, offload):
    base = recipe(sharded, stream=stream, activations={"bits": 8, "granularity": "tensor"})
    full = run_recipe(parse_recipe(base), tmp_path / "full", progress=False)
    base["offload"] = offload  # where activations live changes nothing, before or after the resume
    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(parse_recipe(base), tmp_path / "cut", progress=False)
    partial = staging(tmp_path, "cut")
    assert not (tmp_path / "cut").exists() and not (partial / "metrics.json").exists()
    assert [p.name for p in (partial / "checkpoint").iterdir() if p.name.startswith("block-")] == ["block-00002"]
    resumed = run_recipe(parse_recipe(base), progress=False, resume=tmp_path / "cut")
    assert resumed.out_dir == tmp_path / "cut" and not partial.exists()
    assert not (tmp_path / "cut" / "checkpoint").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert_same_weights(tmp_path / "full", tmp_path / "cut")
    assert resumed.metrics["ppl"]["ppl"] == full.metrics["ppl"]["ppl"]
    for name in ("quant_state.json", "quant_state.safetensors"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes()


def staging(folder: Path, name: str) -> Path:
    """The hidden folder an interrupted run of output `name` left (see lowbit.files.staging_path)."""
    (path,) = [p for p in folder.iterdir() if p.name.startswith(f".{name}.lowbit-partial.")]
    return path


def _interrupted(sharded, tmp_path, monkeypatch) -> tuple[dict, Path]:
    base = recipe(sharded, stream=True)
    with monkeypatch.context() as m:
        _interrupt_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(parse_recipe(base), tmp_path / "cut", progress=False)
    return base, staging(tmp_path, "cut")


def test_corrupted_checkpoint_is_refused(sharded, tmp_path, monkeypatch, capsys):
    base, partial = _interrupted(sharded, tmp_path, monkeypatch)
    target = partial / "checkpoint" / "block-00001" / "inputs.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(LowbitError, match="corrupted"):
        run_recipe(parse_recipe(base), progress=False, resume=partial)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(json.dumps(base))
    capsys.readouterr()
    assert main(["run", str(recipe_file), "--resume", str(tmp_path / "cut"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: checkpoint file") and err.count("\n") == 1
    assert staging(tmp_path, "cut").exists() and not (tmp_path / "cut").exists()


def test_foreign_checkpoint_is_refused(sharded, tmp_path, monkeypatch):
    base, partial = _interrupted(sharded, tmp_path, monkeypatch)
    other = {**base, "weights": {"bits": 3, "group_size": 32}}
    with pytest.raises(LowbitError, match="different recipe or model"):
        run_recipe(parse_recipe(other), progress=False, resume=partial)
    block = staging(tmp_path, "cut") / "model" / "model-00001-of-00004.safetensors"
    block.write_bytes(block.read_bytes()[:-8])
    with pytest.raises(LowbitError, match="corrupted"):
        run_recipe(parse_recipe(base), progress=False, resume=tmp_path / "cut")


def test_resumable_folder_survives_the_sweep_and_resumes(sharded, tmp_path, monkeypatch):
    """The next run in the same folder sweeps dead staging folders but keeps one holding a checkpoint."""
    base, partial = _interrupted(sharded, tmp_path, monkeypatch)
    run_recipe(parse_recipe({**base, "steps": ["rtn"]}), tmp_path / "other", progress=False)
    assert partial.exists()
    result = run_recipe(parse_recipe(base), progress=False, resume=partial)
    assert result.out_dir == tmp_path / "cut" and not partial.exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stream", [True, False])
def test_cpu_low_precision_models(tmp_path, tokenizer, dtype, stream):
    model = write_sharded(tmp_path / "m", tokenizer, dtype=dtype)
    result = run_recipe(parse_recipe(recipe(model, stream=stream, device="cpu")), tmp_path / "run", progress=False)
    assert result.metrics["dtype"] == str(dtype).removeprefix("torch.") and result.metrics["device"] == "cpu"
    saved = tensors(tmp_path / "run")
    assert all(t.dtype == dtype for t in saved.values())
    ref = run_recipe(parse_recipe(recipe(model, stream=stream, dtype="float32", save=False)), progress=False)
    assert result.metrics["ppl"]["ppl"] == pytest.approx(ref.metrics["ppl"]["ppl"], rel=0.02)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure on a machine without CUDA")
def test_cuda_request_without_cuda_fails_before_loading(tmp_path, capsys):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(json.dumps({"model": str(tmp_path / "does-not-exist"), "device": "cuda"}))
    assert main(["run", str(recipe_file), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: device cuda requested but no CUDA GPU") and err.count("\n") == 1
    assert main(["run", str(recipe_file), "--device", "cuda:1"]) == 2
    assert "cuda:1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [recipe_file]


def test_stream_refuses_whole_model_steps(sharded):
    with pytest.raises(LowbitError, match="step rotate changes every block"):
        run_recipe(parse_recipe(recipe(sharded, stream=True, steps=["rotate", "rtn"], save=False)), progress=False)


def test_plan_probes_one_block_and_estimates(sharded, tmp_path, capsys):
    from lowbit.plan import plan_run

    plan = plan_run(parse_recipe(recipe(sharded, stream=True)), probe=True)
    assert plan.streamed and plan.blocks == 3 and plan.block_bytes > 0 and plan.rest_bytes > 0
    assert all(t > 0 for t in plan.probe.values()) and plan.estimate_s > 0
    assert plan.peak["cpu"] > plan.block_bytes + plan.activation_bytes
    assert not [p for p in tmp_path.iterdir()]  # the probe writes nothing next to the run
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(json.dumps(recipe(sharded, stream=True)))
    assert main(["run", str(recipe_file), "--dry-run", "--no-probe", "--out", str(tmp_path / "out")]) == 0
    assert "| cpu |" in capsys.readouterr().out and not (tmp_path / "out").exists()


def test_budget_that_cannot_be_met_is_refused(sharded, tmp_path, capsys):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(json.dumps(recipe(sharded)))
    assert main(["plan", str(recipe_file), "--no-probe", "--max-memory", "100MB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: the run needs about") and "--max-memory allows 0.1 GB" in err
    assert main(["run", str(recipe_file), "--max-memory", "cpu=100MB", "--out", str(tmp_path / "out")]) == 2
    assert "--max-memory" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_run_far_over_free_memory_is_refused_unless_a_budget_is_given(sharded, tmp_path, capsys, monkeypatch):
    from lowbit import plan as plan_mod

    fixed = recipe(sharded, stream=False, offload="none")  # nothing to adapt: the need does not depend on the budget
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(json.dumps(fixed))
    need = plan_mod.plan_run(parse_recipe(fixed), probe=False).peak["cpu"]
    monkeypatch.setattr(plan_mod, "available", lambda _device: int(need / plan_mod.OVERCOMMIT) - 1)
    assert main(["run", str(recipe_file), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: the run needs about") and "GB free now" in err and "--max-memory" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    monkeypatch.setattr(plan_mod, "available", lambda _device: int(need / plan_mod.OVERCOMMIT) + 1)  # tight, not far
    assert main(["run", str(recipe_file), "--dry-run", "--no-probe", "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    monkeypatch.setattr(plan_mod, "available", lambda _device: 1)  # a budget given overrides what is free
    assert main(["run", str(recipe_file), "--dry-run", "--no-probe", "--max-memory", f"{need}B"]) == 0


def test_run_without_budget_offloads_activations_that_do_not_fit_what_is_free(sharded, tmp_path, monkeypatch):
    from lowbit import activations, plan as plan_mod, run as run_mod

    base = recipe(sharded, stream=True, calibration={"data": str(TEXT), "n_samples": 512, "seq_len": 32})
    roomy = plan_mod.plan_run(parse_recipe(base), probe=False)
    free = roomy.peak["cpu"] - roomy.activation_bytes // 2  # the activations do not fit, the rest does
    monkeypatch.setattr(plan_mod, "available", lambda _device: free)
    places = []

    def store(place, *args):
        places.append(place)
        return activations.ActivationStore(place, *args)
    monkeypatch.setattr(run_mod, "ActivationStore", store)
    run_recipe(parse_recipe({**base, "evaluation": None}), tmp_path / "run", progress=False)
    assert places == ["disk"]


@pytest.mark.parametrize("key", ["calibration", "evaluation"])
def test_window_longer_than_the_model_context_is_refused_before_loading(sharded, tmp_path, capsys, key):
    data = recipe(sharded)
    data[key] = {**data[key], "seq_len": 1024}  # the test model has 512 positions
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(json.dumps(data))
    assert main(["run", str(recipe_file), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"lowbit: error: {key}.seq_len 1024 is longer than the model's context (512 "
                                       f"positions): use at most 512\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("steps", [["gptq"], [{"lwc": {"epochs": 1}}], [{"qdrop": {"iters": 4, "n_samples": 4}}]])
@pytest.mark.parametrize("stream", [True, False])
def test_offloaded_activations_give_the_same_run(sharded, tmp_path, steps, stream):
    """Calibration activations memory-mapped on disk: the same weights and perplexity as kept in memory."""
    base = recipe(sharded, steps=steps, stream=stream)
    if steps[0] != "gptq":
        base["activations"] = {"bits": 8, "granularity": "tensor"}
    mem = run_recipe(parse_recipe({**base, "offload": "none"}), tmp_path / "mem", progress=False)
    disk = run_recipe(parse_recipe({**base, "offload": "disk"}), tmp_path / "disk", progress=False)
    if stream:
        assert_same_weights(tmp_path / "mem", tmp_path / "disk")
    assert disk.metrics["ppl"]["ppl"] == mem.metrics["ppl"]["ppl"]
    assert not list(tmp_path.glob("**/lowbit-acts-*"))  # mapped files are unlinked at once


def test_disk_store_is_a_file_mapping():
    from lowbit.activations import ActivationStore

    before = Path("/proc/self/maps").read_text().count("lowbit-acts-")
    x = ActivationStore("disk").empty((64, 128), torch.float32)
    x[3] = 7.0
    assert Path("/proc/self/maps").read_text().count("lowbit-acts-") == before + 1  # backed by an unlinked file
    assert float(x.sum()) == 7.0 * 128  # zero-filled elsewhere
    y = ActivationStore("disk").put(torch.arange(6.0).view(2, 3))
    assert torch.equal(y, torch.arange(6.0).view(2, 3))


def test_budget_offloads_activations_instead_of_refusing(sharded, tmp_path):
    from lowbit.plan import plan_run

    base = recipe(sharded, stream=True, calibration={"data": str(TEXT), "n_samples": 512, "seq_len": 32})
    roomy = plan_run(parse_recipe(base), probe=False)
    assert roomy.offload == "device"
    need_without = roomy.peak["cpu"] - roomy.activation_bytes
    tight = {**base, "max_memory": f"cpu={need_without + roomy.activation_bytes // 2}"}
    plan = plan_run(parse_recipe(tight), probe=False)
    assert plan.offload == "disk" and plan.peak["cpu"] <= plan.budget["cpu"]
    with pytest.raises(LowbitError, match="offload: disk"):
        plan_run(parse_recipe({**tight, "offload": "none"}), probe=False)


@pytest.mark.parametrize("stream", [True, False])
def test_resumed_sparse_run_keeps_the_finished_blocks_masks(sharded, tmp_path, monkeypatch, stream):
    base = recipe(sharded, stream=stream, weights={"bits": 4, "group_size": 32},
                  steps=[{"sparsegpt": {"ratio": 0.5}}, "gptq"])
    full = run_recipe(parse_recipe(base), tmp_path / "full", progress=False)
    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(parse_recipe(base), tmp_path / "cut", progress=False)
    resumed = run_recipe(parse_recipe(base), progress=False, resume=tmp_path / "cut")
    assert_same_weights(tmp_path / "full", tmp_path / "cut")
    assert resumed.metrics.get("sparsity") == full.metrics.get("sparsity")
    assert len(resumed.state.masks) == len(full.state.masks) == 3 * 7
    for name in ("quant_state.json", "quant_state.safetensors"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes()


def test_tensors_written_from_memory_reload_exactly_and_hash_as_the_file(tmp_path):
    """Checkpoint inputs and block shards are written without safetensors' serialized copy: every dtype, empty
    and 0-dim tensors and non-contiguous views reload as the same bits, and the digest fed while writing is the
    file's checksum."""
    import xxhash
    from safetensors.torch import load_file

    from lowbit.checkpoint import file_checksum

    tensors = {"inputs": torch.randn(3, 5, 7), "view": torch.randn(6, 4).t(), "bf16": torch.randn(9).bfloat16(),
               "f16": torch.randn(2, 2).half(), "f64": torch.randn(3).double(), "empty": torch.empty(0, 5),
               "rng": torch.get_rng_state(), "mask": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5),
               "ids": torch.arange(5)}
    digest = xxhash.xxh3_128()
    write_tensors(tmp_path / "t.safetensors", tensors, {"format": "pt"}, digest=digest)
    back = load_file(str(tmp_path / "t.safetensors"))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert digest.hexdigest() == file_checksum(tmp_path / "t.safetensors")
