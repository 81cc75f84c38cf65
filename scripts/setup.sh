#!/usr/bin/env bash
# Installs what ferry's tests and benchmarks need on a fresh Debian machine. Idempotent; run as root.
# - libclang-dev: the userfaultfd crate's -sys part runs bindgen at build time.
# - 2 MiB hugepages: hugetlbfs-backed guest memory in the tests.
set -euo pipefail

need_apt=()
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install: ${need_apt[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${need_apt[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

want_huge=${FERRY_HUGEPAGES:-256}
have_huge=$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)
if [ "$have_huge" -lt "$want_huge" ] && [ -w /proc/sys/vm/nr_hugepages ]; then
  echo "$want_huge" > /proc/sys/vm/nr_hugepages || true
  echo "setup: 2 MiB hugepages: $(cat /proc/sys/vm/nr_hugepages) (wanted $want_huge)"
fi
