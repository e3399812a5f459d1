"""The namespace cluster of tests/netns.py dies with the test process that made it, and needs no network.

A test run stopped by SIGKILL, or by SIGTERM (a CI runner's or `timeout`'s stop: Python dies without running
fixture teardown), must leave no namespace, link, bridge, node process or folder: create_cluster's watchdog
removes them. A run killed together with its watchdog is cleaned by the next create_cluster (remove_stale).
The control kills a run that has no watchdog: everything stays until remove_stale, which the test calls.

The nodes' offline wheels are packed from this venv: preparing them reaches no index (an unreachable one is
set), and pip builds the project from them alone, as the nodes' `pip install -e` does; the control shows the
same build fails without them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests import netns

pytestmark = [pytest.mark.integration, pytest.mark.launcher]

CHILD = """\
import os, time
from tests import netns

def test_hold_a_cluster():
    c = netns.create_cluster(watchdog={watchdog})
    # A detached daemon in a node (as Ray's are): it must go too.
    netns.ssh(c, c.worker, "setsid sleep 600 >/dev/null 2>&1 < /dev/null &", check=True)
    open({ready!r}, "w").write(c.tag)
    time.sleep(600)
"""


@pytest.fixture
def prerequisites():
    why = netns.missing_prerequisites()
    if why:
        from tests.conftest import require_service
        require_service(f"namespace cluster: {why}")


def _run_and_kill(tmp_path, sig: int, watchdog: bool):
    """A pytest process that builds a cluster and sleeps; killed by `sig` once the cluster is up. Returns the
    cluster (from its state file, read before the kill) and its namespaces' inodes."""
    ready = tmp_path / "ready"
    test = tmp_path / "test_child.py"
    test.write_text(CHILD.format(watchdog=watchdog, ready=str(ready)))
    env = {**os.environ, "PYTHONPATH": str(netns.ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
                              str(tmp_path), "-c", os.devnull, str(test)], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not ready.exists():
        if child.poll() is not None or time.time() > deadline:
            child.kill()
            pytest.fail(f"the child test did not build its cluster:\n{child.communicate()[0][-3000:]}")
        time.sleep(0.2)
    state = json.loads((netns.STATE_DIR / f"{ready.read_text()}.json").read_text())
    c = netns.cluster_from_state(state)
    inodes = netns._netns_inodes(c)
    assert netns.leftovers(c, inodes), "the child's cluster is not up"
    assert any("(sleep)" in x for x in netns.leftovers(c, inodes))
    child.send_signal(sig)
    child.communicate(timeout=60)
    assert child.returncode == -sig, child.returncode  # died by the signal: no teardown ran
    return c, inodes, state


def _gone_within(c, inodes, timeout: float = 120) -> list[str]:
    deadline = time.time() + timeout
    while (left := netns.leftovers(c, inodes) + ([str(c.base)] if c.base.exists() else [])
           + ([str(c.state_file)] if c.state_file.exists() else [])) and time.time() < deadline:
        time.sleep(0.5)
    return left


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_cluster_dies_with_the_test_process(prerequisites, tmp_path, sig):
    c, inodes, state = _run_and_kill(tmp_path, sig, watchdog=True)
    assert state["watchdog"] and state["nodes"][0]["pid"]
    left = _gone_within(c, inodes)
    assert left == [], f"left behind after the test process got {signal.Signals(sig).name}: {left}"


def test_without_watchdog_a_killed_run_leaves_all_until_the_next_start(prerequisites, tmp_path):
    c, inodes, state = _run_and_kill(tmp_path, signal.SIGKILL, watchdog=False)
    try:
        # Control: the test process is dead and nothing removed its cluster (the guard above is what does).
        time.sleep(2)
        left = netns.leftovers(c, inodes)
        assert f"network namespace {c.head.netns}" in left and f"bridge {c.bridge}" in left, left
        assert any("(sshd)" in x for x in left) and any("(sleep)" in x for x in left), left
        assert c.state_file.exists()
        # The next start removes it: its test process is dead and it has no watchdog.
        removed = netns.remove_stale()
        assert any(r.startswith(c.tag) for r in removed), removed
        assert _gone_within(c, inodes, timeout=30) == []
    finally:
        netns.destroy_cluster(c)  # no-op when remove_stale did its job


def test_remove_stale_spares_a_cluster_whose_test_process_lives(prerequisites):
    """remove_stale must not touch another session's live cluster (this process is its owner)."""
    c = netns.create_cluster(watchdog=False)
    try:
        assert not any(r.startswith(c.tag) for r in netns.remove_stale())
        assert f"network namespace {c.head.netns}" in netns.leftovers(c)
    finally:
        assert netns.destroy_cluster(c) == []
    assert not c.state_file.exists()


def test_node_wheels_prepared_offline(tmp_path, monkeypatch):
    # An unreachable index on loopback: preparing the wheels must not need it.
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.setenv(var, "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    wheels = netns.prepare_wheels(tmp_path / "wheels")
    names = sorted(w.name.split("-")[0] for w in wheels.glob("*.whl"))
    assert {"setuptools", "wheel"} <= set(names), names
    src = netns.snapshot_checkout(tmp_path / "src")

    def build(find_links):
        # As the nodes' `pip install -e`: pip installs [build-system] requires into an isolated env, offline.
        env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(find_links)}
        return subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                               str(tmp_path / "out"), str(src)], env=env, capture_output=True, text=True,
                              timeout=600)

    built = build(wheels)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    assert list((tmp_path / "out").glob("ich_soups-*.whl"))
    # Control: the same offline build without the prepared wheels fails for want of the build backend.
    (tmp_path / "empty").mkdir()
    bare = build(tmp_path / "empty")
    assert bare.returncode != 0 and "setuptools" in bare.stdout + bare.stderr, bare.stderr[-2000:]
