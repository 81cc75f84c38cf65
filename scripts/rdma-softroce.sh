#!/usr/bin/env bash
# Runs ferry's RDMA tests on a real verbs device where there is no RDMA hardware: soft-RoCE
# (rdma_rxe) inside a stock Debian kernel booted under QEMU with software emulation (TCG), from an
# initramfs this script builds. The userspace code under test is the code that drives a ConnectX
# NIC; only the device is software.
#
#   scripts/rdma-softroce.sh            build, boot, run every RDMA test, fail unless all pass
#   FERRY_RDMA_SHELL=1 scripts/...      boot to a shell on the serial console instead
#
# Installs what it needs (qemu-system-x86, cpio, rdma-core headers, libclang for rdma-sys's
# bindgen); downloads the kernel and rdma-core packages with `apt-get download` (nothing is
# installed from them on the host) into target/rdma-vm/debs, kept between runs.
# In the guest: the transport's RDMA tests, a two-process post-copy of the toucher workload over
# rxe (anonymous, memfd and hugetlbfs destinations, every byte verified, no page read twice), the C example
# migrating through libferry's "rdma:" addresses, and the RDMA microbenchmark. The guest prints FERRY_RDMA_RESULT=PASS or FAIL.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
W=${FERRY_RDMA_WORK:-$ROOT/target/rdma-vm}
t0=$(date +%s)
phase() { echo "rdma-softroce: [+$(( $(date +%s) - t0 )) s] $*"; }

# --- host packages -------------------------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v cpio >/dev/null || need+=(cpio)
command -v rdma >/dev/null || need+=(iproute2)
for pkg in libibverbs-dev librdmacm-dev libclang-dev pkg-config; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  phase "installing ${need[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

# --- build the binaries under test ---------------------------------------------------------
# With every feature of the whole workspace and the tests' dev-dependencies, as .ci/run's
# `cargo test` builds them, so after those this builds next to nothing (without --tests the
# dependencies' features differ and most of the graph is built again).
phase "building (every feature)"
cargo build --locked -q --workspace --all-features --bins --lib --tests
test_exe=$(cargo test --locked -q --workspace --all-features --no-run --message-format=json \
  | grep '"name":"backends"' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
[ -x "$test_exe" ] || { echo "rdma-softroce: no test executable built"; exit 1; }
# The C example, against libferry built with the rdma transport.
FERRY_LIB_DIR=target/debug bash scripts/install-c.sh "$W/c-prefix" >/dev/null
cc -std=c11 -O2 -Wall -Wextra -Werror -I"$W/c-prefix/include" examples/c-embed/migrate.c -o "$W/c-migrate" \
  -L"$W/c-prefix/lib" -lferry -lpthread
BINS=("$test_exe" target/debug/ferry-toucher target/debug/ferry-bench "$W/c-migrate")

# --- kernel and rdma-core packages ---------------------------------------------------------
mkdir -p "$W/debs"
K=${FERRY_RDMA_KERNEL:-}
if [ -z "$K" ]; then
  K=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\([0-9][^ ]*-amd64\)$/\1/p' | head -1)
  K=${K:-6.1.0-56-amd64}
fi
pkgs=(linux-image-$K busybox-static libibverbs1 ibverbs-providers libnl-3-200 libnl-route-3-200)
missing=()
for p in "${pkgs[@]}"; do ls "$W/debs/${p}_"*.deb >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  phase "downloading ${missing[*]}"
  (cd "$W/debs" && apt-get download -q "${missing[@]}" 2>&1 | grep -v unsandboxed | tail -1) || true
  [ -n "$(ls "$W"/debs/linux-image-"$K"_*.deb 2>/dev/null)" ] || { apt-get update -q >/dev/null; (cd "$W/debs" && apt-get download -q "${missing[@]}"); }
fi
rm -rf "$W/kx" "$W/stage" "$W/rootfs"
mkdir -p "$W/kx" "$W/stage"
dpkg-deb -x "$W"/debs/linux-image-"$K"_*.deb "$W/kx"
for f in "$W"/debs/*.deb; do case $f in *linux-image*) ;; *) dpkg-deb -x "$f" "$W/stage" ;; esac; done
phase "packages ready (kernel $K)"

# --- initramfs -----------------------------------------------------------------------------
R=$W/rootfs
LIB=$R/usr/lib/x86_64-linux-gnu
mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,etc,lib64,usr/bin,root,ferry,lib/modules/$K} "$LIB/libibverbs" "$R/etc/libibverbs.d"
cp "$W/stage/bin/busybox" "$R/bin/busybox"
MK=$W/kx/lib/modules/$K/kernel
for m in crypto/crc32_generic net/ipv4/udp_tunnel net/ipv6/ip6_udp_tunnel drivers/infiniband/core/ib_core \
         drivers/infiniband/core/ib_uverbs drivers/infiniband/sw/rxe/rdma_rxe drivers/net/dummy; do
  f=$MK/$m.ko
  [ -f "$f" ] || f=$(ls "$MK/$m.ko".* 2>/dev/null | head -1)
  cp "$f" "$R/lib/modules/$K/"
done
cp "$W/stage/etc/libibverbs.d/rxe.driver" "$R/etc/libibverbs.d/"
cp -a "$W/stage/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so" "$LIB/libibverbs/"
cp /usr/bin/rdma "$R/usr/bin/"
for b in "${BINS[@]}"; do cp "$b" "$R/ferry/$(basename "$b" | sed 's/-[0-9a-f]\{16\}$//')"; done
# Shared libraries: the binaries' and the provider's closure (the provider's from the packages).
{
  for b in "${BINS[@]}" /usr/bin/rdma; do LD_LIBRARY_PATH=$W/c-prefix/lib ldd "$b"; done
  LD_LIBRARY_PATH=$W/stage/usr/lib/x86_64-linux-gnu ldd "$LIB/libibverbs/librxe-rdmav34.so"
} | awk '/=> \//{print $3} /^\t\/lib64/{print $1}' | sort -u | while read -r lib; do
  cp -L "$lib" "$LIB/$(basename "$lib")"
done
mv "$LIB/ld-linux-x86-64.so.2" "$R/lib64/"
ln -s ../usr/lib/x86_64-linux-gnu "$R/lib/x86_64-linux-gnu"
echo "root:x:0:0:root:/root:/bin/sh" > "$R/etc/passwd"
echo "127.0.0.1 localhost" > "$R/etc/hosts"
cp scripts/rdma-softroce-init.sh "$R/init"
chmod +x "$R/init"
(cd "$R" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$W/initramfs.cpio.gz"
phase "initramfs built ($(du -h "$W/initramfs.cpio.gz" | cut -f1))"

# --- boot ----------------------------------------------------------------------------------
args="console=ttyS0 quiet panic=-1"
[ -n "${FERRY_RDMA_SHELL:-}" ] && args="$args ferry=shell"
set +e
timeout "${FERRY_RDMA_TIMEOUT:-900}" qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 2048 -nographic -no-reboot \
  -nic none -kernel "$W"/kx/boot/vmlinuz-"$K" -initrd "$W/initramfs.cpio.gz" -append "$args" </dev/null \
  | tee "$W/vm.log" | grep -v 'libibverbs: Warning'
set -e
phase "vm exited"
grep -q 'FERRY_RDMA_RESULT=PASS' "$W/vm.log" || { echo "rdma-softroce: FAILED (log: $W/vm.log)"; exit 1; }
echo "rdma-softroce: PASSED in $(( $(date +%s) - t0 )) s"
