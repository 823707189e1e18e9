"""Graceful stop on SIGTERM and Ctrl-C.

Inside :func:`graceful_stop`, the first SIGTERM or SIGINT (Ctrl-C) only sets a flag;
the training loop checks it between meta-steps, writes a checkpoint of the last
finished step, flushes the metrics and returns. A second signal raises
``KeyboardInterrupt`` at once (the last checkpoint on disk is intact: checkpoints are
replaced atomically). The previous handlers are restored on exit. Signal handlers
can only be installed from the main thread; elsewhere this is a no-op flag.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torchopt_metagrad as tmg

__all__ = ["StopFlag", "graceful_stop", "run_cli"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """Set when a stop was requested; ``reason`` says by what."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def request(self, reason: str) -> None:
        """Ask the loop to stop after the current meta-step."""
        self.requested = True
        self.reason = self.reason or reason


@contextmanager
def graceful_stop() -> Iterator[StopFlag]:
    """Turn the first SIGTERM/SIGINT into a stop request; see the module docstring."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if flag.requested:
            raise KeyboardInterrupt(f"second {name}: stopping now")
        flag.request(name)

    previous: dict[signal.Signals, Any] = {}
    try:
        for sig in _SIGNALS:
            previous[sig] = signal.signal(sig, handler)
        yield flag
    finally:
        for restored, old in previous.items():
            signal.signal(restored, old)


def run_cli(
    prog: str,
    main: Callable[[], Mapping[str, Any]],
    interrupted: Callable[[Any], bool],
    errors: tuple[type[BaseException], ...] = (),
) -> None:
    """A recipe's ``__main__``: run ``main`` and exit with a message, never a traceback, for
    the errors a user causes: a bad or missing checkpoint (status 1; argparse's usage
    errors exit 2 earlier) and Ctrl-C / a second SIGTERM outside the graceful stop (status
    130; e.g. during the sine estimator study, which keeps no checkpoint); ``errors``: more
    exception types answered with their message (status 1). Exit status 3:
    ``interrupted(result)`` (a graceful stop; ``--resume`` continues).
    """
    from recipes.common.checkpoint import CheckpointError

    try:
        result = main()
    except (FileNotFoundError, CheckpointError, *errors) as err:
        sys.exit(f"{prog}: error: {err}")
    except KeyboardInterrupt as err:
        print(
            f"{prog}: interrupted ({err or 'Ctrl-C'}); outputs already written are complete, "
            "a meta-training run resumes from its last checkpoint with --resume, anything "
            "else reruns from the start",
            file=sys.stderr,
        )
        sys.exit(130)
    # Under torchrun: every rank waits for the others, then leaves the group (a bare exit
    # with gloo threads alive can abort). After an error above, nobody waits.
    tmg.distributed.teardown()
    sys.exit(3 if interrupted(result) else 0)
