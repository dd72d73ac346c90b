# SPEC "On a systemd host": each running machine is the delegated scope
# machine-NAME.scope in machine.slice (its init in it) and is registered with
# systemd-machined (class container, service rmachines); unregistered at stop.
# boots: 1 2
# timeout: 240
. /mnt/rmvm/guest/lib.sh
wait_state bb running 150
wait_state debian running 150
show machinectl list --no-pager
for m in bb debian; do
	show machinectl status "$m" --no-pager | sed -n '1,12p' || fail "machinectl does not know $m"
	props=$(machinectl show "$m" -p Class -p Service -p Leader -p RootDirectory -p Unit)
	echo "$props"
	echo "$props" | grep -qx Class=container || fail "$m: class is not container"
	echo "$props" | grep -qx Service=rmachines || fail "$m: service is not rmachines"
	echo "$props" | grep -qx "Leader=$(leader_of "$m")" || fail "$m: machined's leader is not rmachines' leader $(leader_of "$m")"
	echo "$props" | grep -qx "Unit=machine-$m.scope" || fail "$m: unit is not machine-$m.scope"
	show systemctl status "machine-$m.scope" --no-pager | sed -n '1,15p' || true
	systemctl is-active --quiet "machine-$m.scope" || fail "machine-$m.scope is not active"
	[ "$(systemctl show -P Slice "machine-$m.scope")" = machine.slice ] || fail "machine-$m.scope is not in machine.slice"
	[ "$(systemctl show -P Delegate "machine-$m.scope")" = yes ] || fail "machine-$m.scope is not delegated"
	show cat "/proc/$(leader_of "$m")/cgroup"
	grep -q "^0::/machine.slice/machine-$m.scope/" "/proc/$(leader_of "$m")/cgroup" ||
		grep -qx "0::/machine.slice/machine-$m.scope" "/proc/$(leader_of "$m")/cgroup" ||
		fail "$m's init is not in machine-$m.scope"
done
cgls=$(systemd-cgls --no-pager -u machine.slice 2>&1 || true)
echo "\$ systemd-cgls -u machine.slice"
echo "$cgls" | sed -n '1,40p'
echo "$cgls" | grep -q machine-debian.scope || fail "systemd-cgls does not show machine-debian.scope"
# Unregistered at stop.
show rmachinectl start pk
show machinectl list --no-pager
machinectl show pk >/dev/null 2>&1 || fail "pk is not registered with machined while running"
show rmachinectl stop pk
if machinectl show pk >/dev/null 2>&1; then
	fail "pk is still registered with machined after its stop"
fi
if systemctl is-active --quiet machine-pk.scope; then
	fail "machine-pk.scope is still active after the stop"
fi
# Stopping the scope is a graceful stop of the machine: its supervisor is
# asked (SIGCONT from PID 1), the init gets its stop signal, no SIGKILL.
show rmachinectl start pk
wait_state pk running 60
show systemctl stop machine-pk.scope
wait_state pk stopped 60
log=/run/rmachines/machines/pk/supervisor.log
grep -E "scope is stopping|stop signal|init exited|SIGKILL" "$log" | tail -n 5
grep -q "the machine's scope is stopping" "$log" || fail "pk: the scope's stop did not reach the supervisor"
grep 'init exited' "$log" | tail -n1 | grep -q 'killed=false' || fail "pk: init did not exit by itself"
if grep -q 'sending SIGKILL' "$log"; then
	fail "pk: SIGKILL after a scope stop"
fi
