"""The local MLflow server behind the embedded default (docs/design.md#1).

With no MLFLOW_TRACKING_URI the project starts, or reuses, one `mlflow server` per data folder:

    <data_dir>/mlflow/mlflow.db       SQLite backend store
    <data_dir>/mlflow/artifacts/      artifacts, served by the server itself (proxied artifact access),
                                      so workers only ever talk HTTP, never to a file store
    <data_dir>/mlflow/server.json     {pid, start_time, port, uri, data_dir, backend_store_uri} of the running
                                      server (0600)
    <data_dir>/mlflow/server.log      its output
    <data_dir>/mlflow/server.lock     one start (or stop) of this store at a time

The server runs in its own session so it outlives the command that started it; later commands reuse it through
server.json only when the record proves it: its data_dir is this one, its pid is the process that started then,
leading its own session and running the exact `mlflow server` command for this store, and that session listens on
the recorded port. Anything else is stale, said in one line, and never reused or signalled. `ich ui --stop` stops a
proven server only. Starts pick a port one at a time per user (a lock in the user's runtime folder); every lock
gives up after ICH_LOCK_TIMEOUT_S seconds (default 300) naming its holder.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ich.errors import IchError
from ich.home import ich_home
from soups.supervise import start_time

DEFAULT_PORT = 5000
HEALTH_TIMEOUT_S = 90.0  # it answers in ~5 s here with one worker; a loaded machine can take much longer
LOCK_TIMEOUT_S = 300.0  # a start holds its locks while waiting for /health: longer than two of those waits

# No network: no telemetry, in the server and in its clients.
TELEMETRY_OFF_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
# No job runner either: a huey consumer with 10 workers, for GenAI jobs this project never uses.
SERVER_ENV = {**TELEMETRY_OFF_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServerError(IchError):
    """The local MLflow server could not be started, found or stopped; the message says why in one line."""


@dataclass
class ServerHandle:
    pid: int
    port: int
    uri: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen | None = field(default=None, repr=False)  # set when this process started it

    def stop(self, timeout: float = 15.0) -> None:
        _stop_pid(self.pid, self.process, timeout)
        record = _record_path(self.data_dir)
        if record.exists() and _read_record(self.data_dir).get("pid") == self.pid:
            record.unlink()


# Servers this process started, kept referenced so they can be reaped on stop (no zombies, no
# "subprocess still running" warnings).
_started: dict[int, subprocess.Popen] = {}


def default_data_dir() -> Path:
    return ich_home()


def _mlflow_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "mlflow"


def _record_path(data_dir: Path) -> Path:
    return _mlflow_dir(data_dir) / "server.json"


def read_json_record(path: Path) -> dict:
    """A server's JSON record file ({} when missing, unreadable or not an object): the MLflow server's here, the
    Optuna dashboard's in sweeps/optuna_ui.py."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _read_record(data_dir: Path) -> dict:
    return read_json_record(_record_path(data_dir))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); on Linux read its state.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _server_command(data_dir: Path, port: int, host: str, backend_store_uri: str | None) -> list[str]:
    """The exact `mlflow server` command for data_dir's store: what a start runs and what a record must show."""
    mlflow_dir = _mlflow_dir(data_dir)
    return [_mlflow_executable(), "server",
            "--backend-store-uri", backend_store_uri or f"sqlite:///{mlflow_dir / 'mlflow.db'}",
            "--artifacts-destination", str(mlflow_dir / "artifacts"),
            "--host", host, "--port", str(port),
            "--workers", "1"]  # one uvicorn process: starts in ~5 s instead of ~11 s, light on 2 cores


def _unproven(data_dir: Path, record: dict) -> str | None:
    """Why server.json does not prove a running server of data_dir, or None when it does: its data_dir is this one,
    and its pid is the process that started then (start_time), leading its own session (as started) and running
    the exact command for this store. A copied data folder, a recycled pid, or a record naming any other process
    (anyone can write this file) fails here; nothing is reused or signalled on it."""
    pid, port, uri = record.get("pid"), record.get("port"), record.get("uri")
    if not (isinstance(pid, int) and isinstance(port, int) and isinstance(uri, str)):
        return "it has no pid, port and uri"
    if record.get("data_dir") != str(data_dir):
        return f"it is the record of {record.get('data_dir')}, not of {data_dir}"
    started = start_time(pid)
    if started is None:
        return f"no process {pid}"
    if started != record.get("start_time"):
        return f"process {pid} is not the one recorded (started at another time)"
    try:
        stat_fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return f"process {pid} cannot be read in /proc"
    if int(stat_fields[3]) != pid:
        return f"process {pid} does not lead its own session, as the server started here does"
    expected = _server_command(data_dir, port, urlsplit(uri).hostname or "", record.get("backend_store_uri"))
    # The mlflow script runs under its shebang's interpreter: argv is [python, mlflow, server, ...].
    if cmdline[-len(expected):] != expected or len(cmdline) - len(expected) > 2:
        return f"process {pid} is not the MLflow server of this store ({' '.join(cmdline)[:120]})"
    return None


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes LISTENing on port (any address), from /proc/net/tcp and tcp6."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _session_listens(sid: int, port: int) -> bool:
    """Some process of session sid (the server and its uvicorn child) holds a LISTEN socket on port: the answer on
    the port is this server's, not another's."""
    sockets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not sockets:
        return False
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3]) != sid:
                continue
            if any(os.readlink(fd) in sockets for fd in (proc / "fd").iterdir()):
                return True
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not ours to read
    return False


def _say_stale(data_dir: Path, why: str) -> None:
    print(f"{_record_path(data_dir)} is stale ({why}): not used", file=sys.stderr, flush=True)


def health_ok(uri: str, timeout: float = 2.0) -> bool:
    # No proxies: a proxy from the environment must not answer for 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{uri}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Like uvicorn: connections of a just-stopped server in TIME_WAIT must not block a restart.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_executable() -> str:
    exe = Path(sys.executable).parent / "mlflow"
    if not exe.exists():
        raise MlflowServerError(f"{exe}: no mlflow executable next to the Python interpreter; install mlflow")
    return str(exe)


def _wait_healthy(uri: str, pid: int, process: subprocess.Popen | None, log_path: Path, timeout: float) -> None:
    """Until /health answers from pid's own session listening on the URI's port (not whoever else holds it)."""
    port = urlsplit(uri).port
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health_ok(uri) and _session_listens(pid, port):
            return
        exited = process.poll() is not None if process is not None else not _pid_alive(pid)
        if exited:
            raise MlflowServerError(f"MLflow server (pid {pid}) exited before answering {uri}/health; see {log_path}")
        time.sleep(0.25)
    raise MlflowServerError(
        f"MLflow server (pid {pid}) did not answer {uri}/health within {timeout:.0f} s; see {log_path}")


def _wait_gone(pid: int, process: subprocess.Popen | None, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        gone = process.poll() is not None if process is not None else not _pid_alive(pid)
        if gone:
            return True
        time.sleep(0.1)
    return False


def _stop_pid(pid: int, process: subprocess.Popen | None, timeout: float) -> None:
    # The server runs in its own session (pgid == pid): signal the group so uvicorn goes too.
    process = process or _started.get(pid)
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        if _wait_gone(pid, process, wait_s):
            break
    _started.pop(pid, None)


def start_server(data_dir: str | os.PathLike, port: int | None = None, backend_store_uri: str | None = None,
                 *, timeout: float = HEALTH_TIMEOUT_S, host: str = "127.0.0.1") -> ServerHandle:
    """Start a detached `mlflow server` on host (default 127.0.0.1) for data_dir and wait until /health answers.

    port None: 5000 when free, else any free port. backend_store_uri None: SQLite in data_dir (a
    PostgreSQL URI works too). Artifacts are always served by the server from data_dir/mlflow/artifacts.
    """
    data_dir = Path(data_dir).resolve()
    mlflow_dir = _mlflow_dir(data_dir)
    (mlflow_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    with _port_lock():  # held until our server answers: a concurrent start sees the port taken, not free
        return _start_on_port(data_dir, port, backend_store_uri, timeout, host)


def _start_on_port(data_dir: Path, port: int | None, backend_store_uri: str | None, timeout: float,
                   host: str) -> ServerHandle:
    mlflow_dir = _mlflow_dir(data_dir)
    if port is None:
        port = DEFAULT_PORT if _port_free(DEFAULT_PORT, host) else free_port()
    elif not _port_free(port, host):
        raise MlflowServerError(f"port {port} on {host} is already in use; cannot start the MLflow server there")
    uri = f"http://{host}:{port}"
    log_path = mlflow_dir / "server.log"
    command = _server_command(data_dir, port, host, backend_store_uri)
    env = {**os.environ, **SERVER_ENV}
    env.pop("MLFLOW_TRACKING_URI", None)  # the server must not talk to another server
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=env, cwd=mlflow_dir, start_new_session=True)
    _started[process.pid] = process
    handle = ServerHandle(pid=process.pid, port=port, uri=uri, data_dir=data_dir, log_path=log_path, process=process)
    try:
        _wait_healthy(uri, process.pid, process, log_path, timeout)
    except BaseException:
        _stop_pid(process.pid, process, 5.0)
        raise
    record = {"pid": process.pid, "start_time": start_time(process.pid), "port": port, "uri": uri,
              "data_dir": str(data_dir), "backend_store_uri": backend_store_uri}
    path = _record_path(data_dir)
    path.unlink(missing_ok=True)  # 0600 from creation: a PostgreSQL URI in it may hold a password
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return handle


def lock_timeout() -> float:
    """ICH_LOCK_TIMEOUT_S, else LOCK_TIMEOUT_S: how long a start waits for another one's lock."""
    try:
        return float(os.environ.get("ICH_LOCK_TIMEOUT_S") or LOCK_TIMEOUT_S)
    except ValueError:
        raise MlflowServerError(f"ICH_LOCK_TIMEOUT_S={os.environ['ICH_LOCK_TIMEOUT_S']!r} is not a number of "
                                "seconds") from None


@contextmanager
def _file_lock(path: Path):
    """An exclusive flock on path (0600, created if missing), given up after lock_timeout() with one line naming
    the holder, whose pid and command it writes into the file once it holds it."""
    timeout = lock_timeout()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise MlflowServerError(f"{path}: cannot open the lock ({e.strerror})") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "a process that has not said"
                    raise MlflowServerError(f"{path} is held by pid {holder} for more than {timeout:g} s "
                                            "(ICH_LOCK_TIMEOUT_S); wait for it or end it") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} ({' '.join(sys.argv)[:200]})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _runtime_dir() -> Path:
    """This user's runtime folder for ich ($XDG_RUNTIME_DIR/ich, else <tmp>/ich-<uid>), 0700 and the user's own."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(base) / "ich" if base else Path(tempfile.gettempdir()) / f"ich-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.lstat()
    except OSError as e:
        raise MlflowServerError(f"{folder}: cannot make this user's runtime folder ({e.strerror})") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise MlflowServerError(f"{folder} is not a private folder of this user (uid {os.getuid()}); remove it")
    return folder


@contextmanager
def _port_lock():
    """Per user: two commands with different data folders starting at once both saw port 5000 free, and the
    second then trusted the first one's /health, writing into the other store. One start at a time picks a port
    (another user's server on the port is told apart by _wait_healthy: its socket is not in our session)."""
    with _file_lock(_runtime_dir() / "mlflow-port.lock"):
        yield


@contextmanager
def _start_lock(data_dir: Path):
    # Two commands starting at once must end up sharing one server, not racing for the port.
    _mlflow_dir(data_dir).mkdir(parents=True, exist_ok=True)
    with _file_lock(_mlflow_dir(data_dir) / "server.lock"):
        yield


def _running_server(data_dir: Path) -> dict | None:
    """The recorded server of data_dir when the record proves it (_unproven), after it answers /health from its
    own socket; a record that proves nothing is stale: said in one line, and a fresh server is started."""
    record = _read_record(data_dir)
    if not record:
        return None
    if why := _unproven(data_dir, record):
        _say_stale(data_dir, why)
        return None
    pid, uri = record["pid"], record["uri"]
    try:
        _wait_healthy(uri, pid, _started.get(pid), _mlflow_dir(data_dir) / "server.log", HEALTH_TIMEOUT_S)
    except MlflowServerError as e:
        if _pid_alive(pid):  # alive but deaf: do not start a second server on the same store
            raise MlflowServerError(f"{e}; stop it with `ich ui --stop`") from None
        return None  # it died while we waited: start a fresh one
    return record


def ensure_tracking_uri(data_dir: str | os.PathLike | None = None, *, quiet: bool = False,
                        host: str = "127.0.0.1") -> str:
    """MLFLOW_TRACKING_URI if set; else start or reuse the local server of data_dir and export its URI.

    data_dir defaults to $ICH_HOME or ./.ich. The URI goes into os.environ so Ray workers inherit it.
    host: the address the server listens on (a routable one when Ray spans machines, see decide_tracking).
    """
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    for key, value in TELEMETRY_OFF_ENV.items():
        os.environ.setdefault(key, value)
    data_dir = Path(data_dir).resolve() if data_dir is not None else default_data_dir()
    with _start_lock(data_dir):
        record = _running_server(data_dir)
        if record and urlsplit(record["uri"]).hostname != host:
            raise MlflowServerError(f"the MLflow server of {data_dir} already runs at {record['uri']}, not on {host}; "
                                    "stop it with `ich ui --stop` first")
        uri = record["uri"] if record else start_server(data_dir, host=host).uri
    os.environ["MLFLOW_TRACKING_URI"] = uri
    if not quiet:
        print(f"MLflow UI: {uri}", flush=True)
    return uri


def stop_local_server(data_dir: str | os.PathLike | None = None) -> bool:
    """Stop the recorded server of data_dir; True if one was running. Only a server the record proves
    (_unproven) is signalled; a stale record is said to be (one line) and removed, its process left alone."""
    data_dir = Path(data_dir).resolve() if data_dir is not None else default_data_dir()
    with _start_lock(data_dir):
        record = _read_record(data_dir)
        why = _unproven(data_dir, record) if record else "absent"
        if record and why:
            _say_stale(data_dir, why)
        if not why:
            _stop_pid(record["pid"], None, 15.0)
        _record_path(data_dir).unlink(missing_ok=True)
    return not why


def password_in_uri(uri: str) -> str | None:
    """The one-line refusal for a tracking URI that carries a password (it would be printed and shipped)."""
    if urlsplit(uri).password:
        return ("MLFLOW_TRACKING_URI carries a password (user:password@host): it would be printed and handed to "
                "every trial; put the credentials in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD on "
                "each node instead")
    return None


def outward_ip() -> str:
    """This machine's address on its default route (no packet is sent: a UDP socket is only connected)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 80))  # as Ray does: the default route picks the source address
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def initial_tracking_uri(data_dir: str | os.PathLike | None = None, mlflow_host: str | None = None) -> tuple[str, bool]:
    """(tracking URI, started by the project?) before Ray starts. MLFLOW_TRACKING_URI when set (refused in
    one line if it carries a password); else the project's server, on 127.0.0.1 or on mlflow_host ('auto':
    this machine's outward address). Whether every node reaches it is checked once Ray is up."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        if refusal := password_in_uri(uri):
            raise MlflowServerError(refusal)
        return uri, False
    host = outward_ip() if mlflow_host == "auto" else (mlflow_host or "127.0.0.1")
    return ensure_tracking_uri(data_dir, host=host), True


def main_ui(argv: list[str] | None = None) -> int:
    """`ich ui`: start or reuse the local MLflow server and print its address; it stays in the background."""
    parser = argparse.ArgumentParser(
        prog="ich ui", description="Start (or reuse) the local MLflow server and print its UI address.")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="project data folder (default: $ICH_HOME or ./.ich)")
    parser.add_argument("--stop", action="store_true", help="stop the local server instead")
    args = parser.parse_args(argv)
    if args.stop:
        stopped = stop_local_server(args.data_dir)
        print("MLflow server stopped" if stopped else "no local MLflow server was running")
        return 0
    if os.environ.get("MLFLOW_TRACKING_URI"):
        if refusal := password_in_uri(os.environ["MLFLOW_TRACKING_URI"]):  # refused as by the sweep, not printed
            raise MlflowServerError(refusal)
        print(f"MLflow UI: {os.environ['MLFLOW_TRACKING_URI']} (from MLFLOW_TRACKING_URI)")
        return 0
    ensure_tracking_uri(args.data_dir)  # MlflowServerError: one line and exit 2 from the caller's handler, as the sweep
    return 0


if __name__ == "__main__":
    from ich.errors import run_cli
    sys.exit(run_cli("ich ui", main_ui))
