"""Security checks: no unpickling or code evaluation, loopback-only local server, authenticated cluster,
ingest confined to its source folder.

Policy for loading things that can run code (enforced by test_no_unsafe_loads_in_project_code):

- Checkpoints, training states and soups are safetensors + JSON and are never unpickled: `torch.load`,
  `pickle`/`cloudpickle`/`dill`/`joblib`/`marshal` loads, `numpy.load(..., allow_pickle=True)`,
  `pandas.read_pickle`, `yaml.load` without a safe loader, `eval`/`exec` are not used anywhere in
  ich/, soups/, sweeps/, bench/.
- `mlflow.<flavor>.load_model` unpickles a cloudpickled model, or runs the code file a Models-from-Code
  model names. No product code calls it: soups are logged as Models-from-Code with this project's own
  soups/serve/model.py (no pickle at all), `ich predict` verifies the model and builds SoupClassifier
  itself, and `ich serve` hands MLflow's scoring server only a copy verified by soups.serve.verify.verify_soup_model
  (MLmodel allowlist, code file identical to the installed one, no pickle, weights' sha256 as recorded).
  The attacks on that path are tests in tests/test_attacks.py.
- Any other exception must be added to PRODUCT_ALLOWLIST below with its justification and carry the
  same `# security:` comment in the code. Tests are scanned separately (TEST_ALLOWLIST): they may
  unpickle bytes they made themselves (tripwires proving nothing else unpickles) and load our own
  registered pyfunc model.
"""
from __future__ import annotations

import ast
import ipaddress
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_DIRS = ("ich", "soups", "sweeps", "bench")

# (path relative to the repo, dotted call) -> why it is acceptable. The call site must also carry a
# "# security: ..." comment.
PRODUCT_ALLOWLIST: dict[tuple[str, str], str] = {}  # empty: nothing in the product loads code from data
# Tests: (file name, dotted call) -> why. No comment needed.
TEST_ALLOWLIST: dict[tuple[str, str], str] = {
    ("test_checkpoint.py", "pickle.loads"): "arms its own tripwire payload before proving loaders refuse it",
    ("test_bad_inputs.py", "pickle.loads"): "arms its own tripwire payload before proving `ich train` refuses it",
    ("*", "mlflow.pyfunc.load_model"): "tests load the soup pyfunc model this project registered",
}

# Calls that can run code from the data they load.
UNSAFE_CALLS = {
    "torch.load", "torch.jit.load", "torch.hub.load", "torch.package.PackageImporter",
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "cPickle.load",
    "cPickle.loads", "cloudpickle.load", "cloudpickle.loads", "dill.load", "dill.loads", "joblib.load",
    "marshal.load", "marshal.loads", "shelve.open", "pandas.read_pickle", "yaml.unsafe_load",
    "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all", "eval", "exec",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
MLFLOW_LOAD_MODEL = re.compile(r"^mlflow\.\w+\.(load_model|_load_pyfunc)$")


# ---------------------------------------------------------------------------------------------- ast scan

def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted module/object it stands for (import x as y, from x import y as z)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    names[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    names.setdefault("np", "numpy")  # conventional aliases, even when imported in an odd way
    names.setdefault("pd", "pandas")
    return names


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _resolve(name: str, aliases: dict[str, str]) -> str:
    head, _, rest = name.partition(".")
    if head in aliases:
        return aliases[head] + ("." + rest if rest else "")
    return name


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_calls(source: str, filename: str = "<src>") -> list[tuple[int, str, str]]:
    """(line, dotted call, problem) for every call in `source` that can run code from loaded data."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        raw = _dotted(node.func)
        if raw is None:
            continue
        name = _resolve(raw, aliases)
        if isinstance(node.func, ast.Name) and raw in ("eval", "exec") and raw not in aliases:
            found.append((node.lineno, raw, "evaluates code"))
        elif name in UNSAFE_CALLS and name not in ("eval", "exec"):
            found.append((node.lineno, name, "can unpickle / run code from what it loads"))
        elif name in ("numpy.load", "numpy.lib.npyio.load"):
            allow = _kw(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append((node.lineno, name, "allow_pickle is not False"))
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            loader_name = _dotted(loader).split(".")[-1] if loader is not None and _dotted(loader) else None
            if loader_name not in SAFE_YAML_LOADERS:
                found.append((node.lineno, name, "without a safe Loader"))
        elif MLFLOW_LOAD_MODEL.match(name):
            found.append((node.lineno, name, "unpickles the model's Python object"))
    return sorted(found)


def _has_justification(lines: list[str], lineno: int) -> bool:
    here = lines[lineno - 1] if lineno - 1 < len(lines) else ""
    above = lines[lineno - 2] if lineno >= 2 else ""
    return bool(re.search(r"#\s*security:\s*\S", here) or re.match(r"\s*#\s*security:\s*\S", above))


def product_files() -> list[Path]:
    files = [p for d in PRODUCT_DIRS for p in (ROOT / d).rglob("*.py")]
    files += [p for p in ROOT.glob("*.py")]  # setup.py and the like, if any
    return sorted(p for p in files if "__pycache__" not in p.parts)


def product_violations(files: list[Path]) -> list[str]:
    out = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
        for lineno, name, problem in unsafe_calls(text, str(path)):
            key = (rel, name)
            if key not in PRODUCT_ALLOWLIST:
                out.append(f"{rel}:{lineno}: {name} {problem} (not allowed here)")
            elif not _has_justification(lines, lineno):
                out.append(f"{rel}:{lineno}: {name} is allowlisted but lacks a '# security: <why>' comment")
    return out


def test_no_unsafe_loads_in_project_code():
    files = product_files()
    assert len(files) >= 20, f"scanned only {len(files)} files: is the layout different?"
    violations = product_violations(files)
    assert not violations, "unsafe loads (see this module's docstring for the policy):\n" + "\n".join(violations)


def test_tests_unpickle_only_their_own_tripwires():
    out = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for lineno, name, problem in unsafe_calls(path.read_text(encoding="utf-8"), str(path)):
            if (path.name, name) not in TEST_ALLOWLIST and ("*", name) not in TEST_ALLOWLIST:
                out.append(f"tests/{path.name}:{lineno}: {name} {problem}")
    assert not out, "\n".join(out)


PLANTED = [
    ("import torch\nstate = torch.load(path)\n", "torch.load"),
    ("import torch as T\nT.load(p, weights_only=True)\n", "torch.load"),
    ("from torch import load\nload(p)\n", "torch.load"),
    ("import pickle\npickle.loads(blob)\n", "pickle.loads"),
    ("from pickle import load as l\nl(f)\n", "pickle.load"),
    ("import cloudpickle\ncloudpickle.load(f)\n", "cloudpickle.load"),
    ("import joblib\njoblib.load('m.joblib')\n", "joblib.load"),
    ("import numpy as np\nnp.load('x.npy', allow_pickle=True)\n", "numpy.load"),
    ("import numpy\nnumpy.load('x.npy', allow_pickle=flag)\n", "numpy.load"),
    ("import yaml\nyaml.load(text)\n", "yaml.load"),
    ("import yaml\nyaml.load(text, Loader=yaml.Loader)\n", "yaml.load"),
    ("import yaml\nyaml.unsafe_load(text)\n", "yaml.unsafe_load"),
    ("import pandas as pd\npd.read_pickle('f.pkl')\n", "pandas.read_pickle"),
    ("x = eval(expr)\n", "eval"),
    ("exec(code, {})\n", "exec"),
    ("import mlflow\nmlflow.pyfunc.load_model(user_path)\n", "mlflow.pyfunc.load_model"),
    ("import mlflow.pytorch\nmlflow.pytorch.load_model('runs:/x/model')\n", "mlflow.pytorch.load_model"),
    ("from mlflow import pyfunc\npyfunc.load_model(uri)\n", "mlflow.pyfunc.load_model"),
]
SAFE = [
    "model.eval()\nself.model.eval()\n",
    "import numpy as np\nnp.load('x.npy')\nnp.load('x.npy', allow_pickle=False)\n",
    "import yaml\nyaml.safe_load(t)\nyaml.load(t, Loader=yaml.SafeLoader)\nyaml.load(t, yaml.CSafeLoader)\n",
    "import torch\ntorch.compile(m)\nfrom safetensors.torch import load_file\nload_file(p)\n",
    "import json\njson.loads(s)\n",
]


@pytest.mark.parametrize("source, name", PLANTED, ids=[n + f"-{i}" for i, (_, n) in enumerate(PLANTED)])
def test_scanner_catches_planted_unsafe_calls(source, name):
    assert [n for _, n, _ in unsafe_calls(source)] == [name]


@pytest.mark.parametrize("source", SAFE)
def test_scanner_passes_safe_calls(source):
    assert unsafe_calls(source) == []


def test_allowlisted_call_needs_its_justification_comment(tmp_path, monkeypatch):
    """An allowlisted use without the '# security:' comment still fails; with it, it passes."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setitem(PRODUCT_ALLOWLIST, ("soups/pyfunc.py", "mlflow.pyfunc.load_model"), "an example entry")
    target = tmp_path / "soups" / "pyfunc.py"
    target.parent.mkdir()
    target.write_text("import mlflow\n\ndef serve(uri):\n    return mlflow.pyfunc.load_model(uri)\n")
    assert len(product_violations([target])) == 1
    target.write_text("import mlflow\n\ndef serve(uri):\n    # security: our own registered soup model\n"
                      "    return mlflow.pyfunc.load_model(uri)\n")
    assert product_violations([target]) == []
    elsewhere = tmp_path / "ich" / "checkpoint.py"
    elsewhere.parent.mkdir()
    elsewhere.write_text("import mlflow\n# security: no\nm = mlflow.pyfunc.load_model(p)\n")
    assert product_violations([elsewhere]) != []  # only soups/pyfunc.py may, comment or not


# ---------------------------------------------------------------------------------------------- loopback

def _parse_proc_net(text: str, v6: bool) -> list[tuple[str, int]]:
    """(address, port) of the LISTEN sockets in a /proc/net/tcp[6] table."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != "0A":  # 0A = TCP_LISTEN
            continue
        addr_hex, port_hex = fields[1].split(":")
        raw = bytes.fromhex(addr_hex)
        if v6:  # four 32-bit words, each in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
            addr = str(ipaddress.IPv6Address(raw))
        else:
            addr = str(ipaddress.IPv4Address(raw[::-1]))
        out.append((addr, int(port_hex, 16)))
    return out


def listeners(port: int) -> list[str]:
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            text = Path(table).read_text()
        except OSError:
            continue
        found += [a for a, p in _parse_proc_net(text, v6) if p == port]
    return found


def other_local_addresses() -> list[str]:
    """This machine's non-loopback interface addresses (IPv4 from the routing table's LOCAL entries, IPv6
    from /proc/net/if_inet6)."""
    addrs = set()
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        for prev, line in zip(lines, lines[1:]):
            if "/32 host LOCAL" in line:
                addrs.add(prev.split()[-1])
    except OSError:
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            hexaddr, *_, dev = line.split()
            addrs.add(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    except OSError:
        pass
    return sorted(a for a in addrs if not ipaddress.ip_address(a).is_loopback
                  and not ipaddress.ip_address(a).is_link_local)


def _connects(addr: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        try:
            s.connect((addr, port))
            return True
        except OSError:
            return False


def test_proc_net_parser_sees_wildcard_listeners():
    """The check below can fail: a 0.0.0.0 or :: listener is reported as such."""
    v4 = ("  sl  local_address rem_address   st\n"
          "   0: 00000000:1388 00000000:0000 0A 00000000:00000000\n"
          "   1: 0100007F:1389 00000000:0000 0A 00000000:00000000\n"
          "   2: 0100007F:138A 0100007F:D431 01 00000000:00000000\n")
    assert _parse_proc_net(v4, False) == [("0.0.0.0", 5000), ("127.0.0.1", 5001)]
    v6 = ("  sl  local_address                         remote_address  st\n"
          "   0: 00000000000000000000000000000000:1388 00000000000000000000000000000000:0000 0A 0\n"
          "   1: 00000000000000000000000001000000:1388 00000000000000000000000000000000:0000 0A 0\n")
    assert _parse_proc_net(v6, True) == [("::", 5000), ("::1", 5000)]


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_local_mlflow_server_listens_on_loopback_only(tmp_path, monkeypatch):
    from soups.tracking_server import ensure_tracking_uri, stop_local_server

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = tmp_path / "home"
    uri = ensure_tracking_uri(home, quiet=True)  # the embedded default: starts a local server
    try:
        port = int(uri.rsplit(":", 1)[1])
        assert uri.startswith("http://127.0.0.1:")
        found = listeners(port)
        assert found, f"nothing listens on port {port}"
        assert set(found) == {"127.0.0.1"}, f"MLflow listens on {found}, not on 127.0.0.1 only"
        others = other_local_addresses()
        # Control: a socket on all interfaces is reachable at those addresses, so a refusal means something.
        reachable = []
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as control:
            control.bind(("0.0.0.0", 0))
            control.listen()
            reachable = [a for a in others if ":" not in a and _connects(a, control.getsockname()[1])]
        for addr in reachable:
            assert not _connects(addr, port), f"the MLflow server answers on {addr}:{port}"
        for addr in (a for a in others if ":" in a):
            assert not _connects(addr, port), f"the MLflow server answers on [{addr}]:{port}"
        print(f"MLflow on {uri}: listening on {found}; refused on {reachable + [a for a in others if ':' in a]}")
    finally:
        stop_local_server(home)


# ---------------------------------------------------------------------------------------------- cluster

def _cluster_yaml() -> dict:
    import yaml
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _fenced_blocks(markdown: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", markdown, flags=re.S)


def test_mlflow_basic_auth_admin_and_permissions_come_from_secrets():
    """What test_cluster_config does not check: the auth config the head writes gives authenticated users at
    most EDIT by default (the workers' non-admin user must create runs and models in the experiments the
    driver creates; MANAGE, which grants deletes and permission changes, stays with the admin), holds no
    admin password, and the admin password comes from secrets.env (MLflow ships no default)."""
    config = _cluster_yaml()
    server = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    ini = re.search(r"printf '(\[mlflow\][^']*)'", server)
    assert ini, "the head does not write its basic-auth config"
    ini_text = ini.group(1).replace("\\n", "\n")
    assert re.search(r"^default_permission = (READ|EDIT|NO_PERMISSIONS)$", ini_text, re.M), ini_text
    assert "admin_password" not in ini_text
    assert re.search(r"\(\s*umask 077;\s*printf '\[mlflow\]", server), "basic_auth.ini must be written mode 600"
    admin = re.search(r"MLFLOW_AUTH_ADMIN_PASSWORD=\"?\$\{?(\w+)", server)
    assert admin and admin.group(1) == "MLFLOW_TRACKING_PASSWORD", "admin password must come from secrets.env"
    assert server.index("MLFLOW_AUTH_ADMIN_PASSWORD") < server.index("mlflow server --app-name basic-auth")
    assert re.search(r"MLFLOW_AUTH_CONFIG_PATH=", server)
    # The CSRF secret is generated on the head (or given in secrets.env), never written in the file.
    assert re.search(r"MLFLOW_FLASK_SERVER_SECRET_KEY=\"?\$\{MLFLOW_FLASK_SERVER_SECRET_KEY:-\$\(cat ", server)
    assert "secrets.token_hex" in server
    # Secret files readable by their owner only, on every node.
    common = "\n".join(config["setup_commands"])
    assert re.search(r"chmod 600 [^\n]*~/\.ich/secrets\.env", common)
    assert re.search(r"chmod 600 [^\n]*~/\.ich/ray_auth_token", common)


def test_cluster_docs_turn_on_auth_and_hold_no_secrets():
    from tests.test_cluster_config import find_secrets

    doc = (ROOT / "docs" / "cluster.md").read_text()
    assert "--app-name basic-auth" in doc and "MLFLOW_TRACKING_PASSWORD" in doc
    assert "RAY_AUTH_MODE=token" in doc and "RAY_AUTH_TOKEN_PATH" in doc
    # Every documented client command against the Jobs API runs in token mode.
    for text in (doc, (ROOT / "README.md").read_text()):
        for block in _fenced_blocks(text):
            for i, line in enumerate(block.splitlines()):
                if re.search(r"\bray job (submit|logs|status|stop)\b", line):
                    before = "\n".join(block.splitlines()[: i + 1])
                    assert "RAY_AUTH_MODE=token" in before, f"runs without token auth: {line.strip()}"
    # Placeholders in angle brackets, never values.
    for name, text in (("docs/cluster.md", doc), ("README.md", (ROOT / "README.md").read_text())):
        assert find_secrets(text) == [], name
    secrets_block = next(b for b in _fenced_blocks(doc) if "MLFLOW_TRACKING_PASSWORD=" in b)
    assert re.search(r"MLFLOW_TRACKING_PASSWORD=<[^>]+>", secrets_block)
    # The check can fail: the same docs with a real-looking password filled in are caught.
    planted = doc.replace("MLFLOW_TRACKING_PASSWORD=<a long random password>", "MLFLOW_TRACKING_PASSWORD=Tr0ub4dor3xyz")
    assert planted != doc and find_secrets(planted)


# ---------------------------------------------------------------------------------------------- ingest

@pytest.mark.timeout(120)
def test_ingest_never_reads_outside_source(tmp_path):
    """Links that point outside SRC (a file, a folder inside a class, a whole class folder, and a FIFO that
    would block whoever opened it) are not read: ingest finishes, names them, and no pixel of theirs is in
    the Parquet."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from ich.decode import decode_file
    from tests.imagegen import make_simple_folder

    src = make_simple_folder(tmp_path / "src", {"a": 3, "b": 3}, size=16)
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    secret = np.zeros((16, 16, 3), np.uint8)
    secret[..., 0], secret[..., 1], secret[..., 2] = 201, 13, 177  # a colour no class image has
    Image.fromarray(secret).save(outside / "secret.png")
    Image.fromarray(secret[::-1].copy()).save(outside / "dir" / "secret2.png")
    os.mkfifo(outside / "fifo.png")  # opening it for reading blocks until a writer comes: a hang if read
    os.symlink(outside / "secret.png", src / "a" / "link.png")
    os.symlink(outside / "fifo.png", src / "a" / "fifo_link.png")
    os.symlink(outside / "dir", src / "b" / "linked_dir")
    os.symlink(outside / "dir", src / "c_linked_class")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "sweeps.cli", "ingest", str(src), str(out), "--size", "16",
                           "--workers", "1", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    import json
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    for rel in ("a/link.png", "a/fifo_link.png", "b/linked_dir", "c_linked_class"):
        assert reasons.get(rel) == "outside source", (rel, reasons)
    assert manifest["classes"] == ["a", "b"] and sum(manifest["num_images"].values()) == 6
    table = pq.read_table(sorted((out / "data").glob("*.parquet")))  # every shard
    outside_pixels = {decode_file(str(p), 16).pixels for p in (outside / "secret.png", outside / "dir" / "secret2.png")}
    outside_sha = {decode_file(str(p), 16).sha256 for p in (outside / "secret.png", outside / "dir" / "secret2.png")}
    assert None not in outside_pixels and len(table) == 6
    assert not outside_pixels & set(table.column("image").to_pylist())
    assert not outside_sha & set(table.column("sha256").to_pylist())
    assert not any("link" in p for p in table.column("path").to_pylist())
    # No colour of the secret in any stored image (a crop or resize of it would still carry it).
    pixels = np.frombuffer(b"".join(table.column("image").to_pylist()), np.uint8).reshape(-1, 3)
    assert not ((np.abs(pixels.astype(int) - [201, 13, 177]).sum(axis=1)) < 30).any()
