"""Task accuracy through lm-evaluation-harness, on the model lowbit holds in memory (quantizers attached).

Task names resolve in this order: a local task's own name (`lowbit_piqa`, `hellaswag_text`, or one from an
extra task folder) is always local; a standard name that has a local copy (`lambada_openai`, `piqa`,
`winogrande`, `boolq`) is local when the Hugging Face hub is unreachable or `HF_HUB_OFFLINE` /
`HF_DATASETS_OFFLINE` is set (or `source="local"`), else lm-eval's own task; any other name is lm-eval's.
Local tasks are the YAML files under the project's top-level `tasks/` folder ($LOWBIT_TASKS overrides it);
their relative `data_files` are relative to the YAML file.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn

from lowbit.errors import LowbitError

Source = Literal["auto", "local", "hub"]
STANDARD_LOCAL = {"lambada_openai": "lowbit_lambada_openai", "piqa": "lowbit_piqa",
                  "winogrande": "lowbit_winogrande", "boolq": "lowbit_boolq"}


@dataclass(frozen=True)
class ResolvedTask:
    name: str  # as asked for
    task: str  # the lm-eval task that runs
    source: Literal["local", "lm-eval"]
    config: dict | None = None  # the local task's config with absolute data paths


def tasks_dir() -> Path:
    """The project's offline task folder: $LOWBIT_TASKS, else `tasks/` next to the `lowbit` package."""
    env = os.environ.get("LOWBIT_TASKS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "tasks"


def local_task_files(dirs: list[Path]) -> dict[str, Path]:
    """Task name -> YAML file for every task YAML under `dirs` (later folders win)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    found: dict[str, Path] = {}
    for d in dirs:
        for path in sorted(Path(d).glob("**/*.yaml")):
            cfg = load_yaml(path, resolve_func=False)
            if isinstance(cfg.get("task"), str):
                found[cfg["task"]] = path
    return found


def local_config(path: Path) -> dict:
    """A local task's config with its data files made absolute; missing data is an error naming the fix."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(path)
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
    resolved = {}
    for split, rel in files.items():
        file = (path.parent / rel).resolve()
        if not file.is_file():
            raise LowbitError(f"offline data for task {cfg['task']!r} is missing: {file} (rebuild it with "
                              f"'python tasks/build.py SOURCE_DIR' or point LOWBIT_TASKS at a complete tasks folder)")
        resolved[split] = str(file)
    if resolved:
        cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": resolved}
    return cfg


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or huggingface.co cannot be reached."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_tasks(names: list[str], source: Source = "auto", include: list[Path] | None = None) -> list[ResolvedTask]:
    """Map asked-for names to local or lm-eval tasks (see the module docstring for the order)."""
    local = local_task_files([tasks_dir(), *(include or [])])
    reachable: list[bool] = []

    def online() -> bool:
        if not reachable:
            reachable.append(source == "hub" or (source == "auto" and hub_reachable()))
        return reachable[0]

    out = []
    for name in names:
        target = name if name in local else STANDARD_LOCAL.get(name) if not online() else None
        if target is not None:
            if target not in local:
                raise LowbitError(f"no offline task definition {target!r} for {name!r} under {tasks_dir()}: "
                                  f"set LOWBIT_TASKS to the project's tasks/ folder")
            out.append(ResolvedTask(name, target, "local", local_config(local[target])))
        elif not online():
            raise LowbitError(f"unknown task {name!r} offline: local tasks are {', '.join(sorted(local))} (and the "
                              f"standard names {', '.join(STANDARD_LOCAL)}); other lm-eval tasks need the Hugging "
                              f"Face hub")
        else:
            out.append(ResolvedTask(name, name, "lm-eval"))
    return out


def evaluate_tasks(model: nn.Module, tokenizer, names: list[str], limit: int | None = None,
                   num_fewshot: int | None = None, batch_size: int = 8, source: Source = "auto",
                   include: list[Path] | None = None, bootstrap_iters: int = 1000) -> dict[str, dict]:
    """Score `model` (as it is: hooks, quantizers and kernels included) on lm-eval tasks.

    Returns {name: {"task", "source", "samples", "limit", "num_fewshot", METRIC, METRIC_stderr, ...}}."""
    if not names:
        raise LowbitError("no task given: name at least one, e.g. --tasks lambada_openai,piqa")
    if limit is not None and limit <= 0:
        raise LowbitError(f"--limit must be a positive number of examples per task, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise LowbitError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    resolved = resolve_tasks(names, source, include)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    needs_index = any(r.source == "lm-eval" for r in resolved)
    manager = TaskManager(include_defaults=needs_index)
    specs = [r.config if r.config is not None else r.task for r in resolved]
    try:
        loaded = manager.load(specs)
    except (KeyError, ValueError) as exc:
        raise LowbitError(f"lm-eval could not load the tasks {', '.join(names)}: {exc}") from exc
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # lm-eval bootstraps some standard errors in a forked process pool; a fork of a process whose torch threads
    # are running can hang for ever (seen once: a pool worker that never started). 1000 draws are quick serially.
    os.environ["DISABLE_MULTIPROC"] = "1"
    results = lm_eval.simple_evaluate(model=lm, tasks=list(loaded["tasks"].values()), task_manager=manager,
                                      limit=limit, num_fewshot=num_fewshot, log_samples=False,
                                      bootstrap_iters=bootstrap_iters)
    return {r.name: _scores(r, results, limit, num_fewshot) for r in resolved}


def _scores(r: ResolvedTask, results: dict, limit: int | None, num_fewshot: int | None) -> dict:
    """One task's metrics with lm-eval's filter suffix (',none') dropped."""
    raw = results["results"][r.task]
    row: dict = {"task": r.task, "source": r.source, "samples": results["n-samples"][r.task]["effective"],
                 "limit": limit, "num_fewshot": num_fewshot}
    for key, value in raw.items():
        if "," in key and isinstance(value, (int, float)):
            metric, _filter = key.split(",", 1)
            row[metric] = float(value)
    return row


def main_metric(row: dict) -> tuple[str, float, float | None]:
    """The headline metric of a task row: acc when present (else the first), with its standard error."""
    metrics = [k for k in row if not k.endswith("_stderr") and isinstance(row[k], float)]
    key = "acc" if "acc" in metrics else metrics[0]
    return key, row[key], row.get(f"{key}_stderr")
