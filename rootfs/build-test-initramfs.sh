#!/usr/bin/env bash
# Build the initramfs the VMM tests boot: a static busybox and an /init that
# prints a few marker lines on the console and ends the VM. Prints the path
# of the newc cpio on stdout; everything else goes to stderr.
#
# Needs these Debian packages, which this script does not install:
#   busybox-static cpio gzip
#
# Result: ${SKIFF_CACHE:-$HOME/.cache/skiff}/initramfs/<sha256>/initramfs.cpio,
# where the hash covers this script (and so the /init in it), the
# busybox-static version and the compression.
#
# Environment:
#   SKIFF_CACHE                    cache root (default: $HOME/.cache/skiff)
#   SKIFF_INITRAMFS_COMPRESSION    none (default) or gzip (the result is
#       then initramfs.cpio.gz). Uncompressed by default: where the guest
#       kernel runs under ring-0 emulation, inflating the ~1 MB gzip archive
#       is most of the boot (about 40 s of it), while 2 MB are only copied;
#       on hardware KVM either is a few milliseconds.
#
# What /init prints, one line each, for tests to match:
#   skiff-guest: hello from the microVM
#   skiff-guest: kernel=<uname -r>
#   skiff-guest: cpus=<processors in /proc/cpuinfo>
set -euo pipefail

# stdout is reserved for the result path; callers parse it.
exec 3>&1 1>&2

log() { printf '[build-test-initramfs %3ds] %s\n' "$SECONDS" "$*"; }
die() { printf 'build-test-initramfs: error: %s\n' "$*"; exit 1; }

script_path=$(readlink -f "${BASH_SOURCE[0]}")
# shellcheck source=scripts/lib/cache.sh
source "$(dirname "$script_path")/../scripts/lib/cache.sh"
# shellcheck source=scripts/lib/initramfs.sh
source "$(dirname "$script_path")/../scripts/lib/initramfs.sh"
busybox=/bin/busybox

for tool in cpio gzip find sort sha256sum dpkg-query flock mktemp readlink touch; do
	command -v "$tool" >/dev/null 2>&1 ||
		die "required tool '$tool' not found (see the package list at the top of $script_path)"
done
# The guest has no libc to offer, so only the static build will do; the
# plain "busybox" package installs a dynamic binary at the same path.
bb_version=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null) ||
	die "package busybox-static is not installed"
[[ -n $bb_version ]] || die "package busybox-static is not installed"
[[ -x $busybox ]] || die "$busybox not found (busybox-static $bb_version)"

compression=${SKIFF_INITRAMFS_COMPRESSION:-none}
case $compression in
	gzip) archive=initramfs.cpio.gz ;;
	none) archive=initramfs.cpio ;;
	*) die "SKIFF_INITRAMFS_COMPRESSION must be none or gzip, not '$compression'" ;;
esac

hash=$(
	{
		printf 'compression %s\n' "$compression"
		printf 'busybox-static %s\n' "$bb_version"
		printf 'script\n'; sha256sum <"$script_path"
		printf 'cache\n'; sha256sum <"$cache_lib"
		printf 'initramfs\n'; sha256sum <"${cache_lib%/*}/initramfs.sh"
	} | sha256sum | cut -d' ' -f1
)

cache_begin initramfs "$hash" "$archive"
trap 'rm -rf "$scratch"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "initramfs $hash (busybox-static $bb_version, compression $compression)"
root=$scratch/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc}
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"
cp "$busybox" "$root/bin/busybox"
chmod 0755 "$root/bin/busybox"

# Every applet, not just the few /init uses: a test that execs into the
# guest gets a usable shell and userland for free, and symlinks cost
# nothing in the archive.
while IFS= read -r applet; do
	[[ -n $applet && $applet != bin/busybox ]] || continue
	mkdir -p "$root/$(dirname "$applet")"
	ln -sf /bin/busybox "$root/$applet"
done < <("$busybox" --list-full)
[[ -L $root/bin/sh && -L $root/bin/mount && -L $root/sbin/reboot ]] ||
	die "$busybox lacks sh, mount or reboot"

cat >"$root/init" <<'EOF'
#!/bin/sh
# PID 1 of the skiff test guest. The lines starting with "skiff-guest:" are
# what the VMM's tests look for on the serial console.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc || echo "skiff-guest: mounting /proc failed"
mount -t sysfs sysfs /sys || echo "skiff-guest: mounting /sys failed"
mount -t devtmpfs devtmpfs /dev || echo "skiff-guest: mounting /dev failed"

echo "skiff-guest: hello from the microVM"
echo "skiff-guest: kernel=$(uname -r)"
# Counted from /proc/cpuinfo, which lists the CPUs that actually came
# online, so a test can check the VMM's vCPU setup end to end.
echo "skiff-guest: cpus=$(grep -c ^processor /proc/cpuinfo)"

# The VM ends with a reboot, or with a power-off when the command line says
# skiff.test.end=poweroff. Both reach the VMM as a write of 0xFE to the
# keyboard controller's port 0x64 (reboot=k; poweroff=kbd, which the skiff
# kernel adds because without ACPI Linux would turn a power-off into a halt
# the VMM never hears of). -f because there is no init system to ask: PID 1
# calls reboot(2) itself.
case " $(cat /proc/cmdline) " in
*" skiff.test.end=poweroff "*)
	echo "skiff-guest: powering off"
	poweroff -f
	;;
*)
	echo "skiff-guest: rebooting"
	reboot -f
	;;
esac

# Not reached unless reboot(2) failed; exiting PID 1 panics the kernel,
# which the VMM reports as a failure.
echo "skiff-guest: reboot failed"
exit 1
EOF
chmod 0755 "$root/init"

out=$scratch/out
mkdir "$out"
pack_initramfs "$root" | if [[ $compression == gzip ]]; then gzip -9 -n; else cat; fi >"$out/$archive"

cache_publish "$out"
