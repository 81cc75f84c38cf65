#!/usr/bin/env bash
# A single-node etcd for ferry's tests (Debian's etcd-server; scripts/setup.sh installs it), in the
# foreground: data in DIR, clients on 127.0.0.1:CLIENT_PORT, peers on 127.0.0.1:PEER_PORT.
#   bash scripts/etcd.sh DIR CLIENT_PORT PEER_PORT
set -euo pipefail
dir=${1:?data dir} client=${2:?client port} peer=${3:?peer port}
command -v etcd >/dev/null || { echo "etcd.sh: SKIPPED: no etcd binary (apt install etcd-server)"; exit 3; }
exec etcd --name ferry-test --data-dir "$dir" \
  --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
  --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
  --initial-cluster "ferry-test=http://127.0.0.1:$peer" --initial-cluster-state new \
  --log-level error
