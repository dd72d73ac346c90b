# Last of the first boot: the busybox and the Debian machine run when the
# runner powers the VM off; the next boot checks how they stopped
# (20-previous-shutdown). Their leaders are recorded for that.
# boots: 1
. /mnt/rmvm/guest/lib.sh
for m in bb debian; do
	[ "$(state_of "$m")" = running ] || {
		echo "$m is $(state_of "$m") (an earlier check stopped it); starting it again"
		show rmachinectl start "$m"
	}
	wait_state "$m" running 150
done
show rmachinectl list
# For docs/packaging.md: how the host's tools see the machines.
show machinectl list --no-pager || true
show systemd-cgls --no-pager || true
