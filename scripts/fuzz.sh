#!/usr/bin/env bash
# Fuzzes every decoder a peer or a file reaches (cargo-fuzz, libFuzzer, the nightly toolchain):
#   wire           frame headers, handshake/control messages and layouts, read requests and replies
#   session        post-copy handoffs, pre-copy rounds and back-and-forth offers from a stream of frames
#   snapshot       snapshot images (whole files, and patches to a sound one) and working-set files
#   uffd_mappings  the Firecracker UFFD handshake's JSON mappings and the layout made of them
#   checkpoint     the checkpoint stream (reverse checkpoints, fault-tolerant epochs)
# Each target runs SECONDS (default 60) on the corpus kept in fuzz/corpus/TARGET (new finds are
# added there); a crash stops the script with the input saved under fuzz/artifacts/TARGET.
#   bash scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked -q
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
cargo +nightly fuzz build -O
total=0
for target in wire session snapshot uffd_mappings checkpoint; do
  mkdir -p "corpus/$target"
  log=$(mktemp)
  # Inputs up to 4 KiB: every decoder's interesting cases fit, and the kept corpus stays small.
  cargo +nightly fuzz run -O "$target" "corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
    -max_len=4096 -print_final_stats=1 > "$log" 2>&1 || { tail -30 "$log"; echo "fuzz: $target FAILED"; exit 1; }
  runs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log")
  total=$((total + ${runs:-0}))
  echo "fuzz: $target: ${runs:-?} executions in ${seconds} s, no crash"
  rm -f "$log"
done
echo "fuzz: $total executions in all, no crash"
