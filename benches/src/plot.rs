//! `ferry-bench postcopy --plot FILE.svg`: the pre-paging policies side by side, one column per
//! access pattern, drawn with plotters from the runs' sampled timelines: memory present over
//! time, network faults over time (what pre-paging saves), and the fault-latency distribution.

use anyhow::Result;
use ferry::timeline::TimelinePoint;
use plotters::prelude::*;

/// One migration of the comparison.
#[derive(Debug)]
pub struct PolicyRun {
    /// The pre-pager (`demand`, `push`, `bubbling`).
    pub policy: &'static str,
    /// The guest's access pattern (`seq`, `random`, `hot-set`).
    pub pattern: &'static str,
    /// Pages in the guest.
    pub pages_total: u64,
    /// The destination's counters over time.
    pub timeline: Vec<TimelinePoint>,
    /// Network faults per log2 microsecond bucket: bucket N counts [2^N, 2^(N+1)) us.
    pub fault_histogram_us: Vec<u64>,
}

fn color(policy: &str) -> RGBColor {
    match policy {
        "demand" => RGBColor(200, 60, 50),
        "push" => RGBColor(40, 100, 200),
        _ => RGBColor(30, 150, 70),
    }
}

type Panel<'a> = ChartContext<
    'a,
    SVGBackend<'a>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

fn panel<'a>(
    area: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    caption: String,
    ranges: (std::ops::Range<f64>, std::ops::Range<f64>),
    (x_desc, y_desc): (&str, &str),
) -> Result<Panel<'a>> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(34)
        .y_label_area_size(56)
        .build_cartesian_2d(ranges.0, ranges.1)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 13))
        .draw()?;
    Ok(chart)
}

/// Draws one line per policy of `runs` on `chart`, with a legend.
fn lines(chart: &mut Panel<'_>, runs: &[&PolicyRun], points: impl Fn(&PolicyRun) -> Vec<(f64, f64)>) -> Result<()> {
    for run in runs {
        let style = color(run.policy).stroke_width(2);
        chart
            .draw_series(LineSeries::new(points(run), style))?
            .label(run.policy)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

fn ms(p: &TimelinePoint) -> f64 {
    p.at.as_secs_f64() * 1e3
}

/// Writes the comparison of `runs` to `path` as SVG: a column per pattern, in the order they
/// first appear.
pub fn policies(path: &std::path::Path, runs: &[PolicyRun]) -> Result<()> {
    let mut patterns: Vec<&str> = runs.iter().map(|r| r.pattern).collect();
    patterns.dedup();
    let root = SVGBackend::new(path, (520 * patterns.len() as u32, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let cells = root.split_evenly((3, patterns.len()));
    for (column, pattern) in patterns.iter().enumerate() {
        let of: Vec<&PolicyRun> = runs.iter().filter(|r| r.pattern == *pattern).collect();
        let end_ms = of.iter().filter_map(|r| r.timeline.last()).map(ms).fold(1.0, f64::max);
        let mut present = panel(
            &cells[column],
            format!("{pattern}: memory present"),
            (0.0..end_ms, 0.0..100.0),
            ("ms since resume", "% of pages"),
        )?;
        lines(&mut present, &of, |r| {
            r.timeline.iter().map(|p| (ms(p), 100.0 * p.pages_present as f64 / r.pages_total.max(1) as f64)).collect()
        })?;
        let most_faults =
            of.iter().filter_map(|r| r.timeline.last()).map(|p| p.network_faults as f64).fold(1.0, f64::max);
        let mut faults = panel(
            &cells[patterns.len() + column],
            format!("{pattern}: network faults so far"),
            (0.0..end_ms, 0.0..most_faults * 1.05),
            ("ms since resume", "faults"),
        )?;
        lines(&mut faults, &of, |r| r.timeline.iter().map(|p| (ms(p), p.network_faults as f64)).collect())?;
        let buckets = of.iter().map(|r| r.fault_histogram_us.len()).max().unwrap_or(1).max(1);
        let tallest = of.iter().flat_map(|r| r.fault_histogram_us.iter()).copied().max().unwrap_or(1).max(1);
        let mut latency = panel(
            &cells[2 * patterns.len() + column],
            format!("{pattern}: fault latency"),
            (0.0..buckets as f64, 0.0..tallest as f64 * 1.05),
            ("log2 us (bucket N: 2^N to 2^(N+1) us)", "faults"),
        )?;
        lines(&mut latency, &of, |r| {
            r.fault_histogram_us.iter().enumerate().map(|(n, &c)| (n as f64 + 0.5, c as f64)).collect()
        })?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn run(policy: &'static str, pattern: &'static str, faults_per_tick: u64) -> PolicyRun {
        let timeline = (0..20u64)
            .map(|i| TimelinePoint {
                at: Duration::from_millis(10 * i),
                pages_present: 50 * i,
                urgent_pages: faults_per_tick * i,
                bulk_pages: 50 * i - faults_per_tick * i,
                network_faults: faults_per_tick * i,
                blocktime: Duration::ZERO,
            })
            .collect();
        PolicyRun { policy, pattern, pages_total: 1000, timeline, fault_histogram_us: vec![0, 0, 3, 10, 4] }
    }

    #[test]
    fn the_comparison_has_a_column_per_pattern_and_a_line_per_policy() {
        let runs: Vec<PolicyRun> = ["seq", "random"]
            .into_iter()
            .flat_map(|pattern| [run("demand", pattern, 40), run("bubbling", pattern, 5)])
            .collect();
        let path = std::env::temp_dir().join(format!("ferry-policies-{}.svg", std::process::id()));
        policies(&path, &runs).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        for title in ["seq: memory present", "random: network faults so far", "random: fault latency"] {
            assert!(svg.contains(title), "no panel {title:?}");
        }
        // A legend entry per policy in each of the six panels.
        let legend = |name: &str| svg.lines().filter(|l| l.trim() == name).count();
        assert_eq!(legend("demand"), 6);
        assert_eq!(legend("bubbling"), 6);
        assert!(svg.contains("<polyline"), "no lines drawn");
    }
}
