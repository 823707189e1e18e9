"""Run by tests/test_torchrun.py under ``torchrun``: the sine recipe, with rank 1 failing.

``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/torchrun_failing_rank.py
MODE ARGS...``: MODE ``raise`` makes rank 1 raise after meta-step 2; ``hang`` makes it sleep
there (the other rank's next collective times out after ``--dist-timeout``).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from recipes.sine.recipe import main


def fail_on_rank1(mode: str) -> Any:
    def callback(step: int, record: dict[str, Any], stop: Any) -> None:
        if os.environ.get("RANK") == "1" and step == 2:
            if mode == "hang":
                time.sleep(600)
            raise RuntimeError("injected failure")

    return callback


if __name__ == "__main__":
    main(sys.argv[2:], callbacks=[fail_on_rank1(sys.argv[1])])
