"""The lowbit CLI with one function turned into a stop point, for the fault-injection tests.

usage: python fault_child.py MODULE:ATTR READY_FILE before|after -- LOWBIT_ARGS...

When the run reaches MODULE.ATTR (and, with `after`, once the original has returned) this process creates
READY_FILE and waits there, so the test can signal it at a known point of its work.
"""
import importlib
import sys
import time
from pathlib import Path


def main() -> int:
    target, ready, when = sys.argv[1:4]
    argv = sys.argv[sys.argv.index("--") + 1:]
    module_name, attr = target.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, attr)

    def stop(*args, **kwargs):
        if when == "after":
            original(*args, **kwargs)
        Path(ready).touch()
        while True:
            time.sleep(0.05)

    setattr(module, attr, stop)
    from lowbit.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
