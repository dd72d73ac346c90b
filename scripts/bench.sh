#!/usr/bin/env bash
# rmachines side by side with systemd-nspawn: builds in release mode, runs
# every case, prints the table and writes docs/benchmarks.md and
# docs/density.svg. `--quick` (CI): N <= 10 and few repetitions.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "the benchmarks boot real machines: run them as root" >&2; exit 1; }
scripts/install-deps.sh
mkdir -p /var/tmp/rmachines-fixtures
tests/fixtures/make-rootfs.sh busybox /var/tmp/rmachines-fixtures/busybox
tests/fixtures/make-rootfs.sh debian /var/tmp/rmachines-fixtures/debian
# Room for many machines: every machine's root is its own uid, and each
# gets inotify instances, keys and a veth on the bridge.
sysctl -q -w fs.inotify.max_user_instances=8192 kernel.keys.maxkeys=20000 \
	kernel.pid_max=4194304 net.ipv4.neigh.default.gc_thresh3=8192 \
	net.ipv6.neigh.default.gc_thresh3=8192 >/dev/null || true
cargo bench --quiet --bench compare -- "$@"
