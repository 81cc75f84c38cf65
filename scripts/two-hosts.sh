#!/usr/bin/env bash
# Post-copy between two "hosts" on one machine (Hines & Gopalan's experiment table): the source
# VMM in network namespace ferry-src pinned to core 0, the destination in ferry-dst pinned to
# core 1, joined by a veth pair that tc's tbf shapes to each rate in RATES (both directions);
# "none" leaves it unshaped. For every workload and pre-pager: pages moved, total time,
# downtime, network faults, faults pre-paging saved against demand, the workload's rate during
# post-copy against its steady rate, the time it lost, and the link's own bound for the data
# moved. Run as root (namespaces, tc).
#   bash scripts/two-hosts.sh                      # 1gbit 10gbit none x rand-write seq-write hot-set x demand push bubbling
#   RATES="1gbit" WORKLOADS=rand-write POLICIES=bubbling MEM=1G bash scripts/two-hosts.sh
# Raw JSON goes to target/figures/two-hosts/; the table is printed (markdown).
set -euo pipefail
cd "$(dirname "$0")/.."
rates=${RATES:-"1gbit 10gbit none"}
workloads=${WORKLOADS:-"rand-write seq-write hot-set"}
policies=${POLICIES:-"demand push bubbling"}
mem=${MEM:-2G}
out=target/figures/two-hosts
mkdir -p "$out"
for tool in ip tc taskset python3; do
  command -v $tool >/dev/null || { echo "two-hosts: needs $tool (iproute2, util-linux, python3)"; exit 1; }
done
[ -e /dev/kvm ] || { echo "two-hosts: SKIPPED: no /dev/kvm"; exit 0; }
cargo build --release -q -p ferry-refvmm
vmm=$PWD/target/release/ferry-vmm
. scripts/netns.sh
trap netns_down EXIT
netns_up

run() { # rate workload policy
  local tag=$1-$2-$3 key port=7471
  key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  ip netns exec ferry-dst taskset -c 1 "$vmm" receive --listen $dst_ip:$port --key-hex "$key" --json \
    > "$out/$tag.dst.json" 2> "$out/$tag.dst.err" &
  local receiver=$!
  for _ in $(seq 100); do
    ip netns exec ferry-dst ss -ltn | grep -q ":$port " && break
    sleep 0.05
  done
  ip netns exec ferry-src taskset -c 0 "$vmm" migrate --to $dst_ip:$port --key-hex "$key" --mem "$mem" \
    --workload "$2" --prepager "$3" --json > "$out/$tag.src.json" 2> "$out/$tag.src.err"
  wait $receiver
}

for rate in $rates; do
  shape "$rate"
  for workload in $workloads; do
    for policy in $policies; do
      run "$rate" "$workload" "$policy"
    done
  done
done

python3 - "$out" "$mem" "$rates" "$workloads" "$policies" <<'EOF'
import json, sys
out, mem, rates, workloads, policies = sys.argv[1], sys.argv[2], *[a.split() for a in sys.argv[3:]]
def bits(rate):
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    return next((float(rate[:-len(u)]) * v for u, v in units.items() if rate.endswith(u)), None)
print(f"## Post-copy between two namespaces, source on core 0, destination on core 1, {mem} guest")
print()
print("| link | workload | pre-pager | pages moved | data MiB | total s | link bound s | downtime ms | network faults | saved vs demand | rate during / steady | work lost ms | wrong pages |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for rate in rates:
    for w in workloads:
        demand = None
        for p in policies:
            tag = f"{out}/{rate}-{w}-{p}"
            s, d = json.load(open(tag + ".src.json")), json.load(open(tag + ".dst.json"))
            moved = d["urgent_pages"] + d["bulk_pages"]
            data = moved - d["zero_pages"]
            data_mib = data * 4096 / 2**20
            bound = f"{data * 4096 * 8 / bits(rate):.2f}" if bits(rate) else "-"
            if p == "demand":
                demand = d["network_faults"]
            saved = "-" if demand is None or p == "demand" else str(demand - d["network_faults"])
            print(f"| {rate} | {w} | {p} | {moved} | {data_mib:.0f} | {d['postcopy_ms'] / 1e3:.2f} | {bound} | "
                  f"{s['source_downtime_ms']:.2f} | {d['network_faults']} | {saved} | "
                  f"{100 * d['rate_during_over_baseline']:.1f}% | {d['work_lost_postcopy_ms']:.0f} | {d['guest_mismatches']} |")
print()
print(f"command: RATES=\"{' '.join(rates)}\" WORKLOADS=\"{' '.join(workloads)}\" POLICIES=\"{' '.join(policies)}\" MEM={mem} bash scripts/two-hosts.sh")
EOF
