# rmachine@ord-b.service is ordered After= (and Requires=) rmachine@ord-a,
# both enabled at boot, ord-a slowed by 3 s: ord-b's start began only after
# ord-a was up.
# boots: 1 2
. /mnt/rmvm/guest/lib.sh
show systemctl cat rmachine@ord-b.service | grep -E 'After|Requires|ExecStart'
for unit in rmachine@ord-a.service rmachine@ord-b.service; do
	systemctl is-active --quiet "$unit" || {
		show systemctl status "$unit" || true
		fail "$unit is not active after boot"
	}
done
a_up=$(systemctl show -P ActiveEnterTimestampMonotonic rmachine@ord-a.service)
b_began=$(systemctl show -P InactiveExitTimestampMonotonic rmachine@ord-b.service)
echo "rmachine@ord-a active at ${a_up}us, rmachine@ord-b began at ${b_began}us (monotonic)"
[ "$a_up" -gt 0 ] && [ "$b_began" -ge "$a_up" ] || fail "ord-b started before ord-a was up"
show rmachinectl list
[ "$(state_of ord-a)" = running ] || fail "machine ord-a is not running"
[ "$(state_of ord-b)" = running ] || fail "machine ord-b is not running"
