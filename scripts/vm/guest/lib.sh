# Sourced by every check. Evidence is what a check prints: show the command
# and what it said, then decide.
set -euo pipefail

# Shows a command and its output; returns its status.
show() {
	echo "\$ $*"
	"$@" 2>&1
}

fail() {
	echo "FAIL: $*"
	exit 1
}

# The STATE column of `rmachinectl list` for machine $1.
state_of() {
	rmachinectl list | awk -v m="$1" '$1 == m { print $2 }'
}

# The LEADER column of `rmachinectl list` for machine $1.
leader_of() {
	rmachinectl list | awk -v m="$1" '$1 == m { print $3 }'
}

# Waits up to $3 seconds for machine $1 to be in state $2.
wait_state() {
	local deadline=$(($(date +%s) + $3))
	command -v rmachinectl >/dev/null || fail "rmachinectl is not installed"
	while [ "$(state_of "$1")" != "$2" ]; do
		if [ "$(state_of "$1")" = failed ] && [ "$2" != failed ]; then
			show rmachinectl status "$1" || true
			fail "$1 failed while waiting for it to be $2"
		fi
		if systemctl is-failed --quiet rmachined.service; then
			show systemctl status rmachined.service || true
			fail "rmachined.service failed while waiting for $1 to be $2"
		fi
		if [ "$(date +%s)" -ge "$deadline" ]; then
			show rmachinectl status "$1" || true
			fail "$1 is not $2 after $3 s (it is $(state_of "$1"))"
		fi
		sleep 1
	done
	echo "$1 is $2 (leader $(leader_of "$1"))"
}

# Mounts in the mount namespace of process $1 at or below the machine roots
# or rmachines' runtime directory, one per line; nothing when clean.
machine_mounts() {
	findmnt --task "$1" -rn -o TARGET | grep -E '^/var/lib/machines(/|$)|^/run/rmachines/machines(/|$)' || true
}

# In the host's mount namespace (PID 1's) and in rmachined's own (the unit's
# sandboxing gives it one, a slave of the host's).
assert_no_machine_mounts() {
	local left daemon
	left=$(machine_mounts 1)
	echo "\$ findmnt --task 1 (targets under /var/lib/machines, /run/rmachines/machines) after $1:"
	echo "${left:-(none)}"
	[ -z "$left" ] || fail "mounts of machines are visible in the host's mount namespace after $1"
	daemon=$(systemctl show -P MainPID rmachined.service)
	if [ "$daemon" -gt 0 ]; then
		left=$(machine_mounts "$daemon")
		echo "\$ findmnt --task $daemon (rmachined) ... after $1:"
		echo "${left:-(none)}"
		[ -z "$left" ] || fail "mounts of machines are left in rmachined's mount namespace after $1"
	fi
}
