"""A Ray worker's SIGTERM exit without a stray traceback.

Ray's worker SIGTERM handler raises SystemExit wherever the worker's main thread happens to be. When that is a
weakref callback or a `__del__` (garbage collection runs them between any two bytecodes), Python cannot raise
it there: it prints "Exception ignored in ..." with a traceback and drops the exit. CI saw one at the end of
the demo sweep (a train_trial worker, in `_weakrefset._remove`). This hook drops the print, not the exit: it
sends the signal again, so that the handler runs once more, on ordinary code.
"""
from __future__ import annotations

import os
import signal
import sys
import threading


def _is_ray_sigterm_exit(exc: BaseException | None) -> bool:
    # Ray's handler raises SystemExit with this attribute (ray._raylet.raise_sys_exit_with_custom_error_message).
    return isinstance(exc, SystemExit) and hasattr(exc, "ray_terminate_msg")


def _hook(unraisable) -> None:
    if _is_ray_sigterm_exit(unraisable.exc_value):
        again = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
        again.daemon = True  # never holds up an exit that is already under way
        again.start()
        return
    sys.__unraisablehook__(unraisable)


def quiet_sigterm_exit() -> None:
    """Install the hook in this worker process (any thread; idempotent). Other unraisable errors print as usual."""
    sys.unraisablehook = _hook
