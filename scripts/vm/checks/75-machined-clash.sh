# SPEC "On a systemd host": a machine whose name machined already knows (an
# nspawn machine of the same name) still starts: a warning in the log, not a
# failed start; a taken machine-NAME.scope gives the machine another scope.
# boots: 1
# timeout: 180
. /mnt/rmvm/guest/lib.sh
# Something else holds machine-pk.scope and the name pk in machined.
systemd-run --quiet --scope --unit=machine-pk sleep 600 &
holder_job=$!
for _ in $(seq 50); do
	systemctl is-active --quiet machine-pk.scope && break
	sleep 0.2
done
holder=$(systemctl show -P ControlGroup machine-pk.scope)
holder_pid=$(head -n1 "/sys/fs/cgroup$holder/cgroup.procs")
show busctl call org.freedesktop.machine1 /org/freedesktop/machine1 \
	org.freedesktop.machine1.Manager RegisterMachine sayssus \
	pk 0 other-manager container "$holder_pid" / || fail "cannot register the clashing machine"
show machinectl list --no-pager
show rmachinectl start pk || fail "pk did not start next to a clashing machined entry"
wait_state pk running 60
show systemctl status rmachines-pk.scope --no-pager | sed -n '1,8p' ||
	fail "pk did not get the fallback scope rmachines-pk.scope"
journalctl -u rmachined --no-pager | grep -E 'machine-pk.scope exists|not registered with machined' | tail -n 3
journalctl -u rmachined --no-pager | grep -q 'not registered with machined' ||
	fail "no warning about the name clash in rmachined's log"
[ "$(machinectl show pk -p Service --value)" = other-manager ] ||
	fail "rmachines took over the other manager's machined entry"
show rmachinectl stop pk
[ "$(machinectl show pk -p Service --value)" = other-manager ] ||
	fail "rmachines' stop unregistered the other manager's machine"
machinectl terminate pk >/dev/null 2>&1 || true
kill "$holder_job" 2>/dev/null || true
systemctl stop machine-pk.scope 2>/dev/null || true
