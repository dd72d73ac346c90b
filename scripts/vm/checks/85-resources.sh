# SPEC "Resources and accounting" on a unified cgroup2 host: the machine
# res has [resources] memory = "64M", tasks = 64, cpus = 0.5; its cgroup (an
# ancestor of its init's, below the root) has memory.max, pids.max, cpu.max.
# boots: 1
. /mnt/rmvm/guest/lib.sh
show cat /sys/fs/cgroup/cgroup.controllers
show cat /etc/rmachines/res.toml
show rmachinectl start res || fail "res does not start"
leader=$(leader_of res)
show cat "/proc/$leader/cgroup"
dir=/sys/fs/cgroup$(sed -n 's/^0:://p' "/proc/$leader/cgroup")
found=
while [ "$dir" != /sys/fs/cgroup ] && [ "$dir" != / ]; do
	memory=$(cat "$dir/memory.max" 2>/dev/null)
	pids=$(cat "$dir/pids.max" 2>/dev/null)
	cpu=$(cat "$dir/cpu.max" 2>/dev/null)
	echo "$dir: memory.max=$memory pids.max=$pids cpu.max=$cpu"
	if [ "$memory" = 67108864 ]; then
		found=$dir
		break
	fi
	dir=$(dirname "$dir")
done
show rmachinectl stop res
[ -n "$found" ] || fail "no cgroup of res has memory.max = 64M"
# The values were read while res ran: its cgroup is gone after the stop.
[ "$pids" = 64 ] || fail "pids.max of $found is $pids, not 64"
[ "$cpu" = "50000 100000" ] || fail "cpu.max of $found is $cpu, not 50000 100000"
