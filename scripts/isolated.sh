#!/usr/bin/env bash
# Runs a command (e.g. `cargo test ...`) in its own network, mount and
# cgroup namespaces, with the cgroup2 tree remounted so that its root is a
# cgroup of its own: two checkouts can run the test suite at the same time
# without sharing bridges, nftables tables or machine cgroups.
#   scripts/isolated.sh [--shared] TAG COMMAND ARGS...
# --shared makes `/` a shared mount in the new namespace, as on a systemd host.
set -euo pipefail
propagation=private
if [ "${1:-}" = --shared ]; then
	propagation=shared
	shift
fi
tag=$1
shift
cg2=$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)
own="$cg2/isolated-$tag"
mkdir -p "$own"
cleanup() {
	echo $$ >"$cg2/cgroup.procs"
	# Whatever is left in the cgroup is a leak of the command's: report it.
	if [ -d "$own" ]; then
		find "$own" -mindepth 1 -depth -type d -exec rmdir {} + 2>/dev/null || true
		rmdir "$own" 2>/dev/null || echo "isolated.sh: $own is not empty" >&2
	fi
}
trap cleanup EXIT
echo $$ >"$own/cgroup.procs"
unshare -n -m -C --propagation "$propagation" -- bash -c '
	set -e
	# A sysfs of the new network namespace (/sys/class/net), keeping the
	# cgroup mounts below it.
	keep=$(mktemp -d)
	mount --rbind /sys/fs/cgroup "$keep"
	mount -t sysfs sysfs /sys
	mount --move "$keep" /sys/fs/cgroup
	rmdir "$keep"
	umount -l "$1"
	mount -t cgroup2 cgroup2 "$1"
	ip link set lo up
	shift
	exec "$@"
' isolated "$cg2" "$@"
