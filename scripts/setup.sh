#!/usr/bin/env bash
# Installs the system packages Ferry's build and tests need (Debian/Ubuntu,
# run as root), reserves 2 MiB huge pages, then builds everything in
# release mode.
#   libclang-dev      bindgen in userfaultfd-sys needs libclang
#   build-essential   gcc, as and ld build the workload guest
#   qemu-system-x86   QEMU peer runs of the same guest ELF
#   iproute2          network namespaces, bridges and tbf for two-host tests
#   strace            the lazy-restore test checks that no TCP socket is made
#   util-linux        taskset pins a side to one CPU (ferry-bench --pin, tests)
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(libclang-dev build-essential qemu-system-x86 iproute2 strace util-linux)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
for dev in /dev/kvm /dev/userfaultfd; do
  [ -e "$dev" ] || { echo "error: $dev is missing; Ferry needs KVM and userfaultfd" >&2; exit 1; }
done
bash scripts/hugepages.sh
cargo build --release --workspace --all-targets
