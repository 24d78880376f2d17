#!/usr/bin/env bash
# The main job: sets the host up (scripts/setup.sh) and boots the guest
# kernel in a microVM, streaming its console until the guest ends the VM.
# Extra arguments go to `skiff boot` (e.g. --vcpus 2 --memory 256M).
set -euo pipefail
repo_root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
# Two steps: `eval "$(…)"` would hide a failed set-up from `set -e`.
exports=$("$repo_root/scripts/setup.sh")
eval "$exports"
echo "[demo] booting a microVM (about a minute on a host without hardware virtualization)" >&2
exec "$repo_root/target/release/skiff" boot --kernel "$SKIFF_KERNEL" --initrd "$SKIFF_INITRD" "$@"
