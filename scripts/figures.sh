#!/usr/bin/env bash
# Regenerates the README's figures from the project's own commands and prints each table with the
# command that made it. Ranges are min-max over RUNS runs (default 3): these machines are noisy.
#   bash scripts/figures.sh [kvm|modes|failover|ft|ft-verify|trips|task|restore|restore-bench|two-hosts|toucher|transport|all]   (default: all)
# Needs /dev/kvm for kvm and restore. Raw JSON goes to target/figures/.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
runs=${RUNS:-3}
out=target/figures
mkdir -p "$out"
cargo build --release -q -p ferry-refvmm -p ferry-benches
vmm=target/release/ferry-vmm
bench=target/release/ferry-bench

# min-max of a JSON field over the lines of a file, with a unit scale.
range() { # file field scale digits
  python3 - "$@" <<'EOF'
import json, sys
path, field, scale, digits = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
vals = [json.loads(l)[field] * scale for l in open(path) if l.strip()]
lo, hi = min(vals), max(vals)
f = lambda v: f"{v:.{digits}f}"
print(f(lo) if f(lo) == f(hi) else f"{f(lo)}-{f(hi)}")
EOF
}

kvm() {
  echo "## KVM post-copy, 2 GiB guest, random writes over 1 GiB, tcp loopback ($runs runs each)"
  echo
  echo "| backing | prepager | total s | downtime ms | rate during / steady | during / cold VM | steady writes/s | cold writes/s | work lost ms | network faults | pages sent twice |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for backing in anon memfd; do
    for prepager in bubbling push; do
      f=$out/kvm-$backing-$prepager.jsonl
      : > "$f"
      for _ in $(seq "$runs"); do
        $vmm demo --mem 2G --workload rand-write --mode postcopy --prepager $prepager --backing $backing --json \
          | python3 -c 'import json,sys; r=json.load(sys.stdin); [r.pop(k) for k in ("rate_series_50ms","cold_series_50ms")]; print(json.dumps(r))' >> "$f"
      done
      echo "| $backing | $prepager | $(range "$f" postcopy_ms 0.001 2) | $(range "$f" downtime_ms 1 2) | $(range "$f" rate_during_over_baseline 100 1)% | $(range "$f" rate_during_over_cold 100 0)% | $(range "$f" baseline_rate 0.001 0)k | $(range "$f" cold_rate 0.001 0)k | $(range "$f" work_lost_ms 1 0) | $(range "$f" network_faults 1 0) | $(range "$f" pages_sent_twice 1 0) |"
    done
  done
  echo
  echo "command: $vmm demo --mem 2G --workload rand-write --mode postcopy --prepager P --backing B --json"
  echo
}

modes() {
  echo "## KVM, other modes and transports ($runs runs each)"
  echo
  echo "| run | total s | downtime ms | rounds | notes |"
  echo "| --- | --- | --- | --- | --- |"
  local f=$out/local.jsonl
  : > "$f"
  for _ in $(seq "$runs"); do
    $vmm demo --mem 1G --workload rand-write --mode postcopy --transport local --backing memfd --json \
      | python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({k: r[k] for k in ("postcopy_ms","downtime_ms","guest_mismatches")}))' >> "$f"
  done
  echo "| post-copy, --transport local, 1 GiB memfd | $(range "$f" postcopy_ms 0.001 2) | $(range "$f" downtime_ms 1 2) | | $(range "$f" guest_mismatches 1 0) wrong pages |"
  f=$out/precopy.jsonl
  : > "$f"
  for _ in $(seq "$runs"); do
    $vmm demo --mem 2G --workload seq-write --rate-mib 256 --mode precopy --json \
      | python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"total_ms": r["total_ms"], "downtime_ms": r["downtime_ms"], "rounds": r["rounds"], "rate_after": r["rate_after"], "baseline_rate": r["baseline_rate"], "guest_mismatches": r["guest_mismatches"]}))' >> "$f"
  done
  echo "| pre-copy, seq-write at 256 MiB/s, 2 GiB, 50 ms target | $(range "$f" total_ms 0.001 2) | $(range "$f" downtime_ms 1 1) | $(range "$f" rounds 1 0) | writer $(range "$f" rate_after 0.001 1)k pages/s after vs $(range "$f" baseline_rate 0.001 1)k before |"
  f=$out/hybrid.jsonl
  : > "$f"
  for _ in $(seq "$runs"); do
    $vmm demo --mem 2G --workload rand-write --mode hybrid --max-rounds 3 --json \
      | python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"total_ms": r["total_ms"], "downtime_ms": r["downtime_ms"], "rounds": r["precopy_rounds"], "postcopy_pages": r["postcopy_pages"], "guest_mismatches": r["guest_mismatches"]}))' >> "$f"
  done
  echo "| hybrid, rand-write, 2 GiB, 3 rounds | $(range "$f" total_ms 0.001 2) | $(range "$f" downtime_ms 1 1) | $(range "$f" rounds 1 0) | $(range "$f" postcopy_pages 1 0) pages left for post-copy |"
  # Encryption's price where rounds race the guest's writes: the same hybrid run in plaintext.
  f=$out/hybrid-plain.jsonl
  : > "$f"
  for _ in $(seq "$runs"); do
    $vmm demo --mem 2G --workload rand-write --mode hybrid --max-rounds 3 --encryption off --json \
      | python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"total_ms": r["total_ms"], "downtime_ms": r["downtime_ms"], "rounds": r["precopy_rounds"], "postcopy_pages": r["postcopy_pages"], "guest_mismatches": r["guest_mismatches"]}))' >> "$f"
  done
  echo "| hybrid as above, --encryption off | $(range "$f" total_ms 0.001 2) | $(range "$f" downtime_ms 1 1) | $(range "$f" rounds 1 0) | $(range "$f" postcopy_pages 1 0) pages left for post-copy |"
  echo
  echo "commands: $vmm demo --mem 1G --workload rand-write --mode postcopy --transport local --backing memfd;"
  echo "$vmm demo --mem 2G --workload seq-write --rate-mib 256 --mode precopy;"
  echo "$vmm demo --mem 2G --workload rand-write --mode hybrid --max-rounds 3 [--encryption off] (each --json)"
  echo
}

restore() {
  echo "## Snapshot restore, 2 GiB guest (random writes for 1 s, then saved) ($runs runs each)"
  echo
  local img=$out/guest.img
  $vmm snapshot --out "$img" --mem 2G --workload rand-write --seconds 1 --json > "$out/snapshot.json"
  python3 - "$out/snapshot.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"saved: {r['data_pages']} data pages, {r['zero_pages']} zero pages, in {r['save_ms']:.0f} ms ({r['write_gbps']:.2f} GB/s)")
EOF
  echo
  echo "| restore | to running ms | all pages in ms | faults | network faults | guest check |"
  echo "| --- | --- | --- | --- | --- | --- |"
  $vmm restore --from "$img" --lazy --prepager demand --record --json > /dev/null
  for mode in "--eager" "--lazy --prepager demand" "--lazy --prepager bubbling" "--lazy --prepager bubbling --replay"; do
    f=$out/restore-$(echo "$mode" | tr -d ' -').jsonl
    : > "$f"
    for _ in $(seq "$runs"); do
      # shellcheck disable=SC2086
      $vmm restore --from "$img" $mode --json | python3 -c 'import json,sys; r=json.load(sys.stdin); r.setdefault("faults",0); r.setdefault("network_faults",0); print(json.dumps(r))' >> "$f"
    done
    echo "| $mode | $(range "$f" restore_to_running_ms 1 1) | $(range "$f" all_present_ms 1 0) | $(range "$f" faults 1 0) | $(range "$f" network_faults 1 0) | $(range "$f" guest_mismatches 1 0) wrong |"
  done
  echo
  echo "command: $vmm snapshot --out IMG --mem 2G --workload rand-write --seconds 1; $vmm restore --from IMG MODE --json"
  echo
}

restore_bench() {
  echo "## ferry-bench restore: 2 GiB guest, a working set of 32768 random pages, against Firecracker's example handler ($runs runs)"
  echo
  local f=$out/restore-bench.jsonl
  : > "$f"
  for _ in $(seq "$runs"); do
    $bench restore --mem-mib 2048 --json --dir "$out" >> "$f"
  done
  python3 - "$f" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def rng(vals, digits):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "never"
    lo, hi = min(vals), max(vals)
    f = lambda v: f"{v:.{digits}f}"
    return f(lo) if f(lo) == f(hi) else f"{f(lo)}-{f(hi)}"
print("| cache | mode | to running ms | to working set ms | faults | touch p50 us | fault service p50 us | fault service p99 us | all in ms | raw fault + read p50 us |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for cache in ["page-cache", "dropped"]:
    for mode in ["firecracker-example", "demand", "bubbling", "bubbling+replay", "eager"]:
        rs = [r for r in rows if r.get("mode") == mode and r.get("cache") == cache]
        g = lambda k: [r[k] for r in rs]
        raw = [r["raw_fault_p50_us"] + r["raw_read_p50_us"] for r in rs]
        print(f"| {cache} | {mode} | {rng(g('restore_to_running_ms'), 2)} | {rng(g('time_to_working_set_ms'), 1)} | "
              f"{rng(g('faults'), 0)} | {rng(g('touch_p50_us'), 1)} | {rng(g('fault_p50_us'), 1)} | {rng(g('fault_p99_us'), 0)} | {rng(g('total_ms'), 0)} | {rng(raw, 1)} |")
print()
for cache in ["page-cache", "dropped"]:
    s = [r for r in rows if r.get("summary") == "restore" and r["cache"] == cache]
    print(f"{cache}: replay reaches the working set in {rng([r['replay_ws_over_firecracker'] for r in s], 2)}x Firecracker's "
          f"time with {rng([100 * r['replay_faults_cut'] for r in s], 1)}% fewer faults; a demand touch's p50 is "
          f"{rng([r['demand_touch_p50_over_raw'] for r in s], 2)}x (raw fault + raw read), in the same run")
print()
print("| guest | data | open ms | to running ms | all in ms |")
print("| --- | --- | --- | --- | --- |")
for gib in sorted({r["mem_gib"] for r in rows if r.get("scale")}):
    s = [r for r in rows if r.get("scale") and r["mem_gib"] == gib]
    print(f"| {gib} GiB | {s[0]['data_mib']} MiB | {rng([r['open_ms'] for r in s], 2)} | {rng([r['restore_to_running_ms'] for r in s], 2)} | {rng([r['total_ms'] for r in s], 0)} |")
EOF
  echo
  echo "command: $bench restore --mem-mib 2048 --json --dir $out"
  echo
}

two_hosts() {
  bash scripts/two-hosts.sh
  echo
}

toucher() {
  echo "## ferry-bench postcopy (toucher, 1 GiB, tcp loopback, one run)"
  echo
  $bench postcopy --mem-mib 1024 --json --plot docs/policies.svg > "$out/postcopy.jsonl"
  echo "| policy | pattern | network faults | total ms | rate during / after | fault p50 us |"
  echo "| --- | --- | --- | --- | --- | --- |"
  python3 - "$out/postcopy.jsonl" <<'EOF'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if "policy" in r:
        print(f"| {r['policy']} | {r['pattern']} | {r['network_faults']} | {r['total_ms']:.0f} | {r['rate_during_over_after']:.2f} | {r['fault_p50_us']:.1f} |")
EOF
  echo
  echo "command: $bench postcopy --mem-mib 1024 --json"
  echo
}

transport() {
  echo "## ferry-bench transport"
  echo
  $bench transport --reps 5
  echo
  echo "command: $bench transport --reps 5"
  echo
}

# Keeps the fields a table needs (the series are long).
slim() {
  python3 -c 'import json,sys; r=json.load(sys.stdin); [r.pop(k, None) for k in ("rate_series_50ms","cold_series_50ms")]; print(json.dumps(r))'
}

failover() {
  local mem=1G
  echo "## KVM post-copy that survives failures, $mem guest, random writes over half of it ($runs runs each)"
  echo
  echo "Reverse checkpoints every 100 ms against none, interleaved in one run:"
  echo
  echo "| checkpoints | post-copy s | rate during (writes/s) | work lost ms | checkpoints acked | pages checkpointed | guest paused for them ms (longest) | output gaps / regressions |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  local on=$out/ckpt-on.jsonl off=$out/ckpt-off.jsonl
  : > "$on"; : > "$off"
  for _ in $(seq "$runs"); do
    $vmm demo --mem $mem --workload rand-write --mode postcopy --checkpoint-ms 0 --json 2>/dev/null | slim >> "$off"
    $vmm demo --mem $mem --workload rand-write --mode postcopy --checkpoint-ms 100 --json 2>/dev/null | slim >> "$on"
  done
  for f in "$off" "$on"; do
    echo "| $( [ "$f" = "$on" ] && echo "every 100 ms" || echo none ) | $(range "$f" postcopy_ms 0.001 2) | $(range "$f" rate_during 0.001 1)k | $(range "$f" work_lost_ms 1 0) | $(range "$f" checkpoints 1 0) | $(range "$f" checkpoint_pages 1 0) | $(range "$f" checkpoint_pause_ms 1 1) ($(range "$f" checkpoint_longest_pause_ms 1 1)) | $(range "$f" output_gaps 1 0) / $(range "$f" output_regressions 1 0) |"
  done
  python3 - "$off" "$on" <<'PY'
import json, sys, statistics as st
off = [json.loads(l) for l in open(sys.argv[1])]
on = [json.loads(l) for l in open(sys.argv[2])]
m = lambda rs, k: st.median(r[k] for r in rs)
print()
print(f"Medians, with against without: rate during {m(on,'rate_during')/m(off,'rate_during'):.2f}x, post-copy time {m(on,'postcopy_ms')/m(off,'postcopy_ms'):.2f}x.")
PY
  echo
  echo "command: $vmm demo --mem $mem --workload rand-write --mode postcopy --checkpoint-ms 0|100 --json"
  echo
  echo "The destination SIGKILLed (its own process) when a fraction of the pages has crossed; recovery window 3 s:"
  echo
  echo "| killed at | restarted on source | guest wrong pages | epochs applied | failover ms (SIGKILL to running) | work lost ms | outputs seen | gaps | regressions | re-released |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for at in 0.1 0.4 0.9; do
    local f=$out/kill-$at.jsonl
    : > "$f"
    for _ in $(seq "$runs"); do
      $vmm demo --mem $mem --workload rand-write --mode postcopy --recovery-window-ms 3000 --inject kill-destination=$at --json 2>/dev/null | slim >> "$f"
    done
    local restarted
    restarted=$(python3 -c 'import json,sys; rs=[json.loads(l) for l in open(sys.argv[1])]; print("%d/%d" % (sum(r["restarted_on_source"] for r in rs), len(rs)))' "$f")
    echo "| $at | $restarted | $(range "$f" guest_mismatches 1 0) | $(range "$f" checkpoints_applied 1 0) | $(range "$f" failover_ms 1 0) | $(range "$f" work_lost_ms 1 0) | $(range "$f" outputs_seen 1 0) | $(range "$f" output_gaps 1 0) | $(range "$f" output_regressions 1 0) | $(range "$f" output_duplicates 1 0) |"
  done
  echo
  echo "command: $vmm demo --mem $mem --workload rand-write --mode postcopy --recovery-window-ms 3000 --inject kill-destination=F --json"
  echo
  echo "Data lanes cut 20 times per migration (checkpoints on):"
  echo
  echo "| runs completed | guest wrong pages | pages installed twice | sent twice (not resends) | recoveries | pages resent | paused ms | checkpoints acked | output gaps / regressions |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  local f=$out/cut-lanes.jsonl
  : > "$f"
  for _ in $(seq "$runs"); do
    $vmm demo --mem $mem --workload rand-write --mode postcopy --inject cut-lanes=20 --json 2>/dev/null | slim >> "$f"
  done
  echo "| $(wc -l < "$f")/$runs | $(range "$f" guest_mismatches 1 0) | $(range "$f" pages_installed_twice 1 0) | $(range "$f" pages_sent_twice 1 0) | $(range "$f" recoveries 1 0) | $(range "$f" pages_resent 1 0) | $(range "$f" paused_ms 1 0) | $(range "$f" checkpoints 1 0) | $(range "$f" output_gaps 1 0) / $(range "$f" output_regressions 1 0) |"
  echo
  echo "command: $vmm demo --mem $mem --workload rand-write --mode postcopy --inject cut-lanes=20 --json"
  echo
}

ft() {
  echo "## KVM fault-tolerant pair, 512 MiB guest, random writes over 256 MiB, epochs every 50 ms ($runs runs each)"
  echo
  echo "| run | first copy ms (final pause ms) | epochs acked | guest paused for them ms | took over | from epoch | failover ms (SIGKILL to running) | wrong pages | backup's copy verified at the end | output gaps / regressions / re-released |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  local f
  for kill in none 0.5; do
    f=$out/ft-$kill.jsonl
    : > "$f"
    for _ in $(seq "$runs"); do
      if [ $kill = none ]; then
        $vmm demo --mode ft --mem-mib 512 --workload rand-write --seconds 1 --checkpoint-ms 50 --json 2>/dev/null | slim >> "$f"
      else
        $vmm demo --mode ft --mem-mib 512 --workload rand-write --seconds 1 --checkpoint-ms 50 --inject kill-primary=$kill --json 2>/dev/null | slim >> "$f"
      fi
    done
    python3 - "$f" "$kill" <<'PY'
import json, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
def rng(k, d=0):
    v = [r[k] for r in rs if r.get(k) is not None]
    if not v: return "-"
    lo, hi = min(v), max(v)
    f = lambda x: f"{x:.{d}f}"
    return f(lo) if f(lo) == f(hi) else f"{f(lo)}-{f(hi)}"
killed = sys.argv[2] != "none"
wrong = "primary_guest_mismatches" if not killed else "guest_mismatches"
print(f"| {'primary SIGKILLed ' + sys.argv[2] + ' s into protection' if killed else 'protection ends cleanly'} | "
      f"{rng('first_copy_ms')} ({rng('first_copy_pause_ms', 2)}) | {rng('checkpoints') if not killed else rng('epochs_applied')} | "
      f"{rng('checkpoint_pause_ms', 1)} | {sum(bool(r.get('took_over')) for r in rs)}/{len(rs)} | {rng('takeover_epoch')} | "
      f"{rng('failover_ms')} | {rng(wrong)} | {'-' if killed else str(sum(r.get('copy_verified') is True for r in rs)) + '/' + str(len(rs))} | "
      f"{rng('output_gaps')} / {rng('output_regressions')} / {rng('output_duplicates')} |")
PY
  done
  echo
  echo "command: $vmm demo --mode ft --mem-mib 512 --workload rand-write --seconds 1 --checkpoint-ms 50 [--inject kill-primary=0.5] --json"
  echo
  echo "## KVM fault-tolerant pair, 1 GiB guest, random writes over 512 MiB, epochs every 25 ms for 2 s ($runs runs each)"
  echo
  echo "| writer | epochs | epoch pause p50 / p99 ms | log MiB/s | guest rate protected / unprotected | output latency p50 ms | backup killed 0.5 s in: made anew in ms | new backup's epochs | copies verified at the end (first / new backup) | live primaries | wrong pages | output gaps / regressions |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for rate in 256 none; do
    f=$out/ft-rate-$rate.jsonl
    : > "$f"
    local limit=()
    [ $rate = none ] || limit=(--rate-mib "$rate")
    for _ in $(seq "$runs"); do
      for inject in none kill-backup=0.5; do
        local extra=()
        [ $inject = none ] || extra=(--inject "$inject")
        $vmm demo --mode ft --mem 1G --workload rand-write "${limit[@]}" --seconds 2 --checkpoint-ms 25 "${extra[@]}" --json 2>/dev/null | slim >> "$f"
      done
    done
    python3 - "$f" "$rate" <<'PY'
import json, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
plain = [r for r in rs if not r.get("backup_killed")]
killed = [r for r in rs if r.get("backup_killed")]
def rng(rows, k, d=0, f=lambda r, k: r.get(k)):
    v = [f(r, k) for r in rows if f(r, k) is not None]
    if not v: return "-"
    lo, hi = min(v), max(v)
    g = lambda x: f"{x:.{d}f}"
    return g(lo) if g(lo) == g(hi) else f"{g(lo)}-{g(hi)}"
ratio = lambda r, k: r["rate_protected"] / r["rate_unprotected"] * 100 if r.get("rate_unprotected") else None
writer = f"{sys.argv[2]} MiB/s" if sys.argv[2] != "none" else "unlimited"
new_epochs = lambda r, k: (r.get("new_backup") or {}).get("epochs_applied")
print(f"| {writer} | {rng(plain, 'epochs')} | {rng(plain, 'epoch_pause_p50_ms', 1)} / {rng(plain, 'epoch_pause_p99_ms', 1)} | "
      f"{rng(plain, 'log_mib_per_s')} | {rng(plain, 'rate_protected', 0, ratio)}% | {rng(plain, 'output_latency_p50_ms', 1)} | "
      f"{sum(bool(r.get('backup_recreated')) for r in killed)}/{len(killed)}: {rng(killed, 'recreate_ms')} | {rng(killed, None, 0, new_epochs)} | "
      f"{sum(r.get('copy_verified') is True for r in plain)}/{len(plain)} / {sum((r.get('new_backup') or {}).get('copy_verified') is True for r in killed)}/{len(killed)} | "
      f"{rng(rs, 'live_primaries')} | {rng(rs, 'primary_guest_mismatches')} | {rng(rs, 'output_gaps')} / {rng(rs, 'output_regressions')} |")
PY
  done
  echo
  echo "command: $vmm demo --mode ft --mem 1G --workload rand-write [--rate-mib 256] --seconds 2 --checkpoint-ms 25 [--inject kill-backup=0.5] --json"
  echo
}

# The KVM test's fault-tolerant shape, FT_VERIFY_RUNS times (default 30): how often a clean stop
# finds the backup's copy equal to the guest's memory.
ft_verify() {
  local n=${FT_VERIFY_RUNS:-30} f=$out/ft-verify.jsonl
  : > "$f"
  for _ in $(seq "$n"); do
    $vmm demo --mem-mib 256 --data-mib 64 --mode ft --workload rand-write --seconds 0.5 --checkpoint-ms 20 --json 2>/dev/null | slim >> "$f"
  done
  echo "## KVM fault-tolerant pair, the test's shape: copies verified at a clean stop"
  echo
  python3 - "$f" <<'PY'
import json, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
same = sum(r.get("copy_verified") is True for r in rs)
differ = sum(r.get("copy_verified") is False for r in rs)
print(f"{same} of {len(rs)} runs verified equal, {differ} differing, {len(rs) - same - differ} without the check")
PY
  echo
  echo "command: $vmm demo --mem-mib 256 --data-mib 64 --mode ft --workload rand-write --seconds 0.5 --checkpoint-ms 20 --json"
  echo
}

trips() {
  echo "## Back-and-forth: a 2 GiB guest moved A -> B -> A -> B, random writes over P% of its memory between trips, tcp loopback ($runs runs each)"
  echo
  echo "| mode | dirtied | first trip MB, s | return MB | return s | fewer bytes | less time | return downtime ms | kept image used | wrong pages (guest / untouched memory) |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  local f
  for mode in precopy postcopy hybrid; do
    for percent in 1 5 25; do
      f=$out/trips-$mode-$percent.jsonl
      : > "$f"
      for _ in $(seq "$runs"); do
        # One line per trip; the run number ties a run's returns to its first trip.
        $vmm demo --mem 2G --workload rand-write --mode $mode --trips 4 --dirty-percent $percent --json \
          | python3 -c 'import json,sys,os; run=os.getpid(); [print(json.dumps(dict(json.loads(l), run=run))) for l in sys.stdin if l.startswith("{")]' >> "$f"
      done
      python3 - "$f" "$mode" "$percent" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
runs = {}
for r in rows:
    runs.setdefault(r["run"], []).append(r)
first, ret, fewer, less = [], [], [], []
for trips in runs.values():
    a = trips[0]
    first.append(a)
    for r in trips[1:]:
        ret.append(r)
        fewer.append(100 * (1 - r["bytes_sent"] / a["bytes_sent"]))
        less.append(100 * (1 - r["total_ms"] / a["total_ms"]))
def rng(vals, d=0):
    lo, hi = min(vals), max(vals)
    f = lambda x: f"{x:.{d}f}"
    return f(lo) if f(lo) == f(hi) else f"{f(lo)}-{f(hi)}"
kept = sum(r["base"] == "kept-image" for r in ret)
wrong = sum(r["guest_mismatches"] for r in rows), sum(r["filler_mismatches"] for r in rows)
print(f"| {sys.argv[2]} | {sys.argv[3]}% | {rng([r['bytes_sent'] / 1e6 for r in first])}, {rng([r['total_ms'] / 1e3 for r in first], 2)} | "
      f"{rng([r['bytes_sent'] / 1e6 for r in ret], 1)} | {rng([r['total_ms'] / 1e3 for r in ret], 3)} | {rng(fewer, 2)}% | {rng(less, 1)}% | "
      f"{rng([r['downtime_ms'] for r in ret], 1)} | {kept}/{len(ret)} | {wrong[0]} / {wrong[1]} |")
PY
    done
  done
  echo
  echo "command: $vmm demo --mem 2G --workload rand-write --mode M --trips 4 --dirty-percent P --json (bytes are page payloads)"
  echo
}

task() {
  local n=${TASK_RUNS:-10}
  echo "## Task-guided pre-copy: a 2 GiB guest, phased (300 ms of random writes over 1 GiB, then 100 ms quiet inside a marked segment), tcp loopback ($n runs each)"
  echo
  echo "| stop | downtime ms, p50 (min-max) | total s, p50 (min-max) | rounds | stopped in a segment | waited for one ms | wrong pages |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
  local f
  for run in off on off-plain on-plain; do
    guided=${run%-plain}
    encryption=tls
    [ "$run" = "$guided" ] || encryption=off
    f=$out/task-$run.jsonl
    : > "$f"
    for _ in $(seq "$n"); do
      $vmm demo --mem 2G --workload phased --mode precopy --task-guided $guided --encryption $encryption --json | tail -1 \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({k: r[k] for k in ("downtime_ms","total_ms","rounds","stopped_in_segment","task_wait_ms","task_gave_up","guest_mismatches")}))' >> "$f"
    done
    python3 - "$f" "$run" <<'PY'
import json, statistics, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
def p50(k, scale=1, d=1):
    v = [r[k] * scale for r in rs]
    return f"{statistics.median(v):.{d}f} ({min(v):.{d}f}-{max(v):.{d}f})"
rounds = [r["rounds"] for r in rs]
label = ('task-guided' if sys.argv[2].startswith('on') else 'unguided') + (', --encryption off' if sys.argv[2].endswith('plain') else '')
print(f"| {label} | {p50('downtime_ms', 1, 2)} | {p50('total_ms', 0.001, 2)} | "
      f"{min(rounds)}-{max(rounds)} | {sum(r['stopped_in_segment'] for r in rs)}/{len(rs)} (gave up {sum(r['task_gave_up'] for r in rs)}) | "
      f"{p50('task_wait_ms', 1, 0)} | {sum(r['guest_mismatches'] for r in rs)} |")
PY
  done
  python3 - "$out" <<'PY'
import json, statistics, sys
rs = lambda name: [json.loads(l) for l in open(f"{sys.argv[1]}/task-{name}.jsonl")]
med = lambda rows, k: statistics.median(r[k] for r in rows)
print()
for suffix, what in (("", "over TLS"), ("-plain", "in plaintext")):
    off, on = rs("off" + suffix), rs("on" + suffix)
    print(f"{what}: p50 downtime guided / unguided: {med(on, 'downtime_ms') / med(off, 'downtime_ms'):.3f}; "
          f"p50 total time guided / unguided: {med(on, 'total_ms') / med(off, 'total_ms'):.3f}")
PY
  echo
  echo "command: $vmm demo --mem 2G --workload phased --mode precopy --task-guided on|off --encryption tls|off --json"
  echo
}

case "$what" in
  kvm) kvm ;;
  ft) ft ;;
  ft-verify) ft_verify ;;
  failover) failover ;;
  modes) modes ;;
  restore) restore ;;
  restore-bench) restore_bench ;;
  two-hosts) two_hosts ;;
  toucher) toucher ;;
  transport) transport ;;
  trips) trips ;;
  task) task ;;
  all) kvm; modes; failover; ft; ft_verify; trips; task; restore; restore_bench; two_hosts; toucher; transport ;;
  *) echo "usage: $0 [kvm|modes|failover|ft|trips|task|restore|restore-bench|two-hosts|toucher|transport|all]" >&2; exit 2 ;;
esac
