#!/usr/bin/env bash
# Makes sure the huge page pool has at least FERRY_HUGE_PAGES (default 1024,
# i.e. 2 GiB) 2 MiB pages, for --huge-pages and its tests
# (tests/huge_pages.rs). Needs root to raise the pool; fails if the kernel
# gives fewer pages than asked.
set -euo pipefail
want=${FERRY_HUGE_PAGES:-1024}
have=$(cat /proc/sys/vm/nr_hugepages)
if [ "$have" -lt "$want" ]; then
  echo "reserving $want huge pages of 2 MiB (had $have)"
  echo "$want" > /proc/sys/vm/nr_hugepages
  got=$(cat /proc/sys/vm/nr_hugepages)
  if [ "$got" -lt "$want" ]; then
    echo "error: asked the kernel for $want huge pages and got $got" >&2
    exit 1
  fi
fi
