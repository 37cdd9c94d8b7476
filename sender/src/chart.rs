//! `coinflow-bench`'s rows kept as a JSON report, and drawn as an SVG chart: throughput
//! per row, and ack latency (p50, p99) at the closed and at the open loop per row.
//!
//! The bench writes `<report>.json` and `<report>.svg` next to its Markdown report;
//! `coinflow-bench --chart-from <report>.json` draws the chart again from the JSON alone,
//! so a chart can be made from figures copied out of an older run's table.

use std::path::{Path, PathBuf};

use plotters::coord::combinators::WithKeyPoints;
use plotters::coord::types::{RangedCoordf64, RangedCoordi32};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};

/// One benchmark run: what was measured and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// Which run this is (shown as the chart's title).
    pub title: String,
    /// Concurrent senders in the closed loop.
    pub concurrency: usize,
    /// The open loop's rate, events/s.
    pub rate: f64,
    /// The rows, in the report's order.
    pub rows: Vec<BenchRow>,
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    /// What was measured (`SQLite pipeline`, …).
    pub name: String,
    /// Acked events/s in the closed loop.
    pub throughput_per_s: f64,
    /// Ack latency p50 in the closed loop, ms.
    pub closed_p50_ms: f64,
    /// Ack latency p99 in the closed loop, ms.
    pub closed_p99_ms: f64,
    /// The open loop's achieved rate, events/s; `None`: the row has no open loop.
    pub open_achieved_per_s: Option<f64>,
    /// Ack latency p50 in the open loop, ms.
    pub open_p50_ms: Option<f64>,
    /// Ack latency p99 in the open loop, ms.
    pub open_p99_ms: Option<f64>,
    /// Peak RSS of each process, MiB, in the order the row started them.
    #[serde(default)]
    pub peak_rss_mib: Vec<Rss>,
}

/// A process's peak RSS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rss {
    /// The process (`webhook-edge`, `fulfillment-svc`, …).
    pub process: String,
    /// `VmHWM`, MiB.
    pub mib: f64,
}

/// Why a report could not be read, written or drawn.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    /// Reading or writing a file.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The JSON is not a report.
    #[error("{0}: not a coinflow-bench report: {1}")]
    Json(PathBuf, serde_json::Error),
    /// A report with no rows has nothing to draw.
    #[error("the report has no rows")]
    Empty,
    /// More rows than a chart can show.
    #[error("the report has {0} rows; a chart shows at most {MAX_ROWS}")]
    TooMany(usize),
    /// The drawing library failed.
    #[error("drawing the chart: {0}")]
    Draw(String),
}

/// The most rows a chart shows (a run has about ten).
pub const MAX_ROWS: usize = 200;

const WIDTH: u32 = 1100;
const LABELS: u32 = 300;
const THROUGHPUT_ROW: u32 = 26;
const LATENCY_ROW: u32 = 56;
const PANEL_EXTRA: u32 = 90;
const FONT: &str = "sans-serif";

/// Each latency bar: its legend, its colour, and its value in a row.
type Series = (&'static str, RGBColor, fn(&BenchRow) -> Option<f64>);

const LATENCY: [Series; 4] = [
    ("closed loop p50", RGBColor(120, 170, 225), |r| {
        Some(r.closed_p50_ms)
    }),
    ("closed loop p99", RGBColor(30, 80, 160), |r| {
        Some(r.closed_p99_ms)
    }),
    ("open loop p50", RGBColor(250, 185, 100), |r| r.open_p50_ms),
    ("open loop p99", RGBColor(205, 95, 20), |r| r.open_p99_ms),
];

/// Reads a report written by [`write_json`].
pub fn read_json(path: &Path) -> Result<BenchReport, ChartError> {
    let text = std::fs::read(path).map_err(|e| ChartError::Io(path.to_owned(), e))?;
    serde_json::from_slice(&text).map_err(|e| ChartError::Json(path.to_owned(), e))
}

/// Writes `report` as pretty JSON at `path`.
pub fn write_json(report: &BenchReport, path: &Path) -> Result<(), ChartError> {
    let text =
        serde_json::to_string_pretty(report).map_err(|e| ChartError::Json(path.to_owned(), e))?;
    std::fs::write(path, text + "\n").map_err(|e| ChartError::Io(path.to_owned(), e))
}

/// Draws `report` and writes the SVG at `path`.
pub fn write_svg(report: &BenchReport, path: &Path) -> Result<(), ChartError> {
    let svg = render_svg(report)?;
    std::fs::write(path, svg).map_err(|e| ChartError::Io(path.to_owned(), e))
}

/// Far past any figure a run measures; larger ones are drawn as this.
const LARGEST: f64 = 1e12;

/// A figure as drawn: finite, not negative, at most [`LARGEST`].
fn shown(value: f64) -> f64 {
    if value.is_finite() {
        value.clamp(0.0, LARGEST)
    } else {
        0.0
    }
}

/// An axis from 0 to a little past the largest value, never empty.
fn axis_end(values: impl Iterator<Item = f64>) -> f64 {
    values.map(shown).fold(0.0, f64::max).max(1.0) * 1.15
}

fn drawing(e: impl std::fmt::Display) -> ChartError {
    ChartError::Draw(e.to_string())
}

/// The chart of `report` as an SVG document: two panels, throughput bars per row, then
/// four latency bars per row (closed loop p50 and p99, open loop p50 and p99; a row
/// without an open loop has only the first two), each bar labelled with its value.
pub fn render_svg(report: &BenchReport) -> Result<String, ChartError> {
    let rows = &report.rows;
    if rows.is_empty() {
        return Err(ChartError::Empty);
    }
    if rows.len() > MAX_ROWS {
        return Err(ChartError::TooMany(rows.len()));
    }
    let n = u32::try_from(rows.len()).map_err(drawing)?;
    let top = PANEL_EXTRA + THROUGHPUT_ROW * n;
    let bottom = PANEL_EXTRA + 30 + LATENCY_ROW * n;
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (WIDTH, 40 + top + bottom)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let root = root
            .titled(&report.title, (FONT, 18).into_font())
            .map_err(drawing)?;
        let (upper, lower) = root.split_vertically(top);
        throughput(&upper, report)?;
        latency(&lower, report)?;
        root.present().map_err(drawing)?;
    }
    Ok(svg)
}

/// Each row's height in the y axis' units: row `i` of `n` spans
/// `(n - 1 - i) * ROW .. (n - i) * ROW`, so the first row is at the top.
const ROW: i32 = 100;

/// The y axis: a tick at the middle of every row, labelled with the row's name.
fn row_axis(rows: &[BenchRow]) -> Result<WithKeyPoints<RangedCoordi32>, ChartError> {
    let n = i32::try_from(rows.len()).map_err(drawing)?;
    let centers: Vec<i32> = (0..n).map(|i| (n - 1 - i) * ROW + ROW / 2).collect();
    Ok((0..n * ROW).with_key_points(centers))
}

fn row_name(rows: &[BenchRow], y: i32) -> String {
    usize::try_from(y.div_euclid(ROW))
        .ok()
        .and_then(|from_bottom| rows.len().checked_sub(from_bottom + 1))
        .and_then(|i| rows.get(i))
        .map(|r| r.name.clone())
        .unwrap_or_default()
}

/// The bottom of row `i`'s band in the y axis' units.
fn row_bottom(rows: &[BenchRow], i: usize) -> i32 {
    let below = rows.len().saturating_sub(i + 1);
    i32::try_from(below).unwrap_or(0).saturating_mul(ROW)
}

fn value_style() -> TextStyle<'static> {
    TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Left, VPos::Center))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type Panel<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, WithKeyPoints<RangedCoordi32>>>;

/// A panel of horizontal bars: `caption` above, a row per line named on the left, values
/// from 0 to `end` along the bottom, labelled by `x_label`.
fn panel<'a, 'b>(
    area: &'a Area<'b>,
    rows: &[BenchRow],
    caption: String,
    end: f64,
    x_label: fn(&f64) -> String,
) -> Result<Panel<'a, 'b>, ChartError> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 15).into_font())
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(LABELS)
        .build_cartesian_2d(0.0..end, row_axis(rows)?)
        .map_err(drawing)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .max_light_lines(0)
        .y_label_formatter(&|y| row_name(rows, *y))
        .x_label_formatter(&x_label)
        .label_style((FONT, 12).into_font())
        .draw()
        .map_err(drawing)?;
    Ok(chart)
}

fn throughput(area: &Area<'_>, report: &BenchReport) -> Result<(), ChartError> {
    let rows = &report.rows;
    let end = axis_end(rows.iter().map(|r| r.throughput_per_s));
    let caption = format!(
        "Throughput, acked events/s (closed loop, {} concurrent senders)",
        report.concurrency
    );
    let mut chart = panel(area, rows, caption, end, |x| format!("{x:.0}"))?;
    let bar = RGBColor(70, 110, 180);
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let y = row_bottom(rows, i);
            Rectangle::new(
                [(0.0, y + 15), (shown(r.throughput_per_s), y + 85)],
                bar.filled(),
            )
        }))
        .map_err(drawing)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let v = shown(r.throughput_per_s);
            Text::new(
                format!(" {v:.0}"),
                (v, row_bottom(rows, i) + ROW / 2),
                value_style(),
            )
        }))
        .map_err(drawing)?;
    Ok(())
}

fn latency(area: &Area<'_>, report: &BenchReport) -> Result<(), ChartError> {
    let rows = &report.rows;
    let end = axis_end(
        rows.iter()
            .flat_map(|r| LATENCY.iter().filter_map(move |(_, _, of)| of(r))),
    );
    let caption = format!(
        "Ack latency, ms: closed loop ({} senders) and open loop ({}/s)",
        report.concurrency, report.rate
    );
    let mut chart = panel(area, rows, caption, end, |x| format!("{x:.1}"))?;
    for (k, (label, color, of)) in (0..).zip(LATENCY.iter()) {
        // Bar k of a row, from its top: a fifth of the row each, a tenth free above.
        let top = |i: usize| row_bottom(rows, i) + ROW - ROW / 10 - k * ROW / 5;
        let bars: Vec<(usize, f64)> = rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| of(r).map(|v| (i, shown(v))))
            .collect();
        let color = *color;
        chart
            .draw_series(
                bars.iter().map(|&(i, v)| {
                    Rectangle::new([(0.0, top(i) - 18), (v, top(i))], color.filled())
                }),
            )
            .map_err(drawing)?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart
            .draw_series(
                bars.iter()
                    .map(|&(i, v)| Text::new(format!(" {v:.2}"), (v, top(i) - 9), value_style())),
            )
            .map_err(drawing)?;
    }
    chart
        .draw_series(
            rows.iter()
                .enumerate()
                .filter(|(_, r)| r.open_p50_ms.is_none() && r.open_p99_ms.is_none())
                .map(|(i, _)| {
                    let y = row_bottom(rows, i) + ROW / 4;
                    Text::new(" no open loop", (0.0, y), value_style())
                }),
        )
        .map_err(drawing)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 12).into_font())
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(drawing)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, throughput: f64, open: Option<(f64, f64)>) -> BenchRow {
        BenchRow {
            name: name.to_owned(),
            throughput_per_s: throughput,
            closed_p50_ms: 4.35,
            closed_p99_ms: 11.29,
            open_achieved_per_s: open.map(|_| 1983.0),
            open_p50_ms: open.map(|o| o.0),
            open_p99_ms: open.map(|o| o.1),
            peak_rss_mib: vec![Rss {
                process: "webhook-edge".to_owned(),
                mib: 11.6,
            }],
        }
    }

    fn report() -> BenchReport {
        BenchReport {
            title: "synthetic & small".to_owned(),
            concurrency: 32,
            rate: 2000.0,
            rows: vec![
                row("bare hyper (ceiling)", 40880.0, Some((0.11, 0.26))),
                row("SQLite pipeline", 6679.0, Some((1.12, 5.89))),
                row("SQLite, new ledger, no warm-up", 8415.0, None),
            ],
        }
    }

    /// The text of every `<text>` element, in document order.
    fn texts(svg: &str) -> Vec<String> {
        let doc = roxmltree::Document::parse(svg).unwrap();
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        doc.descendants()
            .filter(|n| n.tag_name().name() == "text")
            .map(|n| n.text().unwrap_or_default().trim().to_owned())
            .collect()
    }

    #[test]
    fn the_chart_is_well_formed_svg_naming_every_row_and_value() {
        let svg = render_svg(&report()).unwrap();
        let texts = texts(&svg);
        for name in [
            "bare hyper (ceiling)",
            "SQLite pipeline",
            "SQLite, new ledger, no warm-up",
        ] {
            // Once per panel.
            let times = texts.iter().filter(|t| *t == name).count();
            assert_eq!(times, 2, "{name} in {texts:?}");
        }
        assert!(texts.iter().any(|t| t == "synthetic & small"), "{texts:?}");
        assert_eq!(texts.iter().filter(|t| *t == "no open loop").count(), 1);
        for value in ["40880", "6679", "8415", "0.26", "5.89", "11.29"] {
            assert!(texts.iter().any(|t| t == value), "{value} in {texts:?}");
        }
        for legend in LATENCY.map(|(label, _, _)| label) {
            assert!(texts.iter().any(|t| t == legend), "{legend} in {texts:?}");
        }
        // Three rows of closed-loop latency, two of open-loop latency: ten latency bars
        // and three throughput bars (plus the legend's four swatches and the backgrounds).
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let filled = |rgb: &str| {
            doc.descendants()
                .filter(|n| n.tag_name().name() == "rect" && n.attribute("fill") == Some(rgb))
                .count()
        };
        assert_eq!(filled("#466EB4"), 3);
        assert_eq!(filled("#1E50A0"), 3 + 1);
        assert_eq!(filled("#CD5F14"), 2 + 1);
    }

    #[test]
    fn a_report_round_trips_through_json_and_is_drawn_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("run.json");
        write_json(&report(), &json).unwrap();
        assert_eq!(read_json(&json).unwrap(), report());
        let svg = dir.path().join("run.svg");
        write_svg(&read_json(&json).unwrap(), &svg).unwrap();
        let svg = std::fs::read_to_string(svg).unwrap();
        assert!(texts(&svg).iter().any(|t| t == "SQLite pipeline"));
    }

    #[test]
    fn odd_reports_are_errors_or_drawn_never_a_panic() {
        assert!(matches!(
            render_svg(&BenchReport {
                rows: Vec::new(),
                ..report()
            }),
            Err(ChartError::Empty)
        ));
        let many = vec![row("r", 1.0, None); MAX_ROWS + 1];
        assert!(matches!(
            render_svg(&BenchReport {
                rows: many,
                ..report()
            }),
            Err(ChartError::TooMany(201))
        ));
        let mut odd = report();
        odd.rows[0].throughput_per_s = f64::NAN;
        odd.rows[1].throughput_per_s = -5.0;
        odd.rows[1].open_p99_ms = Some(f64::MAX);
        odd.rows[2].throughput_per_s = 0.0;
        odd.rows[2].name = "<&\"'>".to_owned();
        odd.rows.iter_mut().for_each(|r| {
            r.closed_p50_ms = 0.0;
            r.closed_p99_ms = f64::INFINITY;
        });
        let svg = render_svg(&odd).unwrap();
        assert!(texts(&svg).iter().any(|t| t == "<&\"'>"));
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"rows\": 3}").unwrap();
        assert!(matches!(read_json(&bad), Err(ChartError::Json(..))));
        assert!(matches!(
            read_json(&dir.path().join("missing.json")),
            Err(ChartError::Io(..))
        ));
    }
}
