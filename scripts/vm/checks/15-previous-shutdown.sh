# The first boot ended with `systemctl poweroff` while the busybox and the
# Debian machine ran. From this boot's view of that one (persistent journal,
# and the machines' logs that rmvm-shutdown-evidence.service kept after
# rmachined stopped): systemd stopped each machine's scope, which asked its
# supervisor for a graceful stop (SPEC "Daemon lifetime and machines"); each
# init got its stop signal, nothing was killed with SIGKILL, each stop took
# less than its stop_timeout, the guests shut down themselves, and the
# machines were down before rmachined stopped (it had none left to keep).
# boots: 2
. /mnt/rmvm/guest/lib.sh
show journalctl --list-boots --no-pager
previous=$(journalctl --list-boots --no-pager | awk '$1 == "-1" { print $2 }')
[ -n "$previous" ] || fail "the journal has no previous boot (not persistent?)"
journal=$(journalctl -b -1 --no-pager -o short-monotonic -u rmachined -u 'rmachine@*' -u 'machine-*')
echo "--- journal of the previous boot, from the stop on"
echo "$journal" | sed -n '/Stopping machine-\|Stopped machine-\|init exited\|0 machines keep/p' | sed -n '1,60p'
if echo "$journal" | grep -i 'SIGKILL'; then
	fail "SIGKILL in the journal of the shutdown"
fi
for m in bb:30 debian:60; do
	name=${m%%:*} timeout=${m#*:}
	# systemd 252 names the unit and its description: "Stopping
	# machine-bb.scope - rmachines machine bb...". A grep that finds
	# nothing must reach the fail below, not end the check under pipefail.
	began=$(echo "$journal" | grep "Stopping machine-$name\.scope" | tail -n1 | sed 's/^\[ *\([0-9.]*\)\].*/\1/' || true)
	ended=$(echo "$journal" | grep "Stopped machine-$name\.scope" | tail -n1 | sed 's/^\[ *\([0-9.]*\)\].*/\1/' || true)
	[ -n "$began" ] || fail "machine-$name.scope was not stopped at shutdown"
	[ -n "$ended" ] || fail "machine-$name.scope did not stop (no 'Stopped' line)"
	took=$(awk -v a="$began" -v b="$ended" 'BEGIN { printf "%.1f", b - a }')
	echo "stopping $name (machine-$name.scope) took ${took}s"
	awk -v t="$took" -v limit="$timeout" 'BEGIN { exit !(t < limit) }' ||
		fail "the stop of $name took ${took}s, more than its stop_timeout ${timeout}s"
done
echo "$journal" | grep -q '0 machines keep running' ||
	fail "rmachined still had machines when it stopped (scopes not ordered before it?)"

kept=/var/log/rmvm/shutdown-$previous/machines
show ls "$kept"
for m in bb debian; do
	echo "--- $m: supervisor.log (stop)"
	grep -E 'stop signal|init exited|SIGKILL|timeout' "$kept/$m/supervisor.log" || true
	grep -q "the machine's scope is stopping" "$kept/$m/supervisor.log" ||
		fail "$m: the supervisor was not asked to stop by its scope"
	grep -q 'stop signal sent' "$kept/$m/supervisor.log" || fail "$m: no stop signal was sent"
	grep 'init exited' "$kept/$m/supervisor.log" | tail -n1 | grep -q 'killed=false' ||
		fail "$m: init did not exit by itself"
	if grep -q 'sending SIGKILL' "$kept/$m/supervisor.log"; then
		fail "$m: SIGKILL after the stop timeout"
	fi
done
echo "--- bb: console (end)"
tail -n 5 "$kept/bb/console.log"
grep -q rmachines-busybox-shutdown "$kept/bb/console.log" || fail "busybox init did not run its shutdown actions"
echo "--- debian: console (end)"
tr -d '\r' <"$kept/debian/console.log" | tail -n 8
grep -Eq 'System Power Off|Power-Off|Halting system|System Halt' "$kept/debian/console.log" || fail "the Debian guest did not shut down by itself"
