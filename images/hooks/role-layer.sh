#!/bin/sh
# mmdebstrap customize hook of a role image's build (labbuilder/images/rootfs.py, layer_argv): install
# the role's packages into a tree unpacked from its base image's tree, as mmdebstrap installs
# its own: apt runs outside the tree with mmdebstrap's apt configuration and downloads there;
# dpkg runs inside it (mmdebstrap has mounted /proc, /sys, /dev and stopped services from
# starting). dpkg does not fsync every file (--force-unsafe-io, for this run only): the tree
# becomes a disk image afterwards, so a crash mid-way only means a rebuild.
#
# $1: the tree. LABBUILDER_ROLE_PACKAGES: the packages, separated by spaces (names checked by
# labbuilder against Debian's package name syntax).
set -eu
root="$1"
: "${LABBUILDER_ROLE_PACKAGES:?no packages to install}"
# The image boots its base's initrd (labbuilder checks it holds the root disk's modules): a
# role's packages that trigger initramfs-tools (busybox-static, say) need not regenerate it,
# which took 6 s per image. Regeneration is back on before the image is made.
conf="$root/etc/initramfs-tools/update-initramfs.conf"
cp -p "$conf" "$conf.labbuilder"
sed -i 's/^update_initramfs=.*/update_initramfs=no/' "$conf"
# shellcheck disable=SC2086 # one word per package name
APT_CONFIG="$MMDEBSTRAP_APT_CONFIG" apt-get \
	-o Dir::Bin::dpkg=env \
	-o DPkg::Options::=--unset=TMPDIR \
	-o DPkg::Options::=dpkg \
	-o DPkg::Options::=--force-unsafe-io \
	-o DPkg::Chroot-Directory="$root" \
	-o APT::Install-Recommends=false \
	--yes install $LABBUILDER_ROLE_PACKAGES
mv "$conf.labbuilder" "$conf"
