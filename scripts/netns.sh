# Two "hosts" on one machine, for scripts to source: network namespaces ferry-src (10.77.0.1) and
# ferry-dst (10.77.0.2) joined by a veth pair (ferry-a, ferry-b). Needs root and iproute2.
#   netns_up; shape 1gbit; link_down; link_up; netns_down
src_ip=10.77.0.1
dst_ip=10.77.0.2

netns_down() {
  ip netns del ferry-src 2>/dev/null || true
  ip netns del ferry-dst 2>/dev/null || true
  # A pair left in the root namespace by a run that died between creating and moving it.
  ip link del ferry-a 2>/dev/null || true
}

netns_up() {
  netns_down
  ip netns add ferry-src
  ip netns add ferry-dst
  ip link add ferry-a type veth peer name ferry-b
  ip link set ferry-a netns ferry-src
  ip link set ferry-b netns ferry-dst
  ip -n ferry-src addr add $src_ip/24 dev ferry-a
  ip -n ferry-dst addr add $dst_ip/24 dev ferry-b
  for ns in ferry-src ferry-dst; do ip -n $ns link set lo up; done
  ip -n ferry-src link set ferry-a up
  ip -n ferry-dst link set ferry-b up
}

# tbf on each end's egress: the bucket holds ~2 ms at the rate (at least 64 KiB), the queue 20 ms.
shape() { # rate, or none
  for pair in ferry-src:ferry-a ferry-dst:ferry-b; do
    local ns=${pair%%:*} dev=${pair##*:}
    tc -n "$ns" qdisc del dev "$dev" root 2>/dev/null || true
    if [ "$1" != none ]; then
      local bits
      bits=$(python3 -c "import sys; s=sys.argv[1].lower(); m={'kbit':1e3,'mbit':1e6,'gbit':1e9}; print(int(next(float(s[:-len(k)])*v for k,v in m.items() if s.endswith(k))))" "$1")
      local burst=$(( bits / 8 / 500 > 65536 ? bits / 8 / 500 : 65536 ))
      tc -n "$ns" qdisc add dev "$dev" root tbf rate "$1" burst "$burst" latency 20ms
    fi
  done
}

# A silent link: both ends down, so nothing crosses and nobody hears a FIN or an RST.
link_down() {
  ip -n ferry-src link set ferry-a down
  ip -n ferry-dst link set ferry-b down
}

link_up() {
  ip -n ferry-src link set ferry-a up
  ip -n ferry-dst link set ferry-b up
}
