#!/usr/bin/env bash
# Times OCI runtimes on the same busybox bundle and prints a table of
# medians, with ratios against runc:
#   run           `RT run` of /bin/true, end to end (until run returns);
#   create+start  `RT create` then `RT start` of `echo ran`, until "ran"
#                 arrives on the container's stdout (a FIFO), that is until
#                 the container's process has really run.
# Each figure is the median of RUNS timed repetitions, after one untimed
# warm-up. Deleting the containers is not timed.
#
# Usage: scripts/bench-oci.sh [-n RUNS] [SKIFF_BINARY]
#   runc and crun are always measured (crun is skipped with a note if it is
#   not installed); skiff only when its binary is given. skiff reads its
#   kernel, initramfs and image cache from the environment as usual
#   (SKIFF_KERNEL, SKIFF_AGENT_INITRD, SKIFF_IMAGE_CACHE: see
#   scripts/setup.sh).
#
# crun 1.8 refuses to run when the cgroup v2 hierarchy of a hybrid v1/v2
# host has any controller ("cgroups in hybrid mode not supported"), and no
# flag changes that (not even --cgroup-manager=disabled). On such a host
# crun is measured in a private mount namespace without
# /sys/fs/cgroup/unified, where it sees a plain cgroup v1 host; the table
# says so.
#
# Needs root. The bundle's root is the cached busybox rootfs
# ($SKIFF_BUSYBOX_ROOTFS, or rootfs/build-busybox-rootfs.sh), mounted
# read-only. Runtime state lives in a temporary directory removed at exit,
# with any container left in it.
set -euo pipefail

script_path=$(readlink -f "${BASH_SOURCE[0]}")
repo_root=$(cd "$(dirname "$script_path")/.." && pwd)

die() { printf 'bench-oci: error: %s\n' "$*" >&2; exit 1; }

# rt ARGS...: the runtime being measured, with its own state root.
rt() { "$bin" --root "$work/state-$name" "$@"; }

# elapsed T0 T1: T1 - T0 in seconds.
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f\n", b - a }'; }

# fail WHAT: ends the script with the runtime's error output.
fail() {
	printf 'bench-oci: error: %s failed for %s; its stderr:\n' "$1" "$name" >&2
	tail -n 20 "$work/stderr-$name" >&2
	exit 1
}

seq_no=0
next_id() { seq_no=$((seq_no + 1)); id=bench-$$-$seq_no; }

# time_run: prints the seconds one `run` of /bin/true took.
time_run() {
	local t0 t1
	next_id
	t0=$EPOCHREALTIME
	rt run --bundle "$work/bundle-true" "$id" </dev/null >/dev/null 2>"$work/stderr-$name" || fail run
	t1=$EPOCHREALTIME
	rt delete --force "$id" >/dev/null 2>&1 || true
	elapsed "$t0" "$t1"
}

# time_create_start: prints the seconds from create until the container's
# "ran" arrived.
time_create_start() {
	local t0 t1 line
	next_id
	t0=$EPOCHREALTIME
	rt create --bundle "$work/bundle-echo" "$id" </dev/null >&4 2>"$work/stderr-$name" || fail create
	rt start "$id" </dev/null >/dev/null 2>"$work/stderr-$name" || fail start
	read -r -t 900 line <&4 || fail "reading the container's output"
	t1=$EPOCHREALTIME
	[[ $line == ran ]] || die "$name: the container wrote '$line', not 'ran'"
	wait_stopped
	rt delete --force "$id" >/dev/null 2>&1 || true
	elapsed "$t0" "$t1"
}

# wait_stopped: the process has printed and is about to exit; deleting it
# before would kill it, which some runtimes report as an error.
wait_stopped() {
	local i
	for ((i = 0; i < 500; i++)); do
		rt state "$id" 2>/dev/null | grep -q '"status": *"stopped"' && return 0
		sleep 0.01
	done
}

# median: of the numbers on stdin.
median() {
	sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# measure FUNCTION: the median of RUNS timings, after a warm-up.
# The caller's `|| exit` turns errexit off in here, so failures are
# passed on by hand.
measure() {
	local i
	"$1" >/dev/null || return 1
	for ((i = 0; i < runs; i++)); do
		"$1"
	done | median
}

# measure_runtime: prints "RUN_MEDIAN START_MEDIAN" for $name/$bin. Its
# containers' stdout is a FIFO, opened read-write so that neither side
# blocks on open and an exited container leaves no end-of-file behind.
measure_runtime() {
	exec 4<>"$work/out"
	local run_median start_median
	run_median=$(measure time_run) || return 1
	start_median=$(measure time_create_start) || return 1
	exec 4>&-
	printf '%s %s\n' "$run_median" "$start_median"
}

# The script runs itself, as `--measure NAME BIN WORK RUNS`, inside the
# private mount namespace that crun needs on hybrid hosts.
if [[ ${1:-} == --measure ]]; then
	(($# == 5)) || die "usage: $0 --measure NAME BIN WORK RUNS"
	name=$2 bin=$3 work=$4 runs=$5
	measure_runtime
	exit
fi

usage() { die "usage: $0 [-n RUNS] [SKIFF_BINARY]"; }
runs=15
while getopts n: opt; do
	case $opt in
		n) runs=$OPTARG ;;
		*) usage ;;
	esac
done
shift $((OPTIND - 1))
(($# <= 1)) || usage
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive number, not '$runs'"
skiff=${1:-}
if [[ -n $skiff ]]; then
	[[ -f $skiff && -x $skiff ]] || die "$skiff is not an executable"
	skiff=$(readlink -f "$skiff")
fi
[[ $(id -u) -eq 0 ]] || die "must run as root: the runtimes create namespaces and cgroups"
# EPOCHREALTIME (bash 5) reads the clock without forking a `date`.
[[ -n ${EPOCHREALTIME:-} ]] || die "needs bash 5 or newer (EPOCHREALTIME)"

find_tool() { PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin command -v "$1" || true; }
runc=$(find_tool runc)
crun=$(find_tool crun)
[[ -n $runc ]] || die "runc is not installed (scripts/setup.sh installs it)"

rootfs=${SKIFF_BUSYBOX_ROOTFS:-}
if [[ -z $rootfs ]]; then
	rootfs=$("$repo_root/rootfs/build-busybox-rootfs.sh" 2>/dev/null) ||
		die "building the busybox rootfs failed (run rootfs/build-busybox-rootfs.sh to see why)"
fi
[[ -x $rootfs/bin/busybox ]] || die "$rootfs is not a busybox rootfs"
[[ $rootfs != *[\"\\]* ]] || die "the rootfs path $rootfs cannot go into JSON as it is"

names=(runc) # the runtimes measured, in order
declare -A bin_of=([runc]=$runc)
notes=()
if [[ -n $crun ]]; then
	names+=(crun)
	bin_of[crun]=$crun
else
	notes+=("crun is not installed: skipped")
fi
if [[ -n $skiff ]]; then
	names+=(skiff)
	bin_of[skiff]=$skiff
fi

# Whether crun must be kept away from the v2 hierarchy of a hybrid host.
hybrid_with_controllers() {
	[[ $(stat -fc %T /sys/fs/cgroup 2>/dev/null) == tmpfs ]] &&
		[[ $(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null) == cgroup2fs ]] &&
		[[ -n $(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null) ]]
}
crun_private_ns=
if [[ -n $crun ]] && hybrid_with_controllers; then
	crun_private_ns=1
fi

# in_private_ns PROGRAM ARGS...: runs it in a private mount namespace
# without the cgroup v2 hierarchy.
in_private_ns() {
	# shellcheck disable=SC2016 # expanded by that sh, not this script
	unshare --mount --propagation private -- sh -c 'umount /sys/fs/cgroup/unified && exec "$@"' sh "$@"
}

work=$(mktemp -d "${TMPDIR:-/tmp}/skiff-bench-oci.XXXXXX")
cleanup() {
	local state
	for name in "${names[@]}"; do
		bin=${bin_of[$name]}
		for state in "$work/state-$name"/*; do
			[[ -e $state ]] || continue
			if [[ $name == crun && -n $crun_private_ns ]]; then
				in_private_ns "$bin" --root "$work/state-$name" delete --force "${state##*/}"
			else
				rt delete --force "${state##*/}"
			fi >/dev/null 2>&1 || true
		done
	done
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# write_bundle DIR ARGS_JSON: a bundle like the ones the engines make, less
# their capabilities and seccomp profile, which would measure policy rather
# than the runtime.
write_bundle() {
	mkdir -p "$1"
	cat >"$1/config.json" <<EOF
{
	"ociVersion": "1.0.2",
	"process": {
		"terminal": false,
		"user": {"uid": 0, "gid": 0},
		"args": $2,
		"env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
		"cwd": "/",
		"noNewPrivileges": true
	},
	"root": {"path": "$rootfs", "readonly": true},
	"hostname": "bench",
	"mounts": [
		{"destination": "/proc", "type": "proc", "source": "proc"},
		{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
		{"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
		{"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
		{"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
		{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}
	],
	"linux": {
		"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
		"maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
		"readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
	}
}
EOF
}
write_bundle "$work/bundle-true" '["/bin/true"]'
write_bundle "$work/bundle-echo" '["/bin/echo", "ran"]'
mkfifo "$work/out"

declare -A run_median start_median
for name in "${names[@]}"; do
	bin=${bin_of[$name]}
	if [[ $name == crun && -n $crun_private_ns ]]; then
		medians=$(in_private_ns "$script_path" --measure "$name" "$bin" "$work" "$runs") || exit 1
		notes+=("crun ran in a private mount namespace without the cgroup v2 hierarchy (hybrid host)")
	else
		medians=$(measure_runtime) || exit 1
	fi
	read -r run_median["$name"] start_median["$name"] <<<"$medians"
done

ms() { awk -v s="$1" 'BEGIN { printf "%.1f ms", s * 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
printf 'median of %d runs, busybox bundle, %s\n' "$runs" "$(uname -r)"
printf '%-8s %16s %10s %20s %10s\n' runtime 'run /bin/true' 'vs runc' 'create+start→ran' 'vs runc'
for name in "${names[@]}"; do
	printf '%-8s %16s %10s %20s %10s\n' "$name" \
		"$(ms "${run_median[$name]}")" "$(ratio "${run_median[$name]}" "${run_median[runc]}")" \
		"$(ms "${start_median[$name]}")" "$(ratio "${start_median[$name]}" "${start_median[runc]}")"
done
for note in "${notes[@]}"; do
	printf 'note: %s\n' "$note"
done
