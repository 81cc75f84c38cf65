#!/usr/bin/env bash
# Prepares this machine for ferry's tests and benchmarks. Idempotent; run as root.
# - 2 MiB hugepages: hugetlbfs-backed guest memory (1 GiB test guests need 512 of them).
# - userfaultfd, io_uring and /dev/kvm are kernel features: checked and reported, not installed.
# ferry builds with cargo alone: no -sys crate needs a C toolchain or libclang.
set -euo pipefail

want_huge=${FERRY_HUGEPAGES:-640}
have_huge=$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)
if [ "$have_huge" -lt "$want_huge" ]; then
  if [ -w /proc/sys/vm/nr_hugepages ]; then
    echo "$want_huge" > /proc/sys/vm/nr_hugepages || true
  fi
  echo "setup: 2 MiB hugepages: $(cat /proc/sys/vm/nr_hugepages) (wanted $want_huge)"
fi

for dev in /dev/userfaultfd /dev/kvm; do
  [ -e "$dev" ] || echo "setup: $dev is missing: tests that need it will say SKIPPED"
done
