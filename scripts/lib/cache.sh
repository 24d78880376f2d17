# shellcheck shell=bash
# The content-addressed cache shared by the scripts that build slow
# artifacts. An entry is ${SKIFF_CACHE:-$HOME/.cache/skiff}/KIND/HASH, where
# HASH covers every input; it is built in a scratch directory beside it,
# under a per-hash lock, and published with one rename, so it appears whole
# or not at all. Callers define `log` and print only the result on fd 3;
# they must hash this file too, since it decides the layout.

# shellcheck disable=SC2034 # hashed by the sourcing script
cache_lib=$(readlink -f "${BASH_SOURCE[0]}")

# Prints the cached result and ends the script, if there is one.
cache_found() {
	if [[ -f $1 ]]; then
		log "cached: $1"
		printf '%s\n' "$1" >&3
		exit 0
	fi
}

# cache_begin KIND HASH NAME sets entry (the entry's directory), result
# (entry/NAME) and scratch (an empty directory beside the entry), or ends the
# script with the cached result. Two builds of the same inputs (parallel
# test runs) would only waste cores and race on the rename, so the second
# waits for the first and then usually finds the entry.
cache_begin() {
	local kind=$1 hash=$2 name=$3
	local dir=${SKIFF_CACHE:-${HOME:?set SKIFF_CACHE or HOME}/.cache/skiff}/$kind
	cache_found "$dir/$hash/$name"
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd)
	entry=$dir/$hash
	result=$entry/$name
	exec 9>"$dir/.lock-$hash"
	if ! flock -n 9; then
		log "another build of $hash is running; waiting for it"
		flock 9
	fi
	cache_found "$result"
	# Scratch directories of builds that were killed outright (no trap
	# ran); holding the lock, no live build of this hash owns one.
	rm -rf "$dir/.build-$hash".*
	# shellcheck disable=SC2034 # the sourcing script builds in it
	scratch=$(mktemp -d "$dir/.build-$hash.XXXXXX")
}

# cache_publish OUT moves the finished directory OUT into place as the entry
# and prints the result.
cache_publish() {
	rm -rf "$entry"
	mv -T "$1" "$entry"
	log "done: $result ($(stat -c %s "$result") bytes)"
	printf '%s\n' "$result" >&3
}
