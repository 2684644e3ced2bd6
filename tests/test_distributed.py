"""Data-parallel calibration: 2-process Gloo runs (launched here as torchrun would, bounded by timeouts) on a tiny
Llama give the statistics, decisions and saved weights of one process; only rank 0 writes; a lost rank ends the run."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lowbit.recipe import parse_recipe
from lowbit.run import run_recipe

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # hard bound on one launched job


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    from lowbit.data import load_text

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(load_text("wikitext2", "validation")[:30000])
    return path


def recipe(model: str, text: Path, **over) -> dict:
    """Smoothing with a searched alpha, GPTQ, static activations: Hessians, ranges and a grid search in one run.

    Batches of 2 windows: rank 0 holds the first batch, rank 1 the second, each computed as one process would."""
    data = {"name": "dp", "model": model, "threads": 1, "weights": {"bits": 4, "group_size": 32},
            "activations": {"bits": 8, "granularity": "tensor", "dynamic": False},
            "steps": [{"smoothquant": {"alpha_grid": [0.2, 0.5, 0.8], "search_samples": 3}}, "gptq"],
            "calibration": {"data": str(text), "n_samples": 4, "seq_len": 32, "batch_size": 2},
            "evaluation": {"data": str(text), "seq_len": 64, "max_tokens": 320, "baseline": False}}
    data.update(over)
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argvs: list[list[str]], cwds: list[Path], timeout_s: float = 60) -> list[subprocess.Popen]:
    """One process per rank with the environment torchrun gives (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    port, n = free_port(), len(argvs)
    procs = []
    for rank, (argv, cwd) in enumerate(zip(argvs, cwds)):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LOWBIT_DIST_TIMEOUT": str(timeout_s)}
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(proc: subprocess.Popen, timeout_s: float = TIMEOUT_S) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"a rank did not end within {timeout_s} s: {err[-2000:]}")
    return proc.returncode, out, err


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def run_ranks(tmp_path: Path, data: dict, n: int = 2) -> tuple[Path, list[Path]]:
    """`lowbit run` on `n` ranks, each in its own empty working folder; returns the output and those folders."""
    rec = write_recipe(tmp_path / "recipe.yaml", data)
    out = tmp_path / "out" / "run"
    out.parent.mkdir()
    cwds = [tmp_path / f"cwd{r}" for r in range(n)]
    for c in cwds:
        c.mkdir()
    procs = launch([["-m", "lowbit", "run", str(rec), "--out", str(out), "--quiet"]] * n, cwds)
    for rank, proc in enumerate(procs):
        code, stdout, stderr = finish(proc)
        assert code == 0, f"rank {rank}: {stderr[-3000:]}"
        assert ("saved to" in stdout) == (rank == 0)
    return out, cwds


def alphas(run: Path) -> list[str]:
    return [line.split("smoothquant", 1)[1] for line in (run / "run.log").read_text().splitlines()
            if "smoothquant" in line and "alpha" in line]


def test_two_ranks_equal_one_process(tiny_dirs, text, tmp_path):
    data = recipe(tiny_dirs["llama"], text)
    single = run_recipe(parse_recipe(data), tmp_path / "single", progress=False)
    out, cwds = run_ranks(tmp_path, data)
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]  # no leftovers beside it
    assert all(not any(c.iterdir()) for c in cwds)  # nothing written where ranks ran
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ranks"] == 2 and single.metrics["ranks"] == 1
    assert alphas(out) == alphas(single.out_dir) and alphas(out)  # the same alpha chosen at every site
    assert abs(metrics["ppl"]["ppl"] - single.metrics["ppl"]["ppl"]) < 1e-3 * single.metrics["ppl"]["ppl"]
    assert metrics["ppl"]["tokens"] == single.metrics["ppl"]["tokens"]
    a, b = (load_file(str(r / "model" / "model.safetensors")) for r in (single.out_dir, out))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)
    sa, sb = (load_file(str(r / "quant_state.safetensors")) for r in (single.out_dir, out))
    scales = [k for k in sa if k.endswith("inputs_scale")]
    assert scales and sa.keys() == sb.keys()
    for k in sa:  # static activation ranges and weight scales
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=k)
    blocks = [json.loads(line) for line in (out / "blocks.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (single.out_dir / "blocks.jsonl").read_text().splitlines()]
    assert [b["windows"] for b in blocks] == [r["windows"] for r in ref]
    for b, r in zip(blocks, ref):
        assert b["output_rel_error"] == pytest.approx(r["output_rel_error"], rel=1e-4)


def test_searches_on_gathered_windows_equal_one_process(tiny_dirs, text, tmp_path):
    """AWQ's scale and clipping searches and OS token clipping (quantiles over every token) see the same windows and
    tokens on every rank as in one process, so two ranks write the same weights and ranges."""
    data = recipe(tiny_dirs["llama"], text, steps=[{"os": {"token_clipping": True}},
                                                   {"awq": {"search_samples": 3, "clip_tokens": 64}}],
                  evaluation=None)
    single = run_recipe(parse_recipe(data), tmp_path / "single", progress=False)
    out, _ = run_ranks(tmp_path, data)
    for name in ("model/model.safetensors", "quant_state.safetensors"):
        a, b = (load_file(str(r / name)) for r in (single.out_dir, out))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


_STATS = """
import sys, torch
from lowbit import distributed
from lowbit.context import BlockContext, FormatPlan, ModelContext
from lowbit.formats import QuantSpec
from lowbit.models import get_adapter
from lowbit.pipeline import capture_block_inputs
from lowbit.search import channel_ranges
from lowbit.state import QuantState
from lowbit.steps.gptq import accumulate_hessians
from transformers import AutoModelForCausalLM

distributed.init_from_env(torch.device("cpu"))
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.randint(0, 500, (8, 16), generator=torch.Generator().manual_seed(0))
adapter = get_adapter(model)
plan = FormatPlan(weights=QuantSpec(4), batch_size=2)  # rank 0 holds windows 0, 1, 4, 5; rank 1 2, 3, 6, 7
mctx = ModelContext(model, adapter, plan, QuantState(), distributed.shard(ids, 2))
inputs, args, kwargs = capture_block_inputs(model, adapter, mctx.calib_ids)
ctx = BlockContext(mctx, 0, adapter.blocks(model)[0], inputs, args, kwargs)
groups = [g for g in adapter.input_groups()]
out = {f"h.{k}": v for k, v in accumulate_hessians(ctx, groups).items()}
out.update({f"lo.{k}": v[0] for k, v in channel_ranges(ctx, [g[0] for g in groups]).items()})
out.update({f"hi.{k}": v[1] for k, v in channel_ranges(ctx, [g[0] for g in groups]).items()})
out["search"] = ctx.gathered_windows(5)
out["all"] = distributed.gather(ctx.q_inputs, 2)
if distributed.is_main():
    torch.save(out, sys.argv[2])
"""


def test_hessians_and_ranges_are_combined_over_ranks(tiny_dirs, tmp_path):
    single, double = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, "-c", _STATS, tiny_dirs["llama"], str(single)], check=True, timeout=TIMEOUT_S,
                   env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "1"})
    procs = launch([["-c", _STATS, tiny_dirs["llama"], str(double)]] * 2, [tmp_path] * 2)
    for proc in procs:
        code, _, err = finish(proc)
        assert code == 0, err[-3000:]
    a, b = torch.load(single), torch.load(double)
    assert a.keys() == b.keys() and any(k.startswith("h.") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize("fate", ["killed", "hung"])
def test_lost_rank_ends_the_run_with_an_error(tiny_dirs, text, tmp_path, fate):
    """Rank 1 stops inside its first Hessian collection; killed (its peer sees the closed connection) or left
    hanging (its peer's collective times out): rank 0 ends with one error line and no finished folder."""
    rec = write_recipe(tmp_path / "recipe.yaml", recipe(tiny_dirs["llama"], text, evaluation=None))
    out, ready = tmp_path / "out" / "run", tmp_path / "ready"
    out.parent.mkdir()
    cli = ["run", str(rec), "--out", str(out), "--quiet"]
    child = [str(ROOT / "tests" / "fault_child.py"), "lowbit.steps.gptq:accumulate_hessians", str(ready), "before",
             "--"]
    timeout_s = 15  # (ranks must reach their first collective within it even on a loaded machine)
    rank0, rank1 = launch([["-m", "lowbit", *cli], [*child, *cli]], [tmp_path, tmp_path], timeout_s=timeout_s)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not ready.exists():
            assert rank1.poll() is None and time.monotonic() < deadline, rank1.communicate()[1][-3000:]
            time.sleep(0.05)
        if fate == "killed":
            rank1.send_signal(signal.SIGKILL)
        began = time.monotonic()
        code, _, err = finish(rank0)
        waited = time.monotonic() - began
    finally:
        rank1.kill()
        rank1.communicate()
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("lowbit: error: rank 0: "), err[-3000:]
    assert "LOWBIT_DIST_TIMEOUT" in lines[-1] and ".cc:" not in lines[-1]  # no backend source paths
    assert waited < timeout_s + 30
    assert not out.exists()
    assert all(p.name.startswith(".") for p in out.parent.iterdir())  # at most a hidden staging folder


_INTERRUPT_AT_BLOCK_1 = """
import sys
from lowbit.blockio import BlockIO
from lowbit.cli import main

load = BlockIO.load


def stop(self, mctx, index):
    if index == 1:
        raise KeyboardInterrupt
    load(self, mctx, index)


BlockIO.load = stop
sys.exit(main(sys.argv[1:]))
"""


def test_two_ranks_resume_equals_one_uninterrupted_process(tiny_dirs, text, tmp_path):
    """Both ranks interrupted at block 1; `--resume` on two ranks reads rank 0's checkpoint (every rank's windows)
    and finishes with the weights of an uninterrupted single process."""
    data = recipe(tiny_dirs["llama"], text)
    single = run_recipe(parse_recipe(data), tmp_path / "single", progress=False)
    rec = write_recipe(tmp_path / "recipe.yaml", data)
    out = tmp_path / "out" / "run"
    out.parent.mkdir()
    cli = ["run", str(rec), "--out", str(out), "--quiet"]
    for rank, proc in enumerate(launch([["-c", _INTERRUPT_AT_BLOCK_1, *cli]] * 2, [tmp_path] * 2)):
        code, _, err = finish(proc)
        assert code == 130, f"rank {rank}: {err[-3000:]}"
    assert not out.exists()
    for rank, proc in enumerate(launch([["-m", "lowbit", "run", str(rec), "--resume", str(out), "--quiet"]] * 2,
                                       [tmp_path] * 2)):
        code, _, err = finish(proc)
        assert code == 0, f"rank {rank}: {err[-3000:]}"
    a, b = (load_file(str(r / "model" / "model.safetensors")) for r in (single.out_dir, out))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)
    assert not (out / "checkpoint").exists()


@pytest.mark.parametrize("ranks,batch", [(2, 1), (3, 2), (2, 3)])
def test_strided_shards_split_leading_windows(monkeypatch, ranks, batch):
    """Every window on exactly one rank in whole batches, and `leading(n)` of each shard together are exactly the
    first n windows."""
    from lowbit import distributed

    ids = torch.arange(12)[:, None]
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: ranks)
    shards, firsts = [], []
    for r in range(ranks):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shard = distributed.shard(ids, batch).flatten()
        assert all(int(w) // batch % ranks == r for w in shard)
        shards.append(shard)
        firsts.append(shard[:distributed.leading(5, batch)])
    assert sorted(torch.cat(shards).tolist()) == list(range(12))
    assert sorted(torch.cat(firsts).tolist()) == list(range(5))


def test_uneven_calibration_split_is_refused(monkeypatch):
    from lowbit import distributed
    from lowbit.errors import LowbitError
    from lowbit.run import shard_windows

    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    monkeypatch.setattr(distributed, "active", lambda: True)
    with pytest.raises(LowbitError, match="n_samples 6 does not split into whole batches of 2 over 4 ranks.*=8"):
        shard_windows(torch.zeros(6, 8, dtype=torch.long), 2)
    monkeypatch.setattr(distributed, "active", lambda: False)
    assert shard_windows(torch.zeros(6, 8, dtype=torch.long), 4).shape[0] == 6  # one process: any count


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_bad_collective_timeout_is_refused(monkeypatch, value):
    from lowbit import distributed
    from lowbit.errors import LowbitError

    monkeypatch.setenv(distributed.TIMEOUT_ENV, value)
    with pytest.raises(LowbitError, match="LOWBIT_DIST_TIMEOUT=.* is not a positive number of seconds"):
        distributed.timeout_s()


_LEARNED = """
import sys, torch
from lowbit import distributed
from lowbit.context import FormatPlan
from lowbit.formats import QuantSpec
from lowbit.models import get_adapter
from lowbit.pipeline import compress
from lowbit.steps.base import get_step
from transformers import AutoModelForCausalLM

distributed.init_from_env(torch.device("cpu"))
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.randint(0, 500, (4, 16), generator=torch.Generator().manual_seed(0))
plan = FormatPlan(weights=QuantSpec(3, group_size=32), activations=QuantSpec(8, granularity="tensor", dynamic=False),
                  batch_size=1)
steps = [get_step("lwc")(get_step("lwc").Args(epochs=2)), get_step("qdrop")(get_step("qdrop").Args(iters=6))]
compress(model, get_adapter(model), plan, steps, distributed.shard(ids), progress=False)
torch.save(model.state_dict(), f"{sys.argv[2]}.{distributed.rank()}")
"""


def test_learned_steps_take_the_same_steps_on_every_rank(tiny_dirs, tmp_path):
    """LWC then QDrop (with LSQ step sizes) on two ranks holding different windows: gradients averaged over ranks
    keep both ranks' weights identical."""
    out = tmp_path / "weights"
    for proc in launch([["-c", _LEARNED, tiny_dirs["llama"], str(out)]] * 2, [tmp_path] * 2):
        code, _, err = finish(proc)
        assert code == 0, err[-3000:]
    a, b = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
