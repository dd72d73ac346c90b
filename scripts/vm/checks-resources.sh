#!/usr/bin/env bash
# Checks a running machine's [resources] on a unified cgroup2 host (the VM
# test bed): the limits of its definition are in its cgroup2 files, those
# files are not the guest's to write, the guest cannot raise them, the
# controllers are enabled above it, and `rmachinectl status --json` agrees.
#   scripts/vm/checks-resources.sh NAME [RMACHINECTL]
# Prints one PASS/FAIL line per check; exits 1 if any failed. Self-contained:
# needs bash, awk, stat and rmachinectl.
set -uo pipefail
name=${1:?usage: checks-resources.sh NAME [RMACHINECTL]}
ctl=${2:-rmachinectl}
failures=0
pass() { echo "PASS resources/$name: $*"; }
fail() { echo "FAIL resources/$name: $*"; failures=$((failures + 1)); }
check() { # check DESCRIPTION EXPECTED ACTUAL
	if [ "$2" = "$3" ]; then pass "$1 ($3)"; else fail "$1: expected '$2', got '$3'"; fi
}

json=$("$ctl" status "$name" --json) || { fail "rmachinectl status $name --json failed"; exit 1; }
field() { # the value of a top-level key of the status JSON (numbers, strings)
	printf '%s' "$json" | tr -d '\n' | sed -E "s/.*\"$1\": *\"?([^\",}]*)\"?.*/\1/"
}
state=$(field state)
check "machine is running" running "$state"
[ "$state" = running ] || exit 1
leader=$(field leader)
definition=$(field definition)

# [resources] keys of the definition (flat TOML: key = value).
resource() {
	awk -v key="$1" '
		/^\[/ { section = $0; next }
		section == "[resources]" && $1 == key {
			sub(/^[^=]*= */, ""); sub(/ *#.*/, ""); gsub(/"/, ""); print; exit
		}' "$definition"
}
bytes() { # 512M -> 536870912
	awk -v v="$1" 'BEGIN {
		n = v + 0; u = substr(v, length(v)); m = 1
		if (u == "K") m = 1024; else if (u == "M") m = 1024^2
		else if (u == "G") m = 1024^3; else if (u == "T") m = 1024^4
		printf "%.0f\n", n * m }'
}

# The machine's cgroup: the topmost cgroup owned by the guest's root, above
# its init (which may live deeper, e.g. in init.scope under systemd).
cg2=$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)
guest_uid=$(stat -c %u "/proc/$leader")
dir="$cg2$(awk -F: '$1 == "0" { print $3 }' "/proc/$leader/cgroup")"
while [ "$(stat -c %u "$(dirname "$dir")")" = "$guest_uid" ] && [ "$(dirname "$dir")" != "$cg2" ]; do
	dir=$(dirname "$dir")
done
if [ "$(stat -c %u "$dir")" = "$guest_uid" ]; then
	pass "machine cgroup $dir (delegated to host uid $guest_uid)"
else
	fail "no cgroup above init $leader is delegated to its root (uid $guest_uid): $dir"
	exit 1
fi

# A unified host offers the controllers at the cgroup2 root.
for controller in memory cpu pids; do
	grep -qw "$controller" "$cg2/cgroup.controllers" ||
		fail "$cg2 offers no $controller controller (a hybrid host? these checks are for cgroup2)"
done

# Controllers enabled on every ancestor.
parent=$(dirname "$dir")
for controller in memory cpu pids; do
	if grep -qw "$controller" "$parent/cgroup.subtree_control"; then
		pass "$controller enabled in $parent/cgroup.subtree_control"
	else
		fail "$controller not enabled in $parent/cgroup.subtree_control ($(cat "$parent/cgroup.subtree_control"))"
	fi
done

# Each set key, in its file.
expect_file() { # FILE EXPECTED
	local actual
	actual=$(cat "$dir/$1" 2>/dev/null || echo "<missing>")
	check "$1" "$2" "$actual"
}
memory=$(resource memory)
memory_high=$(resource memory_high)
cpus=$(resource cpus)
cpu_weight=$(resource cpu_weight)
tasks=$(resource tasks)
io_weight=$(resource io_weight)
[ -n "$memory" ] && expect_file memory.max "$(bytes "$memory")"
[ -n "$memory" ] || expect_file memory.max max
[ -n "$memory_high" ] && expect_file memory.high "$(bytes "$memory_high")"
[ -n "$cpus" ] && expect_file cpu.max "$(awk -v c="$cpus" 'BEGIN { q = int(c * 100000 + 0.5); if (q < 1000) q = 1000; print q " 100000" }')"
[ -n "$cpus" ] || expect_file cpu.max "max 100000"
[ -n "$cpu_weight" ] && expect_file cpu.weight "$cpu_weight"
[ -n "$tasks" ] && expect_file pids.max "$tasks"
[ -n "$tasks" ] || expect_file pids.max max
if [ -n "$io_weight" ]; then
	if [ -e "$dir/io.weight" ]; then expect_file io.weight "default $io_weight"; else expect_file io.bfq.weight "$io_weight"; fi
fi

# status --json agrees with the files.
check "status memory_max" "$(sed 's/^max$/18446744073709551615/' "$dir/memory.max" 2>/dev/null)" "$(field memory_max)"
check "status tasks_max" "$(sed 's/^max$/18446744073709551615/' "$dir/pids.max" 2>/dev/null)" "$(field tasks_max)"
current=$(field memory_current)
if [ "$current" -gt 0 ] 2>/dev/null && [ "$current" != 18446744073709551615 ]; then
	pass "memory_current $current"
else
	fail "memory_current implausible: $current"
fi
tasks_current=$(field tasks_current)
if [ "$tasks_current" -ge 1 ] 2>/dev/null && [ "$tasks_current" != 18446744073709551615 ]; then
	pass "tasks_current $tasks_current"
else
	fail "tasks_current implausible: $tasks_current"
fi
cpu=$(field cpu_usage_nsec)
if [ "$cpu" -gt 0 ] 2>/dev/null && [ "$cpu" != 18446744073709551615 ]; then
	pass "cpu_usage_nsec $cpu"
else
	fail "cpu_usage_nsec implausible: $cpu"
fi

# The limit files are the host's, not the guest's.
for file in memory.max memory.high cpu.max cpu.weight pids.max io.weight; do
	[ -e "$dir/$file" ] || continue
	owner=$(stat -c %u "$dir/$file")
	mode=$(stat -c %a "$dir/$file")
	if [ "$owner" != "$guest_uid" ] && [ $((0$mode & 2)) = 0 ]; then
		pass "$file owned by uid $owner, mode $mode"
	else
		fail "$file is writable by the guest (owner $owner, mode $mode)"
	fi
done

# The guest's root tries to raise them from inside.
before=$(cat "$dir/memory.max" "$dir/pids.max" "$dir/cpu.max" 2>/dev/null)
out=$("$ctl" shell "$name" -- /bin/sh -c \
	'for f in memory.max pids.max cpu.max; do echo max > /sys/fs/cgroup/$f 2>/dev/null && echo "RAISED $f"; done; true' 2>&1)
after=$(cat "$dir/memory.max" "$dir/pids.max" "$dir/cpu.max" 2>/dev/null)
if [ "$before" = "$after" ] && ! printf '%s' "$out" | grep -q RAISED; then
	pass "the guest cannot raise memory.max, pids.max, cpu.max"
else
	fail "the guest raised a limit: $out"
fi

[ "$failures" = 0 ]
