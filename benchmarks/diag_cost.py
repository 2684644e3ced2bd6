"""What the per-block diagnostics cost: compression time of the embedded model with and without them.

Usage: python benchmarks/diag_cost.py [N_SAMPLES]   (16 x 512-token calibration windows by default, 2 threads)
Each configuration runs on a fresh copy of the FP model, alternating off/on twice, and prints the time of each.
"""
from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.diagnostics import BlockLog
from lowbit.loading import load_model
from lowbit.models import get_adapter
from lowbit.recipe import parse_recipe
from lowbit.pipeline import compress


def main(n_samples: int = 16) -> None:
    torch.set_num_threads(2)
    fp, tokenizer = load_model("smollm2-135m")
    ids = calibration_windows(tokenize(tokenizer, load_text("wikitext2", "validation")), n_samples, 512, 0)
    weights = {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 64}
    for steps in (["rtn"], [{"gptq": {"act_order": True, "observer": "minmax", "diag_damp": 0}}]):
        recipe = parse_recipe({"model": "smollm2-135m", "weights": weights, "steps": steps})
        times: dict[str, list[float]] = {"off": [], "on": []}
        for mode in ("off", "on") if steps != ["rtn"] else ("off", "on", "off", "on"):
            model = copy.deepcopy(fp)
            with tempfile.TemporaryDirectory() as d:
                log = BlockLog(Path(d) / "blocks.jsonl") if mode == "on" else None
                start = time.perf_counter()
                compress(model, get_adapter(model), recipe.plan(), recipe.build_steps(), ids, progress=False,
                         on_block_done=log)
                times[mode].append(time.perf_counter() - start)
                if log:
                    log.close()
        off, on = min(times["off"]), min(times["on"])
        print(f"{recipe.steps[0].name}: without diagnostics {off:.1f} s, with {on:.1f} s "
              f"(+{100 * (on / off - 1):.1f}%; all runs {times})", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
