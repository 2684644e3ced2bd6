"""Post-training sparsity: exact patterns and rates, allocation on target, no revival by later steps, the mask as
run state (save, reload, export, verify), refusals, and the method ranking on a real layer of the embedded model."""
import json

import pytest
import torch
import yaml
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from conftest import make_tiny
from safetensors.torch import load_file

from lowbit.cli import main
from lowbit.context import FormatPlan
from lowbit.errors import LowbitError
from lowbit.export import export_run
from lowbit.formats import QuantSpec
from lowbit.models import get_adapter
from lowbit.pipeline import compress
from lowbit.recipe import parse_recipe
from lowbit.run import run_recipe
from lowbit.runfolder import load_run
from lowbit.sparsity import Pattern, parse_pattern, prune_mask, sparsity_report
from lowbit.steps import Step, get_step
from lowbit.steps.gptq import accumulate_hessians, gptq_quantize
from lowbit.steps.owl import owl_rates
from lowbit.steps.sparsegpt import ObsSelector
from lowbit.steps.wanda import wanda_score
from lowbit.verify import compare, load_exported

W4G32 = QuantSpec(bits=4, symmetric=False, group_size=32)


def step(name: str, **args) -> Step:
    cls = get_step(name)
    return cls(cls.Args(**args))


def pruned(model, steps, ids, plan=FormatPlan()):
    return compress(model, get_adapter(model), plan, steps, ids, progress=False)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_masks_keep_exactly_n_of_every_m(method, pattern, calib_ids):
    model = make_tiny("llama")
    state = pruned(model, [step(method, pattern=pattern)], calib_ids)
    n, m = map(int, pattern.split(":"))
    assert len(state.masks) == 14
    for name, mask in state.masks.items():
        weight = model.get_submodule(name).weight.data
        assert (weight[mask] == 0).all()
        kept = (~mask).reshape(weight.shape[0], -1, m).sum(-1)
        assert (kept == n).all(), name
        assert ((weight != 0).reshape(weight.shape[0], -1, m).sum(-1) == n).all()  # survivors are nonzero


@pytest.mark.parametrize("method, group", [("magnitude", "layer"), ("magnitude", "row"), ("wanda", "row"),
                                           ("wanda", "layer"), ("sparsegpt", "layer"), ("sparsegpt", "row")])
def test_unstructured_ratio_is_exact_per_layer(method, group, calib_ids):
    model = make_tiny("llama")
    state = pruned(model, [step(method, ratio=0.6, group=group)], calib_ids)
    for name, mask in state.masks.items():
        rows, cols = mask.shape
        if group == "row":
            assert (mask.sum(1) == round(0.6 * cols)).all(), name
        elif method == "sparsegpt":  # chosen per block of 128 columns, round(0.6 * rows * width) each
            expected = sum(round(0.6 * rows * min(128, cols - c)) for c in range(0, cols, 128))
            assert int(mask.sum()) == expected, name
        else:
            assert int(mask.sum()) == round(0.6 * mask.numel()), name


def test_prune_mask_rejects_nothing_silently():
    score = torch.rand(8, 16)
    mask = prune_mask(score, 0.25, Pattern(), "row")
    kept_min = score.masked_fill(mask, float("inf")).min(1).values
    assert (score.masked_fill(~mask, -1).max(1).values <= kept_min).all()  # pruned are the lowest of each row
    assert int(prune_mask(score, 0.0, Pattern(), "layer").sum()) == 0


def test_owl_rule_matches_the_paper():
    # outlier ratios 1%, 2%, 3%: min-max scaled to [0, 2λ] = [0, .08, .16], mean .08 -> rates target + (.08, 0, -.08)
    assert owl_rates([0.01, 0.02, 0.03], 0.7, 0.08) == pytest.approx([0.78, 0.70, 0.62])


def small_vocab_llama(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("alloc", [("owl", {"target": 0.7}),
                                   ("learned", {"target": 0.7, "iters": 10, "seq_len": 32, "n_samples": 4})])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_allocation_lands_on_the_global_target(alloc, method, tiny_llama):
    model = small_vocab_llama(tiny_llama)
    calib_ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    state = pruned(model, [step(alloc[0], **alloc[1]), step(method)], calib_ids)
    report = sparsity_report(model, get_adapter(model), state)
    assert abs(report["overall"] - 0.7) < 1e-3
    assert len(set(report["layers"].values())) > 1  # not uniform


def test_learned_block_rates_stay_in_range_and_land_on_target(tiny_llama):
    model = small_vocab_llama(tiny_llama)
    calib_ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    args = {"target": 0.7, "iters": 10, "seq_len": 32, "n_samples": 4, "share": "block", "max_shift": 0.1}
    state = pruned(model, [step("learned", **args), step("sparsegpt")], calib_ids)
    report = sparsity_report(model, get_adapter(model), state)
    assert abs(report["overall"] - 0.7) < 1e-3
    rates = report["layers"]
    assert all(0.6 - 1e-3 <= r <= 0.8 + 1e-3 for r in rates.values())
    for block in {name.rsplit(".", 2)[0] for name in rates}:  # one rate per block (up to rounding to whole weights)
        mine = [r for name, r in rates.items() if name.startswith(block + ".")]
        assert max(mine) - min(mine) < 0.01


def test_learned_allocation_moves_rates_by_the_output_loss(tiny_llama):
    """No steps leave every layer at the target; trained, the rates spread while the weighted mean stays on it."""
    from lowbit.context import ModelContext
    from lowbit.sparsity import dense_pass, input_sq_norms
    from lowbit.state import QuantState
    from lowbit.steps.learned import LearnedArgs, learn_rates

    model = small_vocab_llama(tiny_llama)
    calib_ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    ctx = ModelContext(model, get_adapter(model), FormatPlan(), QuantState(), calib_ids)
    scores = {}

    def visit(bctx):
        norms = input_sq_norms(bctx)
        for rel, lin in bctx.linears().items():
            scores[bctx.full_name(rel)] = wanda_score(lin.weight.data, norms[rel])

    dense_pass(ctx, visit)
    args = LearnedArgs(target=0.7, iters=0, seq_len=32, n_samples=4, lr=0.02)
    uniform = learn_rates(ctx, scores, "row", args)
    assert all(abs(r - 0.7) < 1e-6 for r in uniform.values())
    learned = learn_rates(ctx, scores, "row", args.model_copy(update={"iters": 25}))
    sizes = {n: model.get_submodule(n).weight.numel() for n in learned}
    assert sum(learned[n] * sizes[n] for n in sizes) / sum(sizes.values()) == pytest.approx(0.7, abs=1e-6)
    assert max(learned.values()) - min(learned.values()) > 0.02
    per_block = learn_rates(ctx, scores, "row", args.model_copy(update={"iters": 25, "share": "block"}))
    assert sum(per_block[n] * sizes[n] for n in sizes) / sum(sizes.values()) == pytest.approx(0.7, abs=1e-6)
    by_block = {}
    for n, r in per_block.items():
        by_block.setdefault(n.split(".self_attn")[0].split(".mlp")[0], set()).add(round(r, 9))
    assert len(by_block) == 2 and all(len(v) == 1 for v in by_block.values())  # one rate per block
    assert len({next(iter(v)) for v in by_block.values()}) == 2  # and the blocks differ


def test_shortgpt_removes_the_least_influential_blocks_exactly(calib_ids):
    model = make_tiny("llama")
    blocks = get_adapter(model).blocks(model)
    state = pruned(model, [step("shortgpt", target=0.5)], calib_ids)
    linears = get_adapter(model).linears
    removed = [i for i, b in enumerate(blocks) if all(not lin.weight.any() for lin in linears(b).values())]
    assert len(removed) == 1 and sparsity_report(model, get_adapter(model), state)["overall"] == 0.5
    # a removed block is the identity: its output equals its input
    x = torch.randn(1, 8, 64)
    emb = model.model.rotary_emb(x, torch.arange(8)[None])
    out = blocks[removed[0]](x, position_embeddings=emb, attention_mask=None)
    assert torch.equal(out[0] if isinstance(out, tuple) else out, x)


@pytest.mark.parametrize("steps", [
    [("sparsegpt", {}), ("gptq", {})],
    [("wanda", {}), ("awq", {"n_grid": 4}), ("gptq", {})],
    [("sparsegpt", {"pattern": "2:4"}), ("brecq", {"iters": 10, "n_samples": 2})],
    [("magnitude", {}), ("lwc", {"epochs": 1})],
    [("sparsegpt", {})],  # joint: prunes and quantizes in one pass
])
def test_later_solvers_never_revive_pruned_weights(steps, calib_ids):
    model = make_tiny("llama")
    state = pruned(model, [step(n, **a) for n, a in steps], calib_ids, FormatPlan(weights=W4G32))
    assert len(state.masks) == 14 and len(state.weights) == 14
    for name, mask in state.masks.items():
        weight = model.get_submodule(name).weight.data
        assert int(mask.sum()) > 0 and (weight[mask] == 0).all(), name
        assert (weight[~mask] != 0).float().mean() > 0.7  # survivors mostly nonzero after quantization


def test_a_step_that_revives_pruned_weights_is_stopped(calib_ids):
    class Revive(Step):
        name = "revive"

        def on_block(self, ctx):
            for lin in ctx.linears().values():
                lin.weight.data += 1e-3

    with pytest.raises(LowbitError, match="'revive' made .* pruned weights .* nonzero"):
        pruned(make_tiny("llama"), [step("wanda"), Revive()], calib_ids)


def test_gptq_with_a_mask_compensates_better_than_zeroing_afterwards():
    torch.manual_seed(0)
    x = torch.randn(512, 64) @ torch.randn(64, 64) * 0.3
    w = torch.randn(32, 64)
    h = 2 * x.T @ x / x.shape[0]
    mask = prune_mask(w.abs(), 0.5, Pattern(), "row")
    w_masked = w.masked_fill(mask, 0)
    q_aware, _, _ = gptq_quantize(w_masked, h, W4G32, mask=mask)
    q_plain, _, _ = gptq_quantize(w_masked, h, W4G32)
    assert (q_aware[mask] == 0).all() and (q_plain[mask] != 0).any()
    err = lambda q: (x @ (q - w_masked).T).pow(2).mean()  # noqa: E731  (the output of the pruned layer)
    assert err(q_aware) < err(q_plain.masked_fill(mask, 0))


def test_rotation_after_pruning_is_refused_at_validation():
    with pytest.raises(LowbitError, match="'rotate' after 'wanda'.*before"):
        parse_recipe({"steps": ["wanda", "rotate", "gptq"]})
    parse_recipe({"steps": ["rotate", "wanda", "gptq"]})
    with pytest.raises(LowbitError, match="no pruning step follows"):
        pruned(make_tiny("llama"), [step("owl")], torch.randint(0, 100, (2, 16)))


@pytest.mark.parametrize("bad, message", [
    ({"wanda": {"ratio": 1.0}}, "steps\\[0\\].wanda.ratio: Input should be less than 1"),
    ({"wanda": {"ratio": -0.1}}, "steps\\[0\\].wanda.ratio: Input should be greater than or equal to 0"),
    ({"sparsegpt": {"pattern": "4:4"}}, "pattern 4:4: need 0 < N < M"),
    ({"magnitude": {"pattern": "half"}}, "pattern must be 'unstructured' or N:M"),
])
def test_bad_sparsity_arguments_are_one_line_errors(bad, message):
    with pytest.raises(LowbitError, match=message):
        parse_recipe({"steps": [bad]})


def test_pattern_that_does_not_divide_the_width_is_a_one_line_cli_error(tiny_dirs, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": tiny_dirs["llama"], "weights": None, "evaluation": None,
                                      "steps": [{"wanda": {"pattern": "2:3"}}], "save": False,
                                      "calibration": {"n_samples": 2, "seq_len": 32}}))
    capsys.readouterr()
    assert main(["run", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "wanda: pattern 2:3 needs input widths divisible by 3, but model.layers.0.self_attn.q_proj has 64" in err[0]


@pytest.fixture(scope="module")
def sparse_run(tiny_llama, tmp_path_factory):
    """A saved run of the tiny Llama: SparseGPT 2:4 then GPTQ, W4 g32 symmetric."""
    recipe = parse_recipe({"model": str(tiny_llama), "weights": {"bits": 4, "symmetric": True, "group_size": 32},
                           "steps": [{"sparsegpt": {"pattern": "2:4"}}, "gptq"], "threads": 1, "evaluation": None,
                           "calibration": {"n_samples": 4, "seq_len": 64}})
    out = tmp_path_factory.mktemp("sparse") / "run"
    result = run_recipe(recipe, out, progress=False)
    return out, result


def test_mask_survives_save_reload_export_and_verify(sparse_run, tmp_path, text_windows):
    out, result = sparse_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sparsity"]["overall"] == pytest.approx(0.5) and len(metrics["sparsity"]["layers"]) == 14
    model, _, state = load_run(out)
    assert set(state.masks) == set(result.state.masks)
    for name, mask in state.masks.items():
        assert torch.equal(mask, result.state.masks[name])
        assert (model.get_submodule(name).weight.data[mask] == 0).all()
    export = export_run(out, "compressed-tensors", tmp_path / "ct", dtype="float32")
    assert any("sparsity 2:4 50.00%" in note for note in export.notes)
    qconfig = json.loads((export.path / "config.json").read_text())["quantization_config"]
    assert qconfig["sparsity_config"]["sparsity_structure"] == "2:4"
    assert qconfig["sparsity_config"]["global_sparsity"] == pytest.approx(0.5)
    tensors = load_file(str(export.path / "model.safetensors"))
    for name, mask in state.masks.items():  # symmetric codes: a pruned weight is stored as code 0
        codes = unpack_from_int32(tensors[f"{name}.weight_packed"], 4, mask.shape)
        assert (codes[mask] == 0).all() and (codes[~mask] != 0).float().mean() > 0.7
    exported = load_exported(export.path)
    comparison = compare(model, exported, text_windows)
    assert comparison.max_logit_diff < 1e-4 and comparison.top1_agreement == 1.0


def test_weights_that_break_the_saved_mask_are_refused(sparse_run):
    """Load and export check every masked weight is zero (the run folder's checksums catch edited files earlier)."""
    from lowbit.sparsity import check_model_masks

    model, _, state = load_run(sparse_run[0])
    check_model_masks(model, state, "loading run")
    model.get_submodule("model.layers.0.mlp.up_proj").weight.data += 0.01
    with pytest.raises(LowbitError, match="loading run: weight model.layers.0.mlp.up_proj does not match its saved "
                                          "sparsity mask"):
        check_model_masks(model, state, "loading run")


def test_targets_without_sparsity_refuse_in_one_line(sparse_run, tiny_llama, tmp_path):
    with pytest.raises(LowbitError, match="cannot export to gguf-q4_0: sparsity \\(14 pruned linears\\) is not "
                                          "representable"):
        export_run(sparse_run[0], "gguf-q4_0", tmp_path / "m.gguf")
    recipe = parse_recipe({"model": str(tiny_llama), "weights": None, "steps": ["magnitude"], "threads": 1,
                           "evaluation": None, "calibration": {"n_samples": 2, "seq_len": 32}})
    run_recipe(recipe, tmp_path / "fp", progress=False)
    with pytest.raises(LowbitError, match="sparse with unquantized weights"):
        export_run(tmp_path / "fp", "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_parse_pattern():
    assert parse_pattern("2:4") == Pattern(2, 4) and parse_pattern("4:8").ratio == 0.5
    assert not parse_pattern("unstructured").structured


@pytest.mark.slow
def test_sparsegpt_below_wanda_below_magnitude_on_a_real_layer(embedded):
    """50% unstructured on block 5's gate/up input and down projection of the embedded model: output error
    ||(W - W_pruned) X|| on the calibration tokens, each method with its paper's comparison group."""
    from lowbit.context import BlockContext, ModelContext
    from lowbit.pipeline import capture_block_inputs
    from lowbit.state import QuantState

    model, ids = embedded
    adapter = get_adapter(model)
    mctx = ModelContext(model, adapter, FormatPlan(), QuantState(), ids)
    inputs, args, kwargs = capture_block_inputs(model, adapter, ids)
    blocks = adapter.blocks(model)
    for i in range(5):
        inputs = BlockContext(mctx, i, blocks[i], inputs, args, kwargs).forward()
    ctx = BlockContext(mctx, 5, blocks[5], inputs, args, kwargs)
    for rel in ("mlp.up_proj", "mlp.down_proj"):
        h = accumulate_hessians(ctx, [(rel,)])[rel]
        w = ctx.block.get_submodule(rel).weight.data.float()
        err = lambda q: torch.trace((q - w) @ h @ (q - w).T).item()  # noqa: E731  (= 2/N ||(W - Q) X||²)
        magnitude = w.masked_fill(prune_mask(w.abs(), 0.5, Pattern(), "layer"), 0)
        wanda = w.masked_fill(prune_mask(wanda_score(w, h.diagonal()), 0.5, Pattern(), "row"), 0)
        mask = torch.zeros_like(w, dtype=torch.bool)
        sparsegpt, _, _ = gptq_quantize(w, h, None, mask=mask, select=ObsSelector(128, 0.5, Pattern(), "layer"))
        assert mask.float().mean().item() == pytest.approx(0.5, abs=1e-4) and (sparsegpt[mask] == 0).all()
        e_sgpt, e_wanda, e_mag = err(sparsegpt), err(wanda), err(magnitude)
        assert e_sgpt < e_wanda < e_mag, (rel, e_sgpt, e_wanda, e_mag)


def test_sparse_bench_rows_store_fewer_bytes_as_sparsity_grows():
    from lowbit.kernels.sparse import bench_sparse, sparse_table

    rows = bench_sparse(64, 32, rows=(1,), ratios=(0.5, 0.9), repeats=1)
    assert [r["layer"] for r in rows] == ["CSR float32 50% unstructured (CPU)", "CSR float32 90% unstructured (CPU)"]
    # values (4 B) + column indices (8 B) per nonzero, plus 65 row pointers (8 B); dense 64 x 32 x 4 B
    assert rows[0]["bytes"] == 1024 * 12 + 65 * 8 and rows[1]["bytes"] == round(0.1 * 32) * 64 * 12 + 65 * 8
    assert rows[0]["dense_bytes"] == 8192 and rows[0]["ms_1"] > 0 and rows[0]["dense_ms_1"] > 0
    assert "| CSR float32 90% unstructured (CPU) |" in sparse_table(rows)
