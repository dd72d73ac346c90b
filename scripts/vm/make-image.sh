#!/usr/bin/env bash
# Builds the base image of the VM test bed once and prints the directory that
# holds it: vmlinuz, initrd.img and root.img (raw ext4, made with
# `mkfs.ext4 -d`, no loop device). Debian 12 with systemd, udev, dbus, polkit,
# nftables and machinectl, plus two guest trees for nested machines:
# /var/lib/machines/busybox and /var/lib/machines/debian (a copy of the test
# fixture, which stays untouched).
#
# Cached in $RMACHINES_VM_CACHE (default /var/tmp/rmachines-vm) under a key
# hashed from this script and the fixture script, so a second run reuses it
# and a change to either rebuilds it.
#
# The image carries only what does not change between runs: the per-run
# part (the .deb, the definitions, the checks) comes from a 9p share that
# scripts/vm/run.sh mounts, through /usr/local/sbin/rmvm-init (the kernel's
# init=, which hands over to systemd) and rmvm-checks.service.
set -euo pipefail
cd "$(dirname "$0")/../.."
cache=${RMACHINES_VM_CACHE:-/var/tmp/rmachines-vm}
key=$(cat scripts/vm/make-image.sh tests/fixtures/make-rootfs.sh | sha256sum | cut -c1-16)
dest="$cache/base-$key"
if [ -f "$dest/root.img" ]; then
	echo "$dest"
	exit 0
fi
for tool in mmdebstrap mkfs.ext4; do
	command -v "$tool" >/dev/null || {
		echo "make-image.sh: $tool is missing (scripts/install-deps.sh installs it)" >&2
		exit 1
	}
done
mkdir -p "$cache"
fixtures=/var/tmp/rmachines-fixtures
tests/fixtures/make-rootfs.sh debian "$fixtures/debian" >&2

tmp="$dest.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$tmp"
mkdir -p "$tmp"
tree="$tmp/tree"
echo "make-image.sh: building the Debian 12 base image in $tmp (takes a few minutes)" >&2
mmdebstrap --quiet --variant=minbase \
	--include=systemd,systemd-sysv,udev,dbus,dbus-bin,linux-image-amd64,initramfs-tools,polkitd,pkexec,nftables,iproute2,systemd-container,busybox-static,kmod,procps,passwd,util-linux,mount,coreutils,findutils,grep,sed,gawk \
	bookworm "$tree" >&2

# Boot from /dev/vda, no network, persistent journal, a fixed machine id (no
# first-boot presets), root without a password for debugging on the console.
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$tree/etc/fstab"
echo rmvm >"$tree/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 rmvm\n' >"$tree/etc/hosts"
tr -d '-' </proc/sys/kernel/random/uuid >"$tree/etc/machine-id"
mkdir -p "$tree/var/log/journal" "$tree/mnt/rmvm"
chroot "$tree" passwd -dq root
systemctl --root="$tree" mask apt-daily.timer apt-daily-upgrade.timer fstrim.timer \
	systemd-timesyncd.service e2scrub_all.timer >/dev/null 2>&1 || true

cat >"$tree/usr/local/sbin/rmvm-init" <<'INIT'
#!/bin/sh
# rmachines VM test bed: the kernel runs this as init. It mounts the run's 9p
# share and lets the run's early.sh prepare the system (install the .deb,
# write definitions) before systemd starts, as if the image had been made so.
if modprobe 9pnet_virtio && modprobe 9p &&
	mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 rmvm /mnt/rmvm; then
	[ -x /mnt/rmvm/guest/early.sh ] && /mnt/rmvm/guest/early.sh
else
	echo "rmvm-init: the run's 9p share (tag rmvm) cannot be mounted" >&2
fi
exec /lib/systemd/systemd "$@"
INIT
chmod 755 "$tree/usr/local/sbin/rmvm-init"
cat >"$tree/etc/systemd/system/rmvm-checks.service" <<'UNIT'
[Unit]
Description=rmachines VM test bed: this run's checks
After=multi-user.target rmachined.service
ConditionPathExists=/mnt/rmvm/guest/checks.sh

[Service]
Type=oneshot
ExecStart=/mnt/rmvm/guest/checks.sh
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
UNIT
systemctl --root="$tree" enable rmvm-checks.service >/dev/null 2>&1

# Guest trees for nested machines.
mkdir -p "$tree/var/lib/machines"
tests/fixtures/make-rootfs.sh busybox "$tree/var/lib/machines/busybox" >&2
cp -a "$fixtures/debian" "$tree/var/lib/machines/debian"

cp "$(ls "$tree"/boot/vmlinuz-* | sort -V | tail -n1)" "$tmp/vmlinuz"
cp "$(ls "$tree"/boot/initrd.img-* | sort -V | tail -n1)" "$tmp/initrd.img"
# Room for the .deb, machines' writes and two boots' journals.
size_mb=$(($(du -sm "$tree" | cut -f1) + 1536))
mkfs.ext4 -q -L rmvm-root -d "$tree" "$tmp/root.img" "${size_mb}M"
rm -rf "$tree"
mv "$tmp" "$dest"
trap - EXIT
echo "$dest"
