# `autostart = true` machines (busybox with private networking, Debian with
# systemd) are running after the VM booted, with no command from anyone.
# boots: 1 2
# timeout: 240
. /mnt/rmvm/guest/lib.sh
echo "--- rmachined's journal of this boot"
journalctl -b --no-pager -o short-monotonic -u rmachined | sed -n '1,40p'
wait_state bb running 200
wait_state debian running 200
show rmachinectl list
show rmachinectl status bb
# Private networking: the busybox machine has host0 with an address.
# Private networking: the busybox machine has host0, and an address.
echo "\$ rmachinectl shell bb -- cat /sys/class/net/host0/operstate"
rmachinectl shell bb -- cat /sys/class/net/host0/operstate || fail "bb has no host0"
rmachinectl list | awk '$1 == "bb" { print $4 }' | grep -q '^[0-9]' || fail "bb has no address"
