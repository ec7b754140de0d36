//! `--plot DIR`: the report as SVG charts (plotters): the three measures per method, seconds per
//! repair per method, and the cumulative curves; for a replay, its running exact-match shares.

use plotters::prelude::*;
use star_ls::eval::replay::ReplayReport;
use star_ls::eval::{MethodReport, Report};
use std::path::{Path, PathBuf};

const COLORS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
];

type PlotResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Writes `measures.svg`, `seconds.svg` and `cumulative.svg` into `dir`; returns their paths.
pub fn plot(report: &Report, dir: &Path) -> PlotResult<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let methods: Vec<(String, &MethodReport)> = report
        .methods
        .iter()
        .map(|(k, v)| (format!("{k:?}").to_lowercase(), v))
        .collect();
    let measures = dir.join("measures.svg");
    // Generalization only where some case was held out: a bar at 0 would say it was measured.
    let held_out = methods.iter().any(|(_, m)| m.held_out_cases > 0);
    let named = |m: &MethodReport| {
        let mut v = vec![("effectiveness", m.effectiveness)];
        if held_out {
            v.push(("generalization", m.generalization));
        }
        v.extend([
            ("specificity", m.specificity),
            ("passing kept", m.passing_kept),
        ]);
        v
    };
    let labels: Vec<&str> = methods
        .first()
        .map(|(_, m)| named(m).into_iter().map(|(n, _)| n).collect())
        .unwrap_or_default();
    bars(
        &measures,
        "Repair measures per method (share of cases)",
        &labels,
        &methods
            .iter()
            .map(|(n, m)| (n.as_str(), named(m).into_iter().map(|(_, v)| v).collect()))
            .collect::<Vec<_>>(),
        1.0,
    )?;
    let seconds = dir.join("seconds.svg");
    let most = methods
        .iter()
        .map(|(_, m)| m.repair_seconds_mean)
        .fold(0.0, f64::max);
    bars(
        &seconds,
        "Seconds per repair (mean)",
        &["seconds per repair"],
        &methods
            .iter()
            .map(|(n, m)| (n.as_str(), vec![m.repair_seconds_mean]))
            .collect::<Vec<_>>(),
        (most * 1.15).max(1.0),
    )?;
    let cumulative = dir.join("cumulative.svg");
    curves(&cumulative, &methods)?;
    Ok(vec![measures, seconds, cumulative])
}

/// Grouped bars: one group per measure, one bar per method.
fn bars(
    path: &Path,
    title: &str,
    measures: &[&str],
    series: &[(&str, Vec<f64>)],
    top: f64,
) -> PlotResult<()> {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let groups = measures.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..groups, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(measures.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            match (x - x.floor() - 0.5).abs() < 1e-6 {
                true => measures.get(i).map(|s| s.to_string()).unwrap_or_default(),
                false => String::new(),
            }
        })
        .draw()?;
    let width = 0.8 / series.len().max(1) as f64;
    for (s, (name, values)) in series.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        chart
            .draw_series(values.iter().enumerate().map(|(g, v)| {
                let x0 = g as f64 + 0.1 + s as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, *v)], color.filled())
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        chart.draw_series(values.iter().enumerate().map(|(g, v)| {
            let x = g as f64 + 0.1 + s as f64 * width;
            Text::new(format!("{v:.2}"), (x, *v + top * 0.01), ("sans-serif", 13))
        }))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Effectiveness (solid) and specificity (dashed markers) after each cumulative step, per method.
fn curves(path: &Path, methods: &[(String, &MethodReport)]) -> PlotResult<()> {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let steps = methods
        .iter()
        .flat_map(|(_, m)| m.cumulative.last().map(|p| p.step))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Cumulative: repairs applied one after another",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0usize..steps, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("repairs applied")
        .y_desc("share")
        .draw()?;
    for (s, (name, m)) in methods.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                m.cumulative.iter().map(|p| (p.step, p.effectiveness)),
                color.stroke_width(2),
            ))?
            .label(format!("{name} effectiveness"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        chart
            .draw_series(LineSeries::new(
                m.cumulative.iter().map(|p| (p.step, p.specificity)),
                color.stroke_width(1),
            ))?
            .label(format!("{name} specificity"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(1))
            });
        chart.draw_series(
            m.cumulative
                .iter()
                .map(|p| Circle::new((p.step, p.specificity), 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes `replay.svg` into `dir`: the running exact-match share of the unpatched and the learning
/// model over the lines written, the first repair marked. Returns its path.
pub fn plot_replay(report: &ReplayReport, dir: &Path) -> PlotResult<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("replay.svg");
    let root = SVGBackend::new(path.as_path(), (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = report
        .curve
        .iter()
        .map(|p| p.baseline_pass.max(p.repaired_pass))
        .fold(0.05, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Replay: exact first lines so far, unpatched and learning",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0usize..report.lines.max(1), 0.0..top.min(1.0))?;
    chart
        .configure_mesh()
        .x_desc("lines written")
        .y_desc("share exact")
        .draw()?;
    let series = [
        (
            "unpatched",
            report
                .curve
                .iter()
                .map(|p| (p.line, p.baseline_pass))
                .collect::<Vec<_>>(),
        ),
        (
            "learning",
            report
                .curve
                .iter()
                .map(|p| (p.line, p.repaired_pass))
                .collect(),
        ),
    ];
    for (s, (name, points)) in series.into_iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
    }
    if let Some(line) = report.first_repaired_line {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(line, 0.0), (line, top.min(1.0))],
            BLACK.mix(0.4),
        )))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    drop(chart);
    drop(root);
    Ok(path)
}
