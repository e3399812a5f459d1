"""One error family, one exit: every user error is an `IchError`, and every entry point shows it as one line
`<prog>: error: <message>` with exit code 2; a bug keeps its traceback. No dead `except ImportError` fallback
hides a broken import (or, like `SoupError = ValueError`, turns every ValueError into a user error)."""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ich.errors import USER_ERRORS, ConfigError, IchError, exit_on_user_error, run_cli

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ich", "soups", "sweeps")

# Exception classes of the project that are deliberately NOT user errors (module.Class -> why).
NOT_USER_ERRORS = {
    "sweeps.uploader.UploadError": "a checkpoint upload that failed for good inside a trial: Ray records it as "
                                   "the trial's failure (with its traceback), it never reaches an entry point",
    "soups.serve.inputs.RequestRefused": "a served request refused (a row or a per-request cap): the scoring server "
                                   "answers it as one 400 line; `ich predict` prints it as the ValueError it is",
    "soups.serve.inputs.RefusedByServer": "RequestRefused as the scoring server needs it (an MlflowException: a 400 "
                                    "without a stack trace); never raised at an entry point",
}
# `except ImportError` blocks whose import can genuinely fail (path -> why).
ALLOWED_IMPORT_FALLBACKS: dict[str, str] = {
    "soups/recipes/__init__.py": "ICH_RECIPES names the user's own modules: one that cannot be imported is a "
                                 "ConfigError naming it (exit 2), not a fallback",
}


def project_modules() -> list:
    mods = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        mods.append(pkg)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
            mods.append(importlib.import_module(info.name))
    return mods


def project_exceptions() -> dict[str, type]:
    """module.Class -> class, for every exception class defined in ich/, soups/ and sweeps/."""
    found = {}
    for mod in project_modules():
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
                found[f"{mod.__name__}.{name}"] = obj
    return found


@pytest.fixture(scope="module")
def exceptions() -> dict[str, type]:
    return project_exceptions()


def test_every_project_exception_is_a_user_error_or_listed(exceptions):
    expected = {"ich.checkpoint.CheckpointError", "ich.ingest.IngestError", "ich.models.ModelError",
                "ich.preprocess.PreprocessError", "ich.errors.ConfigError", "soups.store.retry.RegistryError",
                "soups.store.gc.GcError", "soups.tracking_server.MlflowServerError", "soups.serve.verify.UntrustedModel",
                "soups.compat.IncompatibleCheckpoint", "sweeps.schedule.ScheduleError"}
    assert expected <= set(exceptions), sorted(expected - set(exceptions))  # the walk sees the modules
    soup = [k for k in exceptions if k.endswith(".SoupError")]
    report = [k for k in exceptions if k.endswith(".ReportError")]
    assert len(soup) == 1 and len(report) == 1, (soup, report)  # wherever the orchestrator/report split put them
    strays = sorted(k for k, cls in exceptions.items()
                    if not issubclass(cls, IchError) and k not in NOT_USER_ERRORS and cls is not IchError)
    assert strays == [], f"exception classes that are neither IchError nor listed in NOT_USER_ERRORS: {strays}"
    assert all(k in exceptions for k in NOT_USER_ERRORS), "a listed exception no longer exists: drop it"
    assert all(not issubclass(exceptions[k], IchError) for k in NOT_USER_ERRORS)


def test_every_user_error_is_one_line_and_exit_2(exceptions, capsys):
    user = {k: cls for k, cls in exceptions.items() if issubclass(cls, IchError)}
    assert len(user) >= 12, sorted(user)
    for name, cls in sorted(user.items()):
        def fail(cls=cls):
            raise cls(f"/data/{cls.__name__}.bin: what is wrong")
        capsys.readouterr()
        assert run_cli("ich demo", fail) == 2, name
        out, err = capsys.readouterr()
        assert out == "" and err == f"ich demo: error: /data/{cls.__name__}.bin: what is wrong\n", (name, err)

        with pytest.raises(SystemExit) as stopped:  # the form cmd_soup / cmd_report / cmd_gc use
            with exit_on_user_error("ich soup"):
                fail()
        assert stopped.value.code == 2, name
        assert capsys.readouterr().err == f"ich soup: error: /data/{cls.__name__}.bin: what is wrong\n", name


@pytest.mark.parametrize("error", [FileNotFoundError("x.png: no such image file"),
                                   FloatingPointError("train loss is nan at epoch 2"),
                                   ConfigError("train.lr: must be positive\n(got -1)")])
def test_os_user_errors_and_multiline_messages_are_one_line(error, capsys):
    def fail():
        raise error
    assert isinstance(error, USER_ERRORS)
    assert run_cli("sweep", fail) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sweep: error: "), err
    assert err.rstrip("\n").endswith(str(error).splitlines()[-1]), err


def test_success_returns_0_whatever_the_command_returns():
    assert run_cli("sweep", lambda: {"best": 0.9}) == 0
    assert run_cli("ich ingest", lambda: None) == 0


@pytest.mark.parametrize("bug", [RuntimeError("boom"), KeyError("k"), ValueError("a plain ValueError is a bug")])
def test_a_bug_is_not_a_user_error(bug, capsys):
    def fail():
        raise bug
    with pytest.raises(type(bug)):
        run_cli("ich demo", fail)
    with pytest.raises(type(bug)):
        with exit_on_user_error("ich soup"):
            fail()
    assert capsys.readouterr().err == ""


def env_for(tmp_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ICH_HOME": str(tmp_path / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)  # nothing may be contacted: the config is read first
    return env


def stderr_lines(p: subprocess.CompletedProcess) -> list[str]:
    return [line for line in p.stderr.splitlines() if line.strip()]


def test_a_bug_keeps_its_traceback_in_a_real_process(tmp_path):
    code = "import sys; from ich.errors import run_cli; sys.exit(run_cli('ich demo', lambda: 1 / 0))"
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env_for(tmp_path), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and "Traceback (most recent call last)" in p.stderr, p.stderr
    assert "ZeroDivisionError" in p.stderr and "error:" not in p.stderr, p.stderr


def ich_command() -> list[str]:
    script = Path(sys.executable).parent / "ich"  # the console script users run (entry point sweeps.cli:main)
    return [str(script)] if script.is_file() else [sys.executable, "-m", "sweeps.cli"]


@pytest.mark.parametrize("entry", ["ich gc", "sweeps/coatnet.py"])
def test_entry_points_refuse_a_missing_config_with_one_line(entry, tmp_path):
    missing = tmp_path / "no-such-sweep.yaml"
    if entry == "ich gc":
        argv, prog = ich_command() + ["gc", "--experiment", "errors-test", "--config", str(missing)], "ich gc"
    else:
        argv, prog = [sys.executable, str(ROOT / "sweeps" / "coatnet.py"), "--config", str(missing)], "sweep"
    p = subprocess.run(argv, cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=240)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert stderr_lines(p) == [f"{prog}: error: {missing}: no such sweep config"], p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not (tmp_path / "home").exists()  # refused before anything started


# ------------------------------------------------------------------------------ no dead import fallbacks

def import_fallbacks(path: Path) -> list[int]:
    """Lines of `except ImportError` / `except ModuleNotFoundError` handlers (alone or in a tuple)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            types = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            names = {t.id if isinstance(t, ast.Name) else getattr(t, "attr", "") for t in types}
            if names & {"ImportError", "ModuleNotFoundError"}:
                lines.append(node.lineno)
    return lines


def test_no_import_fallback_remains():
    found = [f"{p.relative_to(ROOT)}:{line}" for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
             for line in import_fallbacks(p) if str(p.relative_to(ROOT)) not in ALLOWED_IMPORT_FALLBACKS]
    assert found == [], f"`except ImportError` fallbacks (delete them, or list why the import can fail): {found}"


def test_the_check_sees_an_import_fallback(tmp_path):
    planted = tmp_path / "m.py"
    planted.write_text("try:\n    from soups.orchestrate import SoupError\nexcept ImportError:\n    SoupError = ValueError\n"
                       "try:\n    import x\nexcept (OSError, ModuleNotFoundError):\n    pass\n"
                       "try:\n    import y\nexcept ValueError:\n    pass\n")
    assert import_fallbacks(planted) == [3, 7]


# ------------------------------------------------------------------------------ design references

def test_design_references_point_at_the_note():
    """Code cites the design as `docs/design.md#N`; every N is a decision of docs/design.md, and no bare
    "design decision N" (which pointed at nothing in the repository) is left."""
    anchors = set(re.findall(r'<a id="(\d+)"></a>', (ROOT / "docs" / "design.md").read_text()))
    cited, bare = set(), []
    for package in PACKAGES + ("tests", "bench"):
        for p in sorted((ROOT / package).rglob("*.py")):
            text = p.read_text()
            for m in re.finditer(r"docs/design\.md#(\d+)((?: and #\d+)*)", text):
                cited |= {m.group(1), *re.findall(r"#(\d+)", m.group(2))}
            bare += [f"{p.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(r"[Dd]esign decisions? \d+", text)]
    assert len(cited) >= 8 and cited <= anchors, sorted(cited - anchors)
    assert bare == []
