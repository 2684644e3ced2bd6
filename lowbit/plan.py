"""Plan a run before running it: peak memory per device, disk space and time, against a memory budget.

Memory and disk come from the checkpoint's shard headers and config (nothing is loaded); time comes from a
short timed probe: the recipe's steps on the first block with a few calibration windows, scaled to all
blocks and windows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import psutil
import torch

from lowbit.activations import choose_place
from lowbit.errors import LowbitError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes in a size like `4GB`, `512MiB` or `1e9`."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise LowbitError(f"memory size {text!r} is not understood: write e.g. 4GB, 512MiB or 8e9")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_memory(spec: str | None) -> dict[str, int]:
    """`4GB` (every device) or `cpu=8GB,cuda:0=20GB` -> bytes per device name (`*` for every device)."""
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        device, sep, size = part.rpartition("=")
        out[device.strip() if sep else "*"] = parse_size(size)
    return out


def available(device: torch.device) -> int:
    """Memory free on a device now: the GPU's free memory, else the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def memory_budget(spec: str | None, device: torch.device) -> int:
    """The budget for `device` from `--max-memory` (its own entry, else the `*` one), else what is free."""
    budgets = parse_memory(spec)
    for key in (str(device), device.type, "*"):
        if key in budgets:
            return budgets[key]
    return available(device)


OVERCOMMIT = 1.5  # without --max-memory, a run estimated this far over the free memory is refused (estimates err high)
RUNTIME_BYTES = 450 * 10**6  # resident size of a process with torch and transformers imported (measured)
SOLVERS = ("gptq", "sparsegpt", "wanda")  # steps that hold a float32 Hessian per input group of a block


@dataclass
class Plan:
    """What a run will need, per device, before it starts."""

    model: str
    dtype: str
    device: str
    streamed: bool
    blocks: int
    block_bytes: int  # the largest decoder block, in the run's dtype
    rest_bytes: int  # embeddings, final norm, head
    activation_bytes: int  # calibration activations held across a block
    work_bytes: int  # one batch's forward intermediates plus the solver's float32 state
    peak: dict[str, int]  # device -> bytes
    budget: dict[str, int]  # device -> bytes (given or free now)
    disk_bytes: int
    offload: str = "device"  # where calibration activations live: device | cpu | disk (lowbit.activations)
    probe: dict | None = None  # windows -> seconds for one block
    estimate_s: float | None = None


def gram_bytes(n: int) -> int:
    """Memory of an n-wide float64 XᵀX sum kept on and above the diagonal in strips (steps.gptq.UpperGram)."""
    strip = max(128, -(-n // 8))
    return sum(min(strip, n - a) * (n - a) for a in range(0, n, strip)) * 8


def solver_bytes(groups: list[tuple[int, int]], tokens: int, forward: int, item: int) -> int:
    """Peak working memory of a Hessian solver on one block, whose input groups are (width n, stacked rows), in
    the order the pipeline visits them. Three phases, the largest counts: the statistics pass (forward
    intermediates, one batch's buffered group inputs, every group's float64 sum, the widest input in float32
    and one strip's float32 product with its float64 sum); turning the sums into float32 Hessians one by one;
    solving each group while the later ones wait (its Hessian and factor, three float32 copies of its weights)."""
    widths = [n for n, _ in groups]
    widest = max(widths)
    strip = max(128, -(-widest // 8))
    statistics = (forward + tokens * sum(widths) * item + sum(gram_bytes(n) for n in widths)
                  + tokens * widest * 4 + strip * widest * 12)
    convert = max(sum(4 * m * m for m in widths[:k]) + gram_bytes(n) + 4 * n * n for k, n in enumerate(widths))
    solve = max(sum(4 * m * m for m in widths[k:]) + 4 * n * n + 3 * 4 * rows * n
                for k, (n, rows) in enumerate(groups))
    return max(statistics, convert, solve)


def plan_run(recipe, probe: bool = True, progress: bool = False) -> Plan:
    """Peak memory per device, disk and (with `probe`) time of `recipe`; refuses a budget it cannot meet."""
    from lowbit.devices import resolve_device, resolve_dtype
    from lowbit.loading import empty_model, resolve_model_path
    from lowbit.models import get_adapter
    from lowbit.run import use_streaming

    device = resolve_device(recipe.device)
    steps = recipe.build_steps()
    model_path = resolve_model_path(recipe.model)
    dtype = resolve_dtype(recipe.dtype, model_path)
    streamed = use_streaming(recipe, model_path, dtype, steps)
    model = empty_model(recipe.model, dtype)
    adapter, config = get_adapter(model), model.config.get_text_config()
    blocks = adapter.blocks(model)
    item = dtype.itemsize
    block_bytes = max(sum(p.numel() for p in b.parameters()) for b in blocks) * item
    unique = {id(p): p.numel() for p in model.parameters()}
    rest_bytes = sum(unique.values()) * item - len(blocks) * block_bytes
    cal, hidden = recipe.calibration, config.hidden_size
    copies = 2 + 2 * any(s.needs_fp_targets for s in steps)
    activation_bytes = copies * cal.n_samples * cal.seq_len * hidden * item
    batch = min(cal.batch_size, cal.n_samples)
    inter = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", 4 * hidden)
    forward = batch * cal.seq_len * (3 * inter + 6 * hidden) * item
    if model.config._attn_implementation == "eager":  # scores and probabilities materialized (SDPA keeps neither)
        forward += 2 * batch * config.num_attention_heads * cal.seq_len ** 2 * item
    linears = adapter.linears(blocks[0])
    largest = max(lin.weight.numel() for lin in linears.values())
    if any(s.name in SOLVERS for s in steps):
        groups = [(linears[g[0]].in_features, sum(linears[r].out_features for r in g)) for g in adapter.input_groups()]
        work_bytes = solver_bytes(groups, batch * cal.seq_len, forward, item)
    else:
        work_bytes = forward + 3 * largest * 4
    evaluation = 0
    if recipe.evaluation:
        ev = recipe.evaluation
        windows = (ev.max_tokens or 300_000) // ev.seq_len
        evaluation = ev.batch_size * ev.seq_len * config.vocab_size * 4 * 3
        if streamed:
            evaluation += windows * ev.seq_len * hidden * item
    weights = rest_bytes + (block_bytes if streamed else len(blocks) * block_bytes)
    on_gpu = device.type != "cpu"
    budget = {d: memory_budget(recipe.max_memory, torch.device(d)) for d in ["cpu"] + [str(device)] * on_gpu}

    def peaks(acts_on_device: int, acts_on_host: int) -> dict[str, int]:
        compute = acts_on_device + work_bytes + (block_bytes if streamed else 0)  # on the device
        if streamed:  # phases: capture (embeddings), block loop (rest freed), evaluation (rest + one block)
            host = max(rest_bytes + acts_on_host, block_bytes + acts_on_host, rest_bytes + block_bytes + evaluation)
        else:
            host = weights + acts_on_host + evaluation
        peak = {"cpu": RUNTIME_BYTES + (host if on_gpu else max(host, compute + (0 if streamed else weights)))}
        if on_gpu:
            peak[str(device)] = compute + (block_bytes if not streamed else 0)
        return peak

    without = peaks(0, 0)  # everything but the activations
    host_room = budget["cpu"] - without["cpu"]
    place = choose_place(recipe.offload, device, activation_bytes,
                         budget[str(device)] - without[str(device)] if on_gpu else host_room, host_room)
    peak = peaks(activation_bytes * (place == "device"), activation_bytes * (place == "cpu" and on_gpu))
    disk = weights + (len(blocks) - 1) * block_bytes * streamed + 2 * activation_bytes
    disk += 0 if streamed else len(blocks) * block_bytes  # checkpointed blocks of an in-memory run
    disk += activation_bytes * (place == "disk")
    plan = Plan(recipe.model, str(dtype).removeprefix("torch."), str(device), streamed, len(blocks), block_bytes,
                rest_bytes, activation_bytes, work_bytes, peak, budget, disk, place)
    fixes = ("set stream: true, offload: disk, fewer calibration samples, a shorter calibration.seq_len or a "
             "smaller calibration.batch_size")
    for d, need in peak.items():
        if recipe.max_memory and need > budget[d]:
            raise LowbitError(f"the run needs about {need / 1e9:.1f} GB on {d} but --max-memory allows "
                              f"{budget[d] / 1e9:.1f} GB: {fixes}, or raise the budget")
        if not recipe.max_memory and need > OVERCOMMIT * budget[d]:
            raise LowbitError(f"the run needs about {need / 1e9:.1f} GB on {d}, far more than the "
                              f"{budget[d] / 1e9:.1f} GB free now: {fixes}; or give --max-memory to run anyway")
    if probe and streamed:
        plan.probe = {w: probe_block(recipe, w, progress) for w in (1, 2)}
        slope = plan.probe[2] - plan.probe[1]
        fixed = max(plan.probe[1] - slope, 0.0)
        plan.estimate_s = len(blocks) * (fixed + max(slope, 0.0) * cal.n_samples)
    return plan


def probe_block(recipe, windows: int, progress: bool = False) -> float:
    """Seconds to read, compress and write the first block with `windows` calibration windows."""
    import tempfile
    import time
    from pathlib import Path

    from lowbit import streaming
    from lowbit.blockio import BlockIO, ProbeDone
    from lowbit.data import calibration_windows, load_text, tokenize
    from lowbit.devices import resolve_device, resolve_dtype
    from lowbit.loading import load_skeleton, resolve_model_path
    from lowbit.models import get_adapter
    from lowbit.pipeline import compress

    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    path = resolve_model_path(recipe.model)
    dtype, device = resolve_dtype(recipe.dtype, path), resolve_device(recipe.device)
    reader = streaming.ShardReader(path)
    model, tokenizer = load_skeleton(recipe.model, dtype)
    adapter = get_adapter(model)
    streaming.load_rest(model, adapter, reader, dtype, with_head=False)
    cal = recipe.calibration
    text = next((name for name, _ in cal.mix() if name != "self"), "wikitext2")  # timing only: any text will do
    ids = calibration_windows(tokenize(tokenizer, load_text(text, cal.split)), windows, cal.seq_len, cal.seed)
    with tempfile.TemporaryDirectory(prefix="lowbit-probe-") as tmp:
        io = BlockIO(device, dtype, reader, Path(tmp), stop_after=1)
        start = time.perf_counter()
        try:
            compress(model, adapter, recipe.plan(), recipe.build_steps(), ids, progress=progress, io=io)
        except ProbeDone:
            pass
        return time.perf_counter() - start


def plan_table(plan: Plan) -> str:
    """The plan as a short report."""
    gb = 1e9
    lines = [f"model {plan.model}: {plan.blocks} blocks of {plan.block_bytes / gb:.2f} GB, embeddings/norm/head "
             f"{plan.rest_bytes / gb:.2f} GB, {plan.dtype} on {plan.device}, "
             f"{'one block in memory at a time (streamed)' if plan.streamed else 'whole model in memory'}",
             f"calibration activations {plan.activation_bytes / gb:.2f} GB "
             f"({'on the device' if plan.offload == 'device' else 'offloaded to ' + plan.offload}), "
             f"per-block work (forward batch, solver) {plan.work_bytes / gb:.2f} GB",
             "| device | peak memory GB (estimate) | budget GB |", "|---|---|---|"]
    for d, need in plan.peak.items():
        lines.append(f"| {d} | {need / gb:.2f} | {plan.budget[d] / gb:.2f} |")
    lines.append(f"disk: {plan.disk_bytes / gb:.2f} GB (output model and checkpoints)")
    if plan.probe:
        probes = ", ".join(f"{w} window(s) {t:.1f} s" for w, t in plan.probe.items())
        lines.append(f"probe on block 0: {probes}; estimated compression time {plan.estimate_s / 60:.1f} min")
    elif not plan.streamed:
        lines.append("no time probe (it reads one block from safetensors shards: give a local model folder)")
    return "\n".join(lines)
