"""Sensitivity analysis and budgeted mixed precision: the knapsack solver, the budget as the size column counts it,
the resolved recipe, mixed exports, bad input."""
import itertools
import json

import gguf
import numpy as np
import pytest
import torch
import yaml

from lowbit.allocate import allocate, solve_mck
from lowbit.cli import main
from lowbit.formats import storage_bits
from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.export import export_run
from lowbit.loading import load_model
from lowbit.models import get_adapter
from lowbit.recipe import BudgetConfig, format_from_name, load_recipe, parse_recipe
from lowbit.report import model_size
from lowbit.run import run_recipe
from lowbit.runfolder import load_run
from lowbit.sensitivity import Candidate, heldout_windows, measure, solve_weight
from lowbit.verify import compare, load_exported


def _brute_force(costs, values, budget):
    best = None
    for choice in itertools.product(range(costs.shape[1]), repeat=costs.shape[0]):
        cost = sum(costs[i, c] for i, c in enumerate(choice))
        value = sum(values[i, c] for i, c in enumerate(choice))
        if cost <= budget and (best is None or value < best - 1e-12):
            best = value
    return best


@pytest.mark.parametrize("seed", range(8))
def test_knapsack_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, k = 6, 3
    costs = rng.integers(1, 40, (n, k)) * 7  # a common factor: the exact grid is in units of the gcd
    values = rng.normal(size=(n, k))
    lo, hi = costs.min(1).sum(), costs.max(1).sum()
    coarse_seen = False
    for budget in np.linspace(lo, hi, 5).astype(int):
        sol = solve_mck(costs, values, int(budget))
        assert sol.exact and sol.cost <= budget
        assert sol.cost == sum(costs[i, c] for i, c in enumerate(sol.choice))
        assert sol.value == pytest.approx(_brute_force(costs, values, budget), abs=1e-9)
        coarse = solve_mck(costs, values, int(budget), max_cells=n * 4)  # forced coarse grid: still within budget
        assert coarse.cost <= budget and coarse.value >= sol.value - 1e-9
        coarse_seen |= not coarse.exact
    assert coarse_seen


TINY_RECIPE = {"threads": 2, "evaluation": None, "calibration": {"n_samples": 4, "seq_len": 64},
               "weights": {"bits": 4, "symmetric": False, "group_size": 32}}


def _tiny_table(path, formats, metric="hessian"):
    """A sensitivity table of the tiny Llama (RTN solver) and the objects the allocator needs."""
    model, tokenizer = load_model(str(path))
    adapter = get_adapter(model)
    tokens = tokenize(tokenizer, load_text("wikitext2", "validation")[:100000])
    calib = calibration_windows(tokens, 4, 64, 0)
    recipe = parse_recipe({**TINY_RECIPE, "model": str(path)})
    cands = {f: Candidate(f, format_from_name(f, recipe.weights).spec(), recipe.weights.observer) for f in formats}
    table = measure(model, adapter, cands, None, lambda n: True, calib, heldout_windows(tokens, 4, 64, 2, 0),
                    [metric] if isinstance(metric, str) else metric, progress=False)
    linears = {f"{adapter.block_name(i)}.{r}": m for i, b in enumerate(adapter.blocks(model))
               for r, m in adapter.linears(b).items()}
    return model, adapter, table, cands, linears, tokens, calib


def test_allocation_is_optimal_and_meets_the_budget_as_the_size_column_counts(tiny_llama):
    model, _, table, cands, linears, _, _ = _tiny_table(tiny_llama, ["w2g32", "w4g32"])
    names = list(linears)
    values = table.values("hessian", names, list(cands))
    costs = np.array([[storage_bits(cands[f].spec, tuple(linears[n].weight.shape)) for f in cands] for n in names])
    for avg in (2.6, 3.3, 4.0):
        alloc = allocate(table, cands, linears, model, BudgetConfig(avg_bits=avg), "hessian")
        n_weights = sum(m.weight.numel() for m in linears.values())
        assert alloc.bits <= avg * n_weights and alloc.exact
        assert alloc.predicted == pytest.approx(_brute_force(costs, values, int(avg * n_weights)), rel=1e-9)
    # a size_mb budget: the whole model as `model_size` counts it stays within the budget
    rest = model_size(model, None) * 8 - 16 * sum(m.weight.numel() for m in linears.values())
    size = (rest + (costs.min(1).sum() + costs.max(1).sum()) / 2) / 8e6
    alloc = allocate(table, cands, linears, model, BudgetConfig(size_mb=size), "hessian")
    assert (rest + alloc.bits) / 8e6 <= size and alloc.predicted == pytest.approx(
        _brute_force(costs, values, int(size * 8e6 - rest)), rel=1e-9)


def test_hessian_metric_is_the_heldout_output_error_and_loss_metric_the_model_loss(tiny_llama):
    model, adapter, table, cands, linears, tokens, calib = _tiny_table(tiny_llama, ["w2g32", "w3g32"], "loss")
    heldout = heldout_windows(tokens, 4, 64, 2, 0)
    name = "model.layers.1.mlp.down_proj"
    lin = linears[name]
    inputs = []
    handle = lin.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        base = model(heldout, labels=heldout).loss.item()
    handle.remove()
    x = torch.cat(inputs)
    w = lin.weight.data.clone()
    q = solve_weight(w, None, cands["w2g32"], None)
    expected = 2 * ((x @ (w - q).T) ** 2).sum().item() / x.shape[0]
    assert table.layers[name]["hessian"]["w2g32"] == pytest.approx(expected, rel=1e-4)
    lin.weight.data.copy_(q)
    with torch.no_grad():
        quantized = model(heldout, labels=heldout).loss.item()
    lin.weight.data.copy_(w)
    assert table.layers[name]["loss"]["w2g32"] == pytest.approx(quantized - base, abs=2e-5)
    assert table.base_loss == pytest.approx(base, abs=2e-5)
    assert set(table.blocks) == {"model.layers.0", "model.layers.1"}


def test_fisher_metric_weights_each_output_channel_error_by_the_loss_gradient(tiny_llama):
    """fisher = 1/4 sum_c E_t[(dL/dy_tc)^2] (2 E_t[dy_tc^2]) for L the summed held-out loss, computed here with
    autograd on the model directly; it sits next to the hessian value of the same solve and is non-negative."""
    model, _, table, cands, linears, tokens, _ = _tiny_table(tiny_llama, ["w2g32", "w3g32"], ["fisher", "loss"])
    heldout = heldout_windows(tokens, 4, 64, 2, 0)
    name = "model.layers.0.self_attn.o_proj"
    lin = linears[name]
    seen = {}

    def keep(_m, args, out):
        seen["x"] = args[0].detach().reshape(-1, args[0].shape[-1])
        out.retain_grad()
        seen["y"] = out

    handle = lin.register_forward_hook(keep)
    model.zero_grad()
    model(heldout, labels=heldout).loss.mul(heldout[:, 1:].numel()).backward()
    handle.remove()
    model.zero_grad()
    g = seen["y"].grad.double().reshape(-1, lin.out_features).pow(2).mean(0)
    x, w = seen["x"].double(), lin.weight.data.double()
    for fmt in ("w2g32", "w3g32"):
        d = w - solve_weight(lin.weight.data, None, cands[fmt], None).double()
        per_channel = 2 * ((x @ d.T) ** 2).sum(0) / x.shape[0]
        assert table.layers[name]["fisher"][fmt] == pytest.approx(0.25 * (g * per_channel).sum().item(), rel=1e-4)
        assert table.layers[name]["hessian"][fmt] == pytest.approx(per_channel.sum().item(), rel=1e-4)
    assert set(table.spearman()) == {"hessian", "fisher"}
    assert all(row["fisher"]["w2g32"] > 0 for row in table.layers.values())


def test_budget_run_resolves_to_a_layers_map_that_reruns_identically(tiny_llama, tmp_path):
    recipe = parse_recipe({**TINY_RECIPE, "model": str(tiny_llama), "steps": [{"gptq": {"act_order": True}}],
                           "budget": {"avg_bits": 3.2, "formats": ["w2g32", "w3g32", "w4g32"]}})
    result = run_recipe(recipe, tmp_path / "run", progress=False)
    alloc = result.metrics["allocation"]
    assert alloc["avg_bits"] <= 3.2 and len(set(alloc["formats"].values())) > 1
    counted = sum(storage_bits(rec.spec, tuple(result.model.get_submodule(n).weight.shape))
                  for n, rec in result.state.weights.items())
    assert counted == alloc["bits"]
    assert result.metrics["size_mb"] == pytest.approx(model_size(result.model, result.state) / 1e6)
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["budget"] is None
    for name, fmt in alloc["formats"].items():
        assert saved["layers"][name]["bits"] == int(fmt[1]) and result.state.weights[name].spec.bits == int(fmt[1])
    rerun = run_recipe(load_recipe(tmp_path / "run" / "recipe.yaml", ["save=false"]), progress=False)
    for name, rec in result.state.weights.items():
        assert rerun.state.weights[name].spec == rec.spec
        assert torch.equal(rerun.model.get_submodule(name).weight, result.model.get_submodule(name).weight)


def test_mixed_compressed_tensors_export_has_the_assigned_formats_and_reloads(tiny_llama, tmp_path, text_windows):
    recipe = parse_recipe({**TINY_RECIPE, "model": str(tiny_llama), "target": "compressed-tensors",
                           "budget": {"avg_bits": 5.5, "formats": ["w4g32", "w8"]}})
    run = run_recipe(recipe, tmp_path / "run", progress=False)
    assigned = run.metrics["allocation"]["formats"]
    assert set(assigned.values()) == {"w4g32", "w8"}
    out = export_run(tmp_path / "run", "compressed-tensors", tmp_path / "ct", dtype="float32").path
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    exported = {t: (g["weights"]["num_bits"], g["weights"]["group_size"]) for g in groups.values() for t in g["targets"]}
    assert exported == {n: (4, 32) if f == "w4g32" else (8, None) for n, f in assigned.items()}
    simulated, _, _ = load_run(tmp_path / "run")
    comparison = compare(simulated, load_exported(out), text_windows)
    assert comparison.ppl_rel_diff < 1e-4 and comparison.top1_agreement > 0.99
    assert main(["verify", str(tmp_path / "run"), str(out), "--max-tokens", "512", "--seq-len", "128",
                 "--quiet"]) == 0


def test_mixed_gguf_export_has_one_type_per_tensor_as_assigned(tiny_llama, tmp_path, text_windows):
    recipe = parse_recipe({**TINY_RECIPE, "model": str(tiny_llama), "target": "gguf",
                           "weights": {"format": "gguf", "type": "q4_0"},
                           "budget": {"avg_bits": 6.0, "formats": ["q4_0", "q8_0"]}})
    run = run_recipe(recipe, tmp_path / "run", progress=False)
    assigned = run.metrics["allocation"]["formats"]
    assert set(assigned.values()) == {"q4_0", "q8_0"}
    result = export_run(tmp_path / "run", "gguf", tmp_path / "m.gguf", dtype="float32")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(result.path).tensors}
    blk = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
    for name, fmt in assigned.items():
        i, rel = name.split(".")[2], ".".join(name.split(".")[3:])
        assert types[f"blk.{i}.{blk[rel]}.weight"] == fmt.upper()
    simulated, _, _ = load_run(tmp_path / "run")
    comparison = compare(simulated, load_exported(result.path), text_windows)
    assert comparison.ppl_rel_diff < 0.002 and comparison.top1_agreement > 0.98


def _cli(capsys, *argv):
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("budget, extra, match", [
    ("avg_bits=1.5", [], "below the smallest candidate assignment (all w2g32"),
    ("avg_bits=9", [], "above the largest candidate assignment (all w8"),
    ("formats=[w4g32,w9g64]", [], "unknown format name 'w9g64'"),
    ("formats=[w3g32,w4g32]", ["--set", "target=compressed-tensors"],
     "candidate format w3g32 cannot be served by target compressed-tensors"),
])
def test_bad_budget_input_is_one_line_naming_the_fix(capsys, tiny_llama, tmp_path, budget, extra, match):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**TINY_RECIPE, "model": str(tiny_llama),
                                    "budget": {"avg_bits": 3, "formats": ["w2g32", "w4g32", "w8"]}}))
    code, err = _cli(capsys, "run", str(path), "--budget", budget, "--no-save", "--quiet", *extra)
    assert code == 2 and err.startswith("lowbit: error: ") and "\n" not in err and match in err, err


def test_sensitivity_cli_writes_table_heatmap_and_top_ten(capsys, tiny_llama, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**TINY_RECIPE, "model": str(tiny_llama)}))
    capsys.readouterr()
    assert main(["sensitivity", str(path), "--formats", "w2g32,w4g32", "--metric", "hessian,loss", "--heldout", "2",
                 "--out", str(tmp_path / "s"), "--quiet"]) == 0
    out = capsys.readouterr().out
    table = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert len(table["layers"]) == 14 and set(table["spearman"]["hessian"]) == {"w2g32", "w4g32", "all"}
    top = [line.split()[0] for line in out.splitlines()[1:11]]
    by_loss = sorted(table["layers"], key=lambda n: -table["layers"][n]["loss"]["w2g32"])
    assert top == by_loss[:10]
    assert (tmp_path / "s" / "sensitivity.png").stat().st_size > 10000


@pytest.mark.slow
def test_embedded_sensitivity_orders_formats_and_allocation_beats_uniform_prediction(embedded, tokenizer):
    model, _ = embedded
    adapter = get_adapter(model)
    tokenizer_tokens = tokenize(tokenizer, load_text("wikitext2", "validation"))
    calib = calibration_windows(tokenizer_tokens, 4, 128, 0)
    recipe = parse_recipe({"weights": {"bits": 4, "symmetric": False, "group_size": 64}, "evaluation": None})
    names = ["w2g64", "w3g64", "w4g64"]
    cands = {f: Candidate(f, format_from_name(f, recipe.weights).spec(), "minmax") for f in names}
    table = measure(model, adapter, cands, None, lambda n: True, calib, heldout_windows(tokenizer_tokens, 4, 128, 2, 0),
                    ["hessian"], progress=False)
    assert len(table.layers) == 7 * 30
    for row in table.layers.values():
        assert row["hessian"]["w2g64"] > row["hessian"]["w3g64"] > row["hessian"]["w4g64"] > 0
    linears = {f"{adapter.block_name(i)}.{r}": m for i, b in enumerate(adapter.blocks(model))
               for r, m in adapter.linears(b).items()}
    w3_bits = 3 + 19 / 64
    alloc = allocate(table, cands, linears, model, BudgetConfig(avg_bits=w3_bits), "hessian")
    uniform = sum(row["hessian"]["w3g64"] for row in table.layers.values())
    assert alloc.exact and alloc.avg_bits <= w3_bits and alloc.predicted <= uniform
    assert len(set(alloc.formats.values())) > 1


def test_stacked_group_solve_equals_each_linear_alone():
    from lowbit.sensitivity import _solve_group
    from lowbit.steps.gptq import GPTQArgs

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen) * torch.linspace(0.2, 3, 64)
    h = 2 * x.T @ x / 256
    weights = {"q": torch.randn(64, 64, generator=gen), "k": torch.randn(32, 64, generator=gen)}
    args = GPTQArgs(act_order=True, observer="mse")
    cand = Candidate("w3g32", format_from_name("w3g32", None).spec(), "mse")
    stacked = _solve_group(weights, h, cand, args)
    for rel, w in weights.items():
        torch.testing.assert_close(stacked[rel], solve_weight(w, h, cand, args), rtol=0, atol=1e-5)
