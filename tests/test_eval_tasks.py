"""Task accuracy through lm-eval: lowbit's numbers are lm-eval's, quantizers are really attached, local task
copies render exactly as lm-eval's own definitions, and bad requests fail with one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowbit.cli import main
from lowbit.eval.tasks import evaluate_tasks, resolve_tasks, tasks_dir
from lowbit.loading import load_model
from lowbit.runfolder import load_run

lm_eval = pytest.importorskip("lm_eval")
W4 = {"bits": 4, "granularity": "group", "group_size": 32}
A8 = {"bits": 8, "symmetric": True, "granularity": "token", "dynamic": True}


def _write_tasks(root: Path) -> Path:
    """A tiny multiple-choice task and a tiny loglikelihood task over WikiText-2 sentences."""
    from lowbit.data import load_text

    words = load_text("wikitext2", "test")[:40000].split()
    mc, ll = [], []
    for i in range(24):
        chunk = words[i * 40: i * 40 + 40]
        mc.append({"q": " ".join(chunk[:20]), "choices": [" ".join(chunk[20:24]), " ".join(chunk[30:34]),
                                                          " ".join(chunk[24:28])], "label": i % 3})
        ll.append({"text": " ".join(chunk[:25])})
    d = root / "tiny"
    d.mkdir()
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (d / "ll.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ll))
    (d / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {d / 'mc.jsonl'}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{q}}}}"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (d / "tiny_ll.yaml").write_text("""task: tiny_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: ll.jsonl
output_type: loglikelihood
test_split: test
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
""")
    return d


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return _write_tasks(tmp_path_factory.mktemp("tasks"))


def _direct(model, tokenizer, task_dir: Path, task: str) -> dict:
    """The same task scored by lm-eval alone (its own task manager and HF wrapper)."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    cfg_path = task_dir / f"{task}.yaml"
    text = cfg_path.read_text().replace("test: ll.jsonl", f"test: {task_dir / 'll.jsonl'}")
    direct_dir = task_dir.parent / f"direct-{task}"
    direct_dir.mkdir(exist_ok=True)
    (direct_dir / f"{task}.yaml").write_text(text)
    manager = TaskManager(include_path=str(direct_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8), tasks=[task],
                                  task_manager=manager, log_samples=False, bootstrap_iters=1000)
    return out["results"][task]


def test_run_accuracy_equals_lm_eval_direct(make_run, task_dir, capsys):
    run = make_run(W4)
    assert main(["eval", str(run), "--tasks", "tiny_mc", "--include-path", str(task_dir), "--quiet"]) == 0
    stored = json.loads((run / "metrics.json").read_text())["tasks"]["tiny_mc"]
    model, tokenizer, _ = load_run(run)
    direct = _direct(model, tokenizer, task_dir, "tiny_mc")
    assert stored["samples"] == 24 and stored["source"] == "local"
    for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
        assert stored[key] == direct[f"{key},none"]
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert f"acc {100 * stored['acc']:.1f} ± {100 * stored['acc_stderr']:.1f} (n=24)" in capsys.readouterr().out


def test_w4a8_run_scores_differently_from_fp(make_run, tiny_llama, task_dir):
    """Same weights with and without the run's activation quantizers give different task scores."""
    run = make_run(W4, A8)
    include = [task_dir]
    quantized, tokenizer, state = load_run(run)
    assert state.input_quantizers
    weights_only, _ = load_model(str(run / "model"))
    fp, _ = load_model(str(tiny_llama))
    ppl = {name: evaluate_tasks(m, tokenizer, ["tiny_ll"], include=include)["tiny_ll"]["perplexity"]
           for name, m in (("w4a8", quantized), ("w4", weights_only), ("fp", fp))}
    direct = _direct(quantized, tokenizer, task_dir, "tiny_ll")["perplexity,none"]
    assert ppl["w4a8"] == pytest.approx(direct, rel=1e-9)
    assert abs(ppl["w4a8"] / ppl["w4"] - 1) > 1e-4
    assert abs(ppl["w4a8"] / ppl["fp"] - 1) > 1e-4


STANDARD = ["lambada_openai", "piqa", "winogrande", "boolq"]
UPSTREAM = {"lambada_openai": "lambada/lambada_openai.yaml", "piqa": "piqa/piqa.yaml",
            "winogrande": "winogrande/default.yaml", "boolq": "super_glue/boolq/default.yaml"}


@pytest.mark.parametrize("name", STANDARD)
def test_local_copy_renders_like_lm_eval_task(name, monkeypatch):
    """lm-eval's own task config with only its data source swapped for the local file renders the same
    prompts, choices and targets and has the same metrics as the local task, on the first 40 documents."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (local,) = resolve_tasks([name])
    assert local.source == "local" and local.task == f"lowbit_{name}"
    upstream = load_yaml(Path(lm_eval.__file__).parent / "tasks" / UPSTREAM[name])
    for key in ("dataset_path", "dataset_name", "dataset_kwargs", "tag", "training_split"):
        upstream.pop(key, None)
    upstream.update(task=f"upstream_{name}", dataset_path="json", dataset_kwargs=local.config["dataset_kwargs"])
    manager = TaskManager(include_defaults=False)
    tasks = manager.load([local.config, upstream])["tasks"]
    ours, theirs = tasks[local.task], tasks[f"upstream_{name}"]
    docs_ours, docs_theirs = list(ours.eval_docs)[:40], list(theirs.eval_docs)[:40]
    assert len(ours.eval_docs) == len(theirs.eval_docs) > 1000
    for a, b in zip(docs_ours, docs_theirs):
        assert ours.doc_to_text(a) == theirs.doc_to_text(b)
        assert ours.doc_to_target(a) == theirs.doc_to_target(b)
        if ours.OUTPUT_TYPE == "multiple_choice":
            assert ours.doc_to_choice(a) == theirs.doc_to_choice(b)
    assert sorted(ours.aggregation()) == sorted(theirs.aggregation())
    assert ours.OUTPUT_TYPE == theirs.OUTPUT_TYPE


def test_standard_names_resolve_offline_and_online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_tasks(STANDARD + ["hellaswag_text", "lowbit_piqa"])
    assert [r.task for r in resolved] == [f"lowbit_{n}" for n in STANDARD] + ["hellaswag_text", "lowbit_piqa"]
    assert all(r.source == "local" for r in resolved)
    hub = resolve_tasks(["piqa", "hellaswag_text"], source="hub")
    assert [(r.task, r.source) for r in hub] == [("piqa", "lm-eval"), ("hellaswag_text", "local")]
    assert (tasks_dir() / "hellaswag_text" / "hellaswag_val_text.jsonl.gz").is_file()


def _one_line_error(argv: list[str], capsys, expect: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error:") and "\n" not in err and expect in err, err


def test_bad_requests_fail_with_one_line(tiny_llama, task_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = str(tiny_llama)
    _one_line_error(["eval", model, "--tasks", "no_such_task"], capsys, "unknown task 'no_such_task'")
    _one_line_error(["eval", model, "--tasks", "hellaswag"], capsys, "unknown task 'hellaswag'")
    _one_line_error(["eval", model, "--tasks", "piqa", "--limit", "0"], capsys, "argument --limit: must be at least 1")
    _one_line_error(["eval", model, "--tasks", ","], capsys, "--tasks is empty")
    broken = tmp_path / "tasks" / "piqa"
    broken.mkdir(parents=True)
    (broken / "lowbit_piqa.yaml").write_text((tasks_dir() / "piqa" / "lowbit_piqa.yaml").read_text())
    monkeypatch.setenv("LOWBIT_TASKS", str(tmp_path / "tasks"))
    _one_line_error(["eval", model, "--tasks", "piqa"], capsys, "offline data for task 'lowbit_piqa' is missing")
    _one_line_error(["eval", model, "--tasks", "boolq"], capsys, "no offline task definition 'lowbit_boolq'")
    _one_line_error(["eval", model, "--tasks", "tiny_mc", "--real-kernels", "--include-path", str(task_dir)], capsys,
                    "--real-kernels needs a run folder")
