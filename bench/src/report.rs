//! The results folder: `report.md` (every table, labelled with machine, date, commit and
//! parameters), a CSV per table, and SVG bar charts.

use std::{fmt::Write as _, path::PathBuf};

use plotters::prelude::*;

pub struct Report {
    pub dir: PathBuf,
    markdown: String,
}

/// One table: a title, column names, rows of cells.
pub struct Table {
    pub name: &'static str,
    pub title: String,
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Report {
    pub fn new(dir: PathBuf, header: &str) -> Report {
        std::fs::create_dir_all(&dir).expect("results folder");
        Report {
            dir,
            markdown: format!("{header}\n"),
        }
    }

    /// Adds a table (printed too), its CSV, and notes under it.
    pub fn table(&mut self, table: &Table, notes: &[String]) {
        let mut text = format!(
            "\n## {}\n\n| {} |\n|{}\n",
            table.title,
            table.columns.join(" | "),
            "---|".repeat(table.columns.len())
        );
        for row in &table.rows {
            let _ = writeln!(text, "| {} |", row.join(" | "));
        }
        for note in notes {
            let _ = write!(text, "\n{note}\n");
        }
        print!("{text}");
        self.markdown.push_str(&text);
        let mut csv = table.columns.join(",") + "\n";
        for row in &table.rows {
            csv.push_str(
                &row.iter()
                    .map(|c| c.replace(',', ";"))
                    .collect::<Vec<_>>()
                    .join(","),
            );
            csv.push('\n');
        }
        std::fs::write(self.dir.join(format!("{}.csv", table.name)), csv).expect("csv");
    }

    /// A bar chart of `values` (one bar per label), linked from the report.
    pub fn chart(&mut self, name: &str, title: &str, unit: &str, bars: &[(String, f64)]) {
        let path = self.dir.join(format!("{name}.svg"));
        match draw(&path, title, unit, bars) {
            Ok(()) => {
                let _ = write!(self.markdown, "\n![{title}]({name}.svg)\n");
            }
            Err(e) => {
                let _ = write!(self.markdown, "\n(chart {name} not drawn: {e})\n");
            }
        }
    }

    pub fn finish(self) -> PathBuf {
        let path = self.dir.join("report.md");
        std::fs::write(&path, self.markdown).expect("report");
        path
    }
}

fn draw(
    path: &std::path::Path,
    title: &str,
    unit: &str,
    bars: &[(String, f64)],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 120 + 40 * bars.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-9) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(260)
        .build_cartesian_2d(0.0..max, (0..bars.len()).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(bars.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars.get(*i).map_or(String::new(), |b| b.0.clone()),
            _ => String::new(),
        })
        .x_desc(unit)
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (label, value))| {
        let color = if label.starts_with("parsrv") {
            RGBColor(40, 110, 200)
        } else {
            RGBColor(150, 150, 150)
        };
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (*value, SegmentValue::Exact(i + 1)),
            ],
            color.filled(),
        );
        bar.set_margin(6, 6, 0, 0);
        bar
    }))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_names_every_bar_and_the_report_links_it() {
        let dir = std::env::temp_dir().join(format!("parsrv-report-{}", std::process::id()));
        let mut report = Report::new(dir.clone(), "# test");
        let bars = [
            ("parsrv".to_string(), 3.0),
            ("one accept queue".to_string(), 1.5),
        ];
        report.chart("rates", "new connections per second", "per second", &bars);
        let svg = std::fs::read_to_string(dir.join("rates.svg")).unwrap();
        for text in ["parsrv", "one accept queue", "new connections per second"] {
            assert!(svg.contains(text), "{text} not in the chart:\n{svg}");
        }
        let markdown = std::fs::read_to_string(report.finish()).unwrap();
        assert!(markdown.contains("(rates.svg)"), "{markdown}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
