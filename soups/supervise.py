"""A small supervisor for the cluster head's MLflow server (cluster.yaml starts it; docs/cluster.md "MLflow").

    python -m soups.supervise --pid-file ~/ich-mlflow/server.pid --while-alive <gcs_server pid> -- mlflow server ...

Runs the command in its own process group and starts it again when it exits, after a back-off (2 s, 4 s, ...
30 s); it gives up (exit 1, logged) after more than --max-restarts exits within --window-s seconds, so a
server that cannot start does not loop forever. It stops the server and exits 0 on SIGTERM or SIGINT, and
when the process --while-alive names ends: the head's gcs_server, so `ray stop` (which `ray down` runs on the
head) stops MLflow too. Namespaces and on-prem machines may have no systemd: the project owns this loop.

The pid file holds the supervisor's pid, which is also its process group (it runs in its own session).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from ich.errors import IchError

FIRST_DELAY_S = 2.0    # the first restart waits this long (a port in TIME_WAIT, a database briefly locked)
MAX_DELAY_S = 30.0
MAX_RESTARTS = 5       # more exits than this within WINDOW_S: give up
WINDOW_S = 600.0
STOP_TIMEOUT_S = 15.0  # SIGTERM, then SIGKILL of the server's process group
POLL_S = 0.5


class SuperviseError(IchError):
    """Bad arguments for the supervisor; one line naming the option."""


def restart_delay(crashes: int, first_s: float = FIRST_DELAY_S, max_s: float = MAX_DELAY_S) -> float:
    """Pause before the restart after the crashes-th recent exit: first_s, 2*first_s, ... capped at max_s."""
    return min(max_s, first_s * 2 ** (crashes - 1))


def recent_exits(exits: deque, now: float, window_s: float) -> int:
    """Drop exit times older than window_s from the left of `exits`; how many are left."""
    while exits and now - exits[0] > window_s:
        exits.popleft()
    return len(exits)


def start_time(pid: int) -> int | None:
    """The process's start time (/proc/<pid>/stat field 22), None when it is gone or a zombie: with the pid it
    names one process, never a later one that reused the number."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervise[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def _kill_group(child: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the server's process group (its pgid is the child's pid), SIGKILL what is left after timeout:
    uvicorn workers of a dead `mlflow server` would otherwise keep the port."""
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            child.poll()  # reap our child: a zombie still counts as a member of the group
            try:
                os.killpg(child.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def supervise(command: list[str], *, pid_file: Path | None = None, while_alive: int | None = None,
              max_restarts: int = MAX_RESTARTS, window_s: float = WINDOW_S, first_delay_s: float = FIRST_DELAY_S,
              max_delay_s: float = MAX_DELAY_S) -> int:
    """Run command until told to stop; 0 when stopped, 1 when it gave up after too many exits."""
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    # A hangup of the shell that started it is not a stop (a handler, not SIG_IGN: the server keeps the default).
    signal.signal(signal.SIGHUP, lambda signum, frame: None)
    watched = (while_alive, start_time(while_alive)) if while_alive is not None else None
    if watched and watched[1] is None:
        _log(f"process {while_alive} (--while-alive) is not running; not starting")
        return 1

    def should_stop() -> str | None:
        if stop:
            return f"signal {stop[0]}"
        if watched and start_time(watched[0]) != watched[1]:
            return f"process {watched[0]} (--while-alive) ended"
        return None

    if pid_file:
        pid_file.write_text(f"{os.getpid()}\n")
    exits: deque = deque()
    try:
        while True:
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, process_group=0)
            _log(f"started pid {child.pid}: {' '.join(command)}")
            while child.poll() is None and not (why := should_stop()):
                time.sleep(POLL_S)
            if child.returncode is None:
                _log(f"{why}: stopping pid {child.pid}")
                _kill_group(child)
                child.wait()
                return 0
            rc = child.returncode
            _kill_group(child, timeout=5.0)  # what it left behind must not hold the port
            if why := should_stop():
                _log(f"pid {child.pid} exited {rc}; {why}: not restarting")
                return 0
            exits.append(time.monotonic())
            n = recent_exits(exits, time.monotonic(), window_s)
            if n > max_restarts:
                _log(f"pid {child.pid} exited {rc}; {n} exits within {window_s:.0f} s: giving up")
                return 1
            delay = restart_delay(n, first_delay_s, max_delay_s)
            _log(f"pid {child.pid} exited {rc}; restart {n}/{max_restarts} in {delay:.0f} s")
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline:
                if why := should_stop():
                    _log(f"{why}: not restarting")
                    return 0
                time.sleep(min(POLL_S, delay))
    finally:
        if pid_file and pid_file.exists() and pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soups.supervise",
                                     description="Run a server, restart it when it exits (bounded), stop it on "
                                                 "SIGTERM or when another process ends.")
    parser.add_argument("--pid-file", type=Path, help="write the supervisor's pid (= its process group) here")
    parser.add_argument("--while-alive", type=int, metavar="PID",
                        help="stop the server and exit when this process ends (cluster.yaml: the head's gcs_server)")
    parser.add_argument("--max-restarts", type=int, default=MAX_RESTARTS)
    parser.add_argument("--window-s", type=float, default=WINDOW_S)
    parser.add_argument("--first-delay-s", type=float, default=FIRST_DELAY_S)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the server's command line")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SuperviseError("no command to supervise: give it after --")
    if args.max_restarts < 0 or args.window_s <= 0 or args.first_delay_s < 0:
        raise SuperviseError("--max-restarts must be >= 0, --window-s > 0 and --first-delay-s >= 0")
    if os.getsid(0) != os.getpid():
        try:
            os.setsid()  # own session and process group: the pid file's pid signals the whole group
        except PermissionError:  # already a group leader (started by a job-control shell): keep its group
            pass
    code = supervise(command, pid_file=args.pid_file, while_alive=args.while_alive, max_restarts=args.max_restarts,
                     window_s=args.window_s, first_delay_s=args.first_delay_s)
    if code:
        raise SystemExit(code)  # gave up: the exit status says so (run_cli ignores return values)
    return 0


if __name__ == "__main__":
    from ich.errors import run_cli
    sys.exit(run_cli("python -m soups.supervise", main))
