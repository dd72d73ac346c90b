# polkit with the shipped example rule installed: alice (group rmachines)
# starts and stops a machine; bob is refused with org.rmachines1.AccessDenied.
# boots: 1
. /mnt/rmvm/guest/lib.sh
show id alice
show id bob
show ls /etc/polkit-1/rules.d/
show runuser -u alice -- rmachinectl start pk || fail "alice (group rmachines) cannot start pk"
[ "$(state_of pk)" = running ] || fail "pk is not running after alice started it"
show runuser -u alice -- rmachinectl stop pk || fail "alice (group rmachines) cannot stop pk"
[ "$(state_of pk)" = stopped ] || fail "pk is not stopped after alice stopped it"
show runuser -u bob -- rmachinectl start pk && fail "bob (not in the group) started pk"
reply=$(runuser -u bob -- dbus-send --system --print-reply --dest=org.rmachines1 \
	/org/rmachines1 org.rmachines1.Manager.Start string:pk 2>&1 || true)
echo "\$ runuser -u bob -- dbus-send ... org.rmachines1.Manager.Start string:pk"
echo "$reply"
case "$reply" in
*org.rmachines1.AccessDenied*) ;;
*) fail "bob's Start was not refused with org.rmachines1.AccessDenied" ;;
esac
[ "$(state_of pk)" = stopped ] || fail "pk runs after bob was refused"
