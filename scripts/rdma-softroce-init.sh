#!/bin/busybox sh
# /init of the soft-RoCE test VM (scripts/rdma-softroce.sh): brings up rdma_rxe on a dummy
# interface, runs ferry's RDMA tests and prints FERRY_RDMA_RESULT=PASS or FAIL, then powers off.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/ferry
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/shm /tmp
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
ts() { echo "[guest $(cut -d' ' -f1 /proc/uptime) s] $*"; }
K=$(uname -r)
for m in crc32_generic udp_tunnel ip6_udp_tunnel ib_core ib_uverbs rdma_rxe dummy; do
  insmod /lib/modules/$K/$m.ko* || echo "insmod $m FAILED"
done
ip link set lo up
ip link add dum0 type dummy
ip addr add 10.0.0.1/24 dev dum0
ip link set dum0 up
rdma link add rxe0 type rxe netdev dum0 || echo "rdma link add FAILED"
DEV=$(ls /sys/class/infiniband 2>/dev/null | head -1)
ts "rdma device: ${DEV:-none}"
if grep -q ferry=shell /proc/cmdline; then exec setsid cttyhack sh; fi

FAIL=
step() { # name, command...
  name=$1; shift
  ts "start: $name"
  "$@"
  rc=$?
  ts "end: $name: rc=$rc"
  [ $rc -eq 0 ] || FAIL="$FAIL $name"
}
[ -n "$DEV" ] || FAIL=" no-device"

export FERRY_KEY=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f
# The transport's RDMA tests: every page once per pass, landing in an alias, refusals, a
# vanished source. A test that skipped would print SKIPPED: that counts as a failure here.
step transport-tests sh -c 'backends rdma --test-threads=1 2>&1 | tee /tmp/t.log; s=$?; ! grep -q SKIPPED /tmp/t.log && grep -q "test result: ok" /tmp/t.log'
# Post-copy between two processes over rxe: anonymous (UFFDIO_COPY from registered buffers) and
# memfd (reads land in the registered alias, UFFDIO_CONTINUE). The toucher exits non-zero on any
# wrong byte or any page read or installed twice.
for backing in anon memfd; do
  for pattern in hot-set seq; do
    step "postcopy-$backing-$pattern" ferry-toucher demo --transport rdma --mem-mib 64 --backing $backing \
      --pattern $pattern --policy bubbling
  done
done
# The source drops the destination's queue pairs five times mid-migration: the destination opens
# them again under the session (landing zones registered again) and asks again for what was in
# flight; every byte still checks, and the toucher fails on a page read twice that is not a resend.
step postcopy-memfd-cut-lanes sh -c 'ferry-toucher demo --transport rdma --mem-mib 64 --backing memfd \
  --pattern hot-set --policy demand --touches 200000 --cut-lanes 5 > /tmp/cut.log; s=$?; cat /tmp/cut.log; [ $s = 0 ] && grep -q "\"recoveries\":[1-9]" /tmp/cut.log'
# 2 MiB hugetlbfs destination: reads land in the registered alias of huge pages.
echo 64 > /proc/sys/vm/nr_hugepages
step postcopy-hugetlb-hot-set ferry-toucher demo --transport rdma --mem-mib 64 --backing hugetlb --pattern hot-set
# A C program embedding libferry (built with the rdma feature) migrates 64 MiB over "rdma:".
for backing in anon memfd; do
  step "c-embed-$backing" c-migrate $backing rdma:$DEV
done
step bench-rdma ferry-bench rdma --device "$DEV" --quick
ts "done"
if [ -z "$FAIL" ]; then echo FERRY_RDMA_RESULT=PASS; else echo "FERRY_RDMA_RESULT=FAIL:$FAIL"; fi
poweroff -f
