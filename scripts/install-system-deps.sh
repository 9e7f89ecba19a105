#!/usr/bin/env bash
# Installs the Debian packages the tools and tests need, when root and when missing.
set -euo pipefail
need=()
command -v rsync >/dev/null || need+=(rsync)
command -v ssh >/dev/null || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ip >/dev/null || need+=(iproute2)
command -v tar >/dev/null || need+=(tar)
# every unpacking rank loads the C library libarchive (mpitools/common/tarread.py)
if command -v ldconfig >/dev/null || [ -x /sbin/ldconfig ]; then
    { ldconfig -p 2>/dev/null || /sbin/ldconfig -p; } | grep -q 'libarchive\.so\.13' \
        || need+=(libarchive13)
fi
# the peers `bench` measures beside our methods (testbed only): pdcp, and Slurm's sbcast
# on a Slurm the testbed starts itself (`testbed up --slurm`; its own config and key, so
# Debian's services for these packages need no configuration and may stay stopped)
command -v pdcp >/dev/null || need+=(pdsh)
{ command -v slurmctld && command -v slurmd && command -v sbcast; } >/dev/null \
    || need+=(slurm-wlm)
command -v munged >/dev/null || [ -x /usr/sbin/munged ] || need+=(munge)
# SimGrid's Python bindings for `chiba-admin predict` (imported from the venv through
# Debian's dist-packages directory)
if command -v dpkg-query >/dev/null; then
    dpkg-query -W -f='${Status}' python3-simgrid 2>/dev/null | grep -q "ok installed" \
        || need+=(python3-simgrid)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
    echo "note: missing ${need[*]}; not root, so tests needing them will skip" >&2
fi
