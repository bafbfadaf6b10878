//! `parsrv status --watch`: each socket's counters as rates per second between two statuses.

use std::fmt::Write as _;

use parsrv_common::reuseport::SlotCounters;

use super::{table::column_width, GroupStatus};

impl GroupStatus {
    /// Rates per second since `before`, per socket (for `status --watch`).
    pub fn render_rates(&self, before: &GroupStatus, elapsed: std::time::Duration) -> String {
        let seconds = elapsed.as_secs_f64().max(1e-3);
        let mut out = String::new();
        let titles: Vec<String> = SlotCounters::COUNTERS
            .iter()
            .map(|counter| format!("{}/s", counter.column))
            .collect();
        let _ = write!(out, "{:>4}", "slot");
        for title in &titles {
            let _ = write!(out, " {title:>w$}", w = column_width(title));
        }
        let _ = writeln!(out, "   (per second, last {seconds:.1} s)");
        for socket in &self.sockets {
            let Some(old) = before.sockets.iter().find(|s| s.slot == socket.slot) else {
                continue;
            };
            let _ = write!(out, "{:>4}", socket.slot);
            let now = socket.counters.values();
            for ((title, new), old) in titles.iter().zip(now).zip(old.counters.values()) {
                let rate = new.saturating_sub(old) as f64 / seconds;
                let _ = write!(out, " {rate:>w$.1}", w = column_width(title));
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use parsrv_common::reuseport::SlotCounters;

    use super::super::tests::sample;

    #[test]
    fn rates_are_deltas_per_second() {
        let before = sample();
        let mut after = sample();
        after.sockets[0].counters.selected += 30;
        let text = after.render_rates(&before, std::time::Duration::from_secs(2));
        // Each column as wide as its title plus one, one per counter in field order.
        let columns: String = SlotCounters::COUNTERS
            .iter()
            .map(|c| format!("  {}/s", c.column))
            .collect();
        assert_eq!(
            text.lines().next().unwrap(),
            format!("slot{columns}   (per second, last 2.0 s)")
        );
        assert_eq!(SlotCounters::COUNTERS[0].name, "selected");
        let row = text.lines().nth(1).unwrap();
        let mut expected = vec!["0", "15.0"];
        expected.resize(SlotCounters::COUNT + 1, "0.0");
        assert_eq!(row.split_whitespace().collect::<Vec<_>>(), expected);
    }
}
