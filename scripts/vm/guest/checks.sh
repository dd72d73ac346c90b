#!/bin/bash
# Runs in the VM as rmvm-checks.service, after multi-user.target: every
# check of this boot in /mnt/rmvm/checks (in name order), each with its own
# time limit, its output kept as evidence in /mnt/rmvm/results; then powers
# the VM off. A check says which boots it runs in with a line `# boots: 1 2`
# and may set its limit in seconds with `# timeout: N` (default 180).
set -u
share=/mnt/rmvm
boot=$(cat "$share/boot")
results=$share/results
export RMVM_BOOT=$boot RMVM_SHARE=$share
echo "RMVM boot $boot: checks start at $(cut -d' ' -f1 /proc/uptime)s uptime"
for check in "$share"/checks/*.sh; do
	[ -e "$check" ] || continue
	name=$(basename "$check" .sh)
	boots=$(sed -n 's/^# boots: *//p' "$check" | head -n1)
	case " $boots " in
	*" $boot "*) ;;
	*) continue ;;
	esac
	limit=$(sed -n 's/^# timeout: *//p' "$check" | head -n1)
	log="$results/$boot-$name.log"
	started=$(date +%s)
	if timeout --kill-after=5 "${limit:-180}" bash "$check" >"$log" 2>&1 </dev/null; then
		status=PASS
	else
		rc=$?
		status=FAIL
		{
			[ "$rc" = 124 ] && echo "--- timed out after ${limit:-180}s"
			echo "--- exit status $rc"
			echo "--- rmachinectl list"
			rmachinectl list 2>&1
			echo "--- journal of this boot (rmachined and machines' units, last 60 lines)"
			journalctl -b --no-pager -n 60 -u rmachined -u 'rmachine@*' -u 'machine-*' 2>&1
			echo "--- journal of this boot (everything, last 40 lines)"
			journalctl -b --no-pager -n 40 2>&1
		} >>"$log"
	fi
	echo "$status $boot $name $(($(date +%s) - started))s" >>"$results/summary"
	echo "RMVM $status boot $boot: $name ($(($(date +%s) - started))s)"
done
echo "RMVM boot $boot: checks done at $(cut -d' ' -f1 /proc/uptime)s uptime; powering off"
sync
systemctl poweroff --no-block
