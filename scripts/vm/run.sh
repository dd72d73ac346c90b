#!/usr/bin/env bash
# The VM test bed: boots a Debian 12 VM (a real systemd host, unified cgroup2
# with every controller) twice with the freshly built .deb installed, runs
# the checks in scripts/vm/checks inside it, and reports each one with its
# evidence. Exit status 0 when every check passed.
#
#   scripts/vm/run.sh [DEB]        # default: the newest target/debian/*.deb
#
# Boot 1: guest/early.sh installs the .deb and writes the machines before
# systemd starts; then an ordinary boot, the checks marked `# boots: 1`, and
# `systemctl poweroff` with machines running. Boot 2 (same disk): the checks
# marked `# boots: 2`, among them how boot 1's shutdown stopped the machines.
#
# Environment:
#   RMACHINES_VM_PENDING=all|NAME,...  also run checks from checks/pending/
#                                      (they need work not merged yet)
#   RMACHINES_VM_ACCEL=kvm|tcg         default: kvm when /dev/kvm is usable
#   RMACHINES_VM_BOOT_TIMEOUT=SECONDS  per boot (default 600 with kvm, 1200 with tcg)
#   RMACHINES_VM_KEEP=1                keep the run directory (disk, share, serial logs)
#   RMACHINES_VM_CACHE=DIR             base image cache (default /var/tmp/rmachines-vm)
#
# Everything it starts is gone when it returns, also on failure or signal:
# qemu is killed and the per-run copy (a qcow2 overlay of the cached base
# image) removed.
set -euo pipefail
cd "$(dirname "$0")/../.."
deb=${1:-$(ls -t target/debian/rmachines_*.deb 2>/dev/null | head -n1)}
[ -n "$deb" ] && [ -f "$deb" ] || {
	echo "run.sh: no .deb (build one with scripts/package.sh or pass its path)" >&2
	exit 2
}
for tool in qemu-system-x86_64 qemu-img; do
	command -v "$tool" >/dev/null || {
		echo "run.sh: $tool is missing (apt-get install qemu-system-x86 qemu-utils; scripts/install-deps.sh does)" >&2
		exit 2
	}
done

started_all=$(date +%s)
base=$(timeout 1800 scripts/vm/make-image.sh)
image_secs=$(($(date +%s) - started_all))
cache=${RMACHINES_VM_CACHE:-/var/tmp/rmachines-vm}
mkdir -p "$cache/runs"
run=$(mktemp -d "$cache/runs/run.XXXXXX")
qemu_pid=
cleanup() {
	if [ -n "$qemu_pid" ]; then
		kill -KILL "$qemu_pid" 2>/dev/null || true
		wait "$qemu_pid" 2>/dev/null || true
	fi
	if [ "${RMACHINES_VM_KEEP:-}" = 1 ]; then
		echo "run.sh: kept $run" >&2
	else
		rm -rf "$run"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

share=$run/share
mkdir -p "$share/guest" "$share/checks" "$share/results"
cp scripts/vm/guest/* "$share/guest/"
cp scripts/vm/checks/*.sh "$share/checks/"
case "${RMACHINES_VM_PENDING:-}" in
"") ;;
all) cp scripts/vm/checks/pending/*.sh "$share/checks/" ;;
*)
	for name in ${RMACHINES_VM_PENDING//,/ }; do
		cp "scripts/vm/checks/pending/${name%.sh}.sh" "$share/checks/"
	done
	;;
esac
cp "$deb" "$share/rmachines.deb"
chmod -R a+rX "$share"
qemu-img create -q -f qcow2 -F raw -b "$base/root.img" "$run/disk.qcow2"

# KVM when /dev/kvm is there and works: nested KVM can be present but hang
# (seen on a Firecracker host), so a kernel without a root file system must
# reach its panic quickly first. The answer is kept for the host's boot.
kvm_works() {
	[ -r /dev/kvm ] && [ -w /dev/kvm ] || return 1
	local verdict="$cache/kvm-$(cat /proc/sys/kernel/random/boot_id)"
	if [ ! -f "$verdict" ]; then
		timeout 20 qemu-system-x86_64 -accel kvm -cpu host,-arch-capabilities -m 256 \
			-nodefaults -display none -no-reboot -nic none -monitor none \
			-kernel "$base/vmlinuz" -append "console=ttyS0 panic=-1" \
			-serial "file:$run/kvm-probe.log" </dev/null >/dev/null 2>&1 || true
		if grep -q 'Kernel panic' "$run/kvm-probe.log" 2>/dev/null; then
			echo yes >"$verdict"
		else
			echo "run.sh: /dev/kvm is there but a KVM guest does not boot; using tcg" >&2
			echo no >"$verdict"
		fi
	fi
	[ "$(cat "$verdict")" = yes ]
}
accel=${RMACHINES_VM_ACCEL:-}
if [ -z "$accel" ]; then
	if kvm_works; then accel=kvm; else accel=tcg; fi
fi
case "$accel" in
# arch-capabilities: a nested KVM host may refuse MSR 0x10a (qemu aborts).
kvm) cpu=host,-arch-capabilities boot_timeout=${RMACHINES_VM_BOOT_TIMEOUT:-600} ;;
*) cpu=max boot_timeout=${RMACHINES_VM_BOOT_TIMEOUT:-1200} ;;
esac

# Host-side results join the guest's in the same summary.
record() { # STATUS BOOT NAME SECONDS EVIDENCE
	echo "$1 $2 $3 $4s" >>"$share/results/summary"
	printf '%s\n' "$5" >"$share/results/$2-$3.log"
}

echo "run.sh: base image $base (ready in ${image_secs}s), .deb $deb, accel $accel, run $run"
for boot in 1 2; do
	echo "$boot" >"$share/boot"
	serial=$run/serial-$boot.log
	began=$(date +%s)
	qemu-system-x86_64 -accel "$accel" -cpu "$cpu" -m 2048 -smp 2 \
		-nodefaults -display none -no-reboot -nic none \
		-kernel "$base/vmlinuz" -initrd "$base/initrd.img" \
		-append "root=/dev/vda rw console=ttyS0 init=/usr/local/sbin/rmvm-init panic=-1 net.ifnames=0" \
		-drive "file=$run/disk.qcow2,if=virtio,format=qcow2,cache=writeback" \
		-virtfs "local,path=$share,mount_tag=rmvm,security_model=none,id=rmvm" \
		-serial "file:$serial" -monitor none </dev/null >"$run/qemu-$boot.log" 2>&1 &
	qemu_pid=$!
	while kill -0 "$qemu_pid" 2>/dev/null && [ $(($(date +%s) - began)) -lt "$boot_timeout" ]; do
		sleep 1
	done
	if kill -0 "$qemu_pid" 2>/dev/null; then
		kill -KILL "$qemu_pid"
		wait "$qemu_pid" || true
		qemu_pid=
		record FAIL "$boot" vm-powers-off "$boot_timeout" \
			"the VM did not power off within ${boot_timeout}s; serial console (last 60 lines):
$(tail -n 60 "$serial" | tr -d '\r')"
		echo "run.sh: boot $boot: timed out after ${boot_timeout}s"
		break
	fi
	rc=0
	wait "$qemu_pid" || rc=$?
	qemu_pid=
	took=$(($(date +%s) - began))
	if [ "$rc" = 0 ] && grep -q 'reboot: Power down' "$serial"; then
		record PASS "$boot" vm-powers-off "$took" "qemu exited 0 after ${took}s; serial console:
$(grep -E 'RMVM|reboot: Power down|Reached target.*Power' "$serial" | tr -d '\r')"
	else
		record FAIL "$boot" vm-powers-off "$took" "qemu exited $rc after ${took}s: $(cat "$run/qemu-$boot.log")
serial console (last 60 lines):
$(tail -n 60 "$serial" | tr -d '\r')"
	fi
	echo "run.sh: boot $boot took ${took}s"
done

# Every check that should have run in a boot and left no result failed.
summary=$share/results/summary
touch "$summary"
for check in "$share"/checks/*.sh; do
	name=$(basename "$check" .sh)
	for boot in $(sed -n 's/^# boots: *//p' "$check" | head -n1); do
		grep -q "^[A-Z]* $boot $name " "$summary" ||
			record FAIL "$boot" "$name" 0 "no result: the check did not run (see vm-powers-off of boot $boot and early-$boot.log)
$(cat "$share/results/early-$boot.log" 2>/dev/null | tail -n 20)"
	done
done

echo
echo "=== evidence"
while read -r status boot name took; do
	echo "--- $status boot $boot: $name ($took)"
	sed 's/^/    /' "$share/results/$boot-$name.log"
done <"$summary"
echo
echo "=== summary (whole VM stage $(($(date +%s) - started_all))s, of which base image ${image_secs}s)"
while read -r status boot name took; do
	echo "RMVM-RESULT $status boot=$boot $name $took"
done <"$summary"
! grep -q '^FAIL' "$summary"
