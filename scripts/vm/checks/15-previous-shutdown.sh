# The first boot ended with `systemctl poweroff` while the busybox and the
# Debian machine ran. From this boot's view of that one (persistent journal,
# and the machines' logs that rmvm-shutdown-evidence.service kept after
# rmachined stopped): rmachined stopped every machine, each init got its
# stop signal, nothing was killed with SIGKILL, it took less than the
# longest stop_timeout (60 s), and the guests shut down themselves.
# boots: 2
. /mnt/rmvm/guest/lib.sh
show journalctl --list-boots --no-pager
previous=$(journalctl --list-boots --no-pager | awk '$1 == "-1" { print $2 }')
[ -n "$previous" ] || fail "the journal has no previous boot (not persistent?)"
journal=$(journalctl -b -1 --no-pager -o short-monotonic -u rmachined -u 'rmachine@*' -u 'machine-*')
echo "--- journal of the previous boot, from the stop on"
echo "$journal" | sed -n '/Stopping\|SIGTERM/,$p' | head -n 60
echo "$journal" | grep -q 'stopping every machine' || fail "rmachined did not log stopping the machines"
echo "$journal" | grep -q 'all machines stopped' || fail "rmachined did not log that every machine stopped"
if echo "$journal" | grep -i 'SIGKILL'; then
	fail "SIGKILL in rmachined's log of the shutdown"
fi
began=$(echo "$journal" | grep -m1 'stopping every machine' | sed 's/^\[ *\([0-9.]*\)\].*/\1/')
ended=$(echo "$journal" | grep -m1 'all machines stopped' | sed 's/^\[ *\([0-9.]*\)\].*/\1/')
took=$(awk -v a="$began" -v b="$ended" 'BEGIN { printf "%.1f", b - a }')
echo "stopping every machine took ${took}s"
awk -v t="$took" 'BEGIN { exit !(t < 60) }' || fail "the stop took ${took}s, more than the stop_timeout"

kept=/var/log/rmvm/shutdown-$previous/machines
show ls "$kept"
for m in bb debian; do
	echo "--- $m: supervisor.log (stop)"
	grep -E 'stop signal|init exited|SIGKILL|timeout' "$kept/$m/supervisor.log" || true
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
