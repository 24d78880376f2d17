#!/usr/bin/env bash
# Installs skiff where containerd and podman can use it: the binary as
# <prefix>/bin/skiff, the guest kernel and the agent's initramfs in
# <prefix>/share/skiff/, where that binary looks for them by default.
# PREFIX defaults to /usr/local. Runs scripts/setup.sh first (which builds
# what is missing, cached).
set -euo pipefail
repo_root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
prefix=${PREFIX:-/usr/local}
# Two steps: `eval "$(…)"` would hide a failed set-up from `set -e`.
exports=$("$repo_root/scripts/setup.sh")
eval "$exports"
install -D -m 0755 "$repo_root/target/release/skiff" "$prefix/bin/skiff"
install -D -m 0644 "$SKIFF_KERNEL" "$prefix/share/skiff/vmlinux"
install -D -m 0644 "$SKIFF_AGENT_INITRD" "$prefix/share/skiff/agent-initrd.img"
echo "installed $prefix/bin/skiff, $prefix/share/skiff/vmlinux and $prefix/share/skiff/agent-initrd.img" >&2
