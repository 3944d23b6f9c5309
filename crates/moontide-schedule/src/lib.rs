//! Schedules of scheduled functions: what `config.schedule` means, and when it is next due.
//!
//! A [`Schedule`] is a cron expression (5 fields, or 6 with seconds first), a nickname
//! (`@hourly`, `@daily`/`@midnight`, `@weekly`, `@monthly`, `@yearly`/`@annually`) or
//! `@every <duration>` (at least 1s), read in an IANA time zone (UTC by default), plus a
//! jitter bound and an overlap policy.
//!
//! Pure: no I/O and no clock. Callers pass the time ([`Schedule::next_after`]) and the
//! randomness ([`Schedule::jitter`]), so every node of a cluster computes the same due
//! times, and tests need no waiting.
//!
//! - Cron times follow the wall clock of the time zone, as Vixie cron does (through
//!   `croner`): a time that a DST change skips runs at the first valid time after the gap
//!   (a fixed-time job) or not at all (an interval job such as `*/15 * * * *`); a time the
//!   change repeats runs once, at its first occurrence.
//! - `@every` ignores time zones: its due times are the multiples of the period since the
//!   Unix epoch, so they are the same on every node and after every restart.

#![forbid(unsafe_code)]

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// Shortest `@every` period.
pub const MIN_EVERY: Duration = Duration::from_secs(1);
/// Longest jitter.
pub const MAX_JITTER: Duration = Duration::from_secs(3_600);

/// What to do when a run is due while the previous one still runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Overlap {
    /// The due run is skipped (recorded as skipped).
    #[default]
    Skip,
    /// The due run waits for the previous one; at most one waits, later ones are skipped.
    Queue,
}

impl Overlap {
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::Queue => "queue",
        }
    }
}

impl FromStr for Overlap {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<Overlap, ScheduleError> {
        match text {
            "skip" => Ok(Overlap::Skip),
            "queue" => Ok(Overlap::Queue),
            other => Err(ScheduleError::Overlap(format!(
                "unknown overlap policy \"{other}\": skip or queue"
            ))),
        }
    }
}

/// Why a schedule is refused; [`ScheduleError::field`] names the part at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("{0}")]
    Expression(String),
    #[error("{0}")]
    TimeZone(String),
    #[error("{0}")]
    Jitter(String),
    #[error("{0}")]
    Overlap(String),
}

impl ScheduleError {
    /// The field of `config.schedule` at fault: `cron`, `timezone`, `jitter`, `overlap`.
    pub fn field(&self) -> &'static str {
        match self {
            ScheduleError::Expression(_) => "cron",
            ScheduleError::TimeZone(_) => "timezone",
            ScheduleError::Jitter(_) => "jitter",
            ScheduleError::Overlap(_) => "overlap",
        }
    }
}

#[derive(Debug, Clone)]
enum Expr {
    Cron(Box<Cron>),
    Every(Duration),
}

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    expr: Expr,
    text: String,
    zone: Tz,
    jitter: Duration,
    overlap: Overlap,
}

impl Schedule {
    /// Parses an expression in a time zone (`None`: UTC).
    pub fn parse(expression: &str, timezone: Option<&str>) -> Result<Schedule, ScheduleError> {
        let text = expression.trim();
        let expr = parse_expression(text)?;
        let zone = match timezone {
            None => Tz::UTC,
            Some(name) => name
                .parse::<Tz>()
                .map_err(|_| ScheduleError::TimeZone(format!("unknown time zone \"{name}\"")))?,
        };
        Ok(Schedule {
            expr,
            text: text.to_string(),
            zone,
            jitter: Duration::ZERO,
            overlap: Overlap::Skip,
        })
    }

    /// Each run starts up to `jitter` after its due time (`< 1h`).
    pub fn with_jitter(mut self, jitter: Duration) -> Result<Schedule, ScheduleError> {
        if jitter > MAX_JITTER {
            return Err(ScheduleError::Jitter("must be at most 1h".into()));
        }
        self.jitter = jitter;
        Ok(self)
    }

    pub fn with_overlap(mut self, overlap: Overlap) -> Schedule {
        self.overlap = overlap;
        self
    }

    /// The expression as given (trimmed).
    pub fn expression(&self) -> &str {
        &self.text
    }

    /// The IANA name of the time zone (`UTC` by default).
    pub fn timezone(&self) -> &str {
        self.zone.name()
    }

    pub fn overlap(&self) -> Overlap {
        self.overlap
    }

    pub fn jitter_bound(&self) -> Duration {
        self.jitter
    }

    /// The first due time strictly after `after`, or `None` if there is none (a cron
    /// expression that never matches, such as `0 0 30 2 *`).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.expr {
            Expr::Every(period) => {
                let period = period.as_millis() as i64;
                let now = after.timestamp_millis();
                let next = now.div_euclid(period) * period + period;
                Utc.timestamp_millis_opt(next).single()
            }
            // Cron times are whole seconds: search from the second `after` is in (croner
            // would keep its fraction in the answer).
            Expr::Cron(cron) => cron
                .find_next_occurrence(
                    &Utc.timestamp_opt(after.timestamp(), 0)
                        .single()?
                        .with_timezone(&self.zone),
                    false,
                )
                .ok()
                .map(|time| time.with_timezone(&Utc)),
        }
    }

    /// The next `count` due times after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
        let mut times = Vec::with_capacity(count);
        let mut cursor = after;
        while times.len() < count {
            let Some(next) = self.next_after(cursor) else {
                break;
            };
            times.push(next);
            cursor = next;
        }
        times
    }

    /// The delay of one run after its due time, in `[0, jitter)`, from `random` (any
    /// value; pass the same one on every node to agree on the delay).
    pub fn jitter(&self, random: u64) -> Duration {
        let bound = self.jitter.as_millis() as u64;
        if bound == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(random % bound)
    }

    /// A due time as RFC 3339 in the schedule's time zone (`2026-03-29T03:00:00+02:00`).
    pub fn format(&self, time: DateTime<Utc>) -> String {
        time.with_timezone(&self.zone)
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false)
    }
}

fn parse_expression(text: &str) -> Result<Expr, ScheduleError> {
    if text.is_empty() {
        return Err(ScheduleError::Expression(
            "empty: a cron expression (\"0 3 * * *\"), @daily or @every 30s".into(),
        ));
    }
    if let Some(rest) = text.strip_prefix("@every") {
        let rest = rest.trim();
        let period = humantime::parse_duration(rest).map_err(|e| {
            ScheduleError::Expression(format!("@every needs a duration such as 30s: {e}"))
        })?;
        if period < MIN_EVERY {
            return Err(ScheduleError::Expression(
                "@every must be at least 1s".into(),
            ));
        }
        return Ok(Expr::Every(period));
    }
    let expanded = if text.starts_with('@') {
        match text.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            _ => {
                return Err(ScheduleError::Expression(format!(
                    "unknown nickname \"{text}\": @hourly, @daily, @weekly, @monthly, @yearly or @every <duration>"
                )));
            }
        }
    } else {
        text
    };
    let text = expanded;
    let fields = text.split_whitespace().count();
    if !(fields == 5 || fields == 6) {
        return Err(ScheduleError::Expression(format!(
            "a cron expression has 5 fields (minute hour day month weekday), or 6 with seconds first; this one has {fields}"
        )));
    }
    let cron = Cron::from_str(text)
        .map_err(|e| ScheduleError::Expression(format!("invalid cron expression: {e}")))?;
    Ok(Expr::Cron(Box::new(cron)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn next(schedule: &Schedule, after: &str) -> String {
        schedule.format(schedule.next_after(utc(after)).unwrap())
    }

    #[test]
    fn five_and_six_field_cron() {
        let daily = Schedule::parse("0 3 * * *", None).unwrap();
        assert_eq!(daily.timezone(), "UTC");
        assert_eq!(
            next(&daily, "2026-01-01T02:59:59Z"),
            "2026-01-01T03:00:00+00:00"
        );
        // Strictly after: a run at 03:00 does not find itself again.
        assert_eq!(
            next(&daily, "2026-01-01T03:00:00Z"),
            "2026-01-02T03:00:00+00:00"
        );
        // A fraction of a second in the start time does not leak into the answer.
        assert_eq!(
            daily.next_after(utc("2026-01-01T02:59:59.750Z")).unwrap(),
            utc("2026-01-01T03:00:00Z")
        );
        assert_eq!(
            daily.next_after(utc("2026-01-01T03:00:00.250Z")).unwrap(),
            utc("2026-01-02T03:00:00Z")
        );
        let seconds = Schedule::parse("*/10 * * * * *", None).unwrap();
        assert_eq!(
            next(&seconds, "2026-01-01T00:00:01Z"),
            "2026-01-01T00:00:10+00:00"
        );
    }

    #[test]
    fn nicknames() {
        let cases = [
            ("@hourly", "2026-01-01T01:00:00+00:00"),
            ("@daily", "2026-01-02T00:00:00+00:00"),
            ("@midnight", "2026-01-02T00:00:00+00:00"),
            ("@weekly", "2026-01-04T00:00:00+00:00"), // Sunday
            ("@monthly", "2026-02-01T00:00:00+00:00"),
            ("@yearly", "2027-01-01T00:00:00+00:00"),
        ];
        for (expression, expected) in cases {
            let schedule = Schedule::parse(expression, None).unwrap();
            assert_eq!(
                next(&schedule, "2026-01-01T00:30:00Z"),
                expected,
                "{expression}"
            );
        }
    }

    #[test]
    fn refusals_name_their_field() {
        for bad in [
            "",
            "* * *",
            "0 3 * * * * *",
            "61 * * * *",
            "@often",
            "@every",
            "@every 500ms",
            "@every soon",
        ] {
            let error = Schedule::parse(bad, None).unwrap_err();
            assert_eq!(error.field(), "cron", "{bad}: {error}");
        }
        let error = Schedule::parse("@daily", Some("Mars/Base")).unwrap_err();
        assert_eq!(error.field(), "timezone");
        assert_eq!(error.to_string(), "unknown time zone \"Mars/Base\"");
        let error = Schedule::parse("@daily", None)
            .unwrap()
            .with_jitter(Duration::from_secs(7_200))
            .unwrap_err();
        assert_eq!(error.field(), "jitter");
        assert_eq!("later".parse::<Overlap>().unwrap_err().field(), "overlap");
        assert_eq!("queue".parse::<Overlap>().unwrap(), Overlap::Queue);
    }

    #[test]
    fn a_time_zone_moves_the_wall_clock() {
        let schedule = Schedule::parse("0 3 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(schedule.timezone(), "Europe/Berlin");
        // Winter: UTC+1.
        let time = schedule.next_after(utc("2026-01-10T00:00:00Z")).unwrap();
        assert_eq!(time, utc("2026-01-10T02:00:00Z"));
        assert_eq!(schedule.format(time), "2026-01-10T03:00:00+01:00");
        // Summer: UTC+2.
        let time = schedule.next_after(utc("2026-07-10T00:00:00Z")).unwrap();
        assert_eq!(time, utc("2026-07-10T01:00:00Z"));
    }

    #[test]
    fn spring_forward_gap_runs_a_fixed_time_once_after_the_gap() {
        // Berlin, 2026-03-29: 02:00 local jumps to 03:00. 02:30 does not exist that day.
        let schedule = Schedule::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
        let times = schedule.upcoming(utc("2026-03-28T00:00:00Z"), 3);
        let local: Vec<String> = times.iter().map(|t| schedule.format(*t)).collect();
        assert_eq!(local[0], "2026-03-28T02:30:00+01:00");
        // The skipped time runs once, at the first valid time after the gap.
        assert_eq!(local[1], "2026-03-29T03:00:00+02:00");
        assert_eq!(local[2], "2026-03-30T02:30:00+02:00");
    }

    #[test]
    fn fall_back_overlap_runs_a_repeated_time_once() {
        // Berlin, 2026-10-25: 03:00 local goes back to 02:00; 02:30 happens twice.
        let schedule = Schedule::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
        let times = schedule.upcoming(utc("2026-10-24T12:00:00Z"), 2);
        assert_eq!(schedule.format(times[0]), "2026-10-25T02:30:00+02:00");
        assert_eq!(schedule.format(times[1]), "2026-10-26T02:30:00+01:00");
    }

    #[test]
    fn every_is_epoch_aligned_and_ignores_dst() {
        let schedule = Schedule::parse("@every 30m", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            schedule.next_after(utc("2026-01-01T00:10:00Z")).unwrap(),
            utc("2026-01-01T00:30:00Z")
        );
        assert_eq!(
            schedule.next_after(utc("2026-01-01T00:30:00Z")).unwrap(),
            utc("2026-01-01T01:00:00Z")
        );
        // Across the spring-forward change the gaps stay 30 minutes of real time.
        let times = schedule.upcoming(utc("2026-03-29T00:00:00Z"), 6);
        for pair in times.windows(2) {
            assert_eq!((pair[1] - pair[0]).num_minutes(), 30);
        }
        let second = Schedule::parse("@every 1s", None).unwrap();
        assert_eq!(
            second.next_after(utc("2026-01-01T00:00:00.400Z")).unwrap(),
            utc("2026-01-01T00:00:01Z")
        );
        let compound = Schedule::parse("@every 1h30m", None).unwrap();
        assert_eq!(
            compound.next_after(utc("1970-01-01T00:00:00Z")).unwrap(),
            utc("1970-01-01T01:30:00Z")
        );
    }

    #[test]
    fn jitter_stays_below_its_bound() {
        let schedule = Schedule::parse("@daily", None).unwrap();
        assert_eq!(schedule.jitter(12345), Duration::ZERO);
        let schedule = schedule.with_jitter(Duration::from_secs(10)).unwrap();
        for random in [0, 1, 9_999, 10_000, u64::MAX] {
            assert!(schedule.jitter(random) < Duration::from_secs(10));
        }
        assert_eq!(schedule.jitter(10_001), Duration::from_millis(1));
    }

    #[test]
    fn a_never_matching_cron_has_no_next_time() {
        let schedule = Schedule::parse("0 0 30 2 *", None).unwrap();
        assert!(schedule.upcoming(utc("2026-01-01T00:00:00Z"), 3).is_empty());
    }
}
