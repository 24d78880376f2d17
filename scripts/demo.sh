#!/usr/bin/env bash
# The main job: sets the host up (scripts/setup.sh), then runs a container
# from a busybox OCI bundle in a microVM, with its output on this terminal.
# It is `skiff run`, the runc-compatible command; extra arguments go to it
# (e.g. --image-format ext4).
set -euo pipefail
repo_root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
# Two steps: `eval "$(…)"` would hide a failed set-up from `set -e`.
exports=$("$repo_root/scripts/setup.sh")
eval "$exports"

bundle=$(mktemp -d)
trap 'rm -rf "$bundle"' EXIT
# The container's own copy of the cached rootfs: it is shared with the
# guest by virtio-fs, so what the container writes lands there.
cp -a "$SKIFF_BUSYBOX_ROOTFS" "$bundle/rootfs"
cat >"$bundle/config.json" <<JSON
{
  "ociVersion": "1.0.2",
  "root": {"path": "rootfs", "readonly": false},
  "hostname": "skiff-demo",
  "process": {
    "terminal": false,
    "user": {"uid": 1000, "gid": 1000},
    "cwd": "/home/user",
    "env": ["PATH=/bin", "HOME=/home/user"],
    "args": ["sh", "-c", "echo \"hello from a container in a skiff microVM\"; echo \"\$(id -un)@\$(hostname) in \$(pwd), kernel \$(uname -r), \$(nproc) vCPU(s)\""]
  },
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}
  ]
}
JSON
echo "[demo] starting a container in a microVM (the first time about a minute on a host without hardware virtualization, a few seconds once its template exists)" >&2
# Templates outlive the demo's state directory: a second demo restores
# the VM the first one booted.
"$repo_root/target/release/skiff" --root "$bundle/state" run --bundle "$bundle" \
    --template-dir "${SKIFF_TEMPLATE_DIR:-/run/skiff/@templates}" "$@" skiff-demo
