# The .deb installs (before the first boot, by guest/early.sh) and
# rmachined.service is enabled and active once the VM has booted.
# boots: 1
. /mnt/rmvm/guest/lib.sh
echo "--- dpkg -i (early.sh, before systemd started)"
cat "$RMVM_SHARE/results/early-1.log" | grep -A30 'dpkg -i' | sed -n '1,30p'
[ "$(cat "$RMVM_SHARE/results/dpkg-status")" = 0 ] || fail "dpkg -i exited $(cat "$RMVM_SHARE/results/dpkg-status")"
show dpkg-query -W -f='${Package} ${Version} ${Status}\n' rmachines
dpkg-query -W -f='${Status}' rmachines | grep -q 'install ok installed' || fail "rmachines is not installed"
show systemctl is-enabled rmachined.service || fail "rmachined.service is not enabled"
show systemctl is-active rmachined.service || fail "rmachined.service is not active"
show systemctl show -p Type -p ActiveState -p SubState -p StatusText -p NRestarts rmachined.service
