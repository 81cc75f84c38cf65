//! A toucher process migrated post-copy to another process: `ferry-toucher demo` runs the
//! destination and spawns the source as its child; 1 GiB of guest memory, every byte verified by
//! the destination, at-most-once proven by the source's per-page served bitmap.

use std::io::Write;
use std::process::Command;

use serde_json::Value;

fn demo(args: &[&str]) -> (Value, Value) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_ferry-toucher")).arg("demo").args(args).output().expect("run ferry-toucher");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ferry-toucher {args:?} failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let mut dest = None;
    let mut source = None;
    for line in stdout.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        match v["role"].as_str() {
            Some("dest") => dest = Some(v),
            Some("source") => source = Some(v),
            _ => panic!("unexpected line {line}"),
        }
    }
    (dest.expect("a destination report"), source.expect("a source report"))
}

fn check(dest: &Value, source: &Value) {
    assert_eq!(dest["guest_mismatches"], 0, "{dest}");
    assert_eq!(dest["pages_installed_twice"], 0, "{dest}");
    assert_eq!(source["pages_served_twice"], 0, "{source}");
    let total = dest["pages_total"].as_u64().unwrap();
    let free = dest["skipped_free_pages"].as_u64().unwrap();
    assert!(free > 0);
    let served = source["data_pages_served"].as_u64().unwrap() + source["zero_pages_served"].as_u64().unwrap();
    assert_eq!(served, total - free, "every non-free page crossed once and no free page did");
    assert_eq!(source["pages_present"].as_u64().unwrap(), total);
}

#[test]
fn sequential_random_and_hot_set_over_1gib() {
    for pattern in ["seq", "random", "hot-set"] {
        let (dest, source) = demo(&["--mem-mib", "1024", "--pattern", pattern, "--policy", "bubbling"]);
        check(&dest, &source);
        assert_eq!(dest["pages_total"], 262_144);
    }
}

#[test]
fn memfd_destination_over_1gib() {
    let (dest, source) = demo(&["--mem-mib", "1024", "--pattern", "random", "--backing", "memfd"]);
    check(&dest, &source);
}

#[test]
fn hugetlbfs_destination_over_1gib() {
    let needed = 512;
    let have = ferry::toucher::reserve_hugepages(needed);
    if have < needed {
        // Written past the test harness's capture so the skip shows in CI's log.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: hugetlbfs_destination_over_1gib: {have} free 2 MiB hugepages, needs {needed} (run scripts/setup.sh as root)"
        );
        return;
    }
    let (dest, source) = demo(&["--mem-mib", "1024", "--pattern", "hot-set", "--backing", "hugetlb"]);
    check(&dest, &source);
    assert_eq!(dest["pages_total"], 512, "2 MiB pages cross whole");
}
