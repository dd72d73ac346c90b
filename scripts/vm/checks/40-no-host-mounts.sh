# Nothing of a machine is mounted in the host's mount namespace (`/` is
# shared on this systemd host): after the starts at boot, after a start that
# fails in the machine's child once its root is mounted, and after stops.
# boots: 1 2
# timeout: 200
. /mnt/rmvm/guest/lib.sh
show findmnt -n -o TARGET,PROPAGATION /
wait_state bb running 150
wait_state debian running 150
assert_no_machine_mounts "the starts at boot"

echo "\$ rmachinectl start broken"
if rmachinectl start broken 2>&1; then
	fail "broken started, but it binds a directory onto a file"
fi
show rmachinectl status broken || true
assert_no_machine_mounts "a failed start"
# A second failed start is refused for the same reason, not for leftovers.
out=$(rmachinectl start broken 2>&1 || true)
echo "again: $out"
case "$out" in
*idmapped*) fail "leftovers of the first failed start break the second" ;;
esac

show rmachinectl start pk
assert_no_machine_mounts "starting pk"
show rmachinectl stop pk
assert_no_machine_mounts "stopping pk"
show rmachinectl restart bb
wait_state bb running 60
assert_no_machine_mounts "restarting bb"
