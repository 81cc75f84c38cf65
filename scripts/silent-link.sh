#!/usr/bin/env bash
# A silent link under a post-copy migration: source (`ferry-vmm migrate`) and destination
# (`ferry-vmm receive`) in their own network namespaces, joined by a veth pair whose both ends go
# down once the guest runs at the destination (nothing crosses, no FIN, no RST). Then either
#   down-up      the link comes back after DOWN_S seconds (default 4: past the 3 s liveness
#                timeout): both sides recover and the migration completes;
#   stays-down   it never comes back: the destination halts its guest and gives the lease up,
#                the source restarts the guest from its image and the last reverse checkpoint.
# Run as root. Each side's JSON report (and stderr) goes to OUT (default target/silent-link).
#   bash scripts/silent-link.sh down-up|stays-down [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=${1:?down-up or stays-down}
out=${2:-target/silent-link}
down_s=${DOWN_S:-4}
mkdir -p "$out"
for tool in ip ss; do
  command -v $tool >/dev/null || { echo "silent-link: SKIPPED: needs $tool (iproute2)"; exit 0; }
done
[ -e /dev/kvm ] || { echo "silent-link: SKIPPED: no /dev/kvm"; exit 0; }
[ "$(id -u)" = 0 ] || { echo "silent-link: SKIPPED: needs root (network namespaces)"; exit 0; }
vmm=${VMM:-}
if [ -z "$vmm" ]; then
  cargo build --release -q -p ferry-refvmm
  vmm=$PWD/target/release/ferry-vmm
fi
case "$scenario" in
  down-up) window=20000 ;;
  stays-down) window=3000 ;;
  *) echo "usage: $0 down-up|stays-down [OUT]" >&2; exit 2 ;;
esac
. scripts/netns.sh
trap netns_down EXIT
netns_up

port=7472
key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
ip netns exec ferry-dst "$vmm" receive --listen $dst_ip:$port --key-hex "$key" --json \
  > "$out/$scenario.dst.json" 2> "$out/$scenario.dst.err" &
receiver=$!
for _ in $(seq 200); do
  ip netns exec ferry-dst ss -ltn | grep -q ":$port " && break
  sleep 0.05
done
ip netns exec ferry-src "$vmm" migrate --to $dst_ip:$port --key-hex "$key" --mem-mib 512 --data-mib 256 \
  --workload rand-write --prepager demand --seconds 2 --recovery-window-ms $window --json \
  > "$out/$scenario.src.json" 2> "$out/$scenario.src.err" &
source=$!
for _ in $(seq 600); do
  grep -q "the guest runs here" "$out/$scenario.dst.err" && break
  sleep 0.02
done
grep -q "the guest runs here" "$out/$scenario.dst.err" || { echo "silent-link: the guest never resumed"; exit 1; }
sleep 0.3
link_down
echo "silent-link: link down at $(date +%T.%N)"
if [ "$scenario" = down-up ]; then
  sleep "$down_s"
  link_up
  echo "silent-link: link up at $(date +%T.%N)"
fi
src_status=0; dst_status=0
wait $source || src_status=$?
wait $receiver || dst_status=$?
echo "silent-link: $scenario: source exit $src_status, destination exit $dst_status"
echo "source: $(tail -1 "$out/$scenario.src.json" 2>/dev/null | head -c 400)"
echo "destination: $(tail -1 "$out/$scenario.dst.json" 2>/dev/null | head -c 400)"
[ "$src_status" = 0 ]
