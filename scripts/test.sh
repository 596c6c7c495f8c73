#!/usr/bin/env bash
# Runs Ferry's checks: formatting, clippy, then every test on real KVM and
# userfaultfd with the workload guest as the oracle.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
cargo test --workspace --release -- --test-threads=1
