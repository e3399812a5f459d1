"""`ich schedule`: run a named sweep on a schedule (cron or a systemd user timer).

Each run of the job extends the same sweep: new trials guided by the sweep's persisted Optuna study, soups
rebuilt over all checkpoints so far, `champion` moved only when the new best soup beats it on val.
The job script takes a lock, so a run that is still going when the next one is due is not doubled.

Locally the job runs this machine's `python sweeps/coatnet.py`. With `--address` it submits the project to
the cluster's Jobs API: `ray job submit --working-dir <project> -- python sweeps/coatnet.py ...` from a clone
(from an installed wheel only the packages ich, soups and sweeps travel, as py_modules, and the entrypoint is
`python -m sweeps.coatnet`), run by the cluster's Python (neither this machine's venv nor its paths exist there),
with token auth from `RAY_AUTH_TOKEN_PATH`. The script works in cron's bare environment (`env -i HOME PATH
SHELL`): it exports what it needs and calls `ray` by its absolute path.

Nothing a user passes reaches a shell unquoted: names, schedules and addresses are validated (conservative
character sets), and every value is shell-quoted (job script, cron line) or systemd-escaped (units). A schedule
must also mean something: cron expressions are parsed by croniter, OnCalendar ones by `systemd-analyze calendar`
(where it exists), timezones by zoneinfo; a refusal is one line and comes before anything is written.

The job script exits with the sweep's status (3: trials failed after their retries, sweeps/coatnet.py), so cron
mail, `--run-now` and whoever reads the log see a failed run as one.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from ich.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOKEN_PATH = "~/.ich/ray_auth_token"  # where cluster.yaml and docs/cluster.md keep the Ray token
# Not shipped to the cluster with --working-dir (Ray also honours .gitignore, which drops .venv, .ich, ...).
WORKING_DIR_EXCLUDES = [".git", ".venv", ".ich", ".ich-ci", "test-artifacts", "bench/out", "**/__pycache__"]

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CRON_FIELD_RE = re.compile(r"[A-Za-z0-9*,/-]{1,64}")  # no `%`: cron turns it into a newline
CRON_KEYWORDS = {"@reboot", "@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
ON_CALENDAR_RE = re.compile(r"[A-Za-z0-9 *:,./~+-]{1,128}")
ADDRESS_RE = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?/?")
MARKER_RE = re.compile(r"#\s*ich-schedule\s+(\S+)\s*$")  # the tag at the end of an ich cron line
TIMEZONE_RE = re.compile(r"[A-Za-z0-9_+/-]{1,64}")  # IANA names (Europe/Berlin, Etc/GMT+5, UTC)
UNIT_DIR = Path("~/.config/systemd/user")  # systemd user units (expanded when used: tests move HOME)


class ScheduleError(ConfigError):
    """A name, path or schedule `ich schedule` refuses; the message says which and why, in one line."""


def _control_chars(s: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in s)


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ScheduleError(f"experiment name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                            "letter or digit (it names the job script, the cron entry and the systemd units)")
    return name


def check_cron(schedule: str) -> str:
    fields = schedule.split()
    if len(fields) == 1 and fields[0] in CRON_KEYWORDS:
        return fields[0]
    if len(fields) != 5 or not all(CRON_FIELD_RE.fullmatch(f) for f in fields):
        raise ScheduleError(f"--every {schedule!r}: not a cron schedule (5 fields of digits, letters, '*', ',', "
                            f"'/', '-', or one of {', '.join(sorted(CRON_KEYWORDS))})")
    from croniter import croniter
    try:  # the character check keeps the shell safe; croniter says whether the fields mean a time
        croniter(" ".join(fields))
    except ValueError as e:  # croniter's errors are ValueErrors
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ScheduleError(f"--every {schedule!r}: not a cron schedule ({reason})") from None
    return " ".join(fields)


def check_on_calendar(spec: str, timezone: str | None = None) -> str:
    """The OnCalendar value (with the timezone suffix), parsed by `systemd-analyze calendar` where it exists."""
    if not ON_CALENDAR_RE.fullmatch(spec) or not spec.strip():
        raise ScheduleError(f"--systemd {spec!r}: not a systemd OnCalendar expression (letters, digits, spaces and "
                            "'*:,./~+-' only, e.g. '*-*-* 03:00:00' or 'daily')")
    value = spec.strip() + (f" {check_timezone(timezone)}" if timezone else "")
    analyze = shutil.which("systemd-analyze")
    if analyze:
        out = subprocess.run([analyze, "calendar", value], capture_output=True, text=True)
        if out.returncode:
            reason = " ".join(out.stderr.split()) or f"exit {out.returncode}"
            raise ScheduleError(f"--systemd {value!r}: not a systemd OnCalendar expression ({reason})")
    return value


def check_timezone(timezone: str) -> str:
    try:
        if TIMEZONE_RE.fullmatch(timezone) and ".." not in timezone:
            ZoneInfo(timezone)
            return timezone
    except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError; a path outside TZPATH a ValueError
        pass
    raise ScheduleError(f"--timezone {timezone!r}: not a known timezone (an IANA name such as Europe/Berlin or UTC)")


def check_address(address: str) -> str:
    if not ADDRESS_RE.fullmatch(address):
        raise ScheduleError(f"--address {address!r}: not the http(s)://HOST:PORT of a Ray Jobs API "
                            "(e.g. http://127.0.0.1:8265 through `ray dashboard cluster.yaml`)")
    return address


def check_path(what: str, path: str) -> str:
    if not path or _control_chars(path):
        raise ScheduleError(f"{what} {path!r}: empty or contains a control character (newline, tab, ...)")
    return path


@dataclass
class JobSpec:
    """One scheduled sweep. Paths are this machine's, except `data` (and an outside `config`) with an
    address: those are paths on the cluster."""
    name: str
    data: str
    num_samples: int
    home: Path
    config: str | None = None
    address: str | None = None
    token_path: Path | None = None
    tracking_uri: str | None = None  # local mode: the MLFLOW_TRACKING_URI the job runs with
    python: str = sys.executable
    root: Path = ROOT


def sweep_args(spec: JobSpec) -> list[str]:
    args = ["--experiment", spec.name, "--data", spec.data, "--num-samples", str(spec.num_samples)]
    return args + (["--config", spec.config] if spec.config else [])


PACKAGES = ("ich", "soups", "sweeps")  # what the job needs of the project (configs are sweeps' package data)


def is_source_checkout(root: Path) -> bool:
    """The project as a folder of its own (a clone), not installed into a site-packages shared with others."""
    return (root / "pyproject.toml").is_file() and (root / "sweeps" / "coatnet.py").is_file()


def job_command(spec: JobSpec) -> list[str]:
    """The command one run executes (as argv; the script shell-quotes it). With --address from a clone, the
    clone is the job's working dir; from an installed wheel the folder above `sweeps` is site-packages
    (gigabytes of other packages), so only the project's packages travel, as py_modules."""
    if not spec.address:
        return [spec.python, str(spec.root / "sweeps" / "coatnet.py"), *sweep_args(spec)]
    ray = str(Path(spec.python).with_name("ray"))  # this machine's venv: cron's PATH has no venv
    submit = [ray, "job", "submit", "--address", spec.address]
    if is_source_checkout(spec.root):
        return [*submit, "--working-dir", str(spec.root),
                "--runtime-env-json", json.dumps({"excludes": WORKING_DIR_EXCLUDES}),
                "--", "python", "sweeps/coatnet.py", *sweep_args(spec)]
    modules = [str(spec.root / p) for p in PACKAGES]
    return [*submit, "--runtime-env-json", json.dumps({"py_modules": modules, "excludes": ["**/__pycache__"]}),
            "--", "python", "-m", "sweeps.coatnet", *sweep_args(spec)]


def job_script(spec: JobSpec) -> str:
    """A bash script that runs the sweep once, under a lock, logging to $ICH_HOME/schedules/<name>.log."""
    q = shlex.quote
    folder = spec.home / "schedules"
    exports = [f"export ICH_HOME={q(str(spec.home))}"]
    if spec.address:
        exports += ["export RAY_AUTH_MODE=token", f"export RAY_AUTH_TOKEN_PATH={q(str(spec.token_path))}"]
    elif spec.tracking_uri:
        exports.append(f"export MLFLOW_TRACKING_URI={q(spec.tracking_uri)}")
    lines = [
        "#!/bin/bash",
        f"# ich schedule: one run of sweep {spec.name} (written by `ich schedule`; safe to edit).",
        "set -uo pipefail",
        "umask 077",
        f"NAME={q(spec.name)}",
        f"LOG={q(str(folder / f'{spec.name}.log'))}",
        *exports,
        "# MLflow credentials come from this machine's own file, never from this script.",
        'if [ -f "$HOME/.ich/secrets.env" ]; then set -a; . "$HOME/.ich/secrets.env"; set +a; fi',
        f"cd {q(str(spec.root))} || exit 1",
        f"exec 9>{q(str(folder / f'{spec.name}.lock'))}",
        'if ! flock -n 9; then echo "$(date -Is) sweep $NAME: previous run still going, skipping" >> "$LOG"; exit 0; fi',
        'echo "$(date -Is) sweep $NAME: start" >> "$LOG"',
        f'{" ".join(q(c) for c in job_command(spec))} >> "$LOG" 2>&1',
        "rc=$?",
        'echo "$(date -Is) sweep $NAME: done (exit $rc)" >> "$LOG"',
        "exit $rc",
    ]
    return "\n".join(lines) + "\n"


def cron_line(schedule: str, script: Path, name: str, timezone: str | None = None) -> str:
    """The ich entry; with a timezone a tagged comment and a CRON_TZ line come first (cronie reads CRON_TZ; like
    any crontab variable it holds for the lines below it too)."""
    path = str(script)
    if "%" in path or _control_chars(path):  # cron turns `%` into a newline, even inside quotes
        raise ScheduleError(f"{path}: a job script path with '%' or a control character cannot go in a cron line; "
                            "set ICH_HOME to a plainer folder")
    entry = f"{check_cron(schedule)} {shlex.quote(path)}  # ich-schedule {check_name(name)}\n"
    if timezone:
        return f"# ich-schedule {name}\nCRON_TZ={check_timezone(timezone)}\n{entry}"
    return entry


def _marks(line: str, name: str) -> bool:
    return bool((m := MARKER_RE.search(line)) and m.group(1) == name)


def crontab_without(crontab: str, name: str) -> str:
    """The crontab text minus the ich entry of exactly `name` (scheduling `night` keeps `nightly`), with its
    tagged comment and the CRON_TZ line right under that comment."""
    lines = crontab.splitlines(keepends=True)
    kept = [line for i, line in enumerate(lines)
            if not (_marks(line, name) or (line.startswith("CRON_TZ=") and i and _marks(lines[i - 1], name)
                                          and lines[i - 1].lstrip().startswith("#")))]
    text = "".join(kept)
    return text if not text or text.endswith("\n") else text + "\n"


def systemd_quote(value: str) -> str:
    """One argument of a systemd Exec line: double-quoted; `%` (specifiers) and `$` (variables) escaped."""
    if _control_chars(value):
        raise ScheduleError(f"{value!r}: a control character cannot go in a systemd unit")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def systemd_units(name: str, on_calendar: str, script: Path, timezone: str | None = None) -> dict[str, str]:
    name, on_calendar = check_name(name), check_on_calendar(on_calendar, timezone)
    return {
        f"ich-sweep-{name}.service": f"[Unit]\nDescription=ich-soups sweep {name}\n\n[Service]\nType=oneshot\n"
                                    f"ExecStart={systemd_quote(str(script))}\n",
        f"ich-sweep-{name}.timer": f"[Unit]\nDescription=ich-soups sweep {name} on a schedule\n\n[Timer]\n"
                                  f"OnCalendar={on_calendar}\nPersistent=true\n\n[Install]\nWantedBy=timers.target\n",
    }


def add_schedule_args(p: argparse.ArgumentParser) -> None:
    from soups.options import add_experiment_arg
    add_experiment_arg(p, "sweep to extend on every run (MLflow experiment; letters, digits, '.', '_', '-')",
                       required=False, otherwise="required unless --list or --run-now")
    p.add_argument("--config", help="sweep YAML (default sweeps/configs/cpu.yaml); with --address a file inside the "
                                    "project is passed relative to it, any other path is a path on the cluster")
    p.add_argument("--data", help="dataset made by `ich ingest` (with --address: its absolute path on the cluster)")
    p.add_argument("--num-samples", type=int, default=8, help="new trials per run")
    p.add_argument("--every", default="0 3 * * *", help="cron schedule, checked by croniter (default %(default)s: daily 03:00)")
    p.add_argument("--systemd", metavar="ON_CALENDAR", help="write a systemd user timer with this OnCalendar instead "
                                                            "(checked by `systemd-analyze calendar` where it exists)")
    p.add_argument("--timezone", metavar="TZ", help="an IANA timezone for the schedule, e.g. Europe/Berlin (cron: a "
                                                    "CRON_TZ line; systemd: the OnCalendar suffix); default: local time")
    p.add_argument("--address", help="Ray Jobs API of the cluster, e.g. http://127.0.0.1:8265 (default: run locally)")
    p.add_argument("--token-path", default=DEFAULT_TOKEN_PATH,
                   help=f"the cluster's Ray token file, for --address (default {DEFAULT_TOKEN_PATH})")
    p.add_argument("--install", action="store_true", help="install the cron entry / enable the timer too")
    p.add_argument("--remove", action="store_true", help="remove this experiment's cron entry / timer instead")
    p.add_argument("--list", action="store_true", help="list the installed ich schedules: name, expression, "
                                                       "timezone, next run")
    p.add_argument("--run-now", metavar="NAME", help="run the job script of schedule NAME now, in the foreground; "
                                                     "exits with its status (the sweep's: 3 = trials failed)")


def build_spec(a, home: Path) -> JobSpec:
    """Validate the command line into a JobSpec (ScheduleError: one line naming what is wrong)."""
    name = check_name(a.experiment)
    if a.num_samples < 1:
        raise ScheduleError(f"--num-samples {a.num_samples}: must be at least 1")
    check_path("ICH_HOME", str(home))
    if a.data is None:
        raise ScheduleError("--data is required: the dataset made by `ich ingest`")
    data = check_path("--data", a.data)
    config = check_path("--config", a.config) if a.config else None
    spec = JobSpec(name=name, data=data, num_samples=a.num_samples, home=home)
    if a.address:
        spec.address = check_address(a.address)
        if not (data.startswith("/") or "://" in data):
            raise ScheduleError(f"--data {data!r}: with --address give the dataset's absolute path on the cluster "
                                "(or a URI); a relative path would be read from the job's working directory")
        token = Path(check_path("--token-path", a.token_path)).expanduser().resolve()
        if not token.is_file():
            raise ScheduleError(f"--token-path {token}: no such file; it holds the cluster's Ray token "
                                f"(docs/cluster.md keeps it at {DEFAULT_TOKEN_PATH})")
        spec.token_path = token
        if config:
            local = Path(config).resolve()
            # Inside the project it travels with the job (working dir or the sweeps package): relative to the root,
            # which sweeps/config.load_config also resolves against the shipped package.
            spec.config = str(local.relative_to(ROOT)) if local.is_file() and local.is_relative_to(ROOT) else config
        return spec
    local_data = Path(data).resolve()
    if not (local_data / "manifest.json").is_file():
        raise ScheduleError(f"{data}: not a dataset made by `ich ingest` (no manifest.json)")
    spec.data = str(check_path("--data", str(local_data)))
    if config:
        spec.config = check_path("--config", str(Path(config).resolve()))
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        from soups.tracking_server import password_in_uri
        if refusal := password_in_uri(uri):
            raise ScheduleError(refusal)
        spec.tracking_uri = check_path("MLFLOW_TRACKING_URI", uri)
    return spec


def cmd_schedule(a) -> None:
    from ich.home import ich_home
    home = ich_home()
    if a.list:
        list_schedules()
        return
    if a.run_now:
        run_now(check_name(a.run_now), home)
        return
    if not a.experiment:
        raise ScheduleError("--experiment is required (or --list, --run-now NAME)")
    if a.remove:
        remove_schedule(check_name(a.experiment), home, systemd=bool(a.systemd))
        return
    spec = build_spec(a, home)
    name = spec.name
    folder = home / "schedules"
    script = folder / f"{name}.sh"
    # Validate everything that goes into the cron line / units before writing anything.
    if a.systemd and not shutil.which("systemd-analyze"):
        print("systemd-analyze not found: OnCalendar checked for its characters only", file=sys.stderr)
    units = systemd_units(name, a.systemd, script, a.timezone) if a.systemd else None
    line = None if units else cron_line(a.every, script, name, a.timezone)
    folder.mkdir(parents=True, exist_ok=True)
    script.write_text(job_script(spec))
    script.chmod(0o700)
    print(f"job script: {script}")
    if spec.address:
        print(f"submits: {' '.join(shlex.quote(c) for c in job_command(spec)[job_command(spec).index('--') + 1:])} "
              f"to {spec.address} (working dir {spec.root})")
    if units:
        unit_dir = UNIT_DIR.expanduser()
        for fname, text in units.items():
            (folder / fname).write_text(text)
            print(f"systemd unit: {folder / fname}")
            if a.install:
                unit_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(folder / fname, unit_dir / fname)
        if a.install:
            _run(["systemctl", "--user", "daemon-reload"], "--install")
            _run(["systemctl", "--user", "enable", "--now", f"ich-sweep-{name}.timer"], "--install")
            print(f"enabled ich-sweep-{name}.timer")
        return
    (folder / f"{name}.cron").write_text(line)
    print(f"cron entry: {line.strip()}")
    if a.install:
        current = _read_crontab()
        _run(["crontab", "-"], "--install", input=crontab_without(current, name) + line)
        print("installed in the user's crontab")


def _run(cmd: list[str], what: str, **kw) -> None:
    """Run a system program (crontab, systemctl); its failure is one line naming it, not a traceback."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    except OSError as e:
        raise ScheduleError(f"{what}: cannot run {cmd[0]} ({e.strerror or e})") from None
    if out.returncode:
        reason = " ".join((out.stderr or out.stdout).split())[:300] or "no message"
        raise ScheduleError(f"{what}: `{' '.join(cmd)}` failed with exit {out.returncode}: {reason}")


def _read_crontab() -> str:
    if not shutil.which("crontab"):
        raise ScheduleError("crontab is not installed here; use --systemd or install cron")
    return subprocess.run(["crontab", "-l"], capture_output=True, text=True).stdout  # exit 1: no crontab yet


def installed_schedules(now: datetime | None = None) -> list[dict]:
    """The ich schedules installed for this user: cron entries (tagged) and systemd timers (ich-sweep-*.timer),
    each with its expression, timezone and next run (None where it cannot be told, e.g. @reboot)."""
    from croniter import croniter
    now = now or datetime.now().astimezone()
    rows = []
    if shutil.which("crontab"):
        tz = None  # a CRON_TZ line holds for the entries below it
        for line in _read_crontab().splitlines():
            if line.startswith("CRON_TZ="):
                tz = line.split("=", 1)[1].strip() or None
            m = MARKER_RE.search(line)
            if not m or line.lstrip().startswith("#"):
                continue
            fields = line.split()
            expr = fields[0] if fields[0].startswith("@") else " ".join(fields[:5])
            next_run = None
            try:  # an entry edited by hand may no longer parse: listed, without a next run
                if expr != "@reboot":
                    next_run = croniter(expr, now.astimezone(ZoneInfo(tz) if tz else now.tzinfo)).get_next(datetime)
            except (ValueError, KeyError):  # CroniterError is a ValueError, ZoneInfoNotFoundError a KeyError
                pass
            rows.append({"name": m.group(1), "kind": "cron", "expression": expr, "timezone": tz or "local",
                         "next_run": next_run.isoformat() if next_run else None})
    analyze = shutil.which("systemd-analyze")
    for timer in sorted(UNIT_DIR.expanduser().glob("ich-sweep-*.timer")):
        spec = next((line.split("=", 1)[1] for line in timer.read_text().splitlines()
                     if line.startswith("OnCalendar=")), "")
        last = spec.split()[-1] if spec.split() else ""
        tz = last if "/" in last or last == "UTC" else "local"
        next_run = None
        if analyze:
            out = subprocess.run([analyze, "calendar", spec], capture_output=True, text=True).stdout
            next_run = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                             if line.strip().startswith("Next elapse:")), None)
        rows.append({"name": timer.name[len("ich-sweep-"):-len(".timer")], "kind": "systemd", "expression": spec,
                     "timezone": tz, "next_run": next_run})
    return rows


def list_schedules() -> None:
    rows = installed_schedules()
    if not rows:
        print("no ich schedules installed (cron entries tagged '# ich-schedule', ich-sweep-*.timer units)")
        return
    print(f"{'name':<20} {'kind':<8} {'expression':<24} {'timezone':<16} next run")
    for r in rows:
        print(f"{r['name']:<20} {r['kind']:<8} {r['expression']:<24} {r['timezone']:<16} {r['next_run'] or '-'}")


def run_now(name: str, home: Path) -> None:
    """Run schedule `name`'s job script now, in the foreground; exit with its status (the sweep's)."""
    script = home / "schedules" / f"{name}.sh"
    if not script.is_file():
        raise ScheduleError(f"--run-now {name}: no job script at {script} (write it with ich schedule --experiment "
                            f"{name} ...)")
    log = home / "schedules" / f"{name}.log"
    start = log.stat().st_size if log.is_file() else 0
    rc = subprocess.run(["bash", str(script)]).returncode
    tail = log.read_text(errors="replace")[start:].splitlines()[-3:] if log.is_file() else []
    for line in tail:  # how the run ended; the sweep's summary line is among them when trials failed
        print(line)
    print(f"sweep {name}: exit {rc} (log: {log})")
    if rc:
        raise SystemExit(rc)


def remove_schedule(name: str, home: Path, systemd: bool) -> None:
    """Remove exactly this experiment's cron entry (or timer); its job script and log stay for the record."""
    if systemd:
        unit = f"ich-sweep-{name}.timer"
        subprocess.run(["systemctl", "--user", "disable", "--now", unit], check=False, capture_output=True)
        for fname in (unit, f"ich-sweep-{name}.service"):
            (UNIT_DIR.expanduser() / fname).unlink(missing_ok=True)
        subprocess.run(["systemctl", "--user", "daemon-reload"], check=False, capture_output=True)
        print(f"removed {unit}")
        return
    current = _read_crontab()
    kept = crontab_without(current, name)
    if kept == current:
        print(f"no cron entry for sweep {name}")
        return
    _run(["crontab", "-"], "--remove", input=kept)
    print(f"removed the cron entry of sweep {name}")
