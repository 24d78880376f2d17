# shellcheck shell=bash
# Packing a directory into an initramfs (newc cpio), shared by the rootfs/
# build scripts. Sourced; defines pack_initramfs.

# The kernel opens /dev/console for /init's stdin/stdout/stderr before /init
# can mount devtmpfs, so the node has to be in the archive. It is written as
# a second, hand-made newc archive (the kernel unpacks concatenated
# archives), so building needs no mknod and no root.
newc_entry() { # name mode rdevmajor rdevminor
	local name=$1 mode=$2 major=$3 minor=$4
	local namesize=$((${#name} + 1))
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
		0 "$mode" 0 0 1 0 0 0 0 "$major" "$minor" "$namesize" 0
	printf '%s\0' "$name"
	# Header (110 bytes) plus name are padded to a multiple of four.
	local pad=$(((4 - (110 + namesize) % 4) % 4))
	head -c "$pad" /dev/zero
}

# pack_initramfs ROOT writes ROOT as an uncompressed newc archive, plus a
# /dev/console node, to stdout. Fixed timestamps and owners and sorted names:
# the same tree gives the same bytes.
pack_initramfs() {
	local root=$1
	find "$root" -exec touch -h -d @0 {} +
	(cd "$root" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
		cpio --quiet -o -H newc -R 0:0 --reproducible)
	newc_entry dev/console $((0020000 | 0600)) 5 1
	newc_entry 'TRAILER!!!' 0 0 0
}
