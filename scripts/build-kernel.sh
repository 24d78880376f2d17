#!/usr/bin/env bash
# Build the skiff guest kernel (an uncompressed x86_64 vmlinux) and print
# its path on stdout; everything else goes to stderr.
#
# Needs these Debian packages, which this script does not install:
#   linux-source-6.1 build-essential bc flex bison libelf-dev xz-utils patch
#
# Inputs: guest/kernel/skiff.config (a fragment on top of tinyconfig) and
# guest/kernel/patches/*.patch (applied in name order with patch -p1).
#
# Result: ${SKIFF_CACHE:-$HOME/.cache/skiff}/kernel/<sha256>/vmlinux, where
# the hash covers the fragment, the patches, this script and the installed
# linux-source-6.1 version, so any change to them gives a new entry and an
# existing entry is reused without touching the compiler.
#
# Environment:
#   SKIFF_CACHE             cache root (default: $HOME/.cache/skiff)
#   SKIFF_KEEP_KERNEL_TREE  1 = keep the configured, built source tree
#                           (moved next to the vmlinux on success, left in
#                           the scratch directory on failure)
set -euo pipefail

# stdout is reserved for the result path; callers parse it.
exec 3>&1 1>&2

log() { printf '[build-kernel %4ds] %s\n' "$SECONDS" "$*"; }
die() { printf 'build-kernel: error: %s\n' "$*"; exit 1; }

script_path=$(readlink -f "${BASH_SOURCE[0]}")
repo_root=$(cd "$(dirname "$script_path")/.." && pwd)
# shellcheck source=scripts/lib/cache.sh
source "$repo_root/scripts/lib/cache.sh"
fragment=$repo_root/guest/kernel/skiff.config
patch_dir=$repo_root/guest/kernel/patches
source_pkg=linux-source-6.1
tarball=/usr/src/linux-source-6.1.tar.xz

for tool in tar xz patch make gcc ld flex bison bc perl awk sha256sum \
            dpkg-query flock nproc readlink mktemp; do
	command -v "$tool" >/dev/null 2>&1 ||
		die "required tool '$tool' not found (see the package list at the top of $script_path)"
done
# objtool, which every x86_64 build runs, links against libelf.
[[ -e /usr/include/gelf.h ]] ||
	die "libelf headers (/usr/include/gelf.h) not found: install libelf-dev"
[[ -f $fragment ]] || die "config fragment $fragment not found"
pkg_version=$(dpkg-query -W -f='${Version}' "$source_pkg" 2>/dev/null) ||
	die "package $source_pkg is not installed"
[[ -n $pkg_version ]] || die "package $source_pkg is not installed"
[[ -f $tarball ]] || die "$tarball not found (package $source_pkg $pkg_version)"

# A fixed order so the hash does not depend on the locale or the
# filesystem's directory order.
patches=()
if [[ -d $patch_dir ]]; then
	while IFS= read -r -d '' p; do
		patches+=("$p")
	done < <(find "$patch_dir" -maxdepth 1 -type f -name '*.patch' -print0 | LC_ALL=C sort -z)
fi

hash=$(
	{
		printf 'package %s %s\n' "$source_pkg" "$pkg_version"
		printf 'fragment\n'; sha256sum <"$fragment"
		printf 'script\n'; sha256sum <"$script_path"
		printf 'cache\n'; sha256sum <"$cache_lib"
		for p in ${patches[@]+"${patches[@]}"}; do
			printf 'patch %s\n' "$(basename "$p")"; sha256sum <"$p"
		done
	} | sha256sum | cut -d' ' -f1
)

cache_begin kernel "$hash" vmlinux
cleanup() {
	local rc=$?
	if [[ $rc -ne 0 && ${SKIFF_KEEP_KERNEL_TREE:-0} == 1 ]]; then
		log "build failed; tree kept in $scratch"
	else
		rm -rf "$scratch"
	fi
	exit "$rc"
}
trap cleanup EXIT

# Long steps run in the background and are waited for, because bash only
# runs a trap once the foreground command has finished: a TERM sent to this
# script alone would otherwise wait out the whole compile. make passes the
# signal on to its jobs and waits for them.
child=
on_signal() {
	if [[ -n $child ]]; then
		kill -TERM "$child" 2>/dev/null || true
		wait "$child" 2>/dev/null || true
	fi
	exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

build_log=$scratch/build.log
run() {
	"$@" >>"$build_log" 2>&1 &
	child=$!
	if ! wait "$child"; then
		child=
		tail -n 60 "$build_log"
		die "command failed: $*"
	fi
	child=
}

# Settings from the caller's environment that would redirect or reshape
# the build.
unset KBUILD_OUTPUT KCONFIG_CONFIG KCONFIG_ALLCONFIG CROSS_COMPILE LLVM ARCH SUBARCH
mk=(make ARCH=x86_64 KBUILD_BUILD_USER=skiff KBUILD_BUILD_HOST=skiff)

log "kernel $hash"
log "unpack $tarball ($source_pkg $pkg_version)"
run tar -xJf "$tarball" -C "$scratch"
src=$scratch/$(basename "$tarball" .tar.xz)
[[ -f $src/Makefile ]] || die "unexpected tarball layout: no $src/Makefile"
# merge_config.sh keeps its temporary files in the current directory.
cd "$src"

for p in ${patches[@]+"${patches[@]}"}; do
	log "patch $(basename "$p")"
	# No fuzz: a patch that no longer matches exactly must be looked at,
	# not guessed into place.
	run patch -p1 --forward --batch --fuzz=0 --no-backup-if-mismatch -i "$p"
done

log "configure: tinyconfig + $(basename "$fragment")"
run "${mk[@]}" tinyconfig
run scripts/kconfig/merge_config.sh -m .config "$fragment"
run "${mk[@]}" olddefconfig

# olddefconfig silently drops any option whose dependencies are not met
# (tinyconfig turns off whole menus), so check every promise the fragment
# makes. An option that is absent from .config is off.
log "verify .config against the fragment"
bad=0
while IFS= read -r line; do
	if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
		opt=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
		got=$(grep -m1 "^$opt=" .config | cut -d= -f2- || true)
		if [[ $got != "$want" ]]; then
			printf 'build-kernel: %s: fragment wants %s, .config has %s\n' \
				"$opt" "$want" "${got:-it unset}"
			bad=1
		fi
	elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
		opt=${BASH_REMATCH[1]}
		got=$(grep -m1 "^$opt=" .config | cut -d= -f2- || true)
		if [[ -n $got ]]; then
			printf 'build-kernel: %s: fragment wants it unset, .config has %s\n' "$opt" "$got"
			bad=1
		fi
	fi
done <"$fragment"
[[ $bad == 0 ]] || die "the kernel config does not match $fragment (see above)"

jobs=$(nproc)
log "build vmlinux (make -j$jobs; log in $build_log)"
build_start=$SECONDS
run "${mk[@]}" -j"$jobs" vmlinux
log "built in $((SECONDS - build_start))s"
# Compiler, linker and objtool warnings are worth a look; kconfig's notes
# about the fragment overriding tinyconfig's choices are expected.
warnings=$(grep 'warning:' "$build_log" | grep -Ev '^\.config:[0-9]+:warning: override:' | sort -u || true)
if [[ -n $warnings ]]; then
	log "the build printed warnings:"
	printf '%s\n' "$warnings"
fi

out=$scratch/out
mkdir "$out"
cp vmlinux "$out/vmlinux"
cp .config "$out/config"
cp System.map "$out/System.map"
cd "$scratch"
if [[ ${SKIFF_KEEP_KERNEL_TREE:-0} == 1 ]]; then
	mv "$src" "$out/$(basename "$src")"
	log "source tree kept in $entry/$(basename "$src")"
fi
# An entry without a vmlinux can only be debris (someone deleted files by
# hand); the lock guarantees nobody is publishing it right now.
cache_publish "$out"

