#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ (docs/fuzzing.md) for a fixed time each,
# on the corpus kept in fuzz/corpus/<target>, then the nft --check property
# test of the generated firewall ruleset. Fails on the first crash or
# invariant violation (its input is left in fuzz/artifacts/<target>/).
#
#   scripts/fuzz.sh --short     # 45 s per target (CI)
#   scripts/fuzz.sh 3600        # one hour per target (the long run)
#   scripts/fuzz.sh 600 notify  # some targets only
#
# New inputs found go to a scratch corpus, not into the repository; to
# keep some, `cargo +nightly fuzz cmin TARGET` (see docs/fuzzing.md).
# Installs what it needs (the nightly toolchain, cargo-fuzz, nftables).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=600
case "${1:-}" in
    --short) seconds=45; shift ;;
    ''|-*) ;;
    *) seconds=$1; shift ;;
esac
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(definition dbus_args control_protocol notify guest_accounts guest_file)
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi
command -v nft >/dev/null || apt-get install -y nftables

dict_of() {
    case $1 in
        definition) echo fuzz/dict/toml.dict ;;
        control_protocol | notify) echo fuzz/dict/protocol.dict ;;
        guest_accounts | guest_file) echo fuzz/dict/accounts.dict ;;
    esac
}

log_dir=${FUZZ_LOG_DIR:-fuzz/target/logs}
mkdir -p "$log_dir"
(cd fuzz && nice cargo +nightly fuzz build -O)
for target in "${targets[@]}"; do
    scratch=fuzz/target/corpus/$target
    mkdir -p "$scratch"
    dict=$(dict_of "$target")
    args=(-max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=1024 -timeout=10)
    [ -n "$dict" ] && args+=(-dict="../$dict")
    echo "== $target: ${seconds}s"
    # The scratch corpus first: new inputs go there; the kept one is read.
    if ! (cd fuzz && nice cargo +nightly fuzz run -O "$target" \
        "../$scratch" "corpus/$target" -- "${args[@]}") \
        >"$log_dir/$target.log" 2>&1; then
        tail -n 40 "$log_dir/$target.log"
        echo "fuzz.sh: $target failed: see $log_dir/$target.log and fuzz/artifacts/$target/" >&2
        exit 1
    fi
    grep -E '^#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss' "$log_dir/$target.log" || true
done

echo "== nft --check property test of the firewall ruleset"
# About 0.3 s a case: as many cases as seconds per target.
RMACHINES_NFT_CASES=$seconds nice cargo test --lib \
    network::firewall::tests::nft_accepts_every_generated_ruleset
