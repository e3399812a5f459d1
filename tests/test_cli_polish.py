"""CLI polish (issue 24 item 5): `--version`, every default shown in --help, `--experiment` defaulting to
MLFLOW_EXPERIMENT_NAME, `hf-hub:timm/<tag>` beside `hub:<tag>`, timm's public API only.

argparse runs in-process; the two import checks run in a fresh interpreter. No network: hub tags are parsed and
resolved against the installed timm's pretrained configs, never downloaded."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "timm", "mlflow", "ray")
LOADED = "print('LOADED', sorted(m for m in %r if m in sys.modules))" % (HEAVY,)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------- --version

def _expected_version_line() -> str:
    from soups.store.provenance import _git, source_hash
    head = f"ich-soups {metadata.version('ich-soups')} (source {source_hash(ROOT)[:12]}"
    commit = _git(ROOT, "rev-parse", "HEAD") if (ROOT / ".git").exists() else None
    return head + (f", git {commit[:12]}" if commit else "")


def test_ich_version_and_the_script_version_print_the_package_and_code_hash_without_heavy_imports():
    ich = _python(f"import sys\nfrom sweeps.cli import main\nrc = main(['--version'])\n{LOADED}\nprint('RC', rc)")
    assert ich.returncode == 0, ich.stderr[-2000:]
    line, loaded, rc = ich.stdout.splitlines()
    assert line.startswith(_expected_version_line()) and loaded == "LOADED []" and rc == "RC 0"
    script = subprocess.run([sys.executable, "sweeps/coatnet.py", "--version"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert script.returncode == 0 and script.stdout.strip() == line, script.stderr[-2000:]
    # Control: the training loop (what `ich train` runs) does import torch, so the check can fail. The parser no
    # longer does (tests/test_layout.py::test_every_help_imports_no_torch_timm_mlflow_or_ray).
    control = _python(f"import sys\nimport ich.train\n{LOADED}")
    assert "'torch'" in control.stdout.splitlines()[-1], control.stderr[-2000:]


def test_version_is_listed_in_ich_help(capsys):
    from sweeps.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "--version" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- defaults

def _help_blocks(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's block of `--help` text (first option string -> its help, whitespace collapsed)."""
    blocks, current = {}, None
    for line in parser.format_help().splitlines():
        if re.match(r"^  -", line):
            current = line.split()[0].rstrip(",")
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


def undisplayed_defaults(parser: argparse.ArgumentParser, where: str) -> list[str]:
    """Options with a value as default (not None, not a flag's False, not an empty list) whose help omits it."""
    blocks, missing = _help_blocks(parser), []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            missing += [m for name, sub in a.choices.items() for m in undisplayed_defaults(sub, f"{where} {name}")]
            continue
        if not a.option_strings or a.nargs == 0 or a.default in (None, argparse.SUPPRESS, []):
            continue
        text = blocks.get(a.option_strings[0], "")
        if not re.search(r"default.*" + re.escape(str(a.default)), text):
            missing.append(f"{where} {a.option_strings[0]} (default {a.default!r}): {text!r}")
    return missing


@pytest.mark.parametrize("experiment", [None, "ich17"])
def test_every_help_shows_every_default(monkeypatch, experiment):
    from soups.options import DefaultsHelpFormatter
    from sweeps.cli import build_parser
    from sweeps.job import add_sweep_args
    if experiment:
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    else:
        monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    parser = build_parser()
    assert undisplayed_defaults(parser, "ich") == []
    script = argparse.ArgumentParser(prog="sweeps/coatnet.py", formatter_class=DefaultsHelpFormatter)
    add_sweep_args(script)
    assert undisplayed_defaults(script, "sweeps/coatnet.py") == []
    checked = [a for a in parser._subparsers._group_actions[0].choices["soup"]._actions if a.default not in (None,)]
    assert len(checked) > 10  # the walk reaches the subcommands' options


def test_the_defaults_check_catches_a_parser_that_hides_them():
    planted = argparse.ArgumentParser(prog="planted")
    planted.add_argument("--n", type=int, default=3, help="a number")
    planted.add_argument("--name", default=None, help="no default: not required to show one")
    assert undisplayed_defaults(planted, "planted") == ["planted --n (default 3): '--n N a number'"]


# ---------------------------------------------------------------------------------------------- --experiment

COMMANDS = {"soup": True, "report": True, "gc": True, "sweep": False, "schedule": False}  # required when unset?


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_experiment_defaults_to_mlflow_experiment_name_read_at_parse_time(monkeypatch, capsys, command):
    from sweeps.cli import build_parser
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert build_parser().parse_args([command]).experiment == "from-env"
    assert build_parser().parse_args([command, "--experiment", "named"]).experiment == "named"
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    assert "$MLFLOW_EXPERIMENT_NAME, here from-env" in " ".join(capsys.readouterr().out.split())

    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")  # unset: the control, read again by the next parse
    if COMMANDS[command]:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([command])
        assert e.value.code == 2 and "--experiment" in capsys.readouterr().err
    else:
        assert build_parser().parse_args([command]).experiment is None


def test_sweep_script_experiment_reaches_the_config(monkeypatch, tmp_path):
    from sweeps.job import parse_args
    from sweeps.config import load_config
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    args = parse_args([])
    assert load_config(None, {"experiment": args.experiment}).experiment == "from-env"
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")  # control: the config's own experiment
    assert load_config(None, {"experiment": parse_args([]).experiment}).experiment == load_config(None).experiment
    assert load_config(None).experiment != "from-env"


# ---------------------------------------------------------------------------------------------- hub tags

def test_hub_and_timm_hf_hub_spellings_name_the_same_tag():
    from timm.models import get_pretrained_cfg

    from ich.models import hub_tag
    tag = "coatnet_0_rw_224.sw_in1k"
    assert hub_tag(f"hub:{tag}") == hub_tag(f"hf-hub:timm/{tag}") == tag
    assert get_pretrained_cfg(tag).hf_hub_id == f"timm/{tag}"  # timm's own repo for the tag: the mapping holds
    for other in ("/data/w.safetensors", "models:/m@champion", "runs:/abc/model", "m-123", "hubs/w.safetensors"):
        assert hub_tag(other) is None


def test_both_spellings_give_the_same_preprocessing_offline():
    from ich.init_source import init_preprocess
    tag = "coatnet_0_rw_224.sw_in1k"
    a, b = init_preprocess(f"hub:{tag}"), init_preprocess(f"hf-hub:timm/{tag}")
    assert a == b and a["mean"] == [0.5, 0.5, 0.5] and a["crop_pct"] == pytest.approx(0.95)


@pytest.mark.parametrize("source, said", [
    ("hf-hub:someorg/coatnet_0_rw_224", "only timm's own hub weights are accepted"),
    ("hf-hub:coatnet_0_rw_224.sw_in1k", "only timm's own hub weights are accepted"),
    ("hf-hub:timm/", "expected a timm tag"),
    ("hub:", "expected a timm tag"),
    ("hf-hub:timm/a/b", "expected a timm tag"),
])
def test_other_hub_repos_are_refused_in_one_line(source, said):
    from ich.errors import IchError
    from ich.models import hub_tag
    with pytest.raises(IchError) as e:
        hub_tag(source)
    assert str(e.value).startswith(f"init weights {source}: ") and said in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- timm public API

PRIVATE_TIMM = re.compile(r"timm\.models\._\w|from\s+timm\.models\s+import\s+\(?\s*_\w")
CODE_FOLDERS = ("ich", "soups", "sweeps", "bench", "tests")


def private_timm_imports(root: Path, folders=CODE_FOLDERS) -> list[str]:
    """`file:line` of every use of a private timm.models module (`timm.models._builder`, ...) under root."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            if path.resolve() == Path(__file__).resolve():  # this file names them to plant them
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if PRIVATE_TIMM.search(line):
                    found.append(f"{path.relative_to(root)}:{n}")
    return found


def test_the_project_uses_timms_public_api_only():
    assert private_timm_imports(ROOT) == []


def test_the_private_timm_check_catches_a_planted_line(tmp_path):
    (tmp_path / "ich").mkdir()
    (tmp_path / "ich" / "m.py").write_text("import timm\nfrom timm.models._builder import build_model_with_cfg\n"
                                           "from timm.models import _registry\n")
    assert private_timm_imports(tmp_path, ("ich",)) == ["ich/m.py:2", "ich/m.py:3"]
