//! The `time` module: wall-clock time (`now`, `now_ms`), a process-wide monotonic clock
//! (`monotonic_ms`), an asynchronous `sleep` and ISO 8601 UTC formatting (`iso8601`).
//!
//! `time.sleep` is an async Lua function: it only works when the calling Lua code runs in a
//! coroutine driven by mlua's async machinery (`Function::call_async` / `Thread::into_async`)
//! inside a tokio runtime with the time driver enabled.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mlua::{Lua, MultiValue, Table, Value};

use super::json::lua_type_name;

/// Longest sleep accepted by `time.sleep(ms)`, in milliseconds.
pub const MAX_SLEEP_MS: f64 = 600_000.0;

/// Range accepted by `time.iso8601`: years 0000 through 9999.
const MIN_ISO_SECONDS: f64 = -62_167_219_200.0; // 0000-01-01T00:00:00Z
const MAX_ISO_SECONDS: f64 = 253_402_300_800.0; // 10000-01-01T00:00:00Z (exclusive)

/// Builds the `time` module table.
pub fn module(lua: &Lua) -> mlua::Result<Table> {
    // Fix the monotonic origin no later than the first module creation.
    monotonic_origin();
    let t = lua.create_table_with_capacity(0, 5)?;
    t.raw_set(
        "now",
        lua.create_function(|_, ()| Ok(unix_now().as_secs_f64()))?,
    )?;
    t.raw_set(
        "now_ms",
        lua.create_function(|_, ()| Ok(unix_now().as_millis() as f64))?,
    )?;
    t.raw_set(
        "monotonic_ms",
        lua.create_function(|_, ()| Ok(monotonic_ms()))?,
    )?;
    t.raw_set(
        "sleep",
        lua.create_async_function(|_, args: MultiValue| async move {
            let ms = sleep_arg(&args)?;
            tokio::time::sleep(Duration::from_secs_f64(ms / 1000.0)).await;
            Ok(())
        })?,
    )?;
    t.raw_set(
        "iso8601",
        lua.create_function(|_, args: MultiValue| {
            let secs = match args.front() {
                None | Some(Value::Nil) => unix_now().as_secs_f64(),
                Some(Value::Integer(i)) => *i as f64,
                Some(Value::Number(n)) => *n,
                Some(other) => {
                    return Err(mlua::Error::runtime(format!(
                        "time.iso8601: expected number or nil, got {}",
                        lua_type_name(other)
                    )));
                }
            };
            iso8601(secs).ok_or_else(|| {
                mlua::Error::runtime("time.iso8601: seconds out of range (years 0000 to 9999 only)")
            })
        })?,
    )?;
    Ok(t)
}

fn sleep_arg(args: &MultiValue) -> mlua::Result<f64> {
    let ms = match args.front() {
        Some(Value::Integer(i)) => *i as f64,
        Some(Value::Number(n)) => *n,
        other => {
            return Err(mlua::Error::runtime(format!(
                "time.sleep: expected number of milliseconds, got {}",
                lua_type_name(other.unwrap_or(&Value::Nil))
            )));
        }
    };
    if !(0.0..=MAX_SLEEP_MS).contains(&ms) {
        return Err(mlua::Error::runtime(format!(
            "time.sleep: milliseconds must be between 0 and {MAX_SLEEP_MS}"
        )));
    }
    Ok(ms)
}

/// Time since the Unix epoch (zero if the system clock is set before 1970).
fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

fn monotonic_origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Milliseconds elapsed since the process-wide monotonic origin.
pub fn monotonic_ms() -> f64 {
    monotonic_origin().elapsed().as_secs_f64() * 1000.0
}

/// Formats seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC, rounded to the
/// nearest millisecond). `None` if not finite or outside years 0000..=9999.
pub fn iso8601(epoch_seconds: f64) -> Option<String> {
    if !(MIN_ISO_SECONDS..MAX_ISO_SECONDS).contains(&epoch_seconds) {
        return None;
    }
    let total_ms = (epoch_seconds * 1000.0).round() as i64;
    if total_ms >= (MAX_ISO_SECONDS as i64) * 1000 {
        return None;
    }
    let days = total_ms.div_euclid(86_400_000);
    let ms_of_day = total_ms.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    let secs_of_day = ms_of_day / 1000;
    Some(format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60,
        ms_of_day % 1000
    ))
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era, [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year from March 1st, [0, 365]
    let mp = (5 * doy + 2) / 153; // month from March, [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandboxed() -> Lua {
        let lua = Lua::new();
        lua.globals().set("time", module(&lua).unwrap()).unwrap();
        lua.sandbox(true).unwrap();
        lua
    }

    #[test]
    fn iso8601_known_values() {
        assert_eq!(iso8601(0.0).unwrap(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            iso8601(1_700_000_000.5).unwrap(),
            "2023-11-14T22:13:20.500Z"
        );
        assert_eq!(iso8601(951_782_400.0).unwrap(), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso8601(-1.0).unwrap(), "1969-12-31T23:59:59.000Z");
        assert_eq!(iso8601(-0.001).unwrap(), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            iso8601(4_107_542_400.0).unwrap(),
            "2100-03-01T00:00:00.000Z"
        );
        assert_eq!(
            iso8601(1_795_337_460.123).unwrap(),
            "2026-11-22T08:51:00.123Z"
        );
        assert_eq!(
            iso8601(MIN_ISO_SECONDS).unwrap(),
            "0000-01-01T00:00:00.000Z"
        );
        assert_eq!(
            iso8601(MAX_ISO_SECONDS - 1.0).unwrap(),
            "9999-12-31T23:59:59.000Z"
        );
        assert_eq!(iso8601(MAX_ISO_SECONDS), None);
        assert_eq!(iso8601(MAX_ISO_SECONDS - 0.0001), None);
        assert_eq!(iso8601(MIN_ISO_SECONDS - 1.0), None);
        assert_eq!(iso8601(f64::NAN), None);
        assert_eq!(iso8601(f64::INFINITY), None);
    }

    #[test]
    fn civil_from_days_matches_a_day_by_day_walk() {
        // Walk forward day by day from 1970-01-01 for ~1000 years and compare.
        let (mut y, mut m, mut d) = (1970i64, 1i64, 1i64);
        for days in 0..366_000i64 {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let month_len = [
                31,
                if leap { 29 } else { 28 },
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ];
            d += 1;
            if d > month_len[(m - 1) as usize] {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn lua_clock_functions() {
        let lua = sandboxed();
        let (now, now_ms, mono1, mono2, iso0, iso_now): (f64, f64, f64, f64, String, String) = lua
            .load(
                "local a = time.monotonic_ms()
                 local b = time.monotonic_ms()
                 return time.now(), time.now_ms(), a, b, time.iso8601(0), time.iso8601()",
            )
            .eval()
            .unwrap();
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((sys - now).abs() < 1.0, "now() = {now}, system = {sys}");
        assert_eq!(now_ms.fract(), 0.0);
        assert!((now_ms / 1000.0 - now).abs() < 1.0);
        assert!(mono2 >= mono1 && mono1 >= 0.0);
        assert_eq!(iso0, "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_now.len(), 24);
        assert!(iso_now.starts_with("20") && iso_now.ends_with('Z'));
    }

    #[test]
    fn lua_argument_errors() {
        let lua = sandboxed();
        for (code, want) in [
            (
                "time.iso8601('x')",
                "time.iso8601: expected number or nil, got string",
            ),
            ("time.iso8601(1e300)", "out of range"),
            ("time.iso8601(0/0)", "out of range"),
        ] {
            let e = lua.load(code).exec().unwrap_err().to_string();
            assert!(e.contains(want), "{code}: {e}");
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn sleep_in_a_coroutine() {
        let lua = sandboxed();
        let f = lua
            .load(
                "local t0 = time.monotonic_ms()
                 time.sleep(25)
                 time.sleep(0)
                 return time.monotonic_ms() - t0",
            )
            .into_function()
            .unwrap();
        let start = tokio::time::Instant::now();
        let _: f64 = f.call_async(()).await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(25));
        assert!(start.elapsed() < Duration::from_millis(1000));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sleep_really_waits() {
        let lua = sandboxed();
        let f = lua.load("time.sleep(20)").into_function().unwrap();
        let start = std::time::Instant::now();
        f.call_async::<()>(()).await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sleep_validates_its_argument() {
        let lua = sandboxed();
        for (code, want) in [
            ("time.sleep(-1)", "between 0 and 600000"),
            ("time.sleep(600001)", "between 0 and 600000"),
            ("time.sleep(0/0)", "between 0 and 600000"),
            ("time.sleep(math.huge)", "between 0 and 600000"),
            (
                "time.sleep('5')",
                "expected number of milliseconds, got string",
            ),
            ("time.sleep()", "got nil"),
        ] {
            let f = lua.load(code).into_function().unwrap();
            let e = f.call_async::<()>(()).await.unwrap_err().to_string();
            assert!(e.contains(want), "{code}: {e}");
        }
    }
}
