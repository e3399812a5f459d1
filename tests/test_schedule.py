"""Scheduled experiments: `ich schedule` writes the job; the local job script runs a sweep and exits with its status.

Unit tests: what goes into the job script, the cron line and the systemd units is validated and quoted (a
name with `$(...)`, quotes or a newline is refused; a data path with them is inert), removal matches the
exact entry, and the cluster job submits the project with a relative entrypoint. The cluster runs under
cron's environment are in tests/test_schedule_cluster.py.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from argparse import Namespace
from pathlib import Path

import pytest

from sweeps.cli import main as ich_main
from sweeps import schedule
from sweeps.schedule import JobSpec, ScheduleError
from tests.fixtures_sweep import write_sweep_config
from tests.test_quiet_logs import _tracebacks

ROOT = Path(__file__).resolve().parent.parent
EVIL = ["$(touch {m})", "`touch {m}`", "a'; touch {m}; '", 'a"; touch {m}; "', "a\ntouch {m}", "a;touch {m}",
        "a && touch {m}", "a|touch {m}", "x$IFS$(touch${{IFS}}{m})"]


def _args(**kw) -> Namespace:
    base = dict(experiment="nightly", data=None, num_samples=2, config=None, every="0 3 * * *", systemd=None,
                address=None, token_path=schedule.DEFAULT_TOKEN_PATH, install=False, remove=False)
    return Namespace(**{**base, **kw})


def _fake_dataset(folder: Path) -> Path:
    """A folder `ich schedule` accepts locally (it only checks for manifest.json); its manifest is bogus so a
    sweep run on it stops at once with one line."""
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    return folder


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name", ["nightly", "ich17", "ich17.v2_gpu-b", "A" * 64])
def test_names_accepted(name):
    assert schedule.check_name(name) == name


@pytest.mark.parametrize("name", [e.format(m="/tmp/x") for e in EVIL] + ["", "-x", ".x", "a b", "a/b", "a\tb",
                                                                           "A" * 65, "über", "a\n"])
def test_names_refused_in_one_line(name):
    with pytest.raises(ScheduleError) as e:
        schedule.check_name(name)
    assert "\n" not in str(e.value) and "experiment name" in str(e.value)


@pytest.mark.parametrize("spec", ["0 3 * * *", "*/15 1-5 * JAN,FEB mon-fri", "@daily", "@reboot", "  0 3 * * *  "])
def test_cron_schedules_accepted(spec):
    assert schedule.check_cron(spec) == " ".join(spec.split())


@pytest.mark.parametrize("spec", ["0 3 * * * ; touch /tmp/x", "0 3 * * *\n* * * * * touch /tmp/x", "0 3 * *",
                                  "% * * * *", "0 3 * * $(id)", "@evil", "0 3 * * * '", ""])
def test_cron_schedules_refused(spec):
    with pytest.raises(ScheduleError, match="not a cron schedule"):
        schedule.check_cron(spec)


@pytest.mark.parametrize("spec", ["*-*-* 03:00:00", "daily", "Mon..Fri 02:30", "*-*-* 0/6:00:00 UTC"])
def test_on_calendar_accepted(spec):
    assert schedule.check_on_calendar(spec) == spec


@pytest.mark.parametrize("spec", ["daily\nExecStartPre=/bin/touch /tmp/x", "daily\rX=1", "%h", "daily;x",
                                  "$(id)", "", "   "])
def test_on_calendar_refused(spec):
    with pytest.raises(ScheduleError, match="OnCalendar"):
        schedule.check_on_calendar(spec)


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265$(id)", "http://h:8265 --x", "ftp://h:1", "h:8265",
                                     "http://h:8265\n"])
def test_addresses_refused(address):
    with pytest.raises(ScheduleError, match="--address"):
        schedule.check_address(address)


def test_evil_name_refused_by_the_command_and_nothing_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ICH_HOME", str(tmp_path / "home"))
    data = _fake_dataset(tmp_path / "ds")
    marker = tmp_path / "PWNED"
    for evil in EVIL:
        rc = ich_main(["schedule", "--experiment", evil.format(m=marker), "--data", str(data)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and err.startswith("ich schedule: error: experiment name "), err
    assert not (tmp_path / "home" / "schedules").exists() and not marker.exists()


# ------------------------------------------------------------------------------------------ quoting is inert


def test_injection_in_data_path_is_inert_when_the_job_runs(tmp_path, monkeypatch, capsys):
    """A dataset folder whose name carries command substitutions and quotes is passed to the sweep as one
    literal argument: the script runs the real sweep, which refuses the (bogus) dataset; no marker appears."""
    marker = tmp_path / "PWNED"
    evil_dir = tmp_path / ("ds $(touch " + str(marker) + ") `touch " + str(marker) + "` ' \" ;touch " + str(marker))
    data = _fake_dataset(evil_dir)
    home = tmp_path / "home with 'quote' and $HOME"
    monkeypatch.setenv("ICH_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert ich_main(["schedule", "--experiment", "inert", "--data", str(data), "--every", "@daily"]) == 0
    script = home / "schedules" / "inert.sh"
    cron = (home / "schedules" / "inert.cron").read_text()
    command = cron.rsplit("  # ich-schedule ", 1)[0].split(" ", 1)[1]
    assert cron.startswith("@daily ") and shlex.split(command) == [str(script)]  # one word for cron's /bin/sh
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "SHELL": "/bin/sh"}  # cron's environment
    out = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=600)
    log = (home / "schedules" / "inert.log").read_text()
    assert out.returncode == 2, (out.stdout, out.stderr, log[-3000:])
    assert str(data) in log and "sweep: error:" in log, log[-3000:]  # the literal path reached the sweep
    assert not marker.exists() and not (ROOT / "PWNED").exists()
    assert "done (exit 2)" in log


def test_cron_line_and_units_quote_the_script_path(tmp_path):
    script = tmp_path / "it's a $HOME `x`" / "nightly.sh"
    line = schedule.cron_line("0 3 * * *", script, "nightly")
    assert line.endswith("  # ich-schedule nightly\n")
    assert shlex.split(line.split("  # ich-schedule")[0]) == ["0", "3", "*", "*", "*", str(script)]
    with pytest.raises(ScheduleError, match="'%'"):
        schedule.cron_line("0 3 * * *", tmp_path / "100%" / "x.sh", "x")
    units = schedule.systemd_units("nightly", "*-*-* 03:00:00", tmp_path / 'a "b" 50% $USER' / "nightly.sh")
    exec_line = units["ich-sweep-nightly.service"].split("ExecStart=")[1].splitlines()[0]
    assert exec_line == '"' + str(tmp_path).replace("%", "%%") + '/a \\"b\\" 50%% $$USER/nightly.sh"'
    assert "OnCalendar=*-*-* 03:00:00\n" in units["ich-sweep-nightly.timer"]
    with pytest.raises(ScheduleError):
        schedule.systemd_units("nightly", "daily\nExecStartPre=/bin/touch /tmp/x", tmp_path / "x.sh")
    with pytest.raises(ScheduleError):
        schedule.systemd_quote("a\nb")


def test_removal_matches_the_exact_entry():
    crontab = ("MAILTO=me\n"
               "0 3 * * * /h/schedules/night.sh  # ich-schedule night\n"
               "0 4 * * * /h/schedules/nightly.sh  # ich-schedule nightly\n"
               "0 5 * * * /h/schedules/xnight.sh  # ich-schedule xnight\n"
               "0 6 * * * /usr/bin/backup  # night backups, not ours\n"
               "0 7 * * * /h/schedules/night.sh  # ich-schedule night")  # no final newline
    kept = schedule.crontab_without(crontab, "night")
    assert kept == ("MAILTO=me\n0 4 * * * /h/schedules/nightly.sh  # ich-schedule nightly\n"
                    "0 5 * * * /h/schedules/xnight.sh  # ich-schedule xnight\n"
                    "0 6 * * * /usr/bin/backup  # night backups, not ours\n")
    assert schedule.crontab_without(kept, "nightly").count("ich-schedule") == 1
    assert schedule.crontab_without("", "night") == ""


# -------------------------------------------------------------------------------------------- cluster jobs


def test_cluster_job_submits_the_project_with_a_relative_entrypoint(tmp_path):
    token = tmp_path / "ray_auth_token"
    token.write_text("t" * 64)
    spec = schedule.build_spec(_args(data="/home/ubuntu/ich17-ds", address="http://127.0.0.1:8265",
                                     token_path=str(token), config=str(ROOT / "sweeps" / "configs" / "gpu.yaml")),
                               tmp_path / "home")
    cmd = schedule.job_command(spec)
    assert Path(cmd[0]).is_absolute() and Path(cmd[0]).name == "ray" and cmd[1:3] == ["job", "submit"]
    assert cmd[cmd.index("--address") + 1] == "http://127.0.0.1:8265"
    assert cmd[cmd.index("--working-dir") + 1] == str(ROOT)
    assert ".git" in json.loads(cmd[cmd.index("--runtime-env-json") + 1])["excludes"]
    entry = cmd[cmd.index("--") + 1:]
    assert entry[:2] == ["python", "sweeps/coatnet.py"]  # the cluster's python, a path inside the working dir
    assert not any(str(ROOT) in a or os.sys.executable in a for a in entry), entry
    assert entry[entry.index("--config") + 1] == "sweeps/configs/gpu.yaml"
    assert entry[entry.index("--data") + 1] == "/home/ubuntu/ich17-ds"  # a path on the cluster, not resolved here
    script = schedule.job_script(spec)
    assert "export RAY_AUTH_MODE=token\n" in script
    assert f"export RAY_AUTH_TOKEN_PATH={shlex.quote(str(token))}\n" in script
    assert "MLFLOW_TRACKING_URI" not in script and "PASSWORD" not in script


def test_cluster_job_refusals(tmp_path):
    token = tmp_path / "tok"
    token.write_text("x")
    with pytest.raises(ScheduleError, match="no such file"):
        schedule.build_spec(_args(data="/d", address="http://h:8265", token_path=str(tmp_path / "none")), tmp_path)
    with pytest.raises(ScheduleError, match="absolute path on the cluster"):
        schedule.build_spec(_args(data="rel/ds", address="http://h:8265", token_path=str(token)), tmp_path)
    with pytest.raises(ScheduleError, match="control character"):
        schedule.build_spec(_args(data="/d\ntouch /tmp/x", address="http://h:8265", token_path=str(token)), tmp_path)


def test_local_job_refuses_a_password_in_the_tracking_uri(tmp_path, monkeypatch):
    data = _fake_dataset(tmp_path / "ds")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://admin:secret@10.0.0.1:5000")
    with pytest.raises(ScheduleError, match="carries a password"):
        schedule.build_spec(_args(data=str(data)), tmp_path)


@pytest.mark.integration
def test_schedule_writes_cron_and_systemd(tmp_path, digits_dataset, monkeypatch, capsys):
    monkeypatch.setenv("ICH_HOME", str(tmp_path))
    token = tmp_path / "ray_auth_token"
    token.write_text("t" * 64)
    assert ich_main(["schedule", "--experiment", "nightly", "--data", "/srv/ich17-ds", "--every", "30 2 * * *",
                     "--address", "http://127.0.0.1:8265", "--token-path", str(token)]) == 0
    script = (tmp_path / "schedules" / "nightly.sh").read_text()
    assert "job submit --address http://127.0.0.1:8265 --working-dir" in script and "RAY_AUTH_MODE=token" in script
    assert "-- python sweeps/coatnet.py --experiment nightly --data /srv/ich17-ds" in script
    assert "flock -n 9" in script
    assert (tmp_path / "schedules" / "nightly.cron").read_text().startswith("30 2 * * * ")
    assert ich_main(["schedule", "--experiment", "nightly", "--data", str(digits_dataset),
                     "--systemd", "*-*-* 02:30:00"]) == 0
    timer = (tmp_path / "schedules" / "ich-sweep-nightly.timer").read_text()
    assert "OnCalendar=*-*-* 02:30:00" in timer
    capsys.readouterr()
    assert ich_main(["schedule", "--experiment", "x", "--data", str(tmp_path)]) == 2  # not a dataset
    assert "not a dataset" in capsys.readouterr().err


# Two scheduled runs extending one sweep (new trials, one Optuna study continued without replaying a proposal,
# soups over all checkpoints, `champion` moved only when beaten, every epoch recorded once) run once, on the
# namespace cluster under cron's environment: tests/test_schedule_cluster.py. A pair of local runs here repeated
# the same claims with two more sweeps; the local job script's own path runs in
# test_scheduled_sweep_with_a_failed_trial_exits_3_and_logs_why below.


# ----------------------------------------------------- schedules that mean something, installs that fail (issue 25)


def _program(folder: Path, name: str, body: str) -> Path:
    """A stand-in for a system program (crontab, systemctl) first on PATH: this machine's real crontab and user
    units are never touched, and a failing one can be planted."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _crontab(bin_dir: Path, table: Path) -> None:
    """A working crontab whose user table is the file `table`."""
    t = shlex.quote(str(table))
    _program(bin_dir, "crontab", f'case "$1" in\n  -l) [ -f {t} ] && exec cat {t}; echo "no crontab for $USER" >&2; '
                                 f'exit 1 ;;\n  -) exec cat > {t} ;;\nesac\nexit 2\n')


@pytest.fixture
def sched_home(tmp_path, monkeypatch):
    """ICH_HOME and HOME in tmp_path, stand-in programs in tmp_path/bin first on PATH."""
    monkeypatch.setenv("ICH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.mark.parametrize("every", ["99 99 99 99 99", "every tuesday please", "0 3 31 2 * *", "61 * * * *"])
def test_meaningless_cron_schedules_refused_in_one_line_before_anything_is_written(sched_home, capsys, every):
    data = _fake_dataset(sched_home / "ds")
    assert ich_main(["schedule", "--experiment", "nightly", "--data", str(data), "--every", every]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ich schedule: error: --every {every!r}: not a cron schedule"), err
    assert not (sched_home / "home" / "schedules").exists()
    # Control: a valid expression is accepted and written.
    assert ich_main(["schedule", "--experiment", "nightly", "--data", str(data), "--every", "0 3 * * 1-5"]) == 0
    assert (sched_home / "home" / "schedules" / "nightly.cron").read_text().startswith("0 3 * * 1-5 ")


def test_out_of_range_fields_pass_the_character_check_and_fail_the_parser():
    """Why croniter is there: '99 99 99 99 99' is made of allowed characters (shell-safe) yet means no time."""
    assert all(schedule.CRON_FIELD_RE.fullmatch(f) for f in "99 99 99 99 99".split())
    with pytest.raises(ScheduleError, match=r"out of range"):
        schedule.check_cron("99 99 99 99 99")


def test_meaningless_on_calendar_refused_by_systemd_analyze(sched_home, capsys):
    if not shutil.which("systemd-analyze"):
        from tests.conftest import require_service
        require_service("systemd-analyze (systemd) is not installed")
    data = _fake_dataset(sched_home / "ds")
    # Letters and spaces only: the character check lets it through, systemd's own parser refuses it.
    assert schedule.ON_CALENDAR_RE.fullmatch("every tuesday please")
    assert ich_main(["schedule", "--experiment", "nightly", "--data", str(data),
                     "--systemd", "every tuesday please"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--systemd 'every tuesday please': not a systemd OnCalendar expression" in err
    assert not (sched_home / "home" / "schedules").exists()
    assert ich_main(["schedule", "--experiment", "nightly", "--data", str(data), "--systemd", "Tue 03:00"]) == 0


def test_timezone(sched_home, capsys):
    data = _fake_dataset(sched_home / "ds")
    base = ["schedule", "--experiment", "nightly", "--data", str(data)]
    for bad in ["Mars/Olympus", "../../etc/passwd", "UTC; touch /tmp/x"]:
        assert ich_main(base + ["--timezone", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--timezone {bad!r}: not a known timezone" in err, err
    assert not (sched_home / "home" / "schedules").exists()
    assert ich_main(base + ["--timezone", "Europe/Berlin"]) == 0  # control
    cron = (sched_home / "home" / "schedules" / "nightly.cron").read_text()
    assert cron.splitlines()[:2] == ["# ich-schedule nightly", "CRON_TZ=Europe/Berlin"], cron
    assert ich_main(base + ["--timezone", "America/New_York", "--systemd", "*-*-* 03:00:00"]) == 0
    timer = (sched_home / "home" / "schedules" / "ich-sweep-nightly.timer").read_text()
    assert "OnCalendar=*-*-* 03:00:00 America/New_York\n" in timer


def test_install_failures_are_one_line(sched_home, capsys):
    data = _fake_dataset(sched_home / "ds")
    base = ["schedule", "--experiment", "nightly", "--data", str(data), "--install"]
    _program(sched_home / "bin", "crontab", 'echo "crontab: cannot write the crontab: permission denied" >&2\nexit 1\n')
    assert ich_main(base) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ich schedule: error: --install: `crontab -` failed with exit 1: "
                                                   "crontab: cannot write the crontab: permission denied"), err
    _program(sched_home / "bin", "systemctl", 'echo "Failed to connect to bus: No medium found" >&2\nexit 1\n')
    assert ich_main(base + ["--systemd", "daily"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`systemctl --user daemon-reload` failed with exit 1: Failed to connect to bus" in err
    # Controls: the same installs with programs that work.
    _crontab(sched_home / "bin", sched_home / "table")
    assert ich_main(base) == 0
    assert (sched_home / "table").read_text().endswith("  # ich-schedule nightly\n")
    _program(sched_home / "bin", "systemctl", "exit 0\n")
    assert ich_main(base + ["--systemd", "daily"]) == 0
    assert (sched_home / "user" / ".config" / "systemd" / "user" / "ich-sweep-nightly.timer").is_file()


def test_list_shows_installed_schedules_with_their_next_run(sched_home, capsys):
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo
    data = _fake_dataset(sched_home / "ds")
    table = sched_home / "table"
    table.write_text("MAILTO=me\n0 6 * * * /usr/bin/backup\n")  # the user's own lines stay
    _crontab(sched_home / "bin", table)
    _program(sched_home / "bin", "systemctl", "exit 0\n")
    for name, extra in [("plain", ["--every", "15 4 * * *"]), ("berlin", ["--every", "0 3 * * *", "--timezone",
                                                                           "Europe/Berlin"]),
                        ("timer", ["--systemd", "*-*-* 02:30:00"])]:
        assert ich_main(["schedule", "--experiment", name, "--data", str(data), "--install", *extra]) == 0
    capsys.readouterr()
    assert ich_main(["schedule", "--list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"plain", "berlin", "timer"}, out

    def next_at(hour, minute, zone):  # the reference, by hand: the next hh:mm wall-clock time in that zone
        now = datetime.now(zone)
        at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        return (at if at > now else at + timedelta(days=1)).isoformat()
    berlin = ZoneInfo("Europe/Berlin")
    assert rows["berlin"].split()[1:] == ["cron", "0", "3", "*", "*", "*", "Europe/Berlin", next_at(3, 0, berlin)]
    local = datetime.now().astimezone().tzinfo
    assert rows["plain"].split()[1:] == ["cron", "15", "4", "*", "*", "*", "local", next_at(4, 15, local)]
    assert rows["timer"].split()[1:5] == ["systemd", "*-*-*", "02:30:00", "local"]
    # Removing the zoned entry takes its CRON_TZ line along; the user's lines and the other entry stay.
    assert ich_main(["schedule", "--experiment", "berlin", "--remove"]) == 0
    assert table.read_text() == ("MAILTO=me\n0 6 * * * /usr/bin/backup\n"
                                 + schedule.cron_line("15 4 * * *", sched_home / "home" / "schedules" / "plain.sh",
                                                      "plain"))


def test_run_now_needs_a_written_schedule(sched_home, capsys):
    assert ich_main(["schedule", "--run-now", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--run-now nope: no job script at " in err
    assert ich_main(["schedule", "--data", "x"]) == 2
    assert "--experiment is required" in capsys.readouterr().err


@pytest.mark.integration
def test_scheduled_sweep_with_a_failed_trial_exits_3_and_logs_why(ray_local, mlflow_server, mlflow_client,
                                                                 digits_dataset, tmp_path):
    """The issue's acceptance test: a scheduled sweep with a planted failing trial (the trainer's test hook:
    exactly one trial fails at every attempt), run now through `ich schedule --run-now` as a user would; the
    job's log holds the sweep's summary line and the exit status, and the status reaches the caller. The same
    sweep shows what a failing sweep still builds (tests/test_exit_status.py: its decision, line and control):
    the failed trial's run FAILED, the other's FINISHED, soups of the good trial only, and the sweep run's
    ich.failed_trials tag. And quiet logs (tests/test_quiet_logs.py, one sweep for both claims): the log holds the
    planted fault's traceback from Ray (each attempt's) and no other one."""
    import ray
    home = tmp_path / "home"
    config = write_sweep_config(tmp_path, "sched-fail", **{
        "epochs: 3": "epochs: 2", "grace_period: 1": "grace_period: 2", "max_failures: 2": "max_failures: 1",
        "{epochs: 4,": "{epochs: 1,"})
    env = {**os.environ, "ICH_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_server,
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "ICH_FAULTS": "mid_epoch:1:fail",
           "RAY_DEDUP_LOGS": "0"}  # no repeated traceback hidden behind "[repeated 2x across cluster]"
    ich = str(Path(os.sys.executable).with_name("ich"))
    subprocess.run([ich, "schedule", "--experiment", "sched-fail", "--config", str(config), "--data",
                    str(digits_dataset), "--num-samples", "2"], env=env, check=True, capture_output=True)
    out = subprocess.run([ich, "schedule", "--run-now", "sched-fail"], env=env, capture_output=True, text=True,
                         timeout=900)
    log = (home / "schedules" / "sched-fail.log").read_text()
    failed = (home / "faults" / "sched-fail" / "mid_epoch-failing-trial").read_text()
    assert out.returncode == 3, (out.stdout[-2000:], out.stderr[-2000:], log[-4000:])
    lines = [line for line in log.splitlines() if line.startswith("sweep sched-fail: ") and "trials failed" in line]
    assert len(lines) == 1, log[-4000:]
    assert lines[0].startswith(f"sweep sched-fail: 1 of 2 trials failed after 1 retries: {failed} (RuntimeError: "
                               "injected fault"), lines[0]
    assert lines[0].endswith("; soups and report built from the 1 others; exit 3 (--allow-failed-trials 1 to accept)")
    assert log.rstrip().endswith("sweep sched-fail: done (exit 3)"), log[-2000:]
    assert lines[0] in out.stdout and "sweep sched-fail: exit 3" in out.stdout  # --run-now shows how it ended
    assert f"{failed} (RuntimeError: injected fault: trial {failed} fails at mid_epoch of epoch 1" in lines[0]
    found = _tracebacks(log)
    assert found, "the planted fault printed no traceback"
    foreign = [tb for tb in found if "injected fault" not in tb]
    assert not foreign, f"{len(foreign)} of {len(found)} tracebacks are not the planted fault's:\n{foreign[0][:3000]}"
    assert "resource_tracker" not in log
    # What could be built was built: soups of the good trial, and only of it.
    exp = mlflow_client.get_experiment_by_name("sched-fail").experiment_id
    trials = mlflow_client.search_runs([exp], "tags.`ich.kind` = 'trial' AND tags.`ich.sweep` = 'sched-fail'")
    statuses = {r.data.tags["ich.trial"]: r.info.status for r in trials}
    assert statuses[failed] == "FAILED" and list(statuses.values()).count("FINISHED") == 1, statuses
    good = next(trial for trial, status in statuses.items() if status == "FINISHED")
    soups = mlflow_client.search_runs([exp], "tags.`ich.kind` = 'soup' AND tags.`ich.sweep` = 'sched-fail'")
    assert soups, "no soup was built from the good trial"
    assert all(failed not in s.data.tags.get("ich.trial", "") for s in soups), [s.data.tags for s in soups]
    assert any(s.data.tags.get("ich.trial") == good for s in soups), [s.data.tags for s in soups]
    sweep_run = mlflow_client.search_runs([exp], "tags.`ich.kind` = 'sweep'")[0]
    assert sweep_run.data.tags["ich.failed_trials"] == failed
