"""`ich schedule`: run a named sweep on a schedule (cron or a systemd user timer).

Each run of the job extends the same sweep: new trials guided by the sweep's persisted Optuna study, soups
rebuilt over all checkpoints so far, `champion` moved only when the new best soup beats it on val.
The job script takes a lock, so a run that is still going when the next one is due is not doubled.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def job_script(name: str, sweep_args: list[str], address: str | None, home: Path, python: str = sys.executable) -> str:
    """A shell script that submits one run of the sweep (to the cluster's Jobs API when `address` is given)."""
    sweep = [python, str(ROOT / "sweeps" / "coatnet.py"), *sweep_args]
    if address:
        ray = str(Path(python).with_name("ray"))
        cmd = [ray, "job", "submit", "--address", address, "--", *sweep]
    else:
        cmd = sweep
    log = home / "schedules" / f"{name}.log"
    return f"""#!/usr/bin/env bash
# ich schedule: one run of sweep '{name}' (written by `ich schedule`; safe to edit).
set -euo pipefail
export ICH_HOME={shlex.quote(str(home))}
{"export RAY_AUTH_MODE=token" if address else ""}
{f"export MLFLOW_TRACKING_URI={shlex.quote(os.environ['MLFLOW_TRACKING_URI'])}" if os.environ.get("MLFLOW_TRACKING_URI") else ""}
cd {shlex.quote(str(ROOT))}
exec 9>{shlex.quote(str(home / "schedules" / f"{name}.lock"))}
if ! flock -n 9; then echo "$(date -Is) sweep {name}: previous run still going, skipping" >> {shlex.quote(str(log))}; exit 0; fi
echo "$(date -Is) sweep {name}: start" >> {shlex.quote(str(log))}
{" ".join(shlex.quote(c) for c in cmd)} >> {shlex.quote(str(log))} 2>&1
echo "$(date -Is) sweep {name}: done" >> {shlex.quote(str(log))}
"""


def cron_line(schedule: str, script: Path) -> str:
    return f"{schedule} {shlex.quote(str(script))}  # ich-schedule {script.stem}\n"


def systemd_units(name: str, on_calendar: str, script: Path) -> dict[str, str]:
    return {
        f"ich-sweep-{name}.service": f"[Unit]\nDescription=ich-soups sweep {name}\n\n[Service]\nType=oneshot\n"
                                    f"ExecStart={script}\n",
        f"ich-sweep-{name}.timer": f"[Unit]\nDescription=ich-soups sweep {name} on a schedule\n\n[Timer]\n"
                                  f"OnCalendar={on_calendar}\nPersistent=true\n\n[Install]\nWantedBy=timers.target\n",
    }


def add_schedule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True, help="sweep to extend on every run (MLflow experiment)")
    p.add_argument("--config", help="sweep YAML (default sweeps/configs/cpu.yaml)")
    p.add_argument("--data", required=True, help="dataset made by `ich ingest`")
    p.add_argument("--num-samples", type=int, default=8, help="new trials per run")
    p.add_argument("--every", default="0 3 * * *", help="cron schedule (default daily 03:00)")
    p.add_argument("--systemd", metavar="ON_CALENDAR", help="write a systemd user timer with this OnCalendar instead")
    p.add_argument("--address", help="Ray Jobs API of the cluster, e.g. http://127.0.0.1:8265 (default: run locally)")
    p.add_argument("--install", action="store_true", help="install the cron entry / enable the timer too")


def cmd_schedule(a) -> None:
    from ich.cli import ich_home
    from ich.errors import ConfigError
    home = ich_home()
    data = Path(a.data).resolve()
    if not (data / "manifest.json").is_file():
        raise ConfigError(f"{a.data}: not a dataset made by `ich ingest` (no manifest.json)")
    name = a.experiment
    sweep_args = ["--experiment", name, "--data", str(data), "--num-samples", str(a.num_samples)]
    if a.config:
        sweep_args += ["--config", str(Path(a.config).resolve())]
    folder = home / "schedules"
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / f"{name}.sh"
    script.write_text(job_script(name, sweep_args, a.address, home))
    script.chmod(0o755)
    print(f"job script: {script}")
    if a.systemd:
        unit_dir = Path.home() / ".config" / "systemd" / "user"
        for fname, text in systemd_units(name, a.systemd, script).items():
            (folder / fname).write_text(text)
            print(f"systemd unit: {folder / fname}")
            if a.install:
                unit_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(folder / fname, unit_dir / fname)
        if a.install:
            subprocess.run(["systemctl", "--user", "daemon-reload"], check=True)
            subprocess.run(["systemctl", "--user", "enable", "--now", f"ich-sweep-{name}.timer"], check=True)
            print(f"enabled ich-sweep-{name}.timer")
        return
    line = cron_line(a.every, script)
    (folder / f"{name}.cron").write_text(line)
    print(f"cron entry: {line.strip()}")
    if a.install:
        if not shutil.which("crontab"):
            raise ConfigError("crontab is not installed here; use --systemd or install cron")
        current = subprocess.run(["crontab", "-l"], capture_output=True, text=True).stdout
        kept = [l for l in current.splitlines(keepends=True) if f"# ich-schedule {name}" not in l]
        subprocess.run(["crontab", "-"], input="".join(kept) + line, text=True, check=True)
        print("installed in the user's crontab")
