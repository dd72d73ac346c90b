# The Debian guest (systemd as its init) reaches `running` with no failed
# unit, with idmapped ownership: on disk its files belong to 0..65535, inside
# they belong to root, and its processes run as a high host uid.
# boots: 1 2
# timeout: 200
. /mnt/rmvm/guest/lib.sh
wait_state debian running 150
state=$(rmachinectl shell debian -- systemctl is-system-running --wait 2>&1 | tr -d '\r' || true)
echo "\$ rmachinectl shell debian -- systemctl is-system-running --wait"
echo "$state"
show rmachinectl shell debian -- systemctl list-units --failed --no-legend --plain || true
if [ "$state" != running ]; then
	# The evidence: why each failed unit failed.
	for unit in $(rmachinectl shell debian -- systemctl list-units --failed --no-legend --plain | tr -d '\r' | awk '{ print $1 }'); do
		show rmachinectl shell debian -- systemctl status --no-pager -l -n 20 "$unit" || true
	done
fi
[ "$state" = running ] || fail "the Debian guest is '$state', not running"
failed=$(rmachinectl shell debian -- systemctl list-units --failed --no-legend --plain | tr -d '\r' | grep -c . || true)
[ "$failed" = 0 ] || fail "$failed failed units in the Debian guest"

leader=$(leader_of debian)
show cat "/proc/$leader/uid_map"
host_uid=$(awk '/^Uid:/ { print $2 }' "/proc/$leader/status")
echo "init of debian (host pid $leader) runs as host uid $host_uid"
[ "$host_uid" -ge 65536 ] || fail "the guest's init runs as host uid $host_uid, not an unprivileged range"
on_disk=$(stat -c '%u:%g' /var/lib/machines/debian/etc/shadow)
inside=$(rmachinectl shell debian -- stat -c '%u:%g' /etc/shadow | tr -d '\r')
echo "/etc/shadow: on disk $on_disk, inside the machine $inside"
[ "$on_disk" = "0:42" ] || fail "the tree on disk changed owner: $on_disk"
[ "$inside" = "0:42" ] || fail "inside, /etc/shadow is $inside (no idmapping?)"
