#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) for vdisk: system packages, then the project venv.
# Idempotent: a rerun skips apt when every package is installed and reuses the venv.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

PACKAGES=(
    qemu-utils qemu-system-x86 qemu-system-common
    nbdkit nbdkit-plugin-python python3-libnbd libnbd-bin
    python3-venv python3-dev gcc
    busybox-static cpio zstd
    fio openssl
    fuse3 e2fsprogs xfsprogs nbd-client socat  # tests/test_filesystems.py: nbdfuse, mkfs/fsck; the guest's nbd client
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ $status == installed ]] || missing+=("$pkg")
done

if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: must run as root to install packages" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
else
    echo "setup: system packages present"
fi

if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv"
    /usr/bin/python3 -m venv --system-site-packages .venv
fi

echo "setup: installing vdisk into .venv (pip install -e '.[test]')"
.venv/bin/pip install --disable-pip-version-check -q -e '.[test]'
echo "setup: done"
