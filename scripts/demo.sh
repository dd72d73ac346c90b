#!/usr/bin/env bash
# Quick start: installs build dependencies, builds rmachines, and boots a demo
# busybox machine you can shell into. Run as root on Debian 12.
#
# The daemon runs on the host's system bus when there is one (the bus policy
# is installed into /etc/dbus-1/system.d), else on a private bus this script
# starts; it prints how to reach it either way.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run the demo as root" >&2; exit 1; }
scripts/install-deps.sh
cargo build --release --quiet
bin=$PWD/target/release
base=/var/lib/rmachines-demo
run=/run/rmachines-demo
mkdir -p "$base/etc" "$base/lib" "$run"
tests/fixtures/make-rootfs.sh busybox "$base/machines/demo"
# Machine roots are root's alone (rmachined refuses a reachable one).
chmod 0700 "$base/machines"
cat > "$base/etc/demo.toml" <<TOML
# A busybox machine: init is busybox's, PID 1 in its own namespaces.
root = "$base/machines/demo"
TOML

if [ -S /run/dbus/system_bus_socket ]; then
	address=unix:path=/run/dbus/system_bus_socket
	install -m 644 dbus/org.rmachines1.conf /etc/dbus-1/system.d/org.rmachines1.conf
	dbus-send --system --type=method_call --dest=org.freedesktop.DBus / org.freedesktop.DBus.ReloadConfig || true
else
	address=unix:path=$run/system_bus_socket
	if ! [ -S "$run/system_bus_socket" ]; then
		sed -e "s|@LISTEN@|$address|" -e "s|@POLICY@|$PWD/dbus/org.rmachines1.conf|" \
			dbus/private-bus.conf.in >"$run/bus.conf"
		dbus-daemon --config-file="$run/bus.conf" --fork --print-pid >"$run/bus.pid"
	fi
fi
export DBUS_SYSTEM_BUS_ADDRESS=$address
if ! "$bin/rmachinectl" list >/dev/null 2>&1; then
	nohup "$bin/rmachined" --config-dir "$base/etc" --state-dir "$run/state" \
		--storage-dir "$base/lib" >"$run/rmachined.log" 2>&1 &
	for _ in $(seq 50); do "$bin/rmachinectl" list >/dev/null 2>&1 && break; sleep 0.1; done
fi
"$bin/rmachinectl" start demo || true
"$bin/rmachinectl" list
cat <<MSG

The demo machine runs. Talk to it with:
  export DBUS_SYSTEM_BUS_ADDRESS=$address
  $bin/rmachinectl shell demo
  $bin/rmachinectl status demo
  $bin/rmachinectl stop demo
rmachined logs to $run/rmachined.log; its console log is $run/state/machines/demo/console.log.
Stop the daemon with: kill \$(pgrep -x rmachined)   (it stops its machines first)
MSG
