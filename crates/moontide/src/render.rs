//! How client commands print what they read: aligned tables and RFC 3339 times for a
//! person (`--output text`), the admin API's own JSON for a script (`--output json`).

use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value;

/// What client commands print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned tables and readable times.
    Text,
    /// The admin API's JSON (one record per line for `logs`).
    Json,
}

/// A table printed with every column as wide as its widest cell.
pub struct Table {
    headers: Vec<&'static str>,
    /// Columns aligned to the right (numbers).
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// `columns`: each header, and whether its column is aligned to the right.
    pub fn new(columns: &[(&'static str, bool)]) -> Table {
        Table {
            headers: columns.iter().map(|(name, _)| *name).collect(),
            right: columns.iter().map(|(_, right)| *right).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    /// The table as text: two spaces between columns, no trailing spaces.
    pub fn render(&self) -> String {
        let width = |column: usize| {
            self.rows
                .iter()
                .map(|row| row[column].chars().count())
                .chain([self.headers[column].len()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.headers.len()).map(width).collect();
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut out = String::new();
            for (column, cell) in cells.enumerate() {
                if column > 0 {
                    out.push_str("  ");
                }
                let pad = widths[column].saturating_sub(cell.chars().count());
                if self.right[column] {
                    out.extend(std::iter::repeat_n(' ', pad));
                    out.push_str(cell);
                } else {
                    out.push_str(cell);
                    out.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.truncate(out.trim_end().len());
            out.push('\n');
            out
        };
        let mut text = line(&mut self.headers.iter().copied());
        for row in &self.rows {
            text.push_str(&line(&mut row.iter().map(String::as_str)));
        }
        text
    }
}

/// Milliseconds since the Unix epoch as an RFC 3339 UTC time (`2026-12-05T00:13:57.123Z`);
/// `-` for a missing value.
pub fn time_ms(value: &Value) -> String {
    match value.as_u64() {
        Some(ms) => {
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        None => "-".to_string(),
    }
}

/// A JSON value as a table cell: strings without quotes, `-` for null.
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let mut table = Table::new(&[("NAME", false), ("VERSION", true), ("ROUTE", false)]);
        table.row(vec!["a-much-longer-name".into(), "12".into(), "-".into()]);
        table.row(vec!["x".into(), "3".into(), "/api".into()]);
        assert_eq!(
            table.render(),
            "NAME                VERSION  ROUTE\n\
             a-much-longer-name       12  -\n\
             x                         3  /api\n"
        );
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(
            time_ms(&json!(1_796_430_837_123u64)),
            "2026-12-05T00:33:57.123Z"
        );
        assert_eq!(time_ms(&Value::Null), "-");
    }
}
