#!/usr/bin/env bash
# Demo: post-copy live migration of the built-in workload guest over
# loopback. A 1 GiB, 2-vCPU guest with a 256 MiB random, write-heavy working
# set runs in ferry-source for 3 s, then moves to ferry-dest; the destination
# resumes at once and faults the rest in while the source pushes it.
# Prints the migration statistics and shows the guest carrying on.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q --bins
B=target/release
D=$(mktemp -d /tmp/ferry-demo.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

# Port 0: the kernel picks a free port; ferry-dest writes it to a file.
$B/ferry-dest --listen 127.0.0.1:0 --listen-addr-file "$D/dst.addr" \
  --serial "$D/dst.log" --api "$D/dst.sock" \
  --stats-json "$D/stats.json" >"$D/dst.out" 2>"$D/dst.err" &
for _ in $(seq 100); do [ -s "$D/dst.addr" ] && break; sleep 0.05; done
ADDR=$(cat "$D/dst.addr")
echo "== ferry-source: 1 GiB, 2 vCPUs, ws=256M random write=80; migrating to $ADDR after 3 s"
$B/ferry-source --mem 1G --vcpus 2 --guest-args "ws=256M pattern=random write=80 report_ms=100" \
  --serial "$D/src.log" --migrate-to "$ADDR" --after 3s 2>"$D/src.err"
echo
echo "== last guest ticks on the source:"
grep "FERRY TICK" "$D/src.log" | tail -n 2
sleep 1
echo "== first guest ticks on the destination (rounds continue):"
grep "FERRY TICK" "$D/dst.log" | head -n 2
echo "== destination status:"
$B/ferry-ctl --api "$D/dst.sock" status | grep -E '"(run_state|bad|ticks)"'
echo "== what the guest saw across the move (from the two serial logs):"
$B/ferry-ctl guest-report "$D/src.log" "$D/dst.log"
$B/ferry-ctl --api "$D/dst.sock" quit >/dev/null
echo "== stats JSON: $D/stats.json   logs: $D"
