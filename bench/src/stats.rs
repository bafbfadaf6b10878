//! The figures the scenarios report: medians and spreads of repeated runs, the fairness of
//! what workers accepted, and a value's line against its target.

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// `median (min-max)` of `values`, with `digits` decimals.
pub fn spread(values: &[f64], digits: usize) -> String {
    let lo = values.iter().copied().fold(f64::MAX, f64::min);
    let hi = values.iter().copied().fold(f64::MIN, f64::max);
    format!(
        "{:.digits$} ({lo:.digits$}-{hi:.digits$})",
        median(values.to_vec())
    )
}

/// Fairness: the most any worker accepted over the least (1.0 is perfectly even).
pub fn fairness(accepted: &[u64]) -> f64 {
    let max = *accepted.iter().max().unwrap_or(&0) as f64;
    let min = *accepted.iter().min().unwrap_or(&0) as f64;
    if min == 0.0 {
        f64::INFINITY
    } else {
        max / min
    }
}

pub fn deltas(after: &[u64], before: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

pub fn ratio_line(name: &str, value: f64, target: f64, higher_is_better: bool) -> String {
    let met = if higher_is_better {
        value >= target
    } else {
        value <= target
    };
    let cmp = if higher_is_better { ">=" } else { "<=" };
    if met {
        format!("{name}: {value:.2} (target {cmp} {target}): met.")
    } else {
        format!(
            "{name}: {value:.2} (target {cmp} {target}): MISSED by {:.2}.",
            (value - target).abs()
        )
    }
}
