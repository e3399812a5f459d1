"""cluster.yaml is a valid Ray cluster launcher config and keeps the invariants the project relies on.

Validation goes through Ray's own code path for `ray up`: ``prepare_config`` (merge with the provider's
defaults.yaml) then ``validate_config`` (Ray's JSON schema ray/autoscaler/ray-schema.json plus its
cross-field checks), from the Ray installed here. No network, no cloud account.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from bench.auth_cache import write_head_auth_ini

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
INVALID = (jsonschema.ValidationError, ValueError, RuntimeError)


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` does to a config before using it; raises on an invalid one."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def head_type(config: dict) -> dict:
    return config["available_node_types"][config["head_node_type"]]


def worker_types(config: dict) -> dict:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def gpu_workers(config: dict) -> dict:
    return {k: v for k, v in worker_types(config).items() if v.get("resources", {}).get("GPU", 0) >= 1}


# -- Ray's own validation ------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_validation():
    prepared = ray_validate(load())
    assert prepared["cluster_name"] == "ich-soups"
    assert prepared["provider"]["type"] == "aws"


def test_raw_file_matches_rays_schema():
    """Our file itself (before defaults are merged) uses only keys and types Ray's schema knows."""
    import json

    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load(), schema)


def _unknown_top_level_key(c):
    c["head_node_typo"] = "ray.head.cpu"


def _max_workers_wrong_type(c):
    c["max_workers"] = "eight"


def _unknown_node_type_key(c):
    next(iter(gpu_workers(c).values()))["min_worker"] = 0


def _gpu_resource_wrong_type(c):
    next(iter(gpu_workers(c).values()))["resources"]["GPU"] = "one"


def _head_type_missing(c):
    c["head_node_type"] = "no.such.type"


def _min_workers_above_max(c):
    next(iter(gpu_workers(c).values()))["min_workers"] = c["max_workers"] + 1


def _setup_command_not_a_string(c):
    c["setup_commands"] = [["pip", "install", "-e", "~/ich-soups"]]


@pytest.mark.parametrize(
    "breakage",
    [
        _unknown_top_level_key,
        _max_workers_wrong_type,
        _unknown_node_type_key,
        _gpu_resource_wrong_type,
        _head_type_missing,
        _min_workers_above_max,
        _setup_command_not_a_string,
    ],
)
def test_broken_copies_fail_validation(breakage):
    """The validation above can fail: deliberately broken copies of cluster.yaml are rejected."""
    config = load()
    breakage(config)
    with pytest.raises(INVALID):
        ray_validate(config)


def test_commented_local_provider_block_is_a_valid_switch():
    """The on-prem block at the end of cluster.yaml, applied as its comment says, passes Ray's checks."""
    text = CLUSTER_YAML.read_text().splitlines()
    start = next(i for i, line in enumerate(text) if re.fullmatch(r"#\s?provider:\s*", line))
    block = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in text[start:]]
    local = yaml.safe_load("\n".join(block))
    assert local["provider"]["type"] == "local"
    assert local["provider"]["head_ip"] and local["provider"]["worker_ips"]

    config = load()
    config.pop("available_node_types")
    config.pop("head_node_type")
    config["provider"] = local["provider"]
    config["auth"] = local["auth"]
    config["max_workers"] = len(local["provider"]["worker_ips"])
    prepared = ray_validate(config)
    assert prepared["provider"]["type"] == "local"


# -- Invariants the project relies on --------------------------------------------------------------


def test_gpu_worker_type_scales_from_zero():
    config = load()
    gpus = gpu_workers(config)
    assert gpus, "no worker node type offers a GPU resource"
    for name, node in gpus.items():
        assert node.get("min_workers", 0) == 0, f"{name} does not scale from zero"
        assert node.get("max_workers", config["max_workers"]) >= 1, f"{name} can never start"
        assert node["resources"].get("CPU", 0) >= 1
    # Trials (GPU, CPU) do not land on the head: it advertises no GPU and no CPU to the scheduler.
    head = head_type(config)
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU", 0) == 0


def test_project_is_synced_and_installed_on_every_node():
    config = load()
    remote = [r for r, local in config["file_mounts"].items() if local in (".", "./")]
    assert remote, "the repository ('.') is not in file_mounts (remote path: local path)"
    project = remote[0]
    common = "\n".join(config["setup_commands"])
    home_form = re.escape(project.replace("~", "$HOME", 1))  # quoted, with extras: "$HOME/ich-soups[system]"
    install = re.search(rf'pip install[^\n]*-e\s+(?:{re.escape(project)}\b|"{home_form}(?:\[[\w,]+\])?")', common)
    assert install, f"setup_commands do not `pip install -e {project}`"
    torch = re.search(r"pip install[^\n]*\btorch\b", common)
    assert torch and torch.start() < install.start(), "torch must be installed (right build) before the project"
    # The same Ray (and torch, mlflow...) on every node as on the machine that runs `ray up`: every install
    # goes through the repo's constraints.txt, whose Ray pin is the Ray installed here.
    installs = re.findall(r"pip install(?! -q --upgrade pip)[^\n]*", common)
    assert installs and all(f"-c {project}/constraints.txt" in i for i in installs), installs
    pin = re.search(r"^ray==([0-9][0-9.]*)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert pin and pin.group(1) == ray.__version__, f"constraints.txt must pin ray=={ray.__version__}"
    # The head also runs the MLflow server with basic auth (needs mlflow[auth]) and the AWS autoscaler: the
    # project's `head` extra, which carries both.
    head = "\n".join(config["head_setup_commands"])
    assert re.search(rf"pip install -q -c {re.escape(project)}/constraints.txt -e \"\$HOME/ich-soups\[head\]\"", head)
    extra = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["head"])
    assert "mlflow[auth]" in extra and "boto3" in extra


def test_token_auth_on_head_workers_and_in_the_environment():
    config = load()
    head_start = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    worker_start = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert head_start and worker_start
    for cmd in head_start + worker_start:
        assert "RAY_AUTH_MODE=token" in cmd, cmd
    assert all("--head" in c for c in head_start)
    assert all("--address=$RAY_HEAD_IP:6379" in c for c in worker_start)
    # Every node (and every process started from a Ray command, trials included) runs in token mode.
    assert "export RAY_AUTH_MODE=token" in "\n".join(config["setup_commands"])
    # The one token reaches every node from outside the repo, where Ray looks for it.
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=\"?([^\s\";]+)", head_start[0]).group(1)
    token_mounts = [r for r in config["file_mounts"] if r.endswith("ray_auth_token")]
    assert token_mounts and token_path.replace("$HOME", "~") == token_mounts[0]
    assert config["file_mounts"][token_mounts[0]].startswith("~/")
    # The sweep owner's signing key reaches every node the same way (file_mounts, outside the repo), and every
    # process there signs with it (env.sh's ICH_SIGNING_KEY); never through a runtime_env (docs/design.md#14).
    assert config["file_mounts"].get("~/.ich/signing_key") == "~/.ich/signing_key"
    common = "\n".join(config["setup_commands"])
    assert 'export ICH_SIGNING_KEY="\\$HOME/.ich/signing_key"' in common
    assert re.search(r"chmod 600 [^\n]*~/\.ich/signing_key", common)
    # The dashboard / Jobs API stays on the head's loopback (reach it with `ray dashboard cluster.yaml`).
    assert "--dashboard-host=127.0.0.1" in head_start[0]


def test_mlflow_server_on_head_and_uri_for_workers():
    config = load()
    common = "\n".join(config["setup_commands"])
    # Workers get the head's address from Ray ($RAY_HEAD_IP) and talk to MLflow over HTTP.
    assert "RAY_HEAD_IP" in common
    uri = re.search(r"export MLFLOW_TRACKING_URI=\"?(http://[^\s\"]+)", common)
    assert uri and uri.group(1).endswith(":5000")
    assert "~/.ich/secrets.env" in config["file_mounts"]
    assert ".ich/secrets.env" in common  # MLFLOW_TRACKING_USERNAME/PASSWORD, ICH_BUCKET come from here
    assert re.search(r"ICH_STORAGE=\"?\\?\$\{ICH_STORAGE:-s3://", common)

    server = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    assert "--app-name basic-auth" in server
    assert "--port 5000" in server
    assert "0.0.0.0" not in server, "MLflow must bind the private interface, not all interfaces"
    assert re.search(r"--host \"?\$ICH_HEAD_IP", server)
    assert "--serve-artifacts" in server and "--artifacts-destination" in server
    assert "ICH_MLFLOW_DB_URI" in server and "sqlite:///" in server  # PostgreSQL DSN, else SQLite
    # Workers never receive the database DSN.
    assert re.search(r"sed -i '/\^ICH_MLFLOW_DB_URI=/d", "\n".join(config["worker_setup_commands"]))


SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key": r"(?i)aws_secret_access_key\s*[:=]",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "credentials in a URL": r"://[^\s/:@$]+:[^\s@/$]+@",
    "literal password/secret/token": (
        r"(?i)\b\w*(password|passwd|secret_key|secret|token)\w*\s*[:=]\s*[\"']?(?![\"']?\$)[A-Za-z0-9+/_\-]{6,}"
    ),
}


def find_secrets(text: str) -> list[str]:
    hits = []
    for line in text.splitlines():
        for name, pattern in SECRET_PATTERNS.items():
            if re.search(pattern, line):
                hits.append(f"{name}: {line.strip()}")
    return hits


def test_no_literal_secrets_in_cluster_yaml():
    assert find_secrets(CLUSTER_YAML.read_text()) == []


@pytest.mark.parametrize(
    "planted",
    [
        "MLFLOW_TRACKING_PASSWORD=hunter2hunter2",
        "    export MLFLOW_AUTH_ADMIN_PASSWORD='correct-horse-battery'",
        "admin_password = password1234",
        "ICH_MLFLOW_DB_URI=postgresql://mlflow:s3cr3t@db.internal:5432/mlflow",
        "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "RAY_AUTH_TOKEN=4f9c2d0e8a7b6c5d4e3f2a1b0c9d8e7f",
    ],
)
def test_secret_detector_catches_planted_secrets(planted):
    """The no-secrets check can fail: a copy of cluster.yaml with a planted secret is caught."""
    assert find_secrets(CLUSTER_YAML.read_text() + "\n" + planted + "\n")


# -- Least privilege (issue 13.5) -----------------------------------------------------------------------


def test_ssh_ingress_is_an_explicit_group_and_roles_are_the_projects():
    config = load()
    group = config["provider"]["security_group"]
    assert group["GroupName"] == "ich-soups-ssh"
    # Rules listed here would only extend Ray's default group (SSH from 0.0.0.0/0); the named group is
    # created with its CIDR rule beforehand (docs/cluster.md), so none may open SSH to the world here.
    for rule in group.get("IpPermissions", []):
        assert all(r.get("CidrIp") != "0.0.0.0/0" for r in rule.get("IpRanges", [])), rule
    assert head_type(config)["node_config"]["IamInstanceProfile"]["Name"] == "ich-soups-head"
    for worker in worker_types(config).values():
        assert worker["node_config"]["IamInstanceProfile"]["Name"] == "ich-soups-worker"
    docs = (ROOT / "docs" / "cluster.md").read_text()
    for name in ("ich-soups-ssh", "ich-soups-head", "ich-soups-worker"):
        assert name in docs, f"docs/cluster.md does not say how to create {name}"


def _split_command(config: dict) -> str:
    return next(c for c in config["head_setup_commands"] if "admin.env" in c)


def test_head_setup_keeps_admin_credentials_on_the_head(tmp_path):
    """Run the head's credential split on a secrets file as the head would, twice (a second `ray up`)."""
    import subprocess
    ich = tmp_path / ".ich"
    ich.mkdir()
    (ich / "secrets.env").write_text("MLFLOW_TRACKING_USERNAME=boss\nMLFLOW_TRACKING_PASSWORD=admin-pw-123\n"
                                     "ICH_BUCKET=b\nICH_MLFLOW_DB_URI=postgresql://u:db-pw@h/d\n")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for _ in range(2):
        r = subprocess.run(["bash", "-c", _split_command(load())], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        admin, shared = (ich / "admin.env").read_text(), (ich / "secrets.env").read_text()
        assert "MLFLOW_TRACKING_PASSWORD=admin-pw-123" in admin and "db-pw" in admin
        assert "admin-pw-123" not in shared and "db-pw" not in shared and "boss" not in shared
        assert "MLFLOW_TRACKING_USERNAME=ich-worker" in shared and "ICH_BUCKET=b" in shared
        assert f"MLFLOW_TRACKING_PASSWORD={(ich / 'worker_password').read_text().strip()}" in shared
    assert oct((ich / "admin.env").stat().st_mode & 0o777) == "0o600"


def test_workers_get_a_non_admin_mlflow_user():
    config = load()
    common = "\n".join(config["setup_commands"])
    assert '. "\\$HOME/.ich/admin.env"' in common  # env.sh: admin credentials override, on the head only
    start = "\n".join(config["head_start_ray_commands"])
    assert "create_user(name, password)" in start and "update_user_admin(name, False)" in start
    assert "default_permission = EDIT" in start  # runs and models: write, no delete, no user management
    assert "--num-cpus=0" in next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)


# -- the head's basic-auth config, as MLflow reads it --------------------------------------------------------
# bench/auth_cache.write_head_auth_ini runs the head's own printf line (cluster.yaml) with HOME in a temp folder.


@pytest.mark.parametrize(("extra_env", "ttl"), [({}, 60), ({"ICH_MLFLOW_AUTH_CACHE_S": "0"}, 0),
                                                ({"ICH_MLFLOW_AUTH_CACHE_S": "300"}, 300)])
def test_head_server_remembers_checked_passwords(tmp_path, monkeypatch, extra_env, ttl):
    """The head's basic-auth config, read by MLflow's own reader: checked passwords are cached for 60 s by default
    (each REST call otherwise pays a scrypt check on the head: bench/auth_cache.py), ICH_MLFLOW_AUTH_CACHE_S
    changes it, 0 turns it off; the rest of the config is what the server needs."""
    from mlflow.server.auth.config import read_auth_config

    ini = write_head_auth_ini(tmp_path, extra_env)
    assert ini.stat().st_mode & 0o077 == 0  # umask 077: the owner's only
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    config = read_auth_config()
    assert config.auth_cache_ttl_seconds == ttl
    assert config.admin_username == "admin" and config.default_permission == "EDIT"
    assert config.authorization_function == "mlflow.server.auth:authenticate_request_basic_auth"
    assert config.database_uri == f"sqlite:///{tmp_path}/ich-mlflow/basic_auth.db"


def test_auth_cache_control_mlflow_caches_nothing_without_the_line(tmp_path, monkeypatch):
    """Control: MLflow's default is no cache (0), so the setting above is what turns it on."""
    from mlflow.server.auth.config import read_auth_config

    ini = write_head_auth_ini(tmp_path, {})
    ini.write_text("".join(line for line in ini.read_text().splitlines(True) if not line.startswith("auth_cache")))
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    assert read_auth_config().auth_cache_ttl_seconds == 0
