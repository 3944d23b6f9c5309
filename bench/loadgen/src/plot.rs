//! `timeline.svg`: two stacked panels over one time axis. Top: offered and achieved
//! requests/s, errors and 503s per second as bars (left axis), p50/p99 latency on a log
//! scale (right axis; see `timeline` for which requests have a latency). Bottom: instances (actual, desired, oracle) as step lines and cold
//! starts per 100 ms as bars. Dashed verticals mark the high phase and the load stop.
//!
//! Text is emitted as SVG `<text>` (plotters' SVG backend without a font feature), so the
//! browser lays it out and no font file or font library is needed to draw it.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::pattern::Pattern;
use crate::summary::Summary;
use crate::timeline::{BUCKET_S, Row};

const WIDTH: u32 = 1280;
const HEIGHT: u32 = 900;
/// Height of the title and text lines above the panels.
const HEADER: u32 = 86;
const FONT: &str = "sans-serif";

const OFFERED: RGBColor = RGBColor(120, 120, 120);
const ACHIEVED: RGBColor = RGBColor(31, 119, 180);
const ERRORS: RGBColor = RGBColor(214, 39, 40);
const SHED: RGBColor = RGBColor(255, 127, 14);
const P50: RGBColor = RGBColor(44, 160, 44);
const P99: RGBColor = RGBColor(148, 103, 189);
const ACTUAL: RGBColor = RGBColor(31, 119, 180);
const DESIRED: RGBColor = RGBColor(255, 127, 14);
const ORACLE: RGBColor = RGBColor(44, 160, 44);
const COLD: RGBColor = RGBColor(140, 86, 75);
const MARKER: RGBColor = RGBColor(150, 150, 150);

/// Draws the plot to `path`.
pub fn draw(path: &Path, rows: &[Row], pattern: &Pattern, summary: &Summary) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let (header, body) = root.split_vertically(HEADER);
    let markers = phase_markers(pattern);
    draw_header(&header, pattern, &markers, summary)?;
    let (top, bottom) = body.split_vertically((HEIGHT - HEADER) / 2 + 20);
    let t_max = (rows.len() as f64 * BUCKET_S).max(BUCKET_S);
    let times: Vec<f64> = markers.iter().map(|(t, _)| *t).collect();
    draw_load(&top, rows, t_max, &times, summary)?;
    draw_instances(&bottom, rows, t_max, &times, summary)?;
    root.present()?;
    Ok(())
}

fn draw_header(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    pattern: &Pattern,
    markers: &[(f64, &str)],
    summary: &Summary,
) -> anyhow::Result<()> {
    area.draw(&Text::new(
        format!("Elasticity — {pattern}"),
        (20, 10),
        (FONT, 21).into_font().style(FontStyle::Bold),
    ))?;
    let mut setup = format!(
        "function {} ({} ms per call) · timeout {} ms · dashed lines:",
        summary.function, summary.service_time_ms, summary.timeout_ms
    );
    for (i, (t, label)) in markers.iter().enumerate() {
        let sep = if i == 0 { " " } else { ", " };
        setup.push_str(&format!("{sep}{label} at {t} s"));
    }
    area.draw(&Text::new(
        setup,
        (20, 40),
        (FONT, 14).into_font().color(&BLACK),
    ))?;
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} ms"));
    let mut line = format!(
        "{} requests: {} ok, {} errors, {} shed · latency p50 {} p99 {} max {}",
        summary.requests.sent,
        summary.requests.ok,
        summary.requests.errors,
        summary.requests.shed,
        ms(summary.latency.p50_ms),
        ms(summary.latency.p99_ms),
        ms(summary.latency.max_ms),
    );
    if let Some(ratio) = summary.instance_ratio {
        line.push_str(&format!(" · instance-seconds {ratio:.2}× oracle"));
    }
    if summary.pattern == "step" {
        line.push_str(&format!(
            " · recovery {}",
            summary
                .recovery_s
                .map_or("never".to_string(), |v| format!("{v:.1} s"))
        ));
    }
    area.draw(&Text::new(
        line,
        (20, 62),
        (FONT, 14).into_font().color(&BLACK),
    ))?;
    Ok(())
}

/// Ticks at 1, 2, 5 × 10^k within `lo..=hi` (plotters' log axis labels only powers of 10).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if (lo..=hi).contains(&v) {
                ticks.push(v);
            }
        }
        decade *= 10.0;
    }
    ticks
}

/// Time tick label: whole seconds without decimals.
fn format_s(t: f64) -> String {
    if t.fract() == 0.0 {
        format!("{t:.0}")
    } else {
        format!("{t:.1}")
    }
}

/// Latency tick label: whole milliseconds, fractions below 1 ms.
fn format_ms(v: f64) -> String {
    if v < 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// Vertical markers: (time, label).
fn phase_markers(pattern: &Pattern) -> Vec<(f64, &'static str)> {
    let mut markers = Vec::new();
    match pattern {
        Pattern::Step { .. } => {
            let (start, end) = pattern.high_phase().expect("step has a high phase");
            markers.push((start, "step up"));
            markers.push((end, "step down"));
        }
        Pattern::Burst { .. } => {
            let (start, end) = pattern.high_phase().expect("burst has a high phase");
            markers.push((start, "burst starts"));
            markers.push((end, "load stops"));
            return markers;
        }
        _ => {}
    }
    markers.push((pattern.load_stop_s(), "load stops"));
    markers
}

/// Points of a step line: each bucket's value held over the bucket; `None` breaks the line.
fn step_segments(rows: &[Row], value: impl Fn(&Row) -> Option<f64>) -> Vec<Vec<(f64, f64)>> {
    let mut segments = Vec::new();
    let mut current: Vec<(f64, f64)> = Vec::new();
    for r in rows {
        match value(r) {
            Some(v) => {
                current.push((r.t_s, v));
                current.push((r.t_s + BUCKET_S, v));
            }
            None => {
                if !current.is_empty() {
                    segments.push(std::mem::take(&mut current));
                }
            }
        }
    }
    if !current.is_empty() {
        segments.push(current);
    }
    segments
}

/// Points of a line through each bucket's midpoint; `None` breaks the line.
fn mid_segments(rows: &[Row], value: impl Fn(&Row) -> Option<f64>) -> Vec<Vec<(f64, f64)>> {
    let mut segments = Vec::new();
    let mut current = Vec::new();
    for r in rows {
        match value(r) {
            Some(v) => current.push((r.t_s + BUCKET_S / 2.0, v)),
            None => {
                if !current.is_empty() {
                    segments.push(std::mem::take(&mut current));
                }
            }
        }
    }
    if !current.is_empty() {
        segments.push(current);
    }
    segments
}

fn legend_line(color: RGBColor, width: u32) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(width))
}

fn legend_box(color: RGBAColor) -> impl Fn((i32, i32)) -> Rectangle<(i32, i32)> {
    move |(x, y)| Rectangle::new([(x + 4, y - 6), (x + 18, y + 6)], color.filled())
}

fn draw_load(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    rows: &[Row],
    t_max: f64,
    markers: &[f64],
    summary: &Summary,
) -> anyhow::Result<()> {
    let rps_peak = rows
        .iter()
        .map(|r| {
            r.offered_rps
                .max(r.achieved_rps)
                .max(f64::from(r.errors + r.shed) / BUCKET_S)
        })
        .fold(0.0, f64::max);
    // Head room above the data for the legend.
    let rps_max = (rps_peak * 1.45).max(10.0);
    let latencies: Vec<f64> = rows
        .iter()
        .flat_map(|r| [r.p50_ms, r.p99_ms])
        .flatten()
        .filter(|v| *v > 0.0)
        .collect();
    let lat_lo = latencies.iter().copied().fold(f64::INFINITY, f64::min);
    let lat_hi = latencies.iter().copied().fold(0.0, f64::max);
    let (lat_lo, lat_hi) = if latencies.is_empty() {
        (1.0, 1000.0)
    } else {
        // The highest point sits at 60% of the axis (log), below the legend.
        let lo = (lat_lo * 0.7).max(0.1);
        (lo, (lo * (lat_hi / lo).powf(1.0 / 0.6)).max(lo * 10.0))
    };

    let mut chart = ChartBuilder::on(area)
        .caption(
            "Load: requests/s (left); latency of the requests sent in each 100 ms, 503s excluded (right, log)",
            (FONT, 16),
        )
        .margin(10)
        .margin_right(20)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .right_y_label_area_size(80)
        .build_cartesian_2d(0f64..t_max, 0f64..rps_max)?
        .set_secondary_coord(
            0f64..t_max,
            (lat_lo..lat_hi)
                .log_scale()
                .with_key_points(log_ticks(lat_lo, lat_hi)),
        );
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("requests / s")
        .x_label_formatter(&|t| format_s(*t))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .light_line_style(RGBColor(240, 240, 240))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("latency (ms, log scale)")
        .y_label_formatter(&|v| format_ms(*v))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .draw()?;

    for t in markers {
        draw_marker(&mut chart, *t, rps_max)?;
    }

    // Errors and 503s, stacked, as per-second rates.
    let errors_total = summary.requests.errors;
    let shed_total = summary.requests.shed;
    chart
        .draw_series(rows.iter().filter(|r| r.errors > 0).map(|r| {
            let top = f64::from(r.errors) / BUCKET_S;
            Rectangle::new(
                [(r.t_s, 0.0), (r.t_s + BUCKET_S, top)],
                ERRORS.mix(0.5).filled(),
            )
        }))?
        .label(format!(
            "errors / s (timeouts, non-503 failures; {errors_total} in all)"
        ))
        .legend(legend_box(ERRORS.mix(0.5)));
    chart
        .draw_series(rows.iter().filter(|r| r.shed > 0).map(|r| {
            let bottom = f64::from(r.errors) / BUCKET_S;
            let top = bottom + f64::from(r.shed) / BUCKET_S;
            Rectangle::new(
                [(r.t_s, bottom), (r.t_s + BUCKET_S, top)],
                SHED.mix(0.5).filled(),
            )
        }))?
        .label(format!("shed (503) / s ({shed_total} in all)"))
        .legend(legend_box(SHED.mix(0.5)));

    draw_lines(
        &mut chart,
        step_segments(rows, |r| Some(r.offered_rps)),
        OFFERED,
        2,
        "offered requests / s",
    )?;
    draw_lines(
        &mut chart,
        step_segments(rows, |r| Some(r.achieved_rps)),
        ACHIEVED,
        1,
        "achieved (2xx) / s",
    )?;
    for (segments, color, width, label) in [
        (
            mid_segments(rows, |r| r.p50_ms),
            P50,
            1,
            "p50 latency (ms, right)",
        ),
        (
            mid_segments(rows, |r| r.p99_ms),
            P99,
            2,
            "p99 latency (ms, right)",
        ),
    ] {
        let mut labelled = false;
        for segment in segments {
            let anno =
                chart.draw_secondary_series(LineSeries::new(segment, color.stroke_width(width)))?;
            if !labelled {
                anno.label(label).legend(legend_line(color, width));
                labelled = true;
            }
        }
        if !labelled {
            chart
                .draw_secondary_series(std::iter::empty::<PathElement<(f64, f64)>>())?
                .label(format!("{label}: no data"))
                .legend(legend_line(color, width));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()?;
    Ok(())
}

fn draw_instances(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    rows: &[Row],
    t_max: f64,
    markers: &[f64],
    summary: &Summary,
) -> anyhow::Result<()> {
    let peak = rows
        .iter()
        .flat_map(|r| {
            [
                r.instances_actual,
                r.instances_desired,
                Some(f64::from(r.oracle_instances)),
                r.cold_starts,
            ]
        })
        .flatten()
        .fold(0.0, f64::max);
    let y_max = (peak * 1.45).max(5.0);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Instances of the function (node's Prometheus gauges, scraped every 100 ms)",
            (FONT, 16),
        )
        .margin(10)
        .margin_right(20)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .right_y_label_area_size(80)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("instances")
        .x_label_formatter(&|t| format_s(*t))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .light_line_style(RGBColor(240, 240, 240))
        .draw()?;
    for t in markers {
        draw_marker(&mut chart, *t, y_max)?;
    }
    let cold_total = summary
        .cold_starts
        .map_or("absent".to_string(), |c| format!("{c:.0} in all"));
    chart
        .draw_series(
            rows.iter()
                .filter(|r| r.cold_starts.unwrap_or(0.0) > 0.0)
                .map(|r| {
                    Rectangle::new(
                        [
                            (r.t_s, 0.0),
                            (r.t_s + BUCKET_S, r.cold_starts.unwrap_or(0.0)),
                        ],
                        COLD.mix(0.55).filled(),
                    )
                }),
        )?
        .label(format!("cold starts per 100 ms ({cold_total})"))
        .legend(legend_box(COLD.mix(0.55)));
    let actual_label = match summary.instance_seconds {
        Some(s) => format!("instances, actual ({s:.0} instance-s)"),
        None => "instances, actual".to_string(),
    };
    let oracle_label = format!(
        "oracle: ceil(offered × {} ms / {}) ({:.0} instance-s)",
        summary.service_time_ms, summary.target_concurrency, summary.oracle_instance_seconds
    );
    for (segments, color, width, label) in [
        (
            step_segments(rows, |r| Some(f64::from(r.oracle_instances))),
            ORACLE,
            2,
            oracle_label,
        ),
        (
            step_segments(rows, |r| r.instances_desired),
            DESIRED,
            2,
            "instances, desired (autoscaler)".to_string(),
        ),
        (
            step_segments(rows, |r| r.instances_actual),
            ACTUAL,
            3,
            actual_label,
        ),
    ] {
        let label = if segments.is_empty() {
            format!("{label}: not exported")
        } else {
            label
        };
        draw_lines(&mut chart, segments, color, width, &label)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()?;
    Ok(())
}

type Chart<'a, 'b, Y> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>;

/// Draws line segments as one legend entry (an empty entry if there are none).
fn draw_lines<Y>(
    chart: &mut Chart<'_, '_, Y>,
    segments: Vec<Vec<(f64, f64)>>,
    color: RGBColor,
    width: u32,
    label: &str,
) -> anyhow::Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    let mut labelled = false;
    for segment in segments {
        let anno = chart.draw_series(LineSeries::new(segment, color.stroke_width(width)))?;
        if !labelled {
            anno.label(label).legend(legend_line(color, width));
            labelled = true;
        }
    }
    if !labelled {
        chart
            .draw_series(std::iter::empty::<PathElement<(f64, f64)>>())?
            .label(label)
            .legend(legend_line(color, width));
    }
    Ok(())
}

/// A dashed vertical line at `t` (labelled in the header).
fn draw_marker<Y>(chart: &mut Chart<'_, '_, Y>, t: f64, y_max: f64) -> anyhow::Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    chart.draw_series(DashedLineSeries::new(
        vec![(t, 0.0), (t, y_max)],
        6,
        4,
        MARKER.stroke_width(1),
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ticks_are_one_two_five() {
        assert_eq!(
            log_ticks(15.0, 600.0),
            vec![20.0, 50.0, 100.0, 200.0, 500.0]
        );
        assert_eq!(log_ticks(1.0, 10.0), vec![1.0, 2.0, 5.0, 10.0]);
    }
}
