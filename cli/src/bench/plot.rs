//! Benchmark plots with `plotters`: SVG (text as SVG text) or PNG
//! (rasterized with a TrueType font read at run time, e.g. from Debian's
//! fonts-dejavu-core). Both lay text out with that font's metrics.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail};
use plotters::coord::Shift;
use plotters::prelude::*;

/// Fonts tried, in order.
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];
const SIZE: (u32, u32) = (1200, 650);

/// The image format a plot path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Scalable vector graphics.
    Svg,
    /// A PNG bitmap.
    Png,
}

/// The format from the file name's extension.
pub fn format_of(path: &Path) -> anyhow::Result<Format> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
    {
        Some(e) if e == "svg" => Ok(Format::Svg),
        Some(e) if e == "png" => Ok(Format::Png),
        _ => bail!(
            "--plot {}: the file must end in .svg or .png",
            path.display()
        ),
    }
}

/// Registers the first font found as "sans-serif" (once per process).
fn ensure_font() -> anyhow::Result<()> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let found = FONT_PATHS.iter().find_map(|p| std::fs::read(p).ok());
        let Some(bytes) = found else {
            return Err(format!(
                "no TrueType font found for the plot's text (looked for {}; install fonts-dejavu-core)",
                FONT_PATHS.join(", ")
            ));
        };
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "the font file is not a usable TrueType font".to_string())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Stacked bars: one bar per run, one segment per phase; `overlays` are
/// other series per run (drawn as markers joined by lines).
pub fn stacked_runs(
    path: &Path,
    title: &str,
    phases: &[&str],
    stacks: &[Vec<f64>],
    overlays: &[(&str, Vec<Option<f64>>)],
) -> anyhow::Result<()> {
    ensure_font()?;
    match format_of(path)? {
        Format::Svg => draw_stacked(
            SVGBackend::new(path, SIZE).into_drawing_area(),
            title,
            phases,
            stacks,
            overlays,
        ),
        Format::Png => draw_stacked(
            BitMapBackend::new(path, SIZE).into_drawing_area(),
            title,
            phases,
            stacks,
            overlays,
        ),
    }
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e}")
}

fn draw_stacked<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    phases: &[&str],
    stacks: &[Vec<f64>],
    overlays: &[(&str, Vec<Option<f64>>)],
) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let n = stacks.len().max(1);
    let top = stacks
        .iter()
        .map(|s| s.iter().sum::<f64>())
        .chain(
            overlays
                .iter()
                .flat_map(|(_, v)| v.iter().flatten().copied()),
        )
        .fold(1.0_f64, f64::max)
        * 1.08;
    // Empty room right of the last bar for the legend (about a fifth of
    // the width).
    let x_end = n as f64 - 0.4 + (n as f64 + 0.2) * 0.3;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.6f64..x_end, 0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("run")
        .y_desc("ms since launch")
        .x_labels((n + n * 3 / 10 + 1).min(32))
        .x_label_formatter(&|x| {
            // Runs are numbered from 1; no numbers under the legend.
            if x.round() >= 0.0 && x.round() < n as f64 {
                format!("{}", x.round() + 1.0)
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .disable_x_mesh()
        .draw()
        .map_err(err)?;
    for (k, name) in phases.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let bars = stacks.iter().enumerate().map(move |(i, s)| {
            let below: f64 = s[..k].iter().sum();
            let x = i as f64;
            Rectangle::new(
                [(x - 0.35, below), (x + 0.35, below + s[k])],
                color.filled(),
            )
        });
        chart
            .draw_series(bars)
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    let marks = [BLACK, RED, BLUE, MAGENTA, CYAN];
    for (j, (label, values)) in overlays.iter().enumerate() {
        let color = marks[j % marks.len()];
        let points: Vec<(f64, f64)> = values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i as f64, v)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(1)))
            .map_err(err)?;
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| Cross::new(*p, 5, color.stroke_width(2))),
            )
            .map_err(err)?
            .label(*label)
            .legend(move |(x, y)| Cross::new((x + 6, y), 5, color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Lines of y against x (one per series), e.g. memory against sandboxes.
pub fn lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    ensure_font()?;
    match format_of(path)? {
        Format::Svg => draw_lines(
            SVGBackend::new(path, SIZE).into_drawing_area(),
            title,
            x_desc,
            y_desc,
            series,
        ),
        Format::Png => draw_lines(
            BitMapBackend::new(path, SIZE).into_drawing_area(),
            title,
            x_desc,
            y_desc,
            series,
        ),
    }
}

fn draw_lines<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let all = || series.iter().flat_map(|(_, v)| v.iter());
    let x_max = all().map(|p| p.0).fold(1.0_f64, f64::max);
    // Headroom for the legend above the lines.
    let y_max = all().map(|p| p.1).fold(1.0_f64, f64::max) * 1.3;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max + 0.5, 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(err)?;
    for (k, (label, points)) in series.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 2), (x + 14, y + 2)], color.filled()));
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_extension() {
        assert_eq!(format_of(Path::new("a/out.svg")).unwrap(), Format::Svg);
        assert_eq!(format_of(Path::new("out.PNG")).unwrap(), Format::Png);
        let e = format_of(Path::new("out.jpg")).unwrap_err().to_string();
        assert!(e.contains(".svg or .png"), "{e}");
    }
}
