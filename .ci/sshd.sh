#!/usr/bin/env bash
# What the launcher test (tests/test_launcher.py, marker `launcher`) needs on the machine: Debian's
# openssh-server (the nodes' sshd; the packaged service is not started), the ssh client, rsync (`ray up`
# syncs file_mounts with it), iproute2 (`ip netns`, veth, bridge) and util-linux (`unshare`, `nsenter`).
# Installs what is missing (root, apt), then checks that a network namespace can be created and removed.
# Exits non-zero with one line saying what is missing: .ci/run then fails instead of letting the test skip.
set -euo pipefail
say() { echo "sshd.sh: $*" >&2; }

need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v rsync >/dev/null || need+=(rsync)
command -v ip >/dev/null || need+=(iproute2)
command -v unshare >/dev/null && command -v nsenter >/dev/null || need+=(util-linux)
if [ "${#need[@]}" -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { say "need root to install ${need[*]}"; exit 1; }
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d exit 101: the package must not start the machine's own sshd; the test runs one per node.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null || { say "apt-get update failed"; exit 1; }
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${need[@]}" >/dev/null \
        || { say "apt-get install ${need[*]} failed"; exit 1; }
fi
[ -x /usr/sbin/sshd ] || { say "/usr/sbin/sshd still missing"; exit 1; }
[ "$(id -u)" = 0 ] || { say "network namespaces need root"; exit 1; }
probe="ichp-$$"
ip netns add "$probe" 2>/dev/null || { say "cannot create a network namespace (ip netns add)"; exit 1; }
ip netns delete "$probe"
unshare --pid --fork --mount-proc true || { say "cannot create a PID namespace (unshare --pid)"; exit 1; }
say "ready: $(/usr/sbin/sshd -V 2>&1 | head -1), rsync, iproute2, namespaces"
