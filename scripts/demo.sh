#!/usr/bin/env bash
# Demo: run the built-in guest, pause it, snapshot it, restore it in a new
# process, and show that the guest carries on (ticks continue, no BAD).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q --bins
B=target/release
D=$(mktemp -d /tmp/ferry-demo.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
echo "== booting a 1 GiB, 2-vCPU guest with a 256 MiB working set"
$B/ferry-source --mem 1G --vcpus 2 --guest-args "ws=256M pattern=random write=80 report_ms=200" \
  --serial "$D/src.log" --api "$D/src.sock" 2>"$D/src.err" &
until grep -q "FERRY TICK 1" "$D/src.log" 2>/dev/null; do sleep 0.2; done
sleep 1
tail -n 3 "$D/src.log"
echo "== pause + snapshot"
$B/ferry-ctl --api "$D/src.sock" pause
$B/ferry-ctl --api "$D/src.sock" snapshot "$D/vm.snap"
$B/ferry-ctl --api "$D/src.sock" quit >/dev/null
echo "== restore in a new process"
$B/ferry-dest --restore "$D/vm.snap" --serial "$D/dst.log" --api "$D/dst.sock" 2>"$D/dst.err" &
sleep 2
tail -n 3 "$D/dst.log"
$B/ferry-ctl --api "$D/dst.sock" status
$B/ferry-ctl --api "$D/dst.sock" quit >/dev/null
echo "== logs in $D"
