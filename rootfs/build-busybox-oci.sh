#!/usr/bin/env bash
# Package the busybox rootfs (rootfs/build-busybox-rootfs.sh) as images that
# container engines import without a registry, for the tests that run skiff
# under containerd and podman. Prints the path of a directory holding:
#
#   busybox.oci.tar   an OCI image layout (oci-layout, index.json, blobs/)
#                     in a tar: one manifest, one gzip layer, image name
#                     skiff.test/busybox:latest (index annotation
#                     io.containerd.image.name; org.opencontainers.image.ref.name
#                     is "latest"). For `ctr images import`, `podman load`,
#                     `skopeo copy oci-archive:...`.
#   busybox-rootfs.tar the same tree as a plain tar (the layer, uncompressed),
#                     for `podman import`.
#
# The layout is written here with tar, gzip and sha256sum rather than umoci
# or skopeo: it is a handful of JSON documents, and writing them directly
# keeps the result byte-for-byte reproducible and needs no extra package.
#
# Usage: build-busybox-oci.sh [OUT_DIR]
#   Without OUT_DIR the result is the cache entry
#   ${SKIFF_CACHE:-$HOME/.cache/skiff}/busybox-oci/<sha256>/image, shared by
#   every caller (read it, never write into it). With OUT_DIR the two files
#   are also copied there, and OUT_DIR is printed instead.
#
# The rootfs comes from $SKIFF_BUSYBOX_ROOTFS when set, else from
# rootfs/build-busybox-rootfs.sh (cached). The hash covers the layer's bytes,
# this script and cache.sh. Needs root (the rootfs has root-only directories).
set -euo pipefail

# stdout is reserved for the result path; callers parse it.
exec 3>&1 1>&2

log() { printf '[build-busybox-oci %3ds] %s\n' "$SECONDS" "$*"; }
die() { printf 'build-busybox-oci: error: %s\n' "$*"; exit 1; }

script_path=$(readlink -f "${BASH_SOURCE[0]}")
script_dir=$(dirname "$script_path")
# shellcheck source=scripts/lib/cache.sh
source "$script_dir/../scripts/lib/cache.sh"

image_name=skiff.test/busybox:latest
image_tag=${image_name##*:}

(($# <= 1)) || die "usage: $0 [OUT_DIR]"
if (($# == 1)); then
	[[ -n $1 ]] || die "OUT_DIR is empty"
	built=$("$script_path")
	mkdir -p "$1"
	cp -- "$built/busybox.oci.tar" "$built/busybox-rootfs.tar" "$1/"
	printf '%s\n' "$(cd "$1" && pwd)" >&3
	exit 0
fi

# cache.sh's entries are files; this one is a directory, complete once it
# exists because cache_publish moves it into place with one rename.
cache_found() {
	if [[ -d $1 ]]; then
		log "cached: $1"
		printf '%s\n' "$1" >&3
		exit 0
	fi
}

for tool in tar gzip sha256sum stat find dpkg flock mktemp readlink; do
	command -v "$tool" >/dev/null 2>&1 || die "required tool '$tool' not found"
done
[[ $(id -u) -eq 0 ]] || die "must run as root: the rootfs has directories only root can read"

rootfs=${SKIFF_BUSYBOX_ROOTFS:-}
if [[ -z $rootfs ]]; then
	rootfs=$("$script_dir/build-busybox-rootfs.sh") || die "building the busybox rootfs failed"
fi
[[ -x $rootfs/bin/busybox ]] || die "$rootfs is not a busybox rootfs (no bin/busybox)"

# The layer as a reproducible tar: sorted names without a leading "./",
# numeric owners as they are in the tree, every time zero. GNU tar format
# stores no atime or ctime, so the same tree always gives the same bytes.
layer_tar() {
	(cd "$rootfs" && find . -mindepth 1 -printf '%P\0' | LC_ALL=C sort -z) |
		tar -C "$rootfs" --format=gnu --numeric-owner --mtime=@0 \
			--no-recursion --null -T - -cf -
}

# Hashing the layer's bytes (a couple of MiB, a fraction of a second) rather
# than the rootfs's path covers a rootfs that came from anywhere.
hash=$(
	{
		printf 'layer\n'; layer_tar | sha256sum
		printf 'script\n'; sha256sum <"$script_path"
		printf 'cache\n'; sha256sum <"$cache_lib"
	} | sha256sum | cut -d' ' -f1
)

cache_begin busybox-oci "$hash" image
trap 'rm -rf "$scratch"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "image $hash from $rootfs"
out=$scratch/out
result_dir=$out/image
layout=$scratch/layout
mkdir -p "$result_dir" "$layout/blobs/sha256"

layer_tar >"$result_dir/busybox-rootfs.tar"
diff_id=$(sha256sum <"$result_dir/busybox-rootfs.tar" | cut -d' ' -f1)
# -n leaves the name and time out of the gzip header, for reproducibility.
gzip -n -c "$result_dir/busybox-rootfs.tar" >"$scratch/layer.tar.gz"

# add_blob FILE moves FILE into the layout under its digest and sets
# blob_digest and blob_size.
add_blob() {
	blob_digest=$(sha256sum <"$1" | cut -d' ' -f1)
	blob_size=$(stat -c %s "$1")
	mv "$1" "$layout/blobs/sha256/$blob_digest"
}

add_blob "$scratch/layer.tar.gz"
layer_digest=$blob_digest layer_size=$blob_size

# Image engines check the platform against the host's, so it must be the
# architecture busybox-static was built for, which is the host's.
arch=$(dpkg --print-architecture)
epoch=1970-01-01T00:00:00Z
printf '%s' \
	'{"created":"'"$epoch"'","architecture":"'"$arch"'","os":"linux",' \
	'"config":{"Env":["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/"},' \
	'"rootfs":{"type":"layers","diff_ids":["sha256:'"$diff_id"'"]},' \
	'"history":[{"created":"'"$epoch"'","created_by":"rootfs/build-busybox-oci.sh"}]}' \
	>"$scratch/config.json"
add_blob "$scratch/config.json"
config_digest=$blob_digest config_size=$blob_size

printf '%s' \
	'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",' \
	'"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$config_digest"'","size":'"$config_size"'},' \
	'"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:'"$layer_digest"'","size":'"$layer_size"'}]}' \
	>"$scratch/manifest.json"
add_blob "$scratch/manifest.json"

# containerd names the image after io.containerd.image.name; podman and
# skopeo look for the tag in org.opencontainers.image.ref.name.
printf '%s' \
	'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[' \
	'{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$blob_digest"'","size":'"$blob_size"',' \
	'"platform":{"architecture":"'"$arch"'","os":"linux"},' \
	'"annotations":{"io.containerd.image.name":"'"$image_name"'","org.opencontainers.image.ref.name":"'"$image_tag"'"}}]}' \
	>"$layout/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

(cd "$layout" && find . -mindepth 1 -printf '%P\0' | LC_ALL=C sort -z) |
	tar -C "$layout" --format=gnu --numeric-owner --owner=0 --group=0 --mtime=@0 \
		--no-recursion --null -T - -cf "$result_dir/busybox.oci.tar"
chmod 0755 "$out" "$result_dir"
chmod 0644 "$result_dir"/*

cache_publish "$out"
