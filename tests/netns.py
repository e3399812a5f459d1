"""Two SSH "machines" on this one: network + PID + mount namespaces, each running Debian's sshd.

API (helper functions and pytest fixtures; root only):

    cluster = create_cluster()          # or the session fixture `ns_cluster`
    cluster.head.addr, cluster.worker.addr   # e.g. "10.87.203.2", "10.87.203.3" (a free private /24)
    cluster.key                         # Path of the ed25519 private key; root logs in with it (key only)
    cluster.shared                      # a folder both nodes and the test see at the same path
    ssh(cluster, cluster.head, "ray status", env=None, timeout=60) -> CompletedProcess (text)
    node_exec(cluster.worker, ["curl", "-sf", url]) -> CompletedProcess: runs inside the node's
                                        namespaces (nsenter, no SSH)
    leftovers(cluster) -> list[str]     # what of this cluster still exists (empty after destroy)
    destroy_cluster(cluster)            # kills the nodes by their outer PIDs, removes namespaces/veths/bridge
    remove_stale() -> list[str]         # clusters of an earlier run whose test process died (create_cluster
                                        # calls it first)

    launched = launch(cluster, tmp)     # or the session fixture `ns_ray_cluster`: `ray up -y` of the
                                        # project's own cluster.yaml rendered for the local provider
    launched.yaml                       # the rendered cluster yaml (give it to `ray submit/exec/down`)
    launched.env                        # environment for the `ray` CLI on this machine (HOME = a client
                                        # home holding .ich/secrets.env and .ich/ray_auth_token)
    launched.mlflow_uri                 # http://<head addr>:5000 (basic auth; reachable from here)
    launched.admin / launched.worker_user  # (username, password) of the MLflow admin / the workers' user
    launched.token_path                 # the Ray token file (RAY_AUTH_TOKEN_PATH for clients)
    launched.dashboard()                # context manager: `ray dashboard <yaml>` tunnel, yields the
                                        # http://127.0.0.1:<port> address of the head's Jobs API
    teardown(launched)                  # `ray down -y`, then destroy_cluster; returns leftovers

Each node is `ip netns exec <ns> unshare --pid --fork --kill-child --mount-proc ...`, started with
start_new_session=True; the test records that outer PID and ends a node by signalling its process group
(killing the PID namespace's first process ends everything in it, Ray included). No PID from inside a
namespace is ever signalled. Inside its mount namespace each node has a private home bind-mounted over /root
(the venv's Python under /root/.pyenv stays visible through a bind mount), a private /tmp and /run, so
`ray up`/`ray submit` write ray_bootstrap_*, ~/.ray, ~/.bashrc, ~/.ich into the node, never into this
machine's real home. Inside each namespace the default route goes via the bridge address, so Ray picks the
namespace address as the node address.

Nothing outlives the test process: create_cluster records the cluster (names, outer PIDs with their start
times) in STATE_DIR/<tag>.json, outside every namespace, and starts a watchdog in its own session that polls
the test process; when that dies (SIGKILL, or SIGTERM, which skips fixture teardown) the watchdog runs
destroy_cluster from the recorded state. A state file whose test process and watchdog are both gone (the
machine's watchdog was killed too) is cleaned by the next create_cluster. A PID is signalled only while its
start time still matches the recorded one.
"""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

BASE_PARENT = Path("/var/tmp")  # not /tmp: each node mounts a private /tmp over it
STATE_DIR = Path("/run/ich-netns")  # one <tag>.json per live cluster: what a watchdog or the next run removes
SSHD = "/usr/sbin/sshd"


@dataclass
class Node:
    name: str           # "head" | "worker"
    netns: str          # network namespace name
    addr: str           # its address on the cluster /24
    veth: str           # root-side veth name
    root: Path          # per-node folder (home, tmp, run)
    pid: int = 0        # outer PID of `ip netns exec ... unshare` (its process group is the node)
    start: int = 0      # that PID's start time (/proc/<pid>/stat field 22): a reused PID is never signalled

    @property
    def home(self) -> Path:
        return self.root / "home"


@dataclass
class NsCluster:
    tag: str
    base: Path
    bridge: str
    bridge_addr: str
    prefix: int
    head: Node
    worker: Node
    key: Path
    shared: Path
    python_bin: Path    # folder of the base Python the venv links to (on PATH inside the nodes)
    log: list[str] = field(default_factory=list)
    owner: int = 0                  # the test process whose death ends the cluster
    watchdog: subprocess.Popen | None = None
    extra_pids: list[tuple[int, int]] = field(default_factory=list)  # (pid, start) started outside the nodes

    @property
    def state_file(self) -> Path:
        return STATE_DIR / f"{self.tag}.json"

    @property
    def nodes(self) -> list[Node]:
        return [self.head, self.worker]


# ------------------------------------------------------------------------------------------- checks


def missing_prerequisites() -> str | None:
    """One line saying what this machine lacks to build the namespaces, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "nsenter", "ssh", "ssh-keygen", "rsync"):
        if not shutil.which(tool):
            return f"`{tool}` is not installed (.ci/sshd.sh installs it)"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is missing: install openssh-server (.ci/sshd.sh)"
    probe = f"ichp-{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    out = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        dest = line.split()[0]
        if dest != "default":
            nets.append(ipaddress.ip_network(dest if "/" in dest else dest + "/32", strict=False))
    return nets


def pick_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps no address or route of this machine."""
    used = _used_networks()
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{secrets.randbelow(254) + 1}.{secrets.randbelow(254) + 1}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free private /24 in 10.0.0.0/8")


# ------------------------------------------------------------------------------------------- build


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r


NODE_INIT = r"""
set -e
# Runs as PID 1 of the node's PID namespace, in its own mount namespace (mounts here stay private).
mount --make-rprivate /
mkdir -p "$NODE_ROOT/home/.pyenv" "$NODE_ROOT/tmp" "$NODE_ROOT/run"
chmod 1777 "$NODE_ROOT/tmp"
chmod 700 "$NODE_ROOT/home"
# The venv's Python lives under the real home: keep it visible inside the private home.
if [ -d /root/.pyenv ]; then mount --bind /root/.pyenv "$NODE_ROOT/home/.pyenv"; fi
# So do the checkout and its venv when they live under /tmp or /root (a CI clone may): same path inside.
IFS=: read -r -a keep <<< "${KEEP_PATHS:-}"
for path in "${keep[@]}"; do
  case "$path" in
    /tmp/*) target="$NODE_ROOT/tmp/${path#/tmp/}" ;;
    /root/*) target="$NODE_ROOT/home/${path#/root/}" ;;
    *) continue ;;
  esac
  mkdir -p "$target" && mount --bind "$path" "$target"
done
mount --rbind "$NODE_ROOT/home" /root
mount --rbind "$NODE_ROOT/tmp" /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/sshd
ip link set lo up
/usr/sbin/sshd -D -e -f "$SSHD_CONFIG" &
# PID 1 reaps orphans (Ray daemons, ssh sessions) until the node is killed from outside.
wait
"""

SSHD_CONFIG = """\
ListenAddress {addr}
Port 22
HostKey {hostkey}
PidFile none
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
MaxSessions 64
MaxStartups 64
Subsystem sftp internal-sftp
"""


def create_cluster(base_parent: Path = BASE_PARENT, watchdog: bool = True) -> NsCluster:
    """Build the two nodes and wait until both sshd accept the test key. Cleans up after itself on failure, and
    (watchdog) when this process dies without cleaning up. First removes stale clusters of dead test runs."""
    for line in remove_stale():
        print(f"netns: removed a stale cluster of a killed run: {line}", file=sys.stderr)
    tag = secrets.token_hex(3)
    net = pick_subnet()
    hosts = list(net.hosts())
    base = base_parent / f"ichns-{tag}"
    (base / "shared").mkdir(parents=True)
    os.chmod(base / "shared", 0o1777)
    c = NsCluster(tag=tag, base=base, bridge=f"ichb-{tag}", bridge_addr=str(hosts[0]), prefix=net.prefixlen,
                  head=Node("head", f"ichh-{tag}", str(hosts[1]), f"ichvh-{tag}", base / "head"),
                  worker=Node("worker", f"ichw-{tag}", str(hosts[2]), f"ichvw-{tag}", base / "worker"),
                  key=base / "id_ed25519", shared=base / "shared",
                  python_bin=Path(os.path.realpath(sys.executable)).parent, owner=os.getpid())
    try:
        save_state(c)  # before anything is made: a kill during the build is covered too
        if watchdog:
            _start_watchdog(c)
        _build(c)
    except BaseException:
        destroy_cluster(c)
        raise
    return c


def _build(c: NsCluster) -> None:
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"ich-netns-{c.tag}", "-f", str(c.key))
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(c.base / "host_key"))
    (c.base / "authorized_keys").write_text(Path(str(c.key) + ".pub").read_text())
    _sh("ip", "link", "add", c.bridge, "type", "bridge")
    _sh("ip", "addr", "add", f"{c.bridge_addr}/{c.prefix}", "dev", c.bridge)
    _sh("ip", "link", "set", c.bridge, "up")
    for n in c.nodes:
        _sh("ip", "netns", "add", n.netns)
        _sh("ip", "link", "add", n.veth, "type", "veth", "peer", "name", "eth0", "netns", n.netns)
        _sh("ip", "link", "set", n.veth, "master", c.bridge)
        _sh("ip", "link", "set", n.veth, "up")
        ns = ("ip", "netns", "exec", n.netns)
        _sh(*ns, "ip", "addr", "add", f"{n.addr}/{c.prefix}", "dev", "eth0")
        _sh(*ns, "ip", "link", "set", "eth0", "up")
        _sh(*ns, "ip", "link", "set", "lo", "up")
        # Without a default route Ray finds no outward interface and picks 127.0.0.1 as the node address.
        _sh(*ns, "ip", "route", "add", "default", "via", c.bridge_addr)
        _start_node(c, n)
    for n in c.nodes:
        _wait_ssh(c, n)


def _kept_paths() -> list[str]:
    """What a node must see at the same path although its /tmp and /root are private: the checkout, the venv
    and the Python it was built with (a CI clone may sit under /tmp or /root)."""
    paths = {ROOT.resolve(), Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    return sorted(str(p) for p in paths if str(p).startswith(("/tmp/", "/root/")) and not str(p).startswith(
        "/root/.pyenv"))


def _start_node(c: NsCluster, n: Node) -> None:
    n.root.mkdir(parents=True, exist_ok=True)
    (n.root / "home").mkdir(exist_ok=True)
    # The node's "machine image": python3 is the Python the project's venv was built with.
    profile = f'export PATH="{c.python_bin}:$PATH"\n'
    (n.root / "home" / ".bashrc").write_text(profile)
    (n.root / "home" / ".profile").write_text('[ -f ~/.bashrc ] && . ~/.bashrc\n')
    config = n.root / "sshd_config"
    config.write_text(SSHD_CONFIG.format(addr=n.addr, hostkey=c.base / "host_key",
                                         authorized=c.base / "authorized_keys"))
    log = open(n.root / "node.log", "ab")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "NODE_ROOT": str(n.root),
           "SSHD_CONFIG": str(config), "KEEP_PATHS": ":".join(_kept_paths())}
    p = subprocess.Popen(["ip", "netns", "exec", n.netns, "unshare", "--pid", "--fork", "--kill-child",
                          "--mount-proc", "bash", "-c", NODE_INIT], env=env, stdout=log, stderr=log,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    n.pid, n.start = p.pid, proc_start(p.pid)
    save_state(c)
    c.log.append(f"{n.name}: outer pid {p.pid}")


def ssh_base(c: NsCluster) -> list[str]:
    return ["ssh", "-i", str(c.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]


def _wait_ssh(c: NsCluster, n: Node, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        r = subprocess.run([*ssh_base(c), f"root@{n.addr}", "true"], capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            return
        if time.time() > deadline or not _alive(n.pid):
            log = (n.root / "node.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"sshd of the {n.name} node ({n.addr}) does not accept the test key: "
                               f"{r.stderr.strip()}\nnode log:\n{log}")
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------- use


def ssh(c: NsCluster, n: Node, command: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    """Run `command` on a node over SSH as root, through a login shell (as Ray's updater does)."""
    r = subprocess.run([*ssh_base(c), f"root@{n.addr}", "bash --login -c " + shlex.quote(command)],
                       capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and r.returncode:
        raise RuntimeError(f"{n.name}$ {command}: exit {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r


def inner_init_pid(n: Node) -> int | None:
    """Outer PID of the node's PID 1 (the child of the outer `unshare`), read from this namespace's /proc."""
    try:
        for task in Path(f"/proc/{n.pid}/task").iterdir():
            kids = (task / "children").read_text().split()
            if kids:
                return int(kids[0])
    except OSError:
        return None
    return None


def node_exec(n: Node, argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run argv inside a node's network, mount and PID namespaces (no SSH), capturing text output."""
    pid = inner_init_pid(n)
    if pid is None:
        raise RuntimeError(f"the {n.name} node is not running")
    return subprocess.run(["nsenter", "-t", str(pid), "-n", "-m", "-p", "--", *argv], capture_output=True,
                          text=True, timeout=timeout, **kw)


# ------------------------------------------------------------------------------------------- teardown


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of this process still answers kill(0): reap it.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def proc_start(pid: int) -> int:
    """Start time of a process in clock ticks since boot (0 when it is gone): with the PID, who it is."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def _same_process(pid: int, start: int) -> bool:
    return bool(pid) and (not start or proc_start(pid) == start) and _alive(pid)


def _kill_group(pid: int, start: int) -> None:
    """SIGTERM then SIGKILL the process group led by pid (a session we started), if it is still that process."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _same_process(pid, start):
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + 5
        while time.time() < deadline and _alive(pid):
            time.sleep(0.1)


def _kill_node(n: Node) -> None:
    if not n.pid or not _same_process(n.pid, n.start):
        return
    inner = inner_init_pid(n)
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        for target in (n.pid, inner):
            if target:
                try:
                    os.killpg(n.pid, sig) if target == n.pid else os.kill(target, sig)
                except ProcessLookupError:
                    pass
        deadline = time.time() + wait
        while time.time() < deadline and (_alive(n.pid) or (inner and _alive(inner))):
            time.sleep(0.1)


def destroy_cluster(c: NsCluster) -> list[str]:
    """Remove everything `create_cluster` made; returns leftovers (empty when all is gone)."""
    _stop_watchdog(c)
    inodes = _netns_inodes(c)  # before the namespaces are deleted: processes still in them show it
    for pid, start in c.extra_pids:
        _kill_group(pid, start)
    for n in c.nodes:
        _kill_node(n)
    for n in c.nodes:
        _sh("ip", "link", "delete", n.veth, check=False)
        _sh("ip", "netns", "delete", n.netns, check=False)
    _sh("ip", "link", "delete", c.bridge, check=False)
    left = leftovers(c, inodes)
    if not left:
        shutil.rmtree(c.base, ignore_errors=True)
        c.state_file.unlink(missing_ok=True)
    return left


# ------------------------------------------------------------------------------------------- state, watchdog


def save_state(c: NsCluster) -> None:
    """What a watchdog or a later run needs to remove this cluster, written atomically outside the namespaces."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state = {"tag": c.tag, "base": str(c.base), "bridge": c.bridge, "bridge_addr": c.bridge_addr,
             "prefix": c.prefix, "key": str(c.key), "shared": str(c.shared), "python_bin": str(c.python_bin),
             "owner": c.owner, "owner_start": proc_start(c.owner),
             "watchdog": c.watchdog.pid if c.watchdog else 0,
             "watchdog_start": proc_start(c.watchdog.pid) if c.watchdog else 0,
             "extra_pids": c.extra_pids,
             "nodes": [{"name": n.name, "netns": n.netns, "addr": n.addr, "veth": n.veth, "root": str(n.root),
                        "pid": n.pid, "start": n.start} for n in c.nodes]}
    tmp = c.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(c.state_file)


def cluster_from_state(state: dict) -> NsCluster:
    head, worker = ({**n, "root": Path(n["root"])} for n in state["nodes"])
    return NsCluster(tag=state["tag"], base=Path(state["base"]), bridge=state["bridge"],
                     bridge_addr=state["bridge_addr"], prefix=state["prefix"], head=Node(**head),
                     worker=Node(**worker), key=Path(state["key"]), shared=Path(state["shared"]),
                     python_bin=Path(state["python_bin"]), owner=state["owner"],
                     extra_pids=[tuple(p) for p in state["extra_pids"]])


def register_pid(c: NsCluster, pid: int) -> None:
    """A process this test started outside the nodes for the cluster (a tunnel): ended with it, even after a kill."""
    c.extra_pids.append((pid, proc_start(pid)))
    save_state(c)


def _start_watchdog(c: NsCluster) -> None:
    # Its own session: a SIGINT/SIGTERM sent to the test's process group does not reach it.
    log = open(c.base / "watchdog.log", "ab")
    c.watchdog = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--watch", str(c.state_file)],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                  cwd="/")
    log.close()
    save_state(c)


def _stop_watchdog(c: NsCluster) -> None:
    """The owner cleans up itself: the watchdog (our child) must not race it."""
    if c.watchdog is not None:
        c.watchdog.kill()
        c.watchdog.wait()
        c.watchdog = None


def _owner_gone(state: dict) -> bool:
    return not _same_process(state["owner"], state["owner_start"])


def destroy_from_state(state: dict) -> list[str]:
    """destroy_cluster for a cluster known only by its state file; also forgets the `ray` CLI's local state."""
    c = cluster_from_state(state)
    left = destroy_cluster(c)
    try:
        forget_local_state(c)
    except ImportError:
        pass
    return left


def watch(state_file: Path, poll: float = 0.2) -> None:
    """The watchdog's loop: while the test process lives and the state file exists, wait; if the process dies
    first, remove its cluster."""
    while state_file.exists():
        state = json.loads(state_file.read_text())
        if _owner_gone(state):
            left = destroy_from_state(state)
            print(f"watchdog: test process {state['owner']} died; cluster {state['tag']} removed, "
                  f"left: {left}", file=sys.stderr)
            state_file.unlink(missing_ok=True)  # also when something is left: the next run does not retry forever
            return
        time.sleep(poll)


def remove_stale() -> list[str]:
    """Remove the clusters of state files whose test process and watchdog are both dead (a run killed together
    with its watchdog, or a reboot-less crash); returns one line per removed cluster."""
    removed = []
    for f in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []:
        try:
            state = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not _owner_gone(state) or _same_process(state["watchdog"], state["watchdog_start"]):
            continue
        left = destroy_from_state(state)
        f.unlink(missing_ok=True)
        removed.append(f"{state['tag']} (test process {state['owner']}){' left: ' + str(left) if left else ''}")
    return removed


def _netns_inodes(c: NsCluster) -> set[int]:
    inodes = set()
    for n in c.nodes:
        try:
            inodes.add(os.stat(f"/run/netns/{n.netns}").st_ino)
        except OSError:
            pass
    return inodes


def processes_in(inodes: set[int]) -> list[str]:
    """Processes of this machine whose network namespace is one of `inodes` (sshd, Ray, trials...)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.stat(proc / "ns" / "net").st_ino in inodes:
                    found.append(f"process {proc.name} ({(proc / 'comm').read_text().strip()})")
            except OSError:
                pass
    return found


def leftovers(c: NsCluster, inodes: set[int] | None = None) -> list[str]:
    """What of this cluster still exists: namespaces, links, node processes, any process in its namespaces."""
    left = []
    netns = _sh("ip", "netns", "list", check=False).stdout
    links = _sh("ip", "-o", "link", check=False).stdout
    for n in c.nodes:
        if n.netns in netns.split():
            left.append(f"network namespace {n.netns}")
        if f" {n.veth}@" in links or f" {n.veth}:" in links:
            left.append(f"veth {n.veth}")
        if n.pid and _alive(n.pid):
            left.append(f"{n.name} node process {n.pid}")
    if f" {c.bridge}:" in links:
        left.append(f"bridge {c.bridge}")
    # Any process still running in one of this cluster's namespaces (sshd, Ray) shows its netns inode.
    left += processes_in(inodes if inodes is not None else _netns_inodes(c))
    return left


# ------------------------------------------------------------------------------------------- ray up

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
WHEEL_CACHE = ROOT / ".ich" / "netns-wheels"  # .gitignore'd; reused across runs


@dataclass
class Launched:
    cluster: NsCluster
    yaml: Path
    env: dict
    client_home: Path
    token_path: Path
    mlflow_uri: str
    admin: tuple[str, str]
    worker_user: tuple[str, str | None]   # password: known only on the head (~/.ich/worker_password)
    src: Path = ROOT
    up_seconds: float = 0.0
    ready_seconds: float = 0.0
    up_log: str = ""

    def ray(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """Run the `ray` CLI on this machine against the cluster, from the checkout `ray up` ran in."""
        r = subprocess.run([RAY, *args], env=self.env, cwd=self.src, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode:
            raise RuntimeError(f"ray {' '.join(args)}: exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
        return r

    def dashboard(self):
        return _dashboard_tunnel(self)


def render_cluster_yaml(c: NsCluster, dest: Path, source: Path = ROOT / "cluster.yaml") -> Path:
    """The project's own cluster.yaml switched to the on-prem `local` provider as its comments instruct."""
    import yaml
    cfg = yaml.safe_load(source.read_text())
    cfg["cluster_name"] = f"ich-soups-{c.tag}"  # the local provider keeps /tmp/cluster-<name>.state
    cfg["provider"] = {"type": "local", "head_ip": c.head.addr, "worker_ips": [c.worker.addr]}
    del cfg["head_node_type"], cfg["available_node_types"]
    cfg["max_workers"] = 1
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(c.key)}
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False, width=1000))
    return dest


def prepare_wheels(dest: Path = WHEEL_CACHE) -> Path:
    """Wheels of the build backend the nodes' editable install (`pip install -e`, build isolation) needs:
    pyproject's [build-system] requires and their dependencies, packed from what this venv has installed, so
    no package index is reached. The rest (torch, the `head` extra's mlflow[auth], boto3, psycopg2-binary) the
    nodes find installed through ICH_SITE_PACKAGES."""
    import tomllib
    from packaging.requirements import Requirement
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]]
    done: set[str] = set()
    while wanted:
        req = wanted.pop()
        key = req.name.lower().replace("_", "-")
        if key in done:
            continue
        dist = _installed(req.name)
        if dist.version not in req.specifier:
            raise RuntimeError(f"{req}: this venv has {dist.version}; install it to prepare the nodes' wheels")
        done.add(key)
        _wheel_from_installed(dist, dest)
        wanted += [r for r in map(Requirement, dist.requires or []) if not r.marker or r.marker.evaluate({"extra": ""})]
    return dest


def _installed(name: str):
    """The installed distribution `name`: this venv's, else setuptools' vendored copy (how `wheel` ships now)."""
    import importlib.metadata as md
    import setuptools
    try:
        return md.distribution(name)
    except md.PackageNotFoundError:
        vendored = Path(setuptools.__file__).parent / "_vendor"
        found = [d for d in md.distributions(path=[str(vendored)]) if d.metadata["Name"].lower() == name.lower()]
        if not found:
            raise RuntimeError(f"{name} is not installed in this venv: the nodes' offline wheels need it") from None
        return found[0]


def _wheel_from_installed(dist, dest: Path) -> Path:
    """A wheel of an installed distribution: its installed files (RECORD) under their site-packages paths, the
    dist-info without the installer's marks, a fresh RECORD. Console scripts come back from entry_points.txt."""
    import base64
    import hashlib
    import re
    import zipfile
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()
    wheel_meta = dist.read_text("WHEEL") or ""
    tag = next((line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")),
               "py3-none-any")
    path = dest / f"{name}-{dist.version}-{tag}.whl"
    if path.exists():
        return path
    info = f"{name}-{dist.version}.dist-info"
    skip = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"}
    record = []
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for f in dist.files or []:
            src = Path(dist.locate_file(f))
            parts = f.parts
            if ".." in parts or "__pycache__" in parts or not src.is_file():
                continue  # scripts outside site-packages (pip regenerates them), bytecode
            arc = "/".join(parts)
            if parts[0].endswith(".dist-info"):
                if parts[-1] in skip:
                    continue
                arc = "/".join((info, *parts[1:]))
            data = src.read_bytes()
            z.writestr(arc, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{arc},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    tmp.replace(path)
    return path


def write_client_home(c: NsCluster, admin: tuple[str, str]) -> tuple[Path, Path]:
    """The `ray up` user's home: ~/.ich/secrets.env, ~/.ich/ray_auth_token and ~/.ich/signing_key (the sweep
    owner's key, made as `ich key show` makes it), as docs/cluster.md says."""
    import sysconfig
    home = c.base / "client-home"
    ich = home / ".ich"
    ich.mkdir(parents=True, exist_ok=True)
    os.chmod(ich, 0o700)
    token = ich / "ray_auth_token"
    token.write_text(secrets.token_hex(32) + "\n")
    secrets_env = ich / "secrets.env"
    secrets_env.write_text(textwrap.dedent(f"""\
        MLFLOW_TRACKING_USERNAME={admin[0]}
        MLFLOW_TRACKING_PASSWORD={admin[1]}
        ICH_STORAGE={c.shared}/ray-results
        ICH_MLFLOW_ARTIFACTS={c.shared}/mlflow-artifacts
        ICH_SITE_PACKAGES={sysconfig.get_paths()["purelib"]}
        PIP_NO_INDEX=1
        PIP_FIND_LINKS={c.shared}/wheels
        """))
    for f in (token, secrets_env):
        os.chmod(f, 0o600)
    from soups.store.signing import own_key
    own_key(ich / "signing_key")
    return home, token


def snapshot_checkout(dest: Path) -> Path:
    """The files a clone of this working tree has (tracked + untracked, minus .gitignore'd): `ray up` runs
    there, as from a user's checkout. `ray up` hashes every file under a file_mounts folder, .venv included
    (~GBs here), and other processes writing in the working tree would race that walk."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"], check=True,
                         capture_output=True, text=True).stdout
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def launch(c: NsCluster, timeout: float = 1200) -> Launched:
    """`ray up -y` of the rendered cluster.yaml, as a user runs it (v1 autoscaler: see docs/cluster.md)."""
    admin = ("ich-admin", secrets.token_hex(16))
    src = snapshot_checkout(c.base / "src")
    shutil.copytree(prepare_wheels(), c.shared / "wheels", ignore=shutil.ignore_patterns("*.json"))
    home, token = write_client_home(c, admin)
    yaml_path = render_cluster_yaml(c, c.base / "cluster.yaml", src / "cluster.yaml")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "ICH_", "PYTEST", "PIP_"))}
    env.update(HOME=str(home), PATH=f"{Path(RAY).parent}:{env.get('PATH', '')}", RAY_UP_enable_autoscaler_v2="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PYTHONUNBUFFERED="1")
    launched = Launched(c, yaml_path, env, home, token, f"http://{c.head.addr}:5000", admin,
                        ("ich-worker", None), src)
    t0 = time.time()
    r = launched.ray("up", "-y", str(yaml_path), timeout=timeout, check=False)
    launched.up_seconds = time.time() - t0
    launched.up_log = r.stdout + r.stderr
    if r.returncode:
        raise RuntimeError(f"ray up failed (exit {r.returncode}):\n{launched.up_log[-6000:]}")
    return launched


def wait_for_worker(launched: Launched, timeout: float = 300) -> str:
    """Poll `ray exec <yaml> 'ray status'` until the worker node is alive; returns the status text."""
    deadline = time.time() + timeout
    status = ""
    while time.time() < deadline:
        r = launched.ray("exec", str(launched.yaml), "ray status", check=False, timeout=120)
        status = r.stdout
        if active_nodes(status) >= 2:
            return status
        time.sleep(5)
    raise RuntimeError(f"the worker did not join within {timeout:.0f} s:\n{status[-3000:]}")


def active_nodes(status: str) -> int:
    """Nodes in the "Active:" section of `ray status` ("2 local.cluster.node" or one "node_..." per line)."""
    active = status.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in status else ""
    n = 0
    for line in active.splitlines():
        word = line.split()[0] if line.split() else ""
        n += int(word) if word.isdigit() else ("node_" in line)
    return n


class _dashboard_tunnel:
    """`ray dashboard <yaml> --port P` in its own session: the Jobs API at http://127.0.0.1:P."""

    def __init__(self, launched: Launched):
        self.launched = launched

    def __enter__(self) -> str:
        from soups.tracking_server import free_port
        port = free_port()
        self.proc = subprocess.Popen([RAY, "dashboard", str(self.launched.yaml), "--port", str(port)],
                                     env=self.launched.env, cwd=self.launched.src, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
        register_pid(self.launched.cluster, self.proc.pid)
        import urllib.request
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=5)
                return url
            except Exception as e:  # noqa: BLE001 -- 401 means the tunnel is up (token auth)
                if getattr(e, "code", None) in (401, 403):
                    return url
            time.sleep(1)
        self.__exit__()
        raise RuntimeError("the `ray dashboard` tunnel did not come up in 60 s")

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def ray_down(launched: Launched, wait: float = 60) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`ray down -y <yaml>` as a user runs it, then what of Ray still runs in the nodes (raylet, gcs_server and the
    head's MLflow server, which lives as long as Ray there: seen from outside, by the nodes' network namespaces)
    once it settles (at most `wait` s); then forget the local
    provider's state of this cluster on this machine (/tmp/ray/cluster-<name>.*) and Ray's SSH control folder.
    Nothing is killed here: the caller asserts on both before any cleanup."""
    r = launched.ray("down", "-y", str(launched.yaml), check=False, timeout=300)
    deadline = time.time() + wait
    while (left := ray_processes(launched.cluster) + [f"process {pid} ({cmd[:150]})" for pid, cmd in
                                                      mlflow_processes(launched.cluster)]) and time.time() < deadline:
        time.sleep(1)
    forget_local_state(launched.cluster)
    return r, left


def ray_processes(c: NsCluster) -> list[str]:
    """Ray's node daemons still running in the cluster's nodes."""
    return [p for p in processes_in(_netns_inodes(c)) if p.endswith(("(raylet)", "(gcs_server)"))]


def mlflow_processes(c: NsCluster) -> list[tuple[int, str]]:
    """(outer pid, command line) of the head's MLflow server and its supervisor (cluster.yaml) in the nodes."""
    found = []
    for line in processes_in(_netns_inodes(c)):
        pid = int(line.split()[1])
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "soups.supervise" in cmd or "mlflow server" in cmd or ("uvicorn" in cmd and "mlflow" in cmd):
            found.append((pid, cmd))
    return found


def forget_local_state(c: NsCluster) -> None:
    """What the `ray` CLI keeps on this machine for the cluster: the local provider's state files and the SSH
    control folder (both named after the cluster)."""
    import getpass
    import hashlib
    from ray.autoscaler._private.local.config import get_lock_path, get_state_path
    name = f"ich-soups-{c.tag}"
    for f in (get_lock_path(name), get_state_path(name)):
        Path(f).unlink(missing_ok=True)
    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    shutil.rmtree(f"/tmp/ray_ssh_{user}/{hashlib.sha256(name.encode()).hexdigest()[:10]}", ignore_errors=True)


def teardown(launched: Launched) -> tuple[subprocess.CompletedProcess, list[str], list[str]]:
    """`ray down -y`, then remove the nodes; returns (ray down, Ray daemons left after it, leftovers)."""
    down, ray_left = ray_down(launched)
    return down, ray_left, destroy_cluster(launched.cluster)


# ------------------------------------------------------------------------------------------- fixtures

try:
    import pytest
except ImportError:  # the module is also usable from a plain script
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def ns_cluster():
        """The two SSH nodes for the session; CI=true turns a missing prerequisite into a failure."""
        from tests.conftest import require_service
        why = missing_prerequisites()
        if why:
            require_service(f"namespace cluster: {why}")
        try:
            c = create_cluster()
        except RuntimeError as e:
            require_service(f"namespace cluster could not be built: {e}")
        yield c
        left = destroy_cluster(c)
        assert not left, f"namespace cluster left behind: {left}"

    @pytest.fixture(scope="session")
    def ns_ray_cluster(ns_cluster):
        """`ray up -y` of the project's cluster.yaml on the two nodes, worker joined; `ray down -y` at the end
        (then `ns_cluster` removes the nodes and fails the session if anything is left)."""
        t0 = time.time()
        try:
            launched = launch(ns_cluster)
            wait_for_worker(launched)
        except RuntimeError as e:
            forget_local_state(ns_cluster)
            pytest.fail(f"ray up on the namespace cluster failed: {e}", pytrace=False)
        launched.ready_seconds = time.time() - t0
        print(f"\nnamespace cluster: ray up {launched.up_seconds:.0f} s, worker joined after "
              f"{launched.ready_seconds:.0f} s")
        yield launched
        down, ray_left = ray_down(launched)
        out = down.stdout + down.stderr
        (ROOT / "test-artifacts").mkdir(exist_ok=True)
        (ROOT / "test-artifacts" / "launcher-ray-down.log").write_text(out)
        # Checked before `ns_cluster` kills the nodes: a failing `ray down` must not pass because of that kill.
        assert down.returncode == 0, f"ray down: exit {down.returncode}\n{out[-3000:]}"
        assert not ray_left, f"Ray or MLflow still running in the nodes after ray down: {ray_left}\n{out[-3000:]}"


if __name__ == "__main__" and sys.argv[1:2] == ["--watch"]:  # the watchdog create_cluster starts
    watch(Path(sys.argv[2]))
elif __name__ == "__main__":  # smoke: build, ssh to both, show addresses, destroy
    cl = create_cluster()
    try:
        for node in cl.nodes:
            print(node.name, node.addr, ssh(cl, node, "hostname -I; echo $HOME; ls -A ~; which python3",
                                            check=True).stdout.split())
        print(node_exec(cl.worker, ["ping", "-c1", "-W2", cl.head.addr]).returncode)
    finally:
        print("leftovers:", destroy_cluster(cl))
