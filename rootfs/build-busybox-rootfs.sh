#!/usr/bin/env bash
# Build the root filesystem the tests and the demo put in their OCI bundles:
# a static busybox with every applet linked in /bin, a passwd and group with
# a few known users, and the empty directories a container expects. Prints
# the path of the rootfs directory on stdout; everything else goes to stderr.
#
# Needs root (the tree is owned by root, /home/user by 1000:1000) and these
# Debian packages, which this script does not install:
#   busybox-static
#
# Result: ${SKIFF_CACHE:-$HOME/.cache/skiff}/busybox-rootfs/<sha256>/rootfs,
# where the hash covers the busybox binary, this script and cache.sh. The
# directory is shared by every caller: reference it (root.path, read-only)
# or copy it, but never write into it.
#
# Users (/etc/passwd) and groups (/etc/group), for tests to rely on:
#   root    0:0          home /root
#   user    1000:1000    home /home/user
#   nobody  65534:65534  home /nonexistent
#   groups  root 0, user 1000, extra 2000 (no members), nogroup 65534
set -euo pipefail

# stdout is reserved for the result path; callers parse it.
exec 3>&1 1>&2

log() { printf '[build-busybox-rootfs %3ds] %s\n' "$SECONDS" "$*"; }
die() { printf 'build-busybox-rootfs: error: %s\n' "$*"; exit 1; }

script_path=$(readlink -f "${BASH_SOURCE[0]}")
# shellcheck source=scripts/lib/cache.sh
source "$(dirname "$script_path")/../scripts/lib/cache.sh"
busybox=/bin/busybox

# cache.sh's entries are files; this one is a directory, complete once it
# exists because cache_publish moves it into place with one rename.
cache_found() {
	if [[ -d $1 ]]; then
		log "cached: $1"
		printf '%s\n' "$1" >&3
		exit 0
	fi
}

for tool in find sort sha256sum dpkg-query flock mktemp readlink touch chown; do
	command -v "$tool" >/dev/null 2>&1 ||
		die "required tool '$tool' not found (see the package list at the top of $script_path)"
done
# A container brings no libc, so only the static build will do; the plain
# "busybox" package installs a dynamic binary at the same path.
bb_version=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null) ||
	die "package busybox-static is not installed"
[[ -n $bb_version ]] || die "package busybox-static is not installed"
[[ -x $busybox ]] || die "$busybox not found (busybox-static $bb_version)"
# Hashing the binary itself, not the package version, also catches a
# busybox installed by hand.
hash=$(
	{
		printf 'busybox\n'; sha256sum <"$busybox"
		printf 'script\n'; sha256sum <"$script_path"
		printf 'cache\n'; sha256sum <"$cache_lib"
	} | sha256sum | cut -d' ' -f1
)

# Checked after the hash so that a cached tree is handed out to anyone.
cache_begin busybox-rootfs "$hash" rootfs
trap 'rm -rf "$scratch"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
[[ $(id -u) -eq 0 ]] || die "must run as root: the tree is owned by root and /home/user by 1000:1000"

log "rootfs $hash (busybox-static $bb_version)"
out=$scratch/out
root=$out/rootfs
mkdir -p "$root"
chmod 0755 "$out" "$root"
mkdir -m 0755 "$root"/{bin,etc,dev,proc,sys,run,var,home}
mkdir -m 0700 "$root/root"
mkdir -m 1777 "$root/tmp"
mkdir -m 0755 "$root/home/user"
cp "$busybox" "$root/bin/busybox"
chmod 0755 "$root/bin/busybox"

# Every applet as a relative link, so the tree also reads right from the
# host (ls -l, a debugger) and not only from inside the container.
applets=0
while IFS= read -r applet; do
	[[ -n $applet && $applet != busybox ]] || continue
	[[ $applet != */* ]] || die "unexpected applet name '$applet'"
	ln -s busybox "$root/bin/$applet"
	applets=$((applets + 1))
done < <("$busybox" --list)
for applet in sh ls cat id env; do
	[[ -L $root/bin/$applet ]] || die "$busybox lacks the applet $applet"
done

cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
user:x:1000:
extra:x:2000:
nogroup:x:65534:
EOF
chmod 0644 "$root/etc/passwd" "$root/etc/group"

# Owners are set explicitly rather than inherited from whoever ran the
# script, and times are fixed, so the same inputs give the same tree.
chown -R -h 0:0 "$root"
chown 1000:1000 "$root/home/user"
find "$root" -exec touch -h -d @0 {} +
log "$applets applets"

cache_publish "$out"
