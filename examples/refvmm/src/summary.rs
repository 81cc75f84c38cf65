//! The report as a person reads it: a few lines in the spirit of QEMU's `info migrate` and
//! `virsh domjobinfo`, numbers rounded to what they mean. `--json` prints every field instead.

use std::fmt::Write;

use serde_json::Value;

/// Lines of the summary of one report (a demo, a migrate or receive half, a trip, a restore).
pub fn summary(command: &str, r: &Value) -> String {
    let mut out = String::new();
    let f = |k: &str| r.get(k).and_then(Value::as_f64);
    let s = |k: &str| r.get(k).and_then(Value::as_str);
    let mut line = |label: &str, text: String| {
        if !text.is_empty() {
            let _ = writeln!(out, "{label:<15} {text}");
        }
    };

    let mut what = vec![s("mode").unwrap_or(command).to_string()];
    if let Some(mib) = f("mem_mib") {
        what.push(format!("of a {} guest", bytes(mib * 1048576.0)));
    }
    let mut shape = Vec::new();
    if let Some(v) = f("vcpus") {
        shape.push(format!("{v:.0} vCPU{}", if v == 1.0 { "" } else { "s" }));
    }
    shape.extend(s("workload").map(str::to_string));
    if !shape.is_empty() {
        what.push(format!("({})", shape.join(", ")));
    }
    if let Some(t) = s("transport") {
        what.push(format!("over {t}"));
    }
    if let Some(p) = s("prepager") {
        what.push(format!("pre-paging {p}"));
    }
    line("migration", what.join(" "));

    let mut status = match (r.get("restarted_on_source").and_then(Value::as_bool), s("destination_error")) {
        (Some(true), why) => format!("restarted on the source{}", why.map(|w| format!(" ({w})")).unwrap_or_default()),
        _ => "completed".to_string(),
    };
    if let Some(m) = f("guest_mismatches") {
        let _ = write!(status, "; the guest checked its memory: {m:.0} wrong pages");
    }
    line("status", status);

    let total = f("postcopy_ms").or(f("total_ms"));
    let mut times = Vec::new();
    if let Some(t) = f("total_ms").or(total) {
        times.push(format!("total {}", ms(t)));
    }
    if let Some(d) = f("downtime_ms") {
        times.push(format!("downtime {}", ms(d)));
    }
    if let (Some(p), Some(t)) = (f("postcopy_ms"), f("total_ms")) {
        if (p - t).abs() > 0.5 {
            times.push(format!("memory behind the guest {}", ms(p)));
        }
    }
    if let Some(rounds) = r.get("rounds").and_then(Value::as_array) {
        times.push(format!("{} pre-copy rounds", rounds.len()));
    }
    line("time", times.join(", "));

    let page = 4096.0;
    let (urgent, bulk) = (f("urgent_pages"), f("bulk_pages"));
    let mut moved = Vec::new();
    if let Some(u) = urgent {
        moved.push(format!("urgent {}", count(u)));
    }
    if let Some(b) = bulk {
        let pivots = f("pivot_pages").filter(|&p| p > 0.0).map(|p| format!(" ({} around faults)", count(p)));
        moved.push(format!("bulk {}{}", count(b), pivots.unwrap_or_default()));
    }
    if let Some(z) = f("zero_pages") {
        moved.push(format!("zero {}", count(z)));
    }
    if let Some(free) = f("skipped_free_pages").filter(|&v| v > 0.0) {
        moved.push(format!("free, skipped {}", count(free)));
    }
    if let Some(p) = f("pages_sent").or(f("pages_sent_total")) {
        moved.push(format!("sent {}", count(p)));
    }
    if let Some(t) = f("pages_sent_twice") {
        moved.push(format!("sent twice {t:.0}"));
    }
    if !moved.is_empty() {
        let of = f("pages_total").map(|t| format!(" of {} pages", count(t))).unwrap_or_default();
        line("transferred", format!("{}{of}", moved.join(", ")));
    }
    if let (Some(u), Some(b), Some(t)) = (urgent, bulk, f("postcopy_ms")) {
        if t > 0.0 {
            line("throughput", format!("{}/s while memory arrived", bytes((u + b) * page / (t / 1e3))));
        }
    }

    let mut faults = Vec::new();
    if let Some(n) = f("network_faults") {
        faults.push(format!("{n:.0} network faults"));
    }
    if let Some(a) = f("faults_avoided").filter(|&v| v > 0.0) {
        faults.push(format!("{a:.0} avoided by pre-paging"));
    }
    if let Some(b) = f("postcopy-blocktime") {
        faults.push(format!("blocktime {}", ms(b)));
    }
    line("faults", faults.join(", "));
    if let (Some(p50), Some(p99)) = (f("fault_p50_us"), f("fault_p99_us")) {
        line("fault latency", format!("p50 {}, p99 {}", us(p50), us(p99)));
    }
    if let Some(dist) = r.get("postcopy-latency-dist").and_then(Value::as_array) {
        let counts: Vec<f64> = dist.iter().filter_map(Value::as_f64).collect();
        let peak = counts.iter().cloned().fold(0.0, f64::max);
        let used: Vec<usize> = (0..counts.len()).filter(|&i| counts[i] > 0.0).collect();
        if let (Some(&lo), Some(&hi)) = (used.first(), used.last()) {
            for (i, &c) in counts.iter().enumerate().take(hi + 1).skip(lo) {
                let bar = "#".repeat(((c / peak) * 30.0).ceil() as usize);
                line("", format!("{:>9} {:>7.0} {bar}", format!("<{} us", 1u64 << (i + 1)), c));
            }
        }
    }

    let mut rates = Vec::new();
    if let Some(b) = f("baseline_rate").or(f("rate_before")) {
        rates.push(format!("steady {}/s", count(b)));
    }
    if let Some(d) = f("rate_during") {
        let share = f("rate_during_over_baseline").map(|x| format!(" ({:.0}%)", x * 100.0)).unwrap_or_default();
        rates.push(format!("while memory arrived {}/s{share}", count(d)));
    }
    if let Some(a) = f("rate_after") {
        rates.push(format!("after {}/s", count(a)));
    }
    if !rates.is_empty() {
        line("guest writes", rates.join(", "));
    }
    if let Some(lost) = f("work_lost_ms") {
        line("time lost", format!("{} of guest work (what it would have done at its steady rate)", ms(lost)));
    }
    let fault_tolerant = r.get("mode").and_then(Value::as_str) == Some("ft");
    if let (true, Some(e)) = (fault_tolerant, f("epochs")) {
        let pauses = match (f("epoch_pause_p50_ms"), f("epoch_pause_p99_ms")) {
            (Some(p50), Some(p99)) => format!(", guest paused p50 {} p99 {}", ms(p50), ms(p99)),
            _ => String::new(),
        };
        let log = f("log_mib_per_s").map(|m| format!(", {m:.0} MiB/s")).unwrap_or_default();
        line("epochs", format!("{e:.0} to the backup{pauses}{log}"));
        if let (Some(p), Some(u)) = (f("rate_protected"), f("rate_unprotected")) {
            line(
                "protected",
                format!("guest {}/s, {:.0}% of its unprotected {}/s", count(p), 100.0 * p / u.max(1e-9), count(u)),
            );
        }
        if let Some(n) = f("backups").filter(|&n| n > 1.0) {
            let anew = f("recreate_ms").map(|m| format!(", made anew in {}", ms(m))).unwrap_or_default();
            line("backups", format!("{n:.0} (a lost backup replaced by a live copy{anew})"));
        }
        if let Some(l) = f("live_primaries") {
            line("live primaries", format!("{l:.0}"));
        }
    } else if let Some(c) = f("checkpoints").filter(|&c| c > 0.0) {
        let longest =
            f("checkpoint_longest_pause_ms").map(|p| format!(", longest pause {}", ms(p))).unwrap_or_default();
        line(
            "checkpoints",
            format!("{c:.0} to the source ({} pages){longest}", count(f("checkpoint_pages").unwrap_or(0.0))),
        );
    }
    if let Some(seen) = f("outputs_seen") {
        line(
            "guest output",
            format!(
                "{seen:.0} seen outside, {:.0} gaps, {:.0} repeated{}",
                f("output_gaps").unwrap_or(0.0),
                f("output_duplicates").unwrap_or(0.0),
                f("output_latency_p50_ms").map(|l| format!(", held p50 {}", ms(l))).unwrap_or_default()
            ),
        );
    }
    if let Some(n) = f("recoveries").filter(|&n| n > 0.0) {
        line("recoveries", format!("{n:.0} lanes reopened, {} paused", ms(f("paused_ms").unwrap_or(0.0))));
    }
    let _ = writeln!(out, "(--json prints every field)");
    out
}

fn ms(v: f64) -> String {
    match v {
        v if v >= 10_000.0 => format!("{:.1} s", v / 1e3),
        v if v >= 1_000.0 => format!("{:.2} s", v / 1e3),
        v if v >= 10.0 => format!("{v:.0} ms"),
        v => format!("{v:.2} ms"),
    }
}

fn us(v: f64) -> String {
    match v {
        v if v >= 1_000.0 => ms(v / 1e3),
        v if v >= 10.0 => format!("{v:.0} us"),
        v => format!("{v:.1} us"),
    }
}

fn count(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{:.2} M", v / 1e6),
        v if v >= 1e4 => format!("{:.0} k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

fn bytes(v: f64) -> String {
    match v {
        v if v >= 1024f64.powi(3) => format!("{:.2} GiB", v / 1024f64.powi(3)),
        v if v >= 1024f64.powi(2) => format!("{:.0} MiB", v / 1024f64.powi(2)),
        v => format!("{:.0} KiB", v / 1024.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_post_copy_report_fits_a_screen_and_says_what_matters() {
        let r = serde_json::json!({
            "mode": "postcopy", "mem_mib": 2048, "vcpus": 1, "workload": "rand-write", "transport": "tcp+tls",
            "prepager": "bubbling", "restarted_on_source": false, "guest_mismatches": 0, "total_ms": 1843.2,
            "postcopy_ms": 1840.0, "downtime_ms": 2.91, "urgent_pages": 3400, "bulk_pages": 520000,
            "pivot_pages": 510000, "zero_pages": 100, "pages_total": 524288, "pages_sent_twice": 0,
            "network_faults": 3400, "faults_avoided": 90, "postcopy-blocktime": 120.5, "fault_p50_us": 27.5,
            "fault_p99_us": 210.0, "postcopy-latency-dist": [0, 0, 0, 0, 10, 2000, 1300, 80, 10],
            "baseline_rate": 2331648.0, "rate_during": 82910.0, "rate_during_over_baseline": 0.0356,
            "rate_after": 1691648.0, "work_lost_ms": 1792.0, "checkpoints": 17, "checkpoint_pages": 4000,
            "checkpoint_longest_pause_ms": 0.8, "outputs_seen": 9000, "output_gaps": 0, "output_duplicates": 0,
            "rate_series_50ms": [[0.0, 1.0]]
        });
        let text = summary("demo", &r);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() <= 25, "{} lines:\n{text}", lines.len());
        for needle in [
            "postcopy of a 2.00 GiB guest",
            "tcp+tls",
            "0 wrong pages",
            "downtime 2.91 ms",
            "total 1.84 s",
            "3400 network faults",
            "blocktime 120 ms",
            "p50 28 us, p99 210 us",
            "steady 2.33 M/s",
            "(4%)",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(!text.contains("82910.0"), "numbers are rounded:\n{text}");
    }
}
