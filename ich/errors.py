"""User errors: bad input shown as one line and exit code 2, never a traceback (a bug keeps its traceback).

The bottom of the house: this module imports nothing from the project, and every room's error class
(CheckpointError, IngestError, SoupError, RegistryError, ...) derives from `IchError`. Every entry point
(`ich`, `sweeps/coatnet.py`, the `ich` subcommands that tests call directly) uses the one handler below."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


class IchError(Exception):
    """Bad input that the user can fix; the message names the file, checkpoint or option and what is wrong."""


class ConfigError(IchError):
    """A sweep/training configuration that cannot run; names the option and the problem."""


# The few OS errors that mean bad input today: a missing file named on the command line, a training loss
# that went NaN/Inf under the user's options.
USER_OS_ERRORS = (FileNotFoundError, FloatingPointError)
USER_ERRORS = (IchError,) + USER_OS_ERRORS


def error_line(prog: str, error: BaseException) -> str:
    """`<prog>: error: <message>` on one line (a message that spans lines is joined)."""
    message = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return f"{prog}: error: {message or type(error).__name__}"


@contextlib.contextmanager
def exit_on_user_error(prog: str) -> Iterator[None]:
    """A user error inside the block: its one line on stderr, then SystemExit(2). Anything else propagates."""
    try:
        yield
    except USER_ERRORS as e:
        print(error_line(prog, e), file=sys.stderr)
        raise SystemExit(2) from None


def run_cli(prog: str, fn: Callable[[], object]) -> int:
    """An entry point's exit code: 0 when fn() returns (its value is ignored), 2 after one line for a user error.
    Anything else, a bug, propagates with its traceback; so does SystemExit (a command's own exit code)."""
    try:
        fn()
    except USER_ERRORS as e:
        print(error_line(prog, e), file=sys.stderr)
        return 2
    return 0
