//! `--plot FILE.svg`: the paper's pictures of one post-copy run, drawn from its report with
//! plotters: the guest's rate over time beside a fresh VM's with the resume marked, memory
//! present over time, bandwidth by lane over time, and the fault-latency distribution.

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde_json::Value;

/// Rows of a report's series field (arrays of numbers).
fn rows(report: &Value, field: &str) -> Vec<Vec<f64>> {
    report
        .get(field)
        .and_then(Value::as_array)
        .map(|rows| {
            rows.iter()
                .filter_map(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_f64).collect::<Vec<f64>>())
                .collect()
        })
        .unwrap_or_default()
}

type Panel<'a> = ChartContext<
    'a,
    SVGBackend<'a>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// A panel with its caption, axes and grid drawn; `y_digits` decimals on the y axis.
fn panel<'a>(
    area: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    caption: &str,
    (x, y): (std::ops::Range<f64>, std::ops::Range<f64>),
    (x_desc, y_desc): (&str, &str),
    y_digits: usize,
) -> Result<Panel<'a>> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.y_digits$}"))
        .label_style(("sans-serif", 14))
        .draw()?;
    Ok(chart)
}

/// Decimals that tell apart the ticks of an axis from 0 to `top` (about ten of them): with one
/// decimal, a guest at 0.26 M writes/s had ticks 0.05 apart print as 0.1, 0.1, 0.2, 0.2.
fn digits_for(top: f64) -> usize {
    if top <= 0.0 || !top.is_finite() {
        return 1;
    }
    (-(top / 10.0).log10()).ceil().clamp(0.0, 6.0) as usize
}

/// A legend entry's line in `style`.
fn key(style: ShapeStyle) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new([(x, y), (x + 18, y)], style)
}

fn legend(chart: &mut Panel<'_>) -> Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

fn max_of(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(0.0, f64::max).max(1e-9)
}

/// Writes the four panels as one SVG file.
pub fn write(path: &std::path::Path, report: &Value) -> Result<()> {
    let rate = rows(report, "rate_series_50ms");
    let cold = rows(report, "cold_series_50ms");
    let timeline = rows(report, "timeline_50ms");
    if rate.is_empty() || timeline.is_empty() {
        bail!("--plot draws a post-copy run: this report has no timeline");
    }
    let pages_total = report.get("pages_total").and_then(Value::as_f64).unwrap_or(1.0).max(1.0);
    let downtime = report.get("downtime_ms").and_then(Value::as_f64).unwrap_or(0.0);
    let dist: Vec<f64> = report
        .get("postcopy-latency-dist")
        .and_then(Value::as_array)
        .map_or_else(Vec::new, |d| d.iter().filter_map(Value::as_f64).collect());
    let title = format!(
        "{} post-copy, {} pre-paging, over {}",
        report.get("workload").and_then(Value::as_str).unwrap_or("?"),
        report.get("prepager").and_then(Value::as_str).unwrap_or("?"),
        report.get("transport").and_then(Value::as_str).unwrap_or("?"),
    );

    let root = SVGBackend::new(path, (1200, 820)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(&title, ("sans-serif", 22))?;
    let panels = root.split_evenly((2, 2));
    let end_ms = max_of(rate.iter().chain(&timeline).filter_map(|r| r.first().copied()));

    // The guest's rate: after the resume here, beside a fresh VM with every page present.
    {
        let top = max_of(rate.iter().chain(&cold).filter_map(|r| r.get(1).copied())) * 1.1 / 1e6;
        let mut chart = panel(
            &panels[0],
            "guest writes over time (resumed at 0)",
            (-end_ms * 0.03..end_ms, 0.0..top),
            ("ms since the guest resumed here", "M writes/s"),
            digits_for(top),
        )?;
        let grey = RGBColor(150, 150, 150).stroke_width(1);
        chart
            .draw_series(LineSeries::new(cold.iter().map(|r| (r[0], r[1] / 1e6)), grey))?
            .label("a fresh VM, every page present")
            .legend(key(grey));
        chart
            .draw_series(LineSeries::new(rate.iter().map(|r| (r[0], r[1] / 1e6)), BLUE.stroke_width(2)))?
            .label("the migrated guest")
            .legend(key(BLUE.stroke_width(2)));
        chart
            .draw_series(std::iter::once(PathElement::new([(0.0, 0.0), (0.0, top)], RED.stroke_width(2))))?
            .label(format!("resumed (paused {downtime:.1} ms before)"))
            .legend(key(RED.stroke_width(2)));
        if let Some(done) = report.get("postcopy_ms").and_then(Value::as_f64) {
            chart
                .draw_series(std::iter::once(PathElement::new([(done, 0.0), (done, top)], GREEN.stroke_width(2))))?
                .label("every page present")
                .legend(key(GREEN.stroke_width(2)));
        }
        legend(&mut chart)?;
    }

    // Memory present.
    {
        let mut chart =
            panel(&panels[1], "memory present", (0.0..end_ms, 0.0..100.0), ("ms since the handoff", "% of pages"), 0)?;
        chart.draw_series(
            AreaSeries::new(timeline.iter().map(|r| (r[0], r[1] / pages_total * 100.0)), 0.0, GREEN.mix(0.3))
                .border_style(GREEN.stroke_width(2)),
        )?;
    }

    // Bandwidth by lane.
    {
        let page = 4096.0;
        let rates: Vec<(f64, f64, f64)> = timeline
            .windows(2)
            .filter(|w| w[1][0] > w[0][0])
            .map(|w| {
                let dt = (w[1][0] - w[0][0]) / 1e3;
                (w[1][0], (w[1][2] - w[0][2]) * page / dt / 1e6, (w[1][3] - w[0][3]) * page / dt / 1e6)
            })
            .collect();
        let top = max_of(rates.iter().flat_map(|r| [r.1, r.2])) * 1.1;
        let mut chart =
            panel(&panels[2], "bandwidth by lane", (0.0..end_ms, 0.0..top), ("ms since the handoff", "MB/s"), 0)?;
        chart
            .draw_series(LineSeries::new(rates.iter().map(|r| (r.0, r.2)), BLUE.stroke_width(2)))?
            .label("bulk (pre-paging)")
            .legend(key(BLUE.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(rates.iter().map(|r| (r.0, r.1)), RED.stroke_width(2)))?
            .label("urgent (faults)")
            .legend(key(RED.stroke_width(2)));
        legend(&mut chart)?;
    }

    // Fault latencies, in QEMU's power-of-two buckets.
    {
        let buckets = dist.len().max(1);
        // At least 5 on the axis, so a few faults do not get fractional ticks.
        let top = (max_of(dist.iter().copied()) * 1.1).max(5.0);
        let mut chart = ChartBuilder::on(&panels[3])
            .caption("network fault latency", ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d((0..buckets).into_segmented(), 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc("latency below (us)")
            .y_desc("faults")
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => format!("{}", 1u64 << (i + 1)),
                _ => String::new(),
            })
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 14))
            .draw()?;
        chart.draw_series(
            Histogram::vertical(&chart)
                .style(RGBColor(70, 110, 180).filled())
                .margin(3)
                .data(dist.iter().enumerate().map(|(i, &c)| (i, c))),
        )?;
    }
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::digits_for;

    #[test]
    fn axis_labels_get_the_decimals_their_ticks_need() {
        assert_eq!(digits_for(0.26), 2, "ticks 0.05 apart");
        assert_eq!(digits_for(2.2), 1);
        assert_eq!(digits_for(25.0), 0);
        assert_eq!(digits_for(0.0), 1, "an empty axis");
    }
}
