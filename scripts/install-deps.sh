#!/usr/bin/env bash
# Installs the Debian packages rmachines' build and tests need (Debian 12).
set -euo pipefail
# qemu-system-x86, qemu-utils, e2fsprogs: the VM test bed (scripts/vm/run.sh).
# openssh-*, ansible-core: the fleet tests (tests/fleet.rs).
# umoci, skopeo, xz-utils, zstd, lib*-dev: images (tests/images.rs).
# libseccomp-dev, pkg-config: the seccomp filter (libseccomp crate).
packages=(busybox-static libseccomp-dev pkg-config mmdebstrap dbus iproute2 nftables systemd-container uidmap util-linux procps rpm
	qemu-system-x86 qemu-utils e2fsprogs
	openssh-client openssh-server ansible-core
	umoci skopeo xz-utils zstd libzstd-dev liblzma-dev)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || {
	echo "rmachines needs a Rust toolchain (1.85 or newer, e.g. from rustup); cargo was not found" >&2
	exit 1
}
