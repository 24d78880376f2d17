#!/usr/bin/env bash
# Prepares a Debian 12 x86_64 host to build, run and test skiff:
#   1. installs the Debian packages the guest kernel, the test images and the
#      tests need (only what is missing; needs root),
#   2. builds the guest kernel, the guest agent's initramfs, the test
#      initramfs, the busybox demo rootfs and its OCI image (cached by
#      content, so a second run takes seconds),
#   3. builds skiff itself (release).
# Prints `export` lines for the artifacts' paths on stdout, so
#   exports=$(scripts/setup.sh) && eval "$exports"
# leaves SKIFF_KERNEL, SKIFF_AGENT_INITRD, SKIFF_INITRD, SKIFF_BUSYBOX_ROOTFS
# and SKIFF_BUSYBOX_OCI set. Progress goes to stderr.
set -euo pipefail

exec 3>&1 1>&2
repo_root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
cd "$repo_root"

log() { printf '[setup %4ds] %s\n' "$SECONDS" "$*"; }
die() { printf 'setup: error: %s\n' "$*"; exit 1; }

packages=(
	# guest kernel build (scripts/build-kernel.sh)
	linux-source-6.1 build-essential bc flex bison libelf-dev libssl-dev xz-utils patch
	# test initramfs and images (rootfs/)
	busybox-static cpio gzip e2fsprogs file
	# root filesystem images made from bundles (src/runtime/image.rs)
	erofs-utils
	# engines and reference runtimes driving skiff like runc
	# (tests/oci_clients.rs, scripts/bench-oci.sh); conmon, CNI plugins and
	# containers-common come as podman's dependencies
	containerd runc crun podman
)

missing=()
for p in "${packages[@]}"; do
	status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
	[[ $status == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
	[[ $(id -u) -eq 0 ]] || die "missing packages ${missing[*]}: run as root, or install them with apt-get"
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[[ -e /dev/kvm ]] || die "/dev/kvm does not exist: skiff needs a host with KVM"

# The toolchain comes from rustup; Debian's own rustc is too old for the lock file.
required_rust=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
command -v rustc >/dev/null 2>&1 || die "no Rust toolchain: install one with rustup (Rust $required_rust or newer)"
rust_version=$(rustc --version | cut -d' ' -f2)
[[ $(printf '%s\n%s\n' "$required_rust" "$rust_version" | sort -V | head -n1) == "$required_rust" ]] ||
	die "rustc $rust_version is older than the $required_rust skiff needs: update it with rustup"
for component in clippy rustfmt; do
	cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1 || {
		log "adding the Rust component $component"
		rustup component add "$component" || die "cannot install the Rust component $component"
	}
done

log "guest kernel"
kernel=$(scripts/build-kernel.sh)
log "guest agent initramfs"
agent_initrd=$(rootfs/build-agent-initramfs.sh)
log "test initramfs"
initrd=$(rootfs/build-test-initramfs.sh)
log "busybox rootfs"
busybox_rootfs=$(rootfs/build-busybox-rootfs.sh)
log "busybox OCI image"
busybox_oci=$(SKIFF_BUSYBOX_ROOTFS=$busybox_rootfs rootfs/build-busybox-oci.sh)
log "building skiff"
cargo build --release --locked --quiet
log "ready: kernel $kernel, agent initramfs $agent_initrd"

printf 'export SKIFF_KERNEL=%q\nexport SKIFF_AGENT_INITRD=%q\nexport SKIFF_INITRD=%q\nexport SKIFF_BUSYBOX_ROOTFS=%q\nexport SKIFF_BUSYBOX_OCI=%q\n' \
	"$kernel" "$agent_initrd" "$initrd" "$busybox_rootfs" "$busybox_oci" >&3
