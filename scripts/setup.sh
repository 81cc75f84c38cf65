#!/usr/bin/env bash
# Prepares this machine for ferry's tests and benchmarks. Idempotent; run as root.
# - 2 MiB hugepages: hugetlbfs-backed guest memory (1 GiB test guests need 512 of them).
# - userfaultfd, io_uring and /dev/kvm are kernel features: checked and reported, not installed.
# - with --rdma: what the `rdma` feature builds with (rdma-core headers, libclang for rdma-sys's
#   bindgen) and what scripts/rdma-softroce.sh boots its VM with (qemu-system-x86, cpio, iproute2);
#   also what every other feature needs (the whole-workspace build CI runs): protoc and the protobuf
#   well-known types for the `etcd` feature's gRPC client, etcd-server for its tests, iproute2 for
#   scripts/silent-link.sh.
# Default features need no -sys crate with C headers: ferry's Rust builds with cargo alone.
set -euo pipefail

# The C ABI tests build examples/c-embed with the system C compiler and pkg-config.
missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if [ "${1:-}" = --rdma ]; then
  for pkg in libibverbs-dev librdmacm-dev libclang-dev qemu-system-x86 cpio iproute2 \
    protobuf-compiler libprotobuf-dev etcd-server; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

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
