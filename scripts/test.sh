#!/usr/bin/env bash
# The whole test suite. Needs root: most tests boot real machines.
# Guest trees are built on first use and cached in /var/tmp/rmachines-fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
	echo "the tests boot real machines in namespaces: run them as root" >&2
	exit 1
fi
scripts/install-deps.sh
mkdir -p /var/tmp/rmachines-fixtures
tests/fixtures/make-rootfs.sh busybox /var/tmp/rmachines-fixtures/busybox
tests/fixtures/make-rootfs.sh debian /var/tmp/rmachines-fixtures/debian
tests/fixtures/make-rootfs.sh debian-polkit /var/tmp/rmachines-fixtures/debian-polkit
cargo test --all-targets "$@"
# Again, the suites that boot machines, in a mount namespace whose `/` is
# shared, as on every systemd host (this host's `/` is private).
unshare --mount --propagation shared -- \
	cargo test --test runtime_boot --test daemon_machines --test network "$@"
