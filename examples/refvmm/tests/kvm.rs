//! Real KVM guests: every workload runs and passes its own memory check; every workload x
//! pre-pager migrates post-copy between two VMs with the guest's check passing and no page sent
//! twice; every workload migrates pre-copy over KVM's dirty log, and every writer hybrid (rounds
//! then post-copy), with the guest's check passing. Needs /dev/kvm; where it cannot be opened each test says SKIPPED and why (they run in
//! CI on this project's machines, which have KVM).

use std::io::Write;
use std::process::Command;

fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            // Written past the harness's capture so the skip shows in CI's log.
            let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: /dev/kvm: {e}");
            false
        }
    }
}

const WORKLOADS: [&str; 6] = ["idle", "seq-write", "rand-write", "read-mostly", "hot-set", "phased"];

/// `ferry-vmm demo` on a small guest (256 MiB, 64 MiB of data, 0.2 s phases) with `args` added or
/// overriding those.
fn demo(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["demo", "--mem-mib", "256", "--data-mib", "64", "--seconds", "0.2"];
    all.extend_from_slice(args);
    vmm(&all)
}

fn vmm(args: &[&str]) -> serde_json::Value {
    vmm_reports(args).pop().expect("a report line")
}

/// Every JSON line `ferry-vmm` printed, in order (a run with several trips prints one per trip).
fn vmm_reports(args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-vmm")).args(args).arg("--json").output().expect("run ferry-vmm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ferry-vmm {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).expect("a JSON report")).collect()
}

#[test]
fn every_workload_runs_and_checks_its_memory() {
    if !kvm_available("every_workload_runs_and_checks_its_memory") {
        return;
    }
    for workload in WORKLOADS {
        let r = vmm(&["run", "--mem-mib", "128", "--data-mib", "32", "--workload", workload, "--seconds", "0.3"]);
        assert_eq!(r["guest_mismatches"], 0, "{workload}: {r}");
        assert!(r["rate"].as_f64().unwrap() > 0.0, "{workload} made no progress: {r}");
    }
}

#[test]
fn a_user_flat_binary_guest_runs_and_reports() {
    if !kvm_available("a_user_flat_binary_guest_runs_and_reports") {
        return;
    }
    // mov eax, 1 / mov edx, PORT_TASK (0x14) / out dx, eax      (enter a task segment)
    // mov eax, 1 / mov edx, PORT_PROGRESS (0x10) / out dx, eax  (progress) / jmp back to it
    let code: [u8; 24] = [
        0xB8, 1, 0, 0, 0, 0xBA, 0x14, 0, 0, 0, 0xEF, //
        0xB8, 1, 0, 0, 0, 0xBA, 0x10, 0, 0, 0, 0xEF, 0xEB, 0xF3,
    ];
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("flat-guest.bin");
    std::fs::write(&path, code).unwrap();
    let r = vmm(&["run", "--mem-mib", "64", "--data-mib", "16", "--guest", path.to_str().unwrap(), "--seconds", "0.2"]);
    assert!(r["rate"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(r["task_segments"], 1, "{r}");
}

#[test]
fn a_hostile_free_page_report_is_dropped_not_fatal() {
    if !kvm_available("a_hostile_free_page_report_is_dropped_not_fatal") {
        return;
    }
    // mov rsi, u64::MAX / mov eax, 5 / mov edx, PORT_FREE (0x13) / out dx, eax   (pages past any end)
    // then: mov eax, 1 / mov edx, PORT_PROGRESS / out dx, eax / jmp back
    let code: [u8; 34] = [
        0x48, 0xBE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xB8, 5, 0, 0, 0, 0xBA, 0x13, 0, 0, 0,
        0xEF, //
        0xB8, 1, 0, 0, 0, 0xBA, 0x10, 0, 0, 0, 0xEF, 0xEB, 0xF3,
    ];
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile-free.bin");
    std::fs::write(&path, code).unwrap();
    let r = vmm(&["run", "--mem-mib", "64", "--data-mib", "16", "--guest", path.to_str().unwrap(), "--seconds", "0.2"]);
    assert_eq!(r["free_reports_dropped"], 1, "{r}");
    assert!(r["rate"].as_f64().unwrap() > 0.0, "the guest goes on: {r}");
}

#[test]
fn free_pages_reported_by_the_guest_never_cross() {
    if !kvm_available("free_pages_reported_by_the_guest_never_cross") {
        return;
    }
    let r = demo(&["--workload", "idle"]);
    assert_eq!(r["skipped_free_pages"], 16384, "the idle guest gives back its 64 MiB of data: {r}");
    assert_eq!(r["guest_mismatches"], 0, "freed pages read as zero at the destination: {r}");
}

#[test]
fn every_workload_and_prepager_migrates_post_copy() {
    if !kvm_available("every_workload_and_prepager_migrates_post_copy") {
        return;
    }
    for workload in WORKLOADS {
        for prepager in ["demand", "push", "bubbling"] {
            let r = demo(&["--workload", workload, "--mode", "postcopy", "--prepager", prepager]);
            assert_eq!(r["restarted_on_source"], false, "{workload}/{prepager}: the destination failed: {r}");
            assert_eq!(r["guest_mismatches"], 0, "{workload}/{prepager}: {r}");
            assert_eq!(r["pages_sent_twice"], 0, "{workload}/{prepager}: {r}");
            assert_eq!(r["pages_total"], 65536, "{workload}/{prepager}: {r}");
            assert!(r["rate_after"].as_f64().unwrap() > 0.0, "the guest runs at the destination: {r}");
            assert_eq!(r["prepager"], prepager, "{r}");
            assert_the_policy_ran(workload, prepager, &r);
        }
    }
}

/// The bulk lane's pages must come from the policy the user chose: bubbling's from bubbles around
/// the guest's faults, push's from its sweep alone, demand's only from the sweep that completes it
/// after the workload's phase. (The idle guest touches a few pages the free-page map leaves: it
/// may give bubbling no pivot with an unclaimed neighbour.)
fn assert_the_policy_ran(workload: &str, prepager: &str, r: &serde_json::Value) {
    let (bulk, pivot, swept) =
        (r["bulk_pages"].as_u64().unwrap(), r["pivot_pages"].as_u64().unwrap(), r["swept_pages"].as_u64().unwrap());
    match prepager {
        "bubbling" => {
            if workload != "idle" {
                assert!(pivot > 0, "bubbling fetched nothing around the guest's faults: {r}");
            }
            assert_eq!(swept, 0, "bubbling completes by itself: {r}");
        }
        "push" => assert_eq!((pivot, swept), (0, 0), "push has no pivots and needs no sweep: {r}"),
        "demand" => assert_eq!((pivot, swept), (0, bulk), "demand fetches nothing in the background: {r}"),
        other => panic!("unknown pre-pager {other}"),
    }
}

#[test]
fn post_copy_reports_the_guests_rate_against_its_steady_state() {
    if !kvm_available("post_copy_reports_the_guests_rate_against_its_steady_state") {
        return;
    }
    let r = demo(&["--workload", "rand-write", "--mode", "postcopy", "--prepager", "bubbling"]);
    let baseline = r["baseline_rate"].as_f64().unwrap();
    assert!(baseline > 0.0, "{r}");
    let postcopy_ms = r["postcopy_ms"].as_f64().unwrap();
    let lost = r["work_lost_ms"].as_f64().unwrap();
    let downtime = r["downtime_ms"].as_f64().unwrap();
    // The guest lost at least the downtime and at most the downtime plus the whole post-copy.
    assert!(lost >= downtime && lost <= downtime + postcopy_ms + 1e-6, "{r}");
    let series = r["rate_series_50ms"].as_array().unwrap();
    assert!(!series.is_empty(), "{r}");
    assert!(series.iter().any(|p| p[1].as_f64().unwrap() > 0.0), "the guest made progress: {r}");
}

#[test]
fn every_workload_migrates_pre_copy_with_the_dirty_log() {
    if !kvm_available("every_workload_migrates_pre_copy_with_the_dirty_log") {
        return;
    }
    for workload in WORKLOADS {
        let r = demo(&["--workload", workload, "--mode", "precopy", "--max-rounds", "8"]);
        assert_eq!(r["guest_mismatches"], 0, "{workload}: {r}");
        let rounds = r["rounds"].as_u64().unwrap();
        assert!((1..=8).contains(&rounds), "{workload}: {r}");
        let per_round = r["pages_per_round"].as_array().unwrap();
        assert_eq!(per_round.len() as u64, rounds + 1, "every round and the final one: {r}");
        assert_eq!(per_round[0], 65536, "round 0 sends every page");
    }
}

#[test]
fn every_writer_migrates_hybrid() {
    if !kvm_available("every_writer_migrates_hybrid") {
        return;
    }
    for (workload, backing) in [
        ("seq-write", "anon"),
        ("rand-write", "anon"),
        ("read-mostly", "anon"),
        ("hot-set", "anon"),
        ("rand-write", "memfd"),
    ] {
        let r = demo(&["--workload", workload, "--mode", "hybrid", "--max-rounds", "2", "--backing", backing]);
        assert_eq!(r["guest_mismatches"], 0, "{workload}/{backing}: {r}");
        assert_eq!(r["pages_sent_twice"], 0, "{workload}/{backing}: {r}");
        let per_round = r["pages_per_round"].as_array().unwrap();
        assert_eq!(
            r["postcopy_pages"],
            per_round[per_round.len() - 1],
            "post-copy moves exactly the pages dirtied after their last round: {r}"
        );
    }
}

#[test]
fn memfd_backed_guest_migrates_in_place() {
    if !kvm_available("memfd_backed_guest_migrates_in_place") {
        return;
    }
    let r = demo(&["--workload", "rand-write", "--backing", "memfd"]);
    assert_eq!(r["guest_mismatches"], 0, "{r}");
    assert_eq!(r["pages_sent_twice"], 0, "{r}");
}

#[test]
fn hugetlbfs_guest_migrates_in_every_mode() {
    if !kvm_available("hugetlbfs_guest_migrates_in_every_mode") {
        return;
    }
    // Two guests of 256 MiB live at once during a demo.
    let have = ferry::toucher::reserve_hugepages(256);
    if have < 256 {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: hugetlbfs_guest_migrates_in_every_mode: {have} free 2 MiB hugepages, needs 256"
        );
        return;
    }
    for mode in ["postcopy", "precopy", "hybrid"] {
        let r = demo(&["--workload", "rand-write", "--mode", mode, "--backing", "hugetlb", "--max-rounds", "3"]);
        assert_eq!(r["guest_mismatches"], 0, "{mode}: {r}");
    }
}

#[test]
fn a_guest_with_several_vcpus_migrates_in_every_mode() {
    if !kvm_available("a_guest_with_several_vcpus_migrates_in_every_mode") {
        return;
    }
    let r = vmm(&[
        "run",
        "--mem-mib",
        "128",
        "--data-mib",
        "48",
        "--workload",
        "hot-set",
        "--vcpus",
        "3",
        "--seconds",
        "0.2",
    ]);
    assert_eq!(r["guest_mismatches"], 0, "{r}");
    for mode in ["postcopy", "precopy", "hybrid"] {
        let r = demo(&[
            "--data-mib",
            "48",
            "--workload",
            "rand-write",
            "--mode",
            mode,
            "--vcpus",
            "3",
            "--max-rounds",
            "3",
        ]);
        assert_eq!(r["guest_mismatches"], 0, "{mode}: every vCPU checked its slice: {r}");
    }
}

/// `ferry-vmm receive` and `ferry-vmm migrate` as two processes, one per host in a real setup.
#[test]
fn receive_and_migrate_run_as_two_processes() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    if !kvm_available("receive_and_migrate_run_as_two_processes") {
        return;
    }
    let key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    for mode in ["postcopy", "precopy", "hybrid"] {
        let mut receiver = Command::new(env!("CARGO_BIN_EXE_ferry-vmm"))
            .args(["receive", "--listen", "127.0.0.1:0", "--key-hex", key, "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferry-vmm receive");
        let mut banner = String::new();
        BufReader::new(receiver.stderr.as_mut().unwrap()).read_line(&mut banner).unwrap();
        let addr =
            banner.trim().strip_prefix("ferry-vmm: receiving on ").unwrap_or_else(|| panic!("{banner}")).to_string();
        // Stray connections first (a scanner, an HTTP request, a negative phase length): each is
        // dropped with a note, and the receive goes on to take the real source.
        for stray in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            br#"{"page_port":1,"local_path":null,"mem_mib":256,"page_size":4096,"vcpus":1,"backing":"anon","mode":"Postcopy","prepager":"push","seconds":-1.0,"baseline_rate":0.0}"#,
        ] {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            std::io::Write::write_all(&mut s, stray).unwrap();
            std::io::Write::write_all(&mut s, b"\n").unwrap();
        }
        let source = vmm(&[
            "migrate",
            "--to",
            &addr,
            "--key-hex",
            key,
            "--mem-mib",
            "256",
            "--data-mib",
            "64",
            "--workload",
            "rand-write",
            "--mode",
            mode,
            "--max-rounds",
            "3",
            "--seconds",
            "0.2",
        ]);
        let out = receiver.wait_with_output().unwrap();
        assert!(out.status.success(), "{mode}: receive failed: {}", String::from_utf8_lossy(&out.stderr));
        let dest: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the destination's JSON report");
        assert_eq!(dest["guest_mismatches"], 0, "{mode}: {dest}");
        assert_eq!(dest["mode"], mode);
        assert!(source["source_downtime_ms"].as_f64().unwrap() > 0.0, "{mode}: {source}");
        if mode == "postcopy" {
            assert_eq!(source["pages_sent_twice"], 0, "{source}");
        }
    }
}

#[test]
fn the_local_transport_migrates_in_every_mode() {
    if !kvm_available("the_local_transport_migrates_in_every_mode") {
        return;
    }
    for mode in ["postcopy", "precopy", "hybrid"] {
        let r = demo(&[
            "--workload",
            "rand-write",
            "--mode",
            mode,
            "--transport",
            "local",
            "--backing",
            "memfd",
            "--max-rounds",
            "3",
        ]);
        assert_eq!(r["guest_mismatches"], 0, "{mode}: {r}");
        assert_eq!(r["transport"], "local", "{r}");
    }
}

/// `ferry-vmm snapshot` then `restore`: eagerly, lazily with every pre-pager, recording the
/// working set (demand paging sees every first touch) and replaying it; the guest's check passes
/// each time.
#[test]
fn a_snapshot_restores_eagerly_and_lazily_and_replays_its_working_set() {
    if !kvm_available("a_snapshot_restores_eagerly_and_lazily_and_replays_its_working_set") {
        return;
    }
    let image = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kvm-snap-{}.img", std::process::id()));
    let image = image.to_str().unwrap();
    let saved = vmm(&[
        "snapshot",
        "--out",
        image,
        "--mem-mib",
        "256",
        "--data-mib",
        "64",
        "--workload",
        "rand-write",
        "--seconds",
        "0.3",
    ]);
    assert!(saved["data_pages"].as_u64().unwrap() > 0, "{saved}");
    let restore = |extra: &[&str]| {
        let mut args = vec!["restore", "--from", image, "--seconds", "0.2"];
        args.extend_from_slice(extra);
        let r = vmm(&args);
        assert_eq!(r["guest_mismatches"], 0, "{extra:?}: {r}");
        r
    };
    let eager = restore(&["--eager"]);
    assert_eq!(eager["pages_read"], saved["data_pages"], "{eager}");
    for prepager in ["push", "bubbling"] {
        let r = restore(&["--lazy", "--prepager", prepager]);
        assert_eq!(r["pages_installed_twice"], 0, "{r}");
        assert_eq!(r["zero_pages"], saved["zero_pages"].as_u64().unwrap() + saved["free_pages"].as_u64().unwrap());
    }
    let recorded = restore(&["--lazy", "--prepager", "demand", "--record"]);
    assert!(recorded["recorded_working_set_pages"].as_u64().unwrap() > 0, "{recorded}");
    let replayed = restore(&["--lazy", "--replay"]);
    assert!(replayed["replayed_pages"].as_u64().unwrap() > 0, "{replayed}");
    assert_eq!(replayed["working_set_pages"], recorded["recorded_working_set_pages"]);
    let _ = std::fs::remove_file(image);
    let _ = std::fs::remove_file(format!("{image}.ws"));
}

#[test]
fn a_kvm_guest_survives_its_data_lanes_being_cut_twenty_times() {
    if !kvm_available("a_kvm_guest_survives_its_data_lanes_being_cut_twenty_times") {
        return;
    }
    for (prepager, backing) in [("bubbling", "anon"), ("push", "memfd")] {
        let r = demo(&[
            "--workload",
            "rand-write",
            "--prepager",
            prepager,
            "--backing",
            backing,
            "--inject",
            "cut-lanes=20",
        ]);
        assert_eq!(r["guest_mismatches"], 0, "{r}");
        assert_eq!(r["pages_installed_twice"], 0, "{r}");
        assert_eq!(r["pages_sent_twice"], 0, "a page served twice that was not a resend: {r}");
        let cuts = r["lane_cuts"].as_u64().unwrap();
        assert!(cuts > 0, "no cut landed: {r}");
        assert!(r["recoveries"].as_u64().unwrap() > 0, "{cuts} cuts and no recovery: {r}");
    }
}

/// The observer's verdict on the guest's output: nothing lost, nothing taken back.
fn assert_output_whole(r: &serde_json::Value) {
    assert!(r["outputs_seen"].as_u64().unwrap() > 0, "the guest's output never reached the observer: {r}");
    assert_eq!(r["output_gaps"], 0, "output lost: {r}");
    assert_eq!(r["output_regressions"], 0, "output taken back: {r}");
}

#[test]
fn reverse_checkpoints_flow_and_output_waits_for_them() {
    if !kvm_available("reverse_checkpoints_flow_and_output_waits_for_them") {
        return;
    }
    for workload in ["seq-write", "rand-write"] {
        // Demand paging with a 1 s phase: the guest runs on arriving memory long enough for
        // several epochs of 20 ms.
        let r = demo(&["--workload", workload, "--prepager", "demand", "--seconds", "1", "--checkpoint-ms", "20"]);
        assert_eq!(r["guest_mismatches"], 0, "{r}");
        assert_eq!(r["restarted_on_source"], false, "{r}");
        let committed = r["checkpoints"].as_u64().unwrap();
        assert!(committed >= 2, "{workload}: {committed} checkpoints in a second of post-copy: {r}");
        // The source applied every acknowledged epoch, and at most those whose ack never came
        // back (the last one, when the session ends while it travels).
        let (applied, failed) = (r["checkpoints_applied"].as_u64().unwrap(), r["checkpoints_failed"].as_u64().unwrap());
        assert!(committed <= applied && applied <= committed + failed, "applied {applied}: {r}");
        assert!(r["checkpoint_pages"].as_u64().unwrap() > 0, "a writer wrote nothing: {r}");
        assert_output_whole(&r);
        // Held output all left once the session ended.
        assert_eq!(r["destination_outputs"]["emitted"], r["destination_outputs"]["released"], "{r}");
    }
    let off = demo(&["--workload", "rand-write", "--checkpoint-ms", "0"]);
    assert_eq!(off["checkpoints"], 0, "{off}");
    assert_output_whole(&off);
}

#[test]
fn the_source_restarts_the_guest_when_its_destination_is_killed() {
    if !kvm_available("the_source_restarts_the_guest_when_its_destination_is_killed") {
        return;
    }
    for at in ["0.1", "0.4", "0.9"] {
        let kill = format!("kill-destination={at}");
        let r = demo(&[
            "--mem-mib",
            "512",
            "--data-mib",
            "256",
            "--workload",
            "rand-write",
            "--checkpoint-ms",
            "20",
            "--recovery-window-ms",
            "1000",
            "--inject",
            &kill,
        ]);
        assert_eq!(r["destination_killed"], true, "{r}");
        assert_eq!(r["restarted_on_source"], true, "{r}");
        assert_eq!(r["guest_mismatches"], 0, "{r}");
        assert_output_whole(&r);
        assert!(r["rate_after"].as_f64().unwrap() > 0.0, "the restarted guest does not run: {r}");
        if r["checkpoints_applied"].as_u64().unwrap() > 0 {
            assert!(r["restart_epoch"].as_u64().is_some(), "{r}");
        }
    }
}

/// Runs `scripts/silent-link.sh SCENARIO` (two network namespaces whose veth link goes down mid
/// post-copy); `None` (and SKIPPED said) where it cannot run here: no root, no iproute2.
fn silent_link(scenario: &str) -> Option<(serde_json::Value, Option<serde_json::Value>)> {
    // The namespaces have fixed names: one scenario at a time.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let root = env!("CARGO_MANIFEST_DIR").to_string() + "/../..";
    let out = std::env::temp_dir().join(format!("ferry-silent-link-{}", std::process::id()));
    let run = Command::new("bash")
        .arg(format!("{root}/scripts/silent-link.sh"))
        .arg(scenario)
        .arg(&out)
        .env("VMM", env!("CARGO_BIN_EXE_ferry-vmm"))
        .output()
        .expect("run scripts/silent-link.sh");
    let said = String::from_utf8_lossy(&run.stdout);
    if said.contains("SKIPPED") {
        let _ = writeln!(std::io::stderr(), "SKIPPED: silent link {scenario}: {}", said.trim());
        return None;
    }
    assert!(run.status.success(), "silent-link {scenario}:\n{said}\n{}", String::from_utf8_lossy(&run.stderr));
    let read = |side: &str| {
        std::fs::read_to_string(out.join(format!("{scenario}.{side}.json")))
            .ok()
            .and_then(|s| serde_json::from_str(s.lines().last()?).ok())
    };
    let source = read("src").expect("the source's report");
    Some((source, read("dst")))
}

#[test]
fn a_silent_link_that_comes_back_pauses_and_the_migration_completes() {
    if !kvm_available("a_silent_link_that_comes_back_pauses_and_the_migration_completes") {
        return;
    }
    let Some((source, destination)) = silent_link("down-up") else { return };
    let destination = destination.expect("the destination's report");
    assert_eq!(source["restarted_on_source"], false, "{source}");
    assert_eq!(destination["guest_mismatches"], 0, "{destination}");
    assert_eq!(destination["pages_installed_twice"], 0, "{destination}");
}

#[test]
fn a_link_that_stays_down_fails_over_to_the_source() {
    if !kvm_available("a_link_that_stays_down_fails_over_to_the_source") {
        return;
    }
    let Some((source, destination)) = silent_link("stays-down") else { return };
    assert!(destination.is_none(), "the destination must fail, not report: {destination:?}");
    assert_eq!(source["restarted_on_source"], true, "{source}");
    assert_eq!(source["guest_mismatches"], 0, "{source}");
}

#[cfg(feature = "etcd")]
#[test]
fn the_source_restarts_the_guest_holding_an_etcd_lease() {
    if !kvm_available("the_source_restarts_the_guest_holding_an_etcd_lease") {
        return;
    }
    let Some(etcd) = ferry::arbiter::ScratchEtcd::start("kvm-failover") else {
        let _ = writeln!(std::io::stderr(), "SKIPPED: the etcd failover: no etcd binary (apt install etcd-server)");
        return;
    };
    let r = demo(&[
        "--workload",
        "rand-write",
        "--checkpoint-ms",
        "20",
        "--recovery-window-ms",
        "1000",
        "--etcd",
        etcd.endpoint(),
        "--inject",
        "kill-destination=0.5",
    ]);
    assert_eq!(r["destination_killed"], true, "{r}");
    assert_eq!(r["restarted_on_source"], true, "{r}");
    assert_eq!(r["guest_mismatches"], 0, "{r}");
    assert_output_whole(&r);
}

/// The fault-tolerant pairs run one at a time (two at once on 2 cores stretch their epochs).
static FT_ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A clean stop compared whole memories, and the backup's copy was the guest's. (At an earlier
/// commit this found copies that differed in about a quarter of runs of this shape; since, none
/// has in the runs `bash scripts/figures.sh ft-verify` counts, cause not identified: see the README.)
fn copy_check(r: &serde_json::Value) {
    assert_eq!(
        r["copy_verified"], true,
        "the verified stop did not find the backup's copy equal (differing chunks: {}): {r}",
        r["copy_differing_chunks"]
    );
}

#[test]
fn a_fault_tolerant_pair_protects_the_guest_and_the_backup_takes_over_when_the_primary_dies() {
    if !kvm_available("a_fault_tolerant_pair_protects_the_guest_and_the_backup_takes_over_when_the_primary_dies") {
        return;
    }
    let _turn = FT_ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Protection ends cleanly: the backup followed every epoch and does not take over.
    let r = demo(&["--mode", "ft", "--workload", "rand-write", "--seconds", "0.5", "--checkpoint-ms", "20"]);
    assert_eq!(r["took_over"], false, "{r}");
    copy_check(&r);
    assert!(r["checkpoints"].as_u64().unwrap() >= 2, "{r}");
    assert!(r["epochs_applied"].as_u64().unwrap() >= r["checkpoints"].as_u64().unwrap(), "{r}");
    assert_eq!(r["primary_guest_mismatches"], 0, "{r}");
    assert_eq!(r["live_primaries"], 1, "{r}");
    assert_output_whole(&r);
    // The primary is SIGKILLed mid-protection: the backup takes over from its last epoch.
    for workload in ["seq-write", "rand-write"] {
        let r = demo(&[
            "--mode",
            "ft",
            "--workload",
            workload,
            "--seconds",
            "1",
            "--checkpoint-ms",
            "20",
            "--inject",
            "kill-primary=0.4",
        ]);
        assert_eq!(r["primary_killed"], true, "{r}");
        assert_eq!(r["took_over"], true, "{r}");
        assert_eq!(r["live_primaries"], 1, "{r}");
        assert_eq!(r["guest_mismatches"], 0, "{workload}: {r}");
        assert_output_whole(&r);
    }
}

#[test]
fn a_lost_backup_is_made_anew_by_a_live_copy_and_protection_resumes() {
    if !kvm_available("a_lost_backup_is_made_anew_by_a_live_copy_and_protection_resumes") {
        return;
    }
    let _turn = FT_ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let r = demo(&[
        "--mode",
        "ft",
        "--workload",
        "rand-write",
        "--seconds",
        "1.5",
        "--checkpoint-ms",
        "20",
        "--inject",
        "kill-backup=0.3",
    ]);
    assert_eq!(r["backup_killed"], true, "{r}");
    assert_eq!(r["backup_recreated"], true, "{r}");
    assert_eq!(r["backups"], 2, "{r}");
    // The new backup got its first copy while the guest ran, then followed epochs until the
    // primary ended protection cleanly.
    let new = &r["new_backup"];
    assert_eq!(new["took_over"], false, "{r}");
    copy_check(new);
    assert!(new["epochs_applied"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["backup_terms"][1]["checkpoints"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["live_primaries"], 1, "{r}");
    assert_eq!(r["primary_guest_mismatches"], 0, "{r}");
    assert_output_whole(&r);
}

/// `ferry-vmm demo --trips 3` on a small guest: the guest goes A -> B -> A -> B.
fn trips(mode: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec![
        "demo",
        "--mem-mib",
        "256",
        "--workload",
        "rand-write",
        "--seconds",
        "0.2",
        "--mode",
        mode,
        "--trips",
        "3",
        "--dirty-percent",
        "5",
    ];
    args.extend_from_slice(extra);
    let reports = vmm_reports(&args);
    assert_eq!(reports.len(), 3, "{mode}: one report per trip: {reports:?}");
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r["trip"], i + 1, "{r}");
        assert_eq!(r["guest_mismatches"], 0, "{mode} trip {}: {r}", i + 1);
        assert_eq!(r["filler_mismatches"], 0, "{mode} trip {}: memory the guest never wrote changed: {r}", i + 1);
    }
    reports
}

#[test]
fn a_guest_that_comes_back_moves_only_what_it_changed_in_every_mode() {
    if !kvm_available("a_guest_that_comes_back_moves_only_what_it_changed_in_every_mode") {
        return;
    }
    for mode in ["precopy", "postcopy", "hybrid"] {
        let reports = trips(mode, &[]);
        let first = &reports[0];
        assert_eq!(first["base"], "full", "{mode}: {first}");
        let first_bytes = first["bytes_sent"].as_u64().unwrap();
        assert!(first_bytes > 0, "{mode}: {first}");
        for r in &reports[1..] {
            assert_eq!(r["base"], "kept-image", "{mode}: {r}");
            assert!(r["refused"].is_null(), "{mode}: {r}");
            // The guest dirties 5% of its memory per stay: a return moves a small fraction of a
            // first trip. Where rounds run, their first pass is what the kept image saves (later
            // rounds resend what the guest rewrites meanwhile, as many as a loaded host's slow
            // rounds let it); post-copy moves each page once, so its whole is compared.
            let (this, first) = match (r["first_pass_pages"].as_u64(), first["first_pass_pages"].as_u64()) {
                (Some(this), Some(first)) => (this, first),
                _ => (r["bytes_sent"].as_u64().unwrap(), first_bytes),
            };
            assert!(this * 4 < first, "{mode}: a return moved {this} against {first} first: {r}");
            assert!(r["changed_pages_at_departure"].as_u64().unwrap() > 0, "{mode}: {r}");
        }
    }
}

#[test]
fn a_kept_image_changed_meanwhile_is_refused_and_the_trip_runs_in_full() {
    if !kvm_available("a_kept_image_changed_meanwhile_is_refused_and_the_trip_runs_in_full") {
        return;
    }
    for mode in ["precopy", "postcopy"] {
        let reports = trips(mode, &["--tamper-kept"]);
        for r in &reports[1..] {
            assert_eq!(r["base"], "full", "{mode}: {r}");
            let reason = r["refused"].as_str().unwrap_or_else(|| panic!("{mode}: no refusal reason: {r}"));
            assert!(reason.contains("differs"), "{mode}: {reason}");
        }
    }
}

#[test]
fn task_guided_pre_copy_stops_the_guest_inside_its_quiet_segment() {
    if !kvm_available("task_guided_pre_copy_stops_the_guest_inside_its_quiet_segment") {
        return;
    }
    for mode in ["precopy", "hybrid"] {
        // The guest writes for 60 ms, then is quiet (marked) for 40 ms; the wait is long enough
        // for many quiet phases, so the source must not give up.
        let r = demo(&[
            "--workload",
            "phased",
            "--heavy-ms",
            "60",
            "--quiet-ms",
            "40",
            "--mode",
            mode,
            "--task-guided",
            "on",
            "--task-wait-ms",
            "30000",
        ]);
        assert_eq!(r["guest_mismatches"], 0, "{mode}: {r}");
        assert_eq!(r["task_guided"], true, "{mode}: {r}");
        assert_eq!(r["stopped_in_segment"], true, "{mode}: {r}");
        assert_eq!(r["task_gave_up"], false, "{mode}: {r}");
    }
    // Unguided, the same guest migrates too and says where it stopped.
    let r = demo(&["--workload", "phased", "--heavy-ms", "60", "--quiet-ms", "40", "--mode", "precopy"]);
    assert_eq!(r["guest_mismatches"], 0, "{r}");
    assert_eq!(r["task_guided"], false, "{r}");
    assert!(r["stopped_in_segment"].is_boolean(), "{r}");
    assert_eq!(r["task_wait_ms"], 0.0, "{r}");
}

#[test]
fn a_guided_source_that_waits_in_vain_stops_anyway_and_says_so() {
    if !kvm_available("a_guided_source_that_waits_in_vain_stops_anyway_and_says_so") {
        return;
    }
    // rand-write never marks a segment: the wait runs out.
    let r = demo(&["--workload", "rand-write", "--mode", "precopy", "--task-guided", "on", "--task-wait-ms", "50"]);
    assert_eq!(r["guest_mismatches"], 0, "{r}");
    assert_eq!(r["stopped_in_segment"], false, "{r}");
    assert_eq!(r["task_gave_up"], true, "{r}");
    assert!(r["task_wait_ms"].as_f64().unwrap() >= 50.0, "{r}");
}

#[test]
fn a_run_without_json_prints_a_summary_and_draws_its_plot() {
    if !kvm_available("a_run_without_json_prints_a_summary_and_draws_its_plot") {
        return;
    }
    let plot = std::env::temp_dir().join(format!("ferry-plot-{}.svg", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-vmm"))
        .args(["demo", "--mem-mib", "256", "--data-mib", "64", "--seconds", "0.2", "--plot"])
        .arg(&plot)
        .output()
        .expect("run ferry-vmm");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().count() <= 25, "a summary is at most 25 lines:\n{text}");
    for needle in ["postcopy of a 256 MiB guest", "0 wrong pages", "downtime", "network faults", "fault latency"] {
        assert!(text.contains(needle), "missing {needle:?}:\n{text}");
    }
    let svg = std::fs::read_to_string(&plot).expect("the plot was written");
    let _ = std::fs::remove_file(&plot);
    assert!(svg.starts_with("<svg"), "an SVG file");
    for panel in ["guest writes over time", "memory present", "bandwidth by lane", "network fault latency"] {
        assert!(svg.contains(panel), "the plot lacks its {panel:?} panel");
    }
}
