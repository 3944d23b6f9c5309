//! Load patterns: the offered rate (requests/s) as a function of time, the phases the
//! summary refers to (when the high phase starts, when the load stops), and the open-loop
//! send schedule derived from the rate curve.
//!
//! The schedule is deterministic: time is cut into 10 ms slots; each slot gets the number
//! of requests the curve asks for at its midpoint (fractions carry over to the next slot,
//! so the total matches the curve), evenly spaced within the slot.

use std::fmt;
use std::time::Duration;

/// Length of one schedule slot, in seconds.
pub const SLOT_S: f64 = 0.010;

/// Parses `10s`, `500ms`, `1.5s`, `2m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("'{text}': a unit is required (ms, s or m)"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}': not a number followed by ms, s or m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("'{text}': unknown unit '{unit}' (ms, s or m)")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("'{text}': out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Formats a duration the way [`parse_duration`] reads it (`10s`, `500ms`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms >= 1000.0 && (ms / 1000.0).fract() == 0.0 {
        format!("{}s", ms / 1000.0)
    } else if ms.fract() == 0.0 {
        format!("{ms}ms")
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// A rate curve. Rates are in requests/s, times in seconds from the start of the load.
#[derive(Debug, Clone, PartialEq)]
pub enum Pattern {
    /// `rate` for `duration`.
    Constant { rate: f64, duration: Duration },
    /// Linear from `base` at t = 0 to `peak` at t = `duration`.
    Ramp {
        base: f64,
        peak: f64,
        duration: Duration,
    },
    /// `base` for `before`, `peak` for `during`, `base` again for `after`.
    Step {
        base: f64,
        peak: f64,
        before: Duration,
        during: Duration,
        after: Duration,
    },
    /// `base` at t = 0, `peak` at `period`/2, back to `base` at `period`; for `duration`.
    Sine {
        base: f64,
        peak: f64,
        period: Duration,
        duration: Duration,
    },
    /// Nothing for `idle_before`, `peak` for `during`, nothing for `idle_after`.
    Burst {
        peak: f64,
        idle_before: Duration,
        during: Duration,
        idle_after: Duration,
    },
}

impl Pattern {
    /// The pattern's name as given to `--pattern`.
    pub fn name(&self) -> &'static str {
        match self {
            Pattern::Constant { .. } => "constant",
            Pattern::Ramp { .. } => "ramp",
            Pattern::Step { .. } => "step",
            Pattern::Sine { .. } => "sine",
            Pattern::Burst { .. } => "burst",
        }
    }

    /// The knobs, in command-line order, with their values as given (`("base", "500")`).
    pub fn knobs(&self) -> Vec<(&'static str, String)> {
        let d = |d: &Duration| format_duration(*d);
        let r = |r: &f64| format!("{r}");
        match self {
            Pattern::Constant { rate, duration } => {
                vec![("rate", r(rate)), ("duration", d(duration))]
            }
            Pattern::Ramp {
                base,
                peak,
                duration,
            } => vec![
                ("base", r(base)),
                ("peak", r(peak)),
                ("duration", d(duration)),
            ],
            Pattern::Step {
                base,
                peak,
                before,
                during,
                after,
            } => vec![
                ("base", r(base)),
                ("peak", r(peak)),
                ("before", d(before)),
                ("during", d(during)),
                ("after", d(after)),
            ],
            Pattern::Sine {
                base,
                peak,
                period,
                duration,
            } => vec![
                ("base", r(base)),
                ("peak", r(peak)),
                ("period", d(period)),
                ("duration", d(duration)),
            ],
            Pattern::Burst {
                peak,
                idle_before,
                during,
                idle_after,
            } => vec![
                ("peak", r(peak)),
                ("idle-before", d(idle_before)),
                ("during", d(during)),
                ("idle-after", d(idle_after)),
            ],
        }
    }

    /// Total length of the schedule, in seconds.
    pub fn duration_s(&self) -> f64 {
        match self {
            Pattern::Constant { duration, .. }
            | Pattern::Ramp { duration, .. }
            | Pattern::Sine { duration, .. } => duration.as_secs_f64(),
            Pattern::Step {
                before,
                during,
                after,
                ..
            } => (*before + *during + *after).as_secs_f64(),
            Pattern::Burst {
                idle_before,
                during,
                idle_after,
                ..
            } => (*idle_before + *during + *idle_after).as_secs_f64(),
        }
    }

    /// The offered rate at time `t` (seconds), in requests/s; 0 outside the schedule.
    pub fn rate(&self, t: f64) -> f64 {
        if t < 0.0 || t >= self.duration_s() {
            return 0.0;
        }
        match self {
            Pattern::Constant { rate, .. } => *rate,
            Pattern::Ramp {
                base,
                peak,
                duration,
            } => base + (peak - base) * t / duration.as_secs_f64(),
            Pattern::Step { base, peak, .. } => {
                let (start, end) = self.high_phase().expect("step has a high phase");
                if (start..end).contains(&t) {
                    *peak
                } else {
                    *base
                }
            }
            Pattern::Sine {
                base, peak, period, ..
            } => {
                let phase = std::f64::consts::TAU * t / period.as_secs_f64();
                base + (peak - base) * (1.0 - phase.cos()) / 2.0
            }
            Pattern::Burst { peak, .. } => {
                let (start, end) = self.high_phase().expect("burst has a high phase");
                if (start..end).contains(&t) {
                    *peak
                } else {
                    0.0
                }
            }
        }
    }

    /// `[start, end)` of the high phase (the step's or the burst's), in seconds.
    pub fn high_phase(&self) -> Option<(f64, f64)> {
        match self {
            Pattern::Step { before, during, .. } => {
                Some((before.as_secs_f64(), (*before + *during).as_secs_f64()))
            }
            Pattern::Burst {
                idle_before,
                during,
                ..
            } => Some((
                idle_before.as_secs_f64(),
                (*idle_before + *during).as_secs_f64(),
            )),
            _ => None,
        }
    }

    /// When the load stops for good (the rate is 0 from then on), in seconds.
    pub fn load_stop_s(&self) -> f64 {
        match self {
            Pattern::Burst { .. } => self.high_phase().map_or(0.0, |(_, end)| end),
            _ => self.duration_s(),
        }
    }

    /// The send schedule: offsets from the start, in seconds, in order.
    pub fn schedule(&self) -> Schedule<'_> {
        Schedule {
            pattern: self,
            slots: (self.duration_s() / SLOT_S).round() as u64,
            next_slot: 0,
            carry: 0.0,
            slot: 0,
            in_slot: 0,
            index: 0,
        }
    }

    /// Checks the knobs: rates finite and not negative, durations not zero.
    pub fn validate(&self) -> Result<(), String> {
        let rates: Vec<(&str, f64)> = match self {
            Pattern::Constant { rate, .. } => vec![("rate", *rate)],
            Pattern::Ramp { base, peak, .. }
            | Pattern::Step { base, peak, .. }
            | Pattern::Sine { base, peak, .. } => vec![("base", *base), ("peak", *peak)],
            Pattern::Burst { peak, .. } => vec![("peak", *peak)],
        };
        let mut errors = Vec::new();
        for (name, rate) in rates {
            if !rate.is_finite() || rate < 0.0 {
                errors.push(format!("--{name} must be a rate >= 0 (requests/s)"));
            }
        }
        if let Pattern::Sine { period, .. } = self
            && period.is_zero()
        {
            errors.push("--period must be > 0".to_string());
        }
        if self.duration_s() < SLOT_S {
            errors.push("the pattern lasts less than 10ms".to_string());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

impl fmt::Display for Pattern {
    /// `step: base 500/s, peak 5000/s, before 10s, during 10s, after 10s`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.name())?;
        for (i, (knob, value)) in self.knobs().into_iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            let unit = if matches!(knob, "rate" | "base" | "peak") {
                "/s"
            } else {
                ""
            };
            write!(f, "{sep}{knob} {value}{unit}")?;
        }
        Ok(())
    }
}

/// Iterator over a pattern's send offsets (seconds from the start), see the module doc.
pub struct Schedule<'a> {
    pattern: &'a Pattern,
    /// Number of slots in the schedule, and the next one to load.
    slots: u64,
    next_slot: u64,
    /// Fraction of a request carried over from earlier slots.
    carry: f64,
    /// The slot being sent, its number of requests, and the index of the next one.
    slot: u64,
    in_slot: u64,
    index: u64,
}

impl Iterator for Schedule<'_> {
    type Item = f64;

    fn next(&mut self) -> Option<f64> {
        while self.index >= self.in_slot {
            if self.next_slot >= self.slots {
                return None;
            }
            self.slot = self.next_slot;
            self.next_slot += 1;
            let mid = (self.slot as f64 + 0.5) * SLOT_S;
            self.carry += self.pattern.rate(mid) * SLOT_S;
            // A little slack so that sums like 0.1 + 0.2 + ... still give whole requests.
            let whole = (self.carry + 1e-9).floor();
            self.carry = (self.carry - whole).max(0.0);
            self.in_slot = whole as u64;
            self.index = 0;
        }
        let t = (self.slot as f64 + self.index as f64 / self.in_slot as f64) * SLOT_S;
        self.index += 1;
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(parse_duration("10s").unwrap(), s(10.0));
        assert_eq!(parse_duration("500ms").unwrap(), s(0.5));
        assert_eq!(parse_duration("1.5s").unwrap(), s(1.5));
        assert_eq!(parse_duration("2m").unwrap(), s(120.0));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("10h").is_err());
        assert!(parse_duration("s").is_err());
        assert_eq!(format_duration(s(10.0)), "10s");
        assert_eq!(format_duration(s(0.5)), "500ms");
    }

    #[test]
    fn step_rates_and_phases() {
        let p = Pattern::Step {
            base: 500.0,
            peak: 5000.0,
            before: s(10.0),
            during: s(10.0),
            after: s(10.0),
        };
        assert_eq!(p.duration_s(), 30.0);
        assert_eq!(p.rate(9.99), 500.0);
        assert_eq!(p.rate(10.0), 5000.0);
        assert_eq!(p.rate(19.99), 5000.0);
        assert_eq!(p.rate(20.0), 500.0);
        assert_eq!(p.rate(30.0), 0.0);
        assert_eq!(p.high_phase(), Some((10.0, 20.0)));
        assert_eq!(p.load_stop_s(), 30.0);
        assert_eq!(
            p.to_string(),
            "step: base 500/s, peak 5000/s, before 10s, during 10s, after 10s"
        );
    }

    #[test]
    fn sine_and_ramp_and_burst_shapes() {
        let sine = Pattern::Sine {
            base: 300.0,
            peak: 3000.0,
            period: s(20.0),
            duration: s(40.0),
        };
        assert!((sine.rate(0.0) - 300.0).abs() < 1e-9);
        assert!((sine.rate(10.0) - 3000.0).abs() < 1e-9);
        assert!((sine.rate(20.0) - 300.0).abs() < 1e-9);
        let ramp = Pattern::Ramp {
            base: 100.0,
            peak: 200.0,
            duration: s(10.0),
        };
        assert_eq!(ramp.rate(5.0), 150.0);
        let burst = Pattern::Burst {
            peak: 2000.0,
            idle_before: s(3.0),
            during: s(5.0),
            idle_after: s(15.0),
        };
        assert_eq!(burst.rate(2.0), 0.0);
        assert_eq!(burst.rate(3.0), 2000.0);
        assert_eq!(burst.rate(8.0), 0.0);
        assert_eq!(burst.load_stop_s(), 8.0);
        assert_eq!(burst.duration_s(), 23.0);
    }

    #[test]
    fn schedule_matches_the_curve_and_is_evenly_spaced() {
        let p = Pattern::Constant {
            rate: 500.0,
            duration: s(1.0),
        };
        let times: Vec<f64> = p.schedule().collect();
        assert_eq!(times.len(), 500);
        for pair in times.windows(2) {
            assert!((pair[1] - pair[0] - 0.002).abs() < 1e-9, "{pair:?}");
        }
        // Fractional rates carry over: 150/s is 1.5 per slot.
        let p = Pattern::Constant {
            rate: 150.0,
            duration: s(2.0),
        };
        assert_eq!(p.schedule().count(), 300);
        // Rates below one per slot still send.
        let p = Pattern::Constant {
            rate: 10.0,
            duration: s(1.0),
        };
        let times: Vec<f64> = p.schedule().collect();
        assert_eq!(times.len(), 10);
        assert!(times.windows(2).all(|w| w[1] > w[0]));
    }

    #[test]
    fn schedule_of_a_burst_is_empty_outside_the_burst() {
        let p = Pattern::Burst {
            peak: 1000.0,
            idle_before: s(1.0),
            during: s(1.0),
            idle_after: s(1.0),
        };
        let times: Vec<f64> = p.schedule().collect();
        assert_eq!(times.len(), 1000);
        assert!(times.iter().all(|t| (1.0..2.0).contains(t)));
    }

    #[test]
    fn validate_rejects_bad_knobs() {
        let p = Pattern::Sine {
            base: -1.0,
            peak: 10.0,
            period: s(0.0),
            duration: s(1.0),
        };
        let err = p.validate().unwrap_err();
        assert!(err.contains("--base") && err.contains("--period"), "{err}");
    }
}
