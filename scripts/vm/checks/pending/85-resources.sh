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
	echo "$dir: memory.max=$(cat "$dir/memory.max" 2>/dev/null) pids.max=$(cat "$dir/pids.max" 2>/dev/null) cpu.max=$(cat "$dir/cpu.max" 2>/dev/null)"
	if [ "$(cat "$dir/memory.max" 2>/dev/null)" = 67108864 ]; then
		found=$dir
		break
	fi
	dir=$(dirname "$dir")
done
show rmachinectl stop res
[ -n "$found" ] || fail "no cgroup of res has memory.max = 64M"
[ "$(cat "$found/pids.max")" = 64 ] || fail "pids.max of $found is not 64"
[ "$(cat "$found/cpu.max")" = "50000 100000" ] || fail "cpu.max of $found is not 50000 100000"
