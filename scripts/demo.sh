#!/usr/bin/env bash
# Set up the machine if needed, then run the main job on its embedded default: build a demo chain, serve it,
# boot a guest on it, stream under the guest, prove the data intact.  Extra arguments go to `vdisk demo`.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

bash scripts/setup.sh
exec .venv/bin/vdisk demo "$@"
