//! The bench's results as SVG plots: for every mode of a [`Report`], one SVG with a panel per
//! hidden size, µs per call (p50, bars p10–p90) against tokens (log scale), one line per path
//! (unfused, fused 1-stage, fused 2-stage; the dispatcher's pick ringed) and per peer
//! ([`PeerReport`], dashed), the floor of the run ([`crate::report::Floors::floor_us`]) shaded;
//! one legend for the figure, in its header.
//!
//! Drawn with `plotters`' SVG backend only: text goes into the SVG as `<text>` in a generic
//! `sans-serif` family, laid out by plotters' own estimate, so no font is read at draw time and
//! no system font library is needed to build.

use crate::report::{Mode, PeerReport, Report, Row};
use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Width and height of one hidden size's panel, in pixels.
const PANEL: (u32, u32) = (540, 380);
/// Height of the header's three lines of text (what, where, when, from which file); the
/// legend's lines follow.
const HEADER: u32 = 82;
/// The narrowest figure (the header's lines need it).
const MIN_WIDTH: u32 = 1080;
/// The shaded floor.
const FLOOR: RGBColor = RGBColor(200, 200, 200);

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// plotters' drawing errors, as ours.
fn drawing<T, E: std::fmt::Display>(res: std::result::Result<T, E>) -> Result<T> {
    res.map_err(|e| anyhow!("drawing the plot: {e}"))
}

/// The colour of an arfuse path.
fn path_color(path: &str) -> RGBColor {
    match path {
        "unfused" => RGBColor(214, 39, 40),
        "fused-1stage" => RGBColor(31, 119, 180),
        "fused-2stage" => RGBColor(44, 160, 44),
        "vendor" => RGBColor(255, 127, 14),
        _ => RGBColor(23, 190, 207),
    }
}

/// The colour of the `index`-th peer.
fn peer_color(index: usize) -> RGBColor {
    const PEERS: [RGBColor; 4] =
        [RGBColor(148, 103, 189), RGBColor(140, 86, 75), RGBColor(227, 119, 194), RGBColor(90, 90, 90)];
    PEERS[index % PEERS.len()]
}

/// The modes `report` has rows of, in table order.
pub fn modes(report: &Report) -> Vec<Mode> {
    [Mode::Decode, Mode::Prefill].into_iter().filter(|m| report.rows.iter().any(|r| r.mode == *m)).collect()
}

/// The file name of `mode`'s plot of a report named `stem` (the JSON file's stem): `{stem}.svg`
/// when the stem already names the mode (`decode-world2`), else `{stem}-{mode}.svg`.
pub fn file_name(stem: &str, mode: Mode) -> String {
    let mode_name = match mode {
        Mode::Decode => "decode",
        Mode::Prefill => "prefill",
    };
    if stem.contains(mode_name) {
        format!("{stem}.svg")
    } else {
        format!("{stem}-{mode_name}.svg")
    }
}

/// What the lines of a figure are: the same in every panel, so one legend, in the header.
struct Legend {
    /// arfuse's paths, in the order of the report's rows (the unfused one first).
    paths: Vec<String>,
    /// The peers with timings of this mode.
    peers: Vec<String>,
}

impl Legend {
    fn of(rows: &[&Row], peers: Option<&PeerReport>, mode: Mode) -> Legend {
        let mut paths: Vec<String> = Vec::new();
        for p in rows.iter().flat_map(|r| &r.paths) {
            if !paths.contains(&p.path) {
                paths.push(p.path.clone());
            }
        }
        let mut names: Vec<String> = Vec::new();
        for r in peers.iter().flat_map(|p| &p.results).filter(|r| r.mode == mode) {
            if !names.contains(&r.peer) {
                names.push(r.peer.clone());
            }
        }
        Legend { paths, peers: names }
    }

    /// The colour of peer `name`.
    fn peer_color(&self, name: &str) -> RGBColor {
        peer_color(self.peers.iter().position(|p| p == name).unwrap_or(0))
    }

    /// The entries: what each swatch is and its text.
    fn entries(&self) -> Vec<(Swatch, String)> {
        let mut entries = vec![(Swatch::Floor, "floor of this run (bandwidth, graph node)".to_string())];
        entries.extend(self.paths.iter().map(|p| (Swatch::Line(path_color(p)), p.clone())));
        entries.push((Swatch::Ring, "the dispatcher's pick".to_string()));
        entries.extend(self.peers.iter().map(|n| (Swatch::Line(self.peer_color(n)), format!("peer: {n} (dashed)"))));
        entries
    }

    /// Where each entry goes in a figure `width` wide: (x, line), lines wrapped.
    fn layout(&self, width: i32) -> Vec<(i32, i32)> {
        let mut at = Vec::new();
        let (mut x, mut line) = (LEGEND_X, 0);
        for (_, text) in self.entries() {
            // plotters' own width estimate of 16 px text, as it lays out every label.
            let w = 26 + (text.chars().count() as f64 * 7.3).round() as i32;
            if x > LEGEND_X && x + w > width - 10 {
                (x, line) = (LEGEND_X, line + 1);
            }
            at.push((x, line));
            x += w + 22;
        }
        at
    }

    /// Lines the legend takes in a figure `width` wide.
    fn lines(&self, width: i32) -> u32 {
        self.layout(width).last().map_or(1, |&(_, line)| line as u32 + 1)
    }

    /// Draws the legend with its first line's swatches centred on height `y`.
    fn draw(&self, area: &Area<'_>, y: i32, width: i32) -> Result<()> {
        for ((swatch, text), (x, line)) in self.entries().into_iter().zip(self.layout(width)) {
            let y = y + LEGEND_LINE * line;
            match swatch {
                Swatch::Floor => {
                    drawing(area.draw(&Rectangle::new([(x, y - 6), (x + 20, y + 6)], FLOOR.mix(0.55).filled())))?
                }
                Swatch::Line(color) => {
                    drawing(area.draw(&PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))))?
                }
                Swatch::Ring => drawing(area.draw(&Circle::new((x + 10, y), 6, BLACK.stroke_width(1))))?,
            }
            let font = ("sans-serif", 16).into_font().color(&BLACK);
            drawing(area.draw(&Text::new(text, (x + 26, y - 7), font)))?;
        }
        Ok(())
    }
}

/// A legend entry's swatch.
enum Swatch {
    Floor,
    Line(RGBColor),
    Ring,
}

/// Left edge of the legend, and the height of one of its lines.
const LEGEND_X: i32 = 14;
const LEGEND_LINE: i32 = 22;

/// The SVG of `mode`'s rows of `report` (with `peers`' lines where they have the shapes);
/// `source` names the JSON it was drawn from, in the header.
pub fn render(report: &Report, peers: Option<&PeerReport>, mode: Mode, source: &str) -> Result<String> {
    let rows: Vec<&Row> = report.rows.iter().filter(|r| r.mode == mode).collect();
    let hiddens: Vec<usize> = rows.iter().map(|r| r.shape.hidden).collect::<BTreeSet<_>>().into_iter().collect();
    if hiddens.is_empty() {
        return Err(anyhow!("the report has no {mode:?} rows"));
    }
    let columns = hiddens.len().min(2);
    let grid_rows = hiddens.len().div_ceil(columns);
    let legend = Legend::of(&rows, peers, mode);
    let width = (PANEL.0 * columns as u32).max(MIN_WIDTH);
    let header_height = HEADER + LEGEND_LINE as u32 * legend.lines(width as i32);
    let size = (width, header_height + PANEL.1 * grid_rows as u32);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        drawing(root.fill(&WHITE))?;
        let (header, body) = root.split_vertically(header_height);
        draw_header(&header, report, &rows, mode, source)?;
        legend.draw(&header, HEADER as i32 + 8, width as i32)?;
        let panels = body.split_evenly((grid_rows, columns));
        for (panel, &hidden) in panels.iter().zip(&hiddens) {
            let of_hidden: Vec<&Row> = rows.iter().copied().filter(|r| r.shape.hidden == hidden).collect();
            draw_panel(panel, report, peers, mode, hidden, &of_hidden, &legend)?;
        }
        drawing(root.present())?;
    }
    Ok(svg)
}

/// What was measured, where, when, and from which file.
fn draw_header(area: &Area<'_>, report: &Report, rows: &[&Row], mode: Mode, source: &str) -> Result<()> {
    let dtype = rows.first().map_or("", |r| r.dtype.as_str());
    let iters = if mode == Mode::Decode { report.iters } else { report.prefill_iters };
    let lines = [
        format!(
            "arfuse-bench, {mode:?} ({}): µs per call (p50 of {} batches of {iters} calls, bars p10–p90), \
             world {} ({} ranks per GPU), {dtype}",
            mode.how(),
            report.repeats,
            report.world_size,
            report.ranks_per_gpu
        ),
        report.device.clone(),
        format!("{} ({}); {}; drawn from {source}", report.date, report.backend, input_sets(report)),
    ];
    for (i, line) in lines.iter().enumerate() {
        let style = ("sans-serif", if i == 0 { 19 } else { 16 }).into_font().color(&BLACK);
        drawing(area.draw(&Text::new(line.as_str(), (12, 8 + 22 * i as i32), style)))?;
    }
    Ok(())
}

/// How many input sets the calls rotated through, per shape (1: the same tensors every call).
fn input_sets(report: &Report) -> String {
    let sets = report.input_sets.iter().map(|&(_, n)| n);
    match (sets.clone().min(), sets.max()) {
        (Some(1), Some(1)) => "one input set per shape (the same tensors on every call)".into(),
        (Some(lo), Some(hi)) if lo == hi => format!("calls rotate over {lo} input sets per shape"),
        (Some(lo), Some(hi)) => format!("calls rotate over {lo}–{hi} input sets per shape"),
        _ => "input sets not recorded".into(),
    }
}

/// One hidden size: the floor, every path, every peer.
fn draw_panel(
    area: &Area<'_>,
    report: &Report,
    peers: Option<&PeerReport>,
    mode: Mode,
    hidden: usize,
    rows: &[&Row],
    legend: &Legend,
) -> Result<()> {
    let mut rows = rows.to_vec();
    rows.sort_by_key(|r| r.shape.rows);
    let tokens = |r: &Row| r.shape.rows as f64;
    let peer_results: Vec<_> =
        peers.map(|p| p.results.iter().filter(|r| r.mode == mode && r.hidden == hidden).collect()).unwrap_or_default();
    let xs: Vec<f64> = rows.iter().map(|r| tokens(r)).chain(peer_results.iter().map(|r| r.rows as f64)).collect();
    let (x_min, x_max) = xs.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let (x_min, x_max) = if x_min < x_max { (x_min / 1.3, x_max * 1.3) } else { (x_min / 2.0, x_max * 2.0) };
    let mut floor: Vec<(f64, f64)> =
        rows.iter().map(|r| (tokens(r), report.floors.floor_us(r.floor_bytes, mode))).collect();
    // One shape: its floor as a band across the panel (an area of one point has no width).
    if let [(_, y)] = floor[..] {
        floor = vec![(x_min, y), (x_max, y)];
    }
    let y_max = rows
        .iter()
        .flat_map(|r| r.paths.iter().map(|p| p.stats.p90))
        .chain(peer_results.iter().map(|r| r.stats.p90))
        .chain(floor.iter().map(|&(_, y)| y))
        .fold(0.0f64, f64::max)
        * 1.12;
    let y_max = if y_max > 0.0 { y_max } else { 1.0 };
    // Ticks at the token counts measured.
    let ticks: Vec<f64> = xs.iter().map(|&x| x as u64).collect::<BTreeSet<_>>().into_iter().map(|x| x as f64).collect();

    let mut chart = drawing(
        ChartBuilder::on(area)
            .caption(format!("hidden {hidden}"), ("sans-serif", 21))
            .margin(10)
            .x_label_area_size(38)
            .y_label_area_size(52)
            .build_cartesian_2d((x_min..x_max).log_scale().with_key_points(ticks), 0f64..y_max),
    )?;
    drawing(
        chart
            .configure_mesh()
            .x_desc("tokens")
            .y_desc("µs per call")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .light_line_style(RGBColor(242, 242, 242))
            .max_light_lines(1)
            .label_style(("sans-serif", 15))
            .draw(),
    )?;
    drawing(chart.draw_series(AreaSeries::new(floor.iter().copied(), 0.0, FLOOR.mix(0.55)).border_style(FLOOR)))?;
    for name in &legend.paths {
        let color = path_color(name);
        let points: Vec<(f64, f64, f64, f64)> = rows
            .iter()
            .filter_map(|r| r.path(name).map(|p| (tokens(r), p.stats.p10, p.stats.p50, p.stats.p90)))
            .collect();
        drawing(chart.draw_series(LineSeries::new(points.iter().map(|&(x, _, y, _)| (x, y)), color.stroke_width(2))))?;
        drawing(chart.draw_series(points.iter().map(|&(x, _, y, _)| Circle::new((x, y), 3, color.filled()))))?;
        drawing(
            chart.draw_series(points.iter().map(|&(x, lo, y, hi)| ErrorBar::new_vertical(x, lo, y, hi, color, 6))),
        )?;
    }
    let picked: Vec<(f64, f64)> = rows.iter().filter_map(|r| Some((tokens(r), r.fused_us()?))).collect();
    drawing(chart.draw_series(picked.iter().map(|&(x, y)| Circle::new((x, y), 7, BLACK.stroke_width(1)))))?;
    for name in &legend.peers {
        let color = legend.peer_color(name);
        let mut points: Vec<(f64, f64)> =
            peer_results.iter().filter(|r| r.peer == *name).map(|r| (r.rows as f64, r.stats.p50)).collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        drawing(chart.draw_series(DashedLineSeries::new(points.iter().copied(), 6, 4, color.stroke_width(2))))?;
        drawing(chart.draw_series(points.iter().map(|&(x, y)| Cross::new((x, y), 4, color.stroke_width(2)))))?;
    }
    Ok(())
}

/// Writes one SVG per mode of `report` into `out_dir` (named by [`file_name`] from `stem`);
/// returns their paths.
pub fn write_plots(
    report: &Report,
    peers: Option<&PeerReport>,
    source: &str,
    out_dir: &Path,
    stem: &str,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut written = Vec::new();
    for mode in modes(report) {
        let path = out_dir.join(file_name(stem, mode));
        let svg = render(report, peers, mode, source)?;
        std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Draws the plots of the report in `json` (an `arfuse-bench --json` file) into `out_dir`
/// (default: beside it), with `peers`' lines if given.
pub fn plot_file(json: &Path, peers: Option<&Path>, out_dir: Option<&Path>) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let report: Report =
        serde_json::from_str(&text).with_context(|| format!("{} is not an arfuse-bench report", json.display()))?;
    let peers = match peers {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let parsed = serde_json::from_str::<PeerReport>(&text)
                .with_context(|| format!("{} is not a peers.py report", path.display()))?;
            Some(parsed)
        }
        None => None,
    };
    let stem = json.file_stem().and_then(|s| s.to_str()).unwrap_or("arfuse");
    let source = json.file_name().and_then(|s| s.to_str()).unwrap_or("the report");
    let dir = match out_dir {
        Some(dir) => dir.to_path_buf(),
        None => json.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    write_plots(&report, peers.as_ref(), source, &dir, stem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{floor_bytes, Floors, PathTiming, PeerTiming, Shape, Stats};

    fn timing(path: &str, p50: f64) -> PathTiming {
        PathTiming {
            path: path.into(),
            stats: Stats { p10: p50 * 0.9, p50, p90: p50 * 1.2, samples: 5 },
            exact: Some(true),
        }
    }

    fn report() -> Report {
        let row = |mode, rows, hidden, base: f64| Row {
            mode,
            shape: Shape { rows, hidden },
            dtype: "bf16".into(),
            dispatched: "fused-1stage".into(),
            paths: vec![
                timing("unfused", base * 1.4),
                timing("fused-1stage", base),
                timing("fused-2stage", base * 1.6),
            ],
            floor_bytes: floor_bytes(Shape { rows, hidden }, 2, 2),
        };
        Report {
            device: "Test GPU x1".into(),
            backend: "test".into(),
            date: "2026-12-01T00:00:00Z".into(),
            command: "arfuse-bench --json t.json".into(),
            world_size: 2,
            ranks_per_gpu: 2,
            iters: 100,
            prefill_iters: 10,
            repeats: 20,
            graph_inputs: String::new(),
            fp8: String::new(),
            input_sets: vec![],
            floors: Floors { copy_gbs: 4000.0, graph_node_us: 0.8 },
            rows: vec![
                row(Mode::Decode, 1, 4096, 4.8),
                row(Mode::Decode, 16, 4096, 5.9),
                row(Mode::Decode, 1, 8192, 6.9),
                row(Mode::Decode, 16, 8192, 7.7),
                row(Mode::Prefill, 8192, 4096, 395.0),
            ],
        }
    }

    #[test]
    fn one_svg_per_mode_with_a_panel_per_hidden_size_every_path_the_floor_and_peers() {
        let peers = PeerReport {
            device: "Test GPU".into(),
            date: String::new(),
            results: [(1, 2.6), (16, 3.0)]
                .into_iter()
                .map(|(rows, p50)| PeerTiming {
                    peer: "torch.compile add+rmsnorm".into(),
                    mode: Mode::Decode,
                    rows,
                    hidden: 4096,
                    stats: Stats { p10: p50, p50, p90: p50, samples: 20 },
                })
                .collect(),
        };
        let report = report();
        assert_eq!(modes(&report), [Mode::Decode, Mode::Prefill]);
        let svg = render(&report, Some(&peers), Mode::Decode, "t.json").expect("render");
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        for text in ["hidden 4096", "hidden 8192", "fused-1stage", "fused-2stage", "unfused", "floor of this run"] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(svg.contains("peer: torch.compile add+rmsnorm"));
        assert!(svg.contains("drawn from t.json") && svg.contains("Test GPU x1"));
        // One legend for the figure; two panels.
        assert_eq!(svg.matches("peer: torch.compile").count(), 1);
        assert_eq!(svg.matches("\nfused-2stage\n").count(), 1);
        assert_eq!(svg.matches("\nhidden ").count(), 2);
        // A single-shape mode draws too (one point per path).
        let prefill = render(&report, None, Mode::Prefill, "t.json").expect("render prefill");
        assert!(prefill.contains("hidden 4096") && !prefill.contains("hidden 8192") && !prefill.contains("peer:"));
    }

    #[test]
    fn plots_are_named_after_the_json_and_its_mode() {
        assert_eq!(file_name("decode-world2", Mode::Decode), "decode-world2.svg");
        assert_eq!(file_name("arfuse", Mode::Prefill), "arfuse-prefill.svg");
        let dir = std::env::temp_dir().join(format!("arfuse-plot-test-{}", std::process::id()));
        let json = dir.join("run.json");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(&json, serde_json::to_string(&report()).expect("json")).expect("write");
        let written = plot_file(&json, None, None).expect("plot");
        assert_eq!(written, [dir.join("run-decode.svg"), dir.join("run-prefill.svg")]);
        assert!(std::fs::read_to_string(&written[0]).expect("svg").contains("hidden 8192"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
