# SPEC "Daemon lifetime": `systemctl restart rmachined` and a reinstall of
# the package (`dpkg -i` again, as an upgrade does) leave running machines
# running, with the same leader, re-adopted by the new daemon.
# boots: 1
# timeout: 240
. /mnt/rmvm/guest/lib.sh
wait_state bb running 150
wait_state debian running 150
before="bb=$(leader_of bb) debian=$(leader_of debian)"
echo "leaders before: $before"
daemon=$(systemctl show -P MainPID rmachined)
show systemctl restart rmachined
[ "$(systemctl show -P MainPID rmachined)" != "$daemon" ] || fail "rmachined was not restarted"
show rmachinectl list
after="bb=$(leader_of bb) debian=$(leader_of debian)"
echo "leaders after the restart: $after"
[ "$after" = "$before" ] || fail "systemctl restart rmachined did not keep the machines: $before became $after"
[ "$(state_of bb)" = running ] && [ "$(state_of debian)" = running ] || fail "machines not running after the restart"
echo "\$ dpkg -i rmachines.deb (again)"
DEBIAN_FRONTEND=noninteractive dpkg -i "$RMVM_SHARE/rmachines.deb" 2>&1 | tail -n 5
show systemctl is-active rmachined
show rmachinectl list
after="bb=$(leader_of bb) debian=$(leader_of debian)"
echo "leaders after the reinstall: $after"
[ "$after" = "$before" ] || fail "reinstalling the package did not keep the machines: $before became $after"
