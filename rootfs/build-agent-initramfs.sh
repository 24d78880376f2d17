#!/usr/bin/env bash
# Build the initramfs every container VM boots: the guest agent
# (guest/agent, a static binary) as /init and the empty directories it
# mounts on. Prints the path of the newc cpio on stdout; everything else
# goes to stderr.
#
# Needs the Rust toolchain and these Debian packages, which this script
# does not install:
#   cpio binutils file
#
# Result: ${SKIFF_CACHE:-$HOME/.cache/skiff}/agent-initramfs/<sha256>/agent-initramfs.cpio,
# where the hash covers the agent binary as built (cargo decides whether
# its sources changed), this script and the cache helper.
#
# Uncompressed on purpose: where the guest kernel runs under ring-0
# emulation, inflating an archive costs far more boot time than copying
# the bytes (see build-test-initramfs.sh).
#
# Environment:
#   SKIFF_CACHE    cache root (default: $HOME/.cache/skiff)
#   CARGO          the cargo to build with (default: cargo)
set -euo pipefail

# stdout is reserved for the result path; callers parse it.
exec 3>&1 1>&2

log() { printf '[build-agent-initramfs %3ds] %s\n' "$SECONDS" "$*"; }
die() { printf 'build-agent-initramfs: error: %s\n' "$*"; exit 1; }

script_path=$(readlink -f "${BASH_SOURCE[0]}")
repo_root=$(cd "$(dirname "$script_path")/.." && pwd)
# shellcheck source=scripts/lib/cache.sh
source "$repo_root/scripts/lib/cache.sh"
# shellcheck source=scripts/lib/initramfs.sh
source "$repo_root/scripts/lib/initramfs.sh"

cargo=${CARGO:-cargo}
target=x86_64-unknown-linux-gnu
for tool in "$cargo" cpio strip file find sort sha256sum flock mktemp readlink touch; do
	command -v "$tool" >/dev/null 2>&1 ||
		die "required tool '$tool' not found (see the package list at the top of $script_path)"
done

# Static, because the initramfs has no libc to load; glibc's static build
# is fine since the agent uses no NSS (it reads /etc/passwd itself).
log "building the agent (static, release)"
(cd "$repo_root" &&
	RUSTFLAGS="-C target-feature=+crt-static" "$cargo" build --release -p skiff-agent --target "$target") ||
	die "building the agent failed"
agent=${CARGO_TARGET_DIR:-$repo_root/target}/$target/release/skiff-agent
[[ -x $agent ]] || die "the build did not produce $agent"
case $(file -b "$agent") in
	*"statically linked"* | *"static-pie linked"*) ;;
	*) die "$agent is not statically linked: $(file -b "$agent")" ;;
esac

hash=$(
	{
		printf 'agent\n'; sha256sum <"$agent"
		printf 'script\n'; sha256sum <"$script_path"
		printf 'cache\n'; sha256sum <"$cache_lib"
		printf 'initramfs\n'; sha256sum <"${cache_lib%/*}/initramfs.sh"
	} | sha256sum | cut -d' ' -f1
)

archive='agent-initramfs.cpio'
cache_begin agent-initramfs "$hash" "$archive"
trap 'rm -rf "$scratch"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "agent initramfs $hash"
root=$scratch/root
mkdir -p "$root"/{dev,proc,sys,run,tmp,mnt}
chmod 1777 "$root/tmp"
# Symbols only matter to a debugger; the archive is copied at every boot.
strip --strip-all -o "$root/init" "$agent"
chmod 0755 "$root/init"

out=$scratch/out
mkdir "$out"
pack_initramfs "$root" >"$out/$archive"

cache_publish "$out"
