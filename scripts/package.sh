#!/usr/bin/env bash
# Builds the .deb and .rpm into target/debian/ and target/generate-rpm/.
# Needs cargo-deb and cargo-generate-rpm (installed from crates.io if absent).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in cargo-deb cargo-generate-rpm; do
	command -v "$tool" >/dev/null || cargo install --locked --quiet "$tool"
done
cargo build --release --quiet
cargo run --release --quiet --example gendocs -- target/assets
cargo deb --no-build --quiet
cargo generate-rpm
ls target/debian/*.deb target/generate-rpm/*.rpm
