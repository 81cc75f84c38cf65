//! `ferry-bench restore` end to end on a small guest: every row restores, the guest reads its
//! working set right (the bench fails otherwise), and the rows say what they claim.

use serde_json::Value;

#[test]
fn restore_bench_rows_cover_every_mode_and_replay_cuts_the_faults() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("restore-bench");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-bench"))
        .args(["restore", "--json", "--mem-mib", "64", "--samples", "500", "--scale-gib", "1", "--dir"])
        .arg(&dir)
        .output()
        .expect("run ferry-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ferry-bench restore failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    for cache in ["page-cache", "dropped"] {
        let row = |mode: &str| {
            rows.iter().find(|r| r["mode"] == mode && r["cache"] == cache).unwrap_or_else(|| panic!("no {mode} row"))
        };
        let (fc, demand, replay, eager) =
            (row("firecracker-example"), row("demand"), row("bubbling+replay"), row("eager"));
        row("bubbling");
        assert!(fc["total_ms"].is_null(), "Firecracker's strategy never fetches untouched pages");
        assert_eq!(fc["faults"], demand["faults"], "on demand both fault on every distinct page of the set");
        let faults = |r: &Value| r["faults"].as_u64().unwrap();
        // Replay fetches the set ahead of the guest; how far ahead depends on the machine's load
        // (6x fewer faults on a loaded CI run, 10x and more when quiet): half is the behaviour.
        assert!(faults(replay) * 2 <= faults(fc), "replay {} faults, baseline {}", faults(replay), faults(fc));
        assert_eq!(faults(eager), 0);
        for r in [fc, demand, replay, eager] {
            assert!(r["raw_fault_p50_us"].as_f64().unwrap() > 0.0 && r["raw_read_p50_us"].as_f64().unwrap() > 0.0);
        }
        assert!(rows.iter().any(|r| r["summary"] == "restore" && r["cache"] == cache));
    }
    assert!(rows.iter().any(|r| r["scale"] == "restore" && r["mem_gib"] == 1));
}
