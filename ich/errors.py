"""User errors: bad input shown as one line and exit code 2, never a traceback (a bug keeps its traceback).

The bottom of the house: this module imports nothing from the project, and every room's error class
(CheckpointError, IngestError, SoupError, RegistryError, ...) derives from `IchError`. Every entry point
(`ich`, `sweeps/coatnet.py`, the `ich` subcommands that tests call directly) uses the one handler below."""
from __future__ import annotations

import contextlib
import re
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


# C0/C1 controls (ESC, CR, BEL... rewrite a terminal's line), line and paragraph separators (a second line for
# splitlines), bidirectional overrides (text shown in another order than it is stored). Names holding them are
# refused where they enter (ingest, checkpoint.json) and escaped wherever one could still be printed.
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    """Each control character as its escape (ESC -> \\x1b): the text stays on one line and shows what it holds."""
    return CONTROL_CHARS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def printable(name: str) -> str:
    """A name as it may be printed: itself, or its repr (escaped, quoted) when it holds a control character."""
    return repr(name) if CONTROL_CHARS.search(name) else name


MAX_MESSAGE_CHARS = 1000  # a message quoting what it refuses (a 10 kB name from a model file) is cut here


def error_line(prog: str, error: BaseException) -> str:
    """`<prog>: error: <message>` on one line (a message that spans lines is joined, control characters escaped,
    anything past MAX_MESSAGE_CHARS cut)."""
    message = escape_controls(" ".join(part.strip() for part in str(error).splitlines() if part.strip()))
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + f"… ({len(message) - MAX_MESSAGE_CHARS} more characters)"
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
