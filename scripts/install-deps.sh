#!/usr/bin/env bash
# Installs the Debian packages rmachines' build and tests need (Debian 12).
set -euo pipefail
packages=(busybox-static mmdebstrap dbus iproute2 nftables systemd-container uidmap util-linux procps rpm umoci skopeo xz-utils zstd libzstd-dev liblzma-dev pkg-config)
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
