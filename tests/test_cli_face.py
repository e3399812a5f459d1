"""One face for the CLI (issue 15.5-15.6): `ich sweep` = `python sweeps/coatnet.py`, `--set a.b=value`
overrides of any config key, help for every option, one exit code for one user error, and output a person
can follow (a line per finished trial, no Ray tables, no bar redrawn into a log).

The --set, help and exit-code cases run in-process (argparse and load_config); the output case runs a tiny
real sweep (local Ray of its own, the session's MLflow server) as a subprocess whose stdout is a pipe: the
session's `demo_sweep_output`, shared with tests/test_quiet_logs.py."""
from __future__ import annotations

import argparse
import re
import types

import pytest

from ich.errors import ConfigError
from sweeps.config import load_config, parse_set
from tests.fixtures_sweep import write_sweep_config


# ------------------------------------------------------------------------------------------ --set parsing

@pytest.mark.parametrize("text, key, value", [
    ("train.lr=3e-4", "train.lr", 3e-4),  # YAML 1.1 alone would read "3e-4" as a string
    ("train.lr=2.0e-4", "train.lr", 2e-4),
    ("num_samples=12", "num_samples", 12),
    ("soup_so_far=true", "soup_so_far", True),
    ("init.weights=null", "init.weights", None),
    ("init.weights=hub:coatnet_0_rw_224", "init.weights", "hub:coatnet_0_rw_224"),
    ("search.model={choice: [a, b]}", "search.model", {"choice": ["a", "b"]}),
    ("search.lr={loguniform: [1e-4, 1e-3]}", "search.lr", {"loguniform": [1e-4, 1e-3]}),
    ("init.preprocess.mean=[0.5, 0.5, 0.5]", "init.preprocess.mean", [0.5, 0.5, 0.5]),
    ("experiment=a=b", "experiment", "a=b"),  # the first = splits
])
def test_parse_set_reads_yaml_values(text, key, value):
    assert parse_set(text) == (key, value)


@pytest.mark.parametrize("text", ["train.lr", "=3", "train..lr=1", ".lr=1", "train.lr=[1, 2"])
def test_parse_set_refuses_malformed_text_in_one_line(text):
    with pytest.raises(ConfigError) as e:
        parse_set(text)
    assert "\n" not in str(e.value) and str(e.value).startswith("--set ")


def test_set_reaches_every_section():
    cfg = load_config(None, sets=["soups.metric=accuracy", "asha.grace_period=1", "train.lr=3e-4",
                                  "init.weights=/models/base.safetensors", "gc.keep_top_k=4", "num_samples=3",
                                  "init.warm_start.epochs=2", "search.lr={loguniform: [1e-4, 1e-3]}"])
    assert cfg.soups.metric == "accuracy" and cfg.asha.grace_period == 1 and cfg.train["lr"] == 3e-4
    assert cfg.init.weights == "/models/base.safetensors" and cfg.gc.keep_top_k == 4 and cfg.num_samples == 3
    assert cfg.init.warm_start["epochs"] == 2 and cfg.init.warm_start["lr"] == 2e-3  # the rest of the block stays
    assert cfg.search["lr"] == {"loguniform": [1e-4, 1e-3]} and "weight_decay" in cfg.search
    default = load_config(None)
    assert (default.soups.metric, default.asha.grace_period, default.num_samples) == ("macro_f1", 2, 8)


def test_set_null_drops_a_training_or_search_key_and_later_sets_win():
    cfg = load_config(None, sets=["search.cutmix=null", "train.grad_clip=null", "num_samples=3", "num_samples=5"])
    assert "cutmix" not in cfg.search and "grad_clip" not in cfg.train and cfg.num_samples == 5


def test_named_option_beats_set():
    assert load_config(None, {"num_samples": 4}, sets=["num_samples=3"]).num_samples == 4
    assert load_config(None, {"num_samples": None}, sets=["num_samples=3"]).num_samples == 3


@pytest.mark.parametrize("text, names", [
    ("nmu_samples=3", ["'nmu_samples'", "the top level", "num_samples", "soups"]),
    ("soups.metrc=accuracy", ["'metrc'", "in soups", "metric", "tie_rule"]),
    ("asha.grace=1", ["'grace'", "in asha", "grace_period", "reduction_factor"]),
    ("train.learning_rate=1e-3", ["'learning_rate'", "in train", "lr", "weight_decay"]),
    ("init.weight=x", ["'weight'", "in init", "weights", "warm_start"]),
    ("search.lrr={uniform: [0, 1]}", ["'lrr'", "in search", "lr"]),
])
def test_set_unknown_key_is_one_line_naming_it_and_the_known_ones(text, names):
    with pytest.raises(ConfigError) as e:
        load_config(None, sets=[text])
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"--set {text.split('=')[0]}: unknown key"), message
    for name in names:
        assert name in message, (name, message)


@pytest.mark.parametrize("text, said", [
    ("num_samples=many", "expected a whole number, got 'many'"),
    ("asha.grace_period=1.5", "expected a whole number, got '1.5'"),
    ("train.lr=fast", "expected a number, got 'fast'"),
    ("soup_so_far=maybe", "expected true or false, got 'maybe'"),
    ("num_samples.x=1", "num_samples is a single value, not a section"),
])
def test_set_value_of_the_wrong_type_is_one_line(text, said):
    with pytest.raises(ConfigError) as e:
        load_config(None, sets=[text])
    assert said in str(e.value) and "\n" not in str(e.value)


def test_set_values_are_validated_like_the_yaml_and_say_so():
    with pytest.raises(ConfigError) as e:
        load_config(None, sets=["soups.metric=top5"])
    assert "cpu.yaml with --set: soups.metric must be one of" in str(e.value)


# ------------------------------------------------------------------------------------------ the CLI tree

def _walk(parser: argparse.ArgumentParser, path: str):
    """(command path, action) of every option and positional of every subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{path} {name}", types.SimpleNamespace(option_strings=[name], help=helps.get(name))
                yield from _walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_option_of_every_subcommand_has_help():
    from sweeps.cli import build_parser
    seen = list(_walk(build_parser(), "ich"))
    missing = [f"{path}: {'/'.join(a.option_strings) or a.dest}" for path, a in seen if not (a.help or "").strip()]
    assert len(seen) > 100 and not missing, missing


def _options(parser: argparse.ArgumentParser) -> list[tuple]:
    return [(tuple(a.option_strings), a.dest, a.help, a.default, a.type, a.nargs, a.const, a.metavar,
             type(a).__name__) for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def test_ich_sweep_has_exactly_the_options_of_coatnet():
    from sweeps.cli import build_parser
    from sweeps.job import add_sweep_args
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["sweep"]
    script = argparse.ArgumentParser()
    add_sweep_args(script)
    assert _options(sub) == _options(script)
    assert {"--set", "--verbose", "--no-report", "--report", "--demo", "--config"} <= {
        o for opts, *_ in _options(sub) for o in opts}
    args = sub.parse_args(["--set", "train.lr=3e-4", "--set", "soups.metric=accuracy"])
    assert args.set == ["train.lr=3e-4", "soups.metric=accuracy"] and not args.no_report and not args.verbose


def _run_main(main, argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, [line for line in err.splitlines() if line.strip()]


def test_ich_sweep_and_the_script_refuse_a_bad_set_alike(capsys):
    from sweeps.cli import main as ich
    from sweeps.job import main as script
    rc1, err1 = _run_main(ich, ["sweep", "--set", "soups.metrc=accuracy", "--no-soups"], capsys)
    rc2, err2 = _run_main(script, ["--set", "soups.metrc=accuracy", "--no-soups"], capsys)
    assert rc1 == rc2 == 2 and len(err1) == len(err2) == 1, (err1, err2)
    assert err1[0].startswith("ich sweep: error: --set soups.metrc: unknown key 'metrc'")
    assert err1[0].removeprefix("ich ") == err2[0]


def test_ui_and_sweep_exit_2_with_one_line_for_a_password_in_the_tracking_uri(tmp_path, capsys, monkeypatch,
                                                                                digits_dataset):
    from sweeps.cli import main as ich
    from sweeps.job import main as script
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://someone:s3cret@127.0.0.1:9")
    monkeypatch.setenv("ICH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = write_sweep_config(tmp_path, "face-password")
    rc1, err1 = _run_main(ich, ["ui"], capsys)
    rc2, err2 = _run_main(script, ["--config", config, "--data", digits_dataset, "--no-soups"], capsys)
    assert rc1 == rc2 == 2 and len(err1) == len(err2) == 1, (err1, err2)
    assert err1[0].split(": error: ")[1] == err2[0].split(": error: ")[1]
    assert "MLFLOW_TRACKING_URI carries a password" in err1[0] and "s3cret" not in err1[0] + err2[0]


# ------------------------------------------------------------------------------------------ progress output

def test_progress_lines_and_epoch_budget_are_pure():
    from sweeps.progress import epoch_budget, trial_line, trial_status
    assert trial_line(3, 8, "853f3a74", "stopped by ASHA", 2, "val_macro_f1", 0.97, 0.9833, {"lr": 0.000715}) == \
        "trial 3/8 853f3a74 stopped by ASHA   2 ep  val_macro_f1 0.9700 (sweep best 0.9833)  lr=0.000715"
    assert trial_status({"epoch": 2}, {"epochs": 6}, 3, error=False) == ("stopped by ASHA", 2)
    assert trial_status({"epoch": 3}, {}, 3, error=False) == ("finished", 3)
    assert trial_status({"epoch": 1}, {}, 3, error=True) == ("failed", 1)
    # 32 trials x 50 epochs: two epochs of one trial already move the bar (a trial count would still read 0/32)
    assert epoch_budget(32, 50, {"a": (50, 2, False)}) == (2, 1600)
    # ASHA's stop after 2 of 6 counts its whole plan as done; a trial's own epochs replace the default plan
    assert epoch_budget(3, 4, {"a": (6, 2, True), "b": (4, 3, False)}) == (9, 14)
    assert epoch_budget(2, 4, {"a": (4, 4, True), "b": (4, 1, True)}) == (8, 8)


def _trial(trial_id, config, last):
    return types.SimpleNamespace(trial_id=trial_id, config=config, last_result=last)


@pytest.mark.parametrize("tty", [False, True])
def test_progress_reporter_prints_one_line_per_trial_and_a_bar_only_on_a_terminal(tty, capsys):
    from sweeps.progress import SweepProgress
    p = SweepProgress(total=2, metric="val_macro_f1", mode="max", planned_epochs=3, params=["lr"], tty=tty)
    a, b = _trial("aaaa0001", {"lr": 1e-3}, {}), _trial("bbbb0002", {"lr": 2e-3, "epochs": 3}, {})
    p.on_step_end(0, [a, b])
    p.on_trial_recover(0, [a, b], b)  # a retry says nothing: the trial has not ended
    for epoch, value in ((1, 0.5), (2, 0.7)):
        p.on_trial_result(0, [a, b], a, {"epoch": epoch, "val_macro_f1": value})
    p.on_trial_complete(0, [a, b], a)  # after 2 of 3 epochs: ASHA stopped it
    p.on_trial_result(0, [a, b], b, {"epoch": 3, "val_macro_f1": 0.6})
    p.on_trial_error(0, [a, b], b)
    p.on_experiment_end([a, b])
    out = capsys.readouterr().out
    assert ("\r" in out) == tty and ("sweep |" in out) == tty
    lines = [line.split("\r")[-1].replace("\x1b[2K", "").replace("\x1b[A", "").rstrip() for line in out.splitlines()]
    lines = [line for line in lines if line]
    trials = [line for line in lines if line.startswith("trial ")]
    assert trials == ["trial 1/2 aaaa0001 stopped by ASHA   2 ep  val_macro_f1 0.7000 (sweep best 0.7000)  lr=0.001",
                      "trial 2/2 bbbb0002 failed            3 ep  val_macro_f1 0.6000 (sweep best 0.7000)  lr=0.002"]
    if tty:  # tqdm's last draw: the whole budget (a: 2 of 3 then stopped, b: 3 of 3) and both trials ended
        assert lines[-1].startswith("sweep |████████████████████████| 6/6 epochs, trials 2/2, best val_macro_f1 0.7000")
        assert "1/6 epochs" in out and "2/6 epochs" in out  # it moved with each epoch, before any trial ended
    else:
        assert lines == trials


def test_progress_counts_on_after_resume(capsys):
    """Tune saves callback states with the experiment and hands them back on --resume: the count goes on from
    the trials that ended before; a trial that failed then and runs again counts once."""
    import json

    from sweeps.progress import SweepProgress
    args = dict(total=3, metric="val_macro_f1", mode="max", planned_epochs=2, params=[], tty=False)
    a, b = _trial("aaaa0001", {}, {}), _trial("bbbb0002", {}, {})
    first = SweepProgress(**args)
    first.on_trial_result(0, [a, b], a, {"epoch": 2, "val_macro_f1": 0.8})
    first.on_trial_complete(0, [a, b], a)
    first.on_trial_result(0, [a, b], b, {"epoch": 1, "val_macro_f1": 0.5})
    first.on_trial_error(0, [a, b], b)
    state = json.loads(json.dumps(first.get_state()))  # plain data

    again = SweepProgress(**args)
    again.set_state({"version": 1, "done": 7})  # another callback's state (Tune keys them by position): ignored
    assert again.done == 0
    again.set_state(state)
    assert (again.done, again.best, again.epochs()) == (2, 0.8, (4, 6))  # both ended trials' plans are done
    c = _trial("cccc0003", {}, {})
    for t, value in ((b, 0.6), (c, 0.9)):
        again.on_trial_result(0, [a, b, c], t, {"epoch": 2, "val_macro_f1": value})
        again.on_trial_complete(0, [a, b, c], t)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trial ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "2/3", "3/3"]
    assert lines[-1].endswith("val_macro_f1 0.9000 (sweep best 0.9000)")


# ------------------------------------------------------------------------------------------ a real sweep's output

RAY_NOISE = ("╭", "│", "Trial status", "Configuration for experiment", "Checkpoint successfully created",
             "View run", "View detailed results", "tensorboard", "A new study created", "Started a local Ray")


@pytest.mark.integration
@pytest.mark.slow
def test_tiny_sweep_prints_a_line_per_trial_then_soups_and_report(demo_sweep_output, mlflow_client):
    """`ich sweep` with stdout a pipe (cron, `ray job logs`): no bar, no Ray tables or info logs, a line per
    trial, the soup table, the report (built by default) and the UI address; the MLflow record is complete.
    The sweep is the session's `ich sweep --demo ... --set soups.scope=across` (tests/fixtures_sweep.py), whose
    output tests/test_quiet_logs.py also reads."""
    out = types.SimpleNamespace(returncode=demo_sweep_output["returncode"], stdout=demo_sweep_output["stdout"])
    assert out.returncode == 0, out.stdout[-4000:]
    lines = out.stdout.splitlines()
    trials = [line for line in lines if re.match(r"trial [123]/3 [0-9a-f]{8} (finished|stopped by ASHA) ", line)]
    assert len(trials) == 3, out.stdout
    assert "\r" not in out.stdout and "sweep |" not in out.stdout  # no bar drawn into a log
    assert not [n for n in RAY_NOISE if n in out.stdout], out.stdout
    assert not [line for line in lines if re.search(r"\t(INFO|WARNING) |^\S+ \S+ INFO ", line)], out.stdout
    assert any(line.startswith("across-best-greedy") for line in lines), out.stdout  # the soup table
    assert any(line.startswith("report: ") for line in lines) and "MLflow UI: " in out.stdout
    assert len(lines) <= 22, f"{len(lines)} lines:\n{out.stdout}"

    # Nothing is lost from the record: the sweep run with its --set, every trial run with its epochs' metric.
    experiment = mlflow_client.get_experiment_by_name("face-output")
    runs = mlflow_client.search_runs([experiment.experiment_id], "tags.`ich.sweep` = 'face-output'")
    sweep = [r for r in runs if r.data.tags.get("ich.kind") == "sweep"]
    trial_runs = [r for r in runs if r.data.tags.get("ich.kind") == "trial"]
    assert len(sweep) == 1 and sweep[0].data.params["set"] == "soups.scope=across"
    assert len(trial_runs) == 3
    for r in trial_runs:
        history = mlflow_client.get_metric_history(r.info.run_id, "val_macro_f1")
        trial_id = r.data.tags["ich.trial"]
        said = next(line for line in trials if f" {trial_id} " in line)
        assert len(history) == int(re.search(r" (\d+) ep ", said).group(1)), (said, history)


def test_sweep_run_names_its_optuna_study_without_a_password(tmp_path):
    """`ich report` finds the study through the sweep run's ich.optuna_storage tag; a password never lands in MLflow."""
    from types import SimpleNamespace

    from sweeps.study import optuna_storage_tag
    assert optuna_storage_tag(SimpleNamespace(optuna_storage=None), tmp_path) == {
        "ich.optuna_storage": f"sqlite:///{tmp_path / 'optuna.db'}"}
    assert optuna_storage_tag(SimpleNamespace(optuna_storage="postgresql://ich@db:5432/optuna"), tmp_path) == {
        "ich.optuna_storage": "postgresql://ich@db:5432/optuna"}
    assert optuna_storage_tag(SimpleNamespace(optuna_storage="postgresql://ich:s3cret@db:5432/optuna"), tmp_path) == {}
