#!/usr/bin/env bash
# Compares the two ways skiff gives a container its root filesystem:
#   virtiofs  the bundle's rootfs directory shared with the guest (default);
#   block     a cached erofs image of it attached as a disk
#             (annotation io.skiff.rootfs=block).
# For two rootfs, the busybox one and a large one (busybox plus a copy of
# the host's /usr/share and a 100 MiB file: over 200 MiB in all):
#   start     `skiff run` of a process that prints one line, end to end;
#             for block, the first run also builds the image (reported on
#             its own as "start, image built"), later runs reuse it;
#   read      sequential read of the 100 MiB file inside the guest
#             (`dd bs=1M` to /dev/null, timed by the guest's /proc/uptime),
#             large rootfs only, in a VM of its own.
# Each start figure is the median of RUNS runs (0: none), each read figure
# of READS (0: none).
# On a host without hardware virtualization a guest read of 100 MiB takes
# many minutes (the guest kernel runs emulated), hence READS defaults to 1.
#
# Usage: scripts/bench-rootfs.sh [-n RUNS] [-r READS] SKIFF_BINARY
# Needs root, and SKIFF_KERNEL / SKIFF_AGENT_INITRD (scripts/setup.sh).
set -euo pipefail

script_path=$(readlink -f "${BASH_SOURCE[0]}")
repo_root=$(cd "$(dirname "$script_path")/.." && pwd)

die() { printf 'bench-rootfs: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -e/p' "$script_path" | sed '$d; s/^# \{0,1\}//'; }

runs=3
reads=1
while getopts "n:r:h" opt; do
	case $opt in
	n) runs=$OPTARG ;;
	r) reads=$OPTARG ;;
	h) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
[[ $# -eq 1 ]] || { usage >&2; exit 2; }
[[ $runs =~ ^[0-9]+$ ]] || die "-n needs a number, not $runs"
[[ $reads =~ ^[0-9]+$ ]] || die "-r needs a number, not $reads"
skiff=$(readlink -f "$1")
[[ -x $skiff ]] || die "$1 is not an executable"
[[ $(id -u) -eq 0 ]] || die "must run as root"
[[ -n ${SKIFF_KERNEL:-} && -n ${SKIFF_AGENT_INITRD:-} ]] ||
	die "SKIFF_KERNEL and SKIFF_AGENT_INITRD must be set (see scripts/setup.sh)"
[[ -n ${EPOCHREALTIME:-} ]] || die "needs bash 5 or newer (EPOCHREALTIME)"

busybox=${SKIFF_BUSYBOX_ROOTFS:-}
if [[ -z $busybox ]]; then
	busybox=$("$repo_root/rootfs/build-busybox-rootfs.sh" 2>/dev/null) ||
		die "building the busybox rootfs failed (run rootfs/build-busybox-rootfs.sh to see why)"
fi

work=$(mktemp -d)
cleanup() {
	"$skiff" --root "$work/state" delete --force bench >/dev/null 2>&1 || true
	rm -rf "$work"
}
trap cleanup EXIT
export SKIFF_IMAGE_CACHE=$work/images

echo "bench-rootfs: preparing the rootfs" >&2
cp -a "$busybox" "$work/small"
cp -a "$busybox" "$work/large"
cp -a /usr/share "$work/large/share"
head -c $((100 << 20)) /dev/urandom >"$work/large/big"
large_size=$(du -sm "$work/large" | cut -f1)
[[ $large_size -ge 200 ]] || die "the large rootfs has only $large_size MiB"

# bundle NAME ROOTFS MODE SCRIPT: a bundle whose root is ROOTFS.
bundle() {
	local dir=$work/bundle-$1
	mkdir -p "$dir"
	cat >"$dir/config.json" <<JSON
{
  "ociVersion": "1.0.2",
  "root": {"path": "$2", "readonly": false},
  "annotations": {"io.skiff.rootfs": "$3"},
  "process": {"terminal": false, "user": {"uid": 0, "gid": 0}, "cwd": "/",
              "env": ["PATH=/bin"], "args": ["sh", "-c", "$4"]},
  "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}]
}
JSON
	printf '%s\n' "$dir"
}

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# run_once BUNDLE: runs it; prints the seconds it took, and keeps its output
# in $work/out.
run_once() {
	local t0=$EPOCHREALTIME
	"$skiff" --root "$work/state" run --bundle "$1" bench >"$work/out" 2>"$work/err" ||
		die "skiff run failed: $(tail -3 "$work/err")"
	local t1=$EPOCHREALTIME
	awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}

# read_rate: MB/s of the last run's read, from the guest uptimes the
# container printed before and after it.
read_rate() {
	awk '$1 == "uptime" { t[++n] = $2 } END { if (n == 2 && t[2] > t[1]) printf "%.2f\n", 104.8576 / (t[2] - t[1]) }' "$work/out"
}

printf '%-10s %-9s %-22s %10s %12s\n' rootfs mode figure median runs
report() { printf '%-10s %-9s %-22s %10s %12s\n' "$@"; }

for rootfs in small large; do
	((runs > 0)) || break
	for mode in virtiofs block; do
		b=$(bundle "$rootfs-$mode" "$work/$rootfs" "$mode" "echo started")
		echo "bench-rootfs: $rootfs rootfs, $mode: start" >&2
		if [[ $mode == block ]]; then
			# The first run builds the image; it is reported apart.
			report "$rootfs" "$mode" "start, image built" "$(run_once "$b")s" 1
		fi
		times=()
		for ((i = 0; i < runs; i++)); do
			times+=("$(run_once "$b")")
			grep -q '^started$' "$work/out" || die "the container printed: $(head -3 "$work/out")"
		done
		report "$rootfs" "$mode" "start" "$(printf '%s\n' "${times[@]}" | median)s" "${times[*]}"
	done
done
for mode in virtiofs block; do
	((reads > 0)) || break
	b=$(bundle "read-$mode" "$work/large" "$mode" \
		"read t _ </proc/uptime; echo uptime \$t; dd if=/big of=/dev/null bs=1M 2>/dev/null; read t _ </proc/uptime; echo uptime \$t")
	echo "bench-rootfs: large rootfs, $mode: read" >&2
	rates=()
	for ((i = 0; i < reads; i++)); do
		run_once "$b" >/dev/null
		rate=$(read_rate)
		[[ -n $rate ]] || die "no read time in the container's output: $(head -3 "$work/out")"
		rates+=("$rate")
	done
	report large "$mode" "read 100 MiB" "$(printf '%s\n' "${rates[@]}" | median) MB/s" "${rates[*]}"
done
echo "large rootfs: $large_size MiB" >&2
