#!/usr/bin/env bash
# Runs Ferry's checks: formatting, clippy, then every test on real KVM and
# userfaultfd with the workload guest as the oracle. Tests run one at a time
# (each in its own process under nextest): they boot VMs on a 2-core host.
set -euo pipefail
cd "$(dirname "$0")/.."
# The huge-page tests need pool pages (a reboot empties the pool).
bash scripts/hugepages.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
cargo test --workspace --release --doc
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
cargo nextest run --workspace --release --test-threads 1 --no-fail-fast
