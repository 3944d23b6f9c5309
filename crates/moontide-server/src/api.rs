//! Admin API wire types and their validation: what a client may send, checked in one step
//! that reports every problem with the path of the offending field (STYLE.md rule 7).
//!
//! Only wire and config types derive `Serialize`/`Deserialize`; unknown fields are
//! rejected everywhere.

use std::collections::BTreeMap;
use std::time::Duration;

use moontide_runtime::egress::AllowRule;
use moontide_runtime::{FunctionEgress, Limits};
use serde::{Deserialize, Serialize};

/// One problem in a request, with the JSON path of the field (`config.timeout`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// `PUT /v1/functions/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// A single-file function (`main.lua`).
    pub source: Option<String>,
    /// A bundle: path → content, with `main.lua` as the entry point.
    pub files: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub config: FunctionConfigInput,
}

/// `PUT /v1/plugins/{name}`: a plugin's Lua source and the limits of its instances (the
/// fields of a function's config, but `route`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginInput {
    pub source: Option<String>,
    #[serde(default)]
    pub config: FunctionConfigInput,
}

/// Requests one plugin instance serves at once unless its config says otherwise: a
/// request holds its share from its first phase to its log phase, mostly waiting on the
/// target, so one instance should serve many.
pub const PLUGIN_DEFAULT_CONCURRENCY: u32 = 100;

impl PluginInput {
    /// Validates the config (paths under `config.`) with plugin defaults.
    pub fn resolve_config(&self, errors: &mut Vec<FieldError>) -> FunctionConfig {
        let mut config = self.config.resolve("config.", errors);
        if self.config.concurrency.is_none() {
            config.concurrency = PLUGIN_DEFAULT_CONCURRENCY;
        }
        if self.config.route.is_some() {
            errors.push(FieldError::new(
                "config.route",
                "a plugin has no route of its own: list it in a route's plugins",
            ));
        }
        if self.config.schedule.is_some() {
            errors.push(FieldError::new(
                "config.schedule",
                "a plugin runs in a route's requests, not on a schedule",
            ));
        }
        config
    }
}

/// A duration given as text (`"5s"`, `"250ms"`, `"2m"`) or as whole milliseconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DurationInput {
    Millis(u64),
    Text(String),
}

/// A size given as text (`"64MiB"`, `"512KiB"`, `"1GB"`) or as bytes.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeInput {
    Bytes(u64),
    Text(String),
}

/// Most calls one instance may serve at once: they share its memory cap, so more is
/// rarely what a user means.
pub const MAX_CONCURRENCY: u32 = 1_000;

/// Function configuration as a client sends it; every field optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfigInput {
    pub timeout: Option<DurationInput>,
    pub memory: Option<SizeInput>,
    pub min: Option<u32>,
    pub max: Option<u32>,
    pub idle_timeout: Option<DurationInput>,
    pub concurrency: Option<u32>,
    pub stable_window: Option<DurationInput>,
    pub panic_window: Option<DurationInput>,
    pub max_scale_up_rate: Option<u32>,
    pub queue_size: Option<u32>,
    pub queue_timeout: Option<DurationInput>,
    pub env: Option<BTreeMap<String, String>>,
    pub route: Option<String>,
    /// Egress allowlist entries of this function only, `CIDR[:PORT]` (see
    /// `moontide_runtime::egress`).
    pub egress_allow: Option<Vec<String>>,
    /// Runs the function on a schedule (`docs/triggers.md`).
    pub schedule: Option<ScheduleInput>,
}

/// `config.schedule` as a client sends it: an expression (`"0 3 * * *"`, `"@daily"`,
/// `"@every 30s"`) or an object with the options.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ScheduleInput {
    Expression(String),
    Full(ScheduleObjectInput),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleObjectInput {
    pub cron: String,
    pub timezone: Option<String>,
    pub overlap: Option<String>,
    pub jitter: Option<DurationInput>,
}

/// A function's schedule as stored and served (checked when it was deployed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub cron: String,
    /// IANA name.
    pub timezone: String,
    /// `skip` or `queue`.
    pub overlap: String,
    #[serde(default)]
    pub jitter_ms: u64,
}

impl ScheduleConfig {
    /// The parsed schedule (`None` only for a record that no longer parses, which
    /// validation at deploy rules out).
    pub fn compile(&self) -> Option<moontide_schedule::Schedule> {
        let schedule = moontide_schedule::Schedule::parse(&self.cron, Some(&self.timezone)).ok()?;
        let overlap = self.overlap.parse().ok()?;
        schedule
            .with_jitter(Duration::from_millis(self.jitter_ms))
            .ok()
            .map(|schedule| schedule.with_overlap(overlap))
    }
}

impl ScheduleInput {
    /// Validates (paths under `path`: `config.schedule.timezone`).
    pub fn resolve(&self, path: &str, errors: &mut Vec<FieldError>) -> Option<ScheduleConfig> {
        let (cron, timezone, overlap, jitter) = match self {
            ScheduleInput::Expression(cron) => (cron, None, None, None),
            ScheduleInput::Full(full) => (
                &full.cron,
                full.timezone.as_deref(),
                full.overlap.as_deref(),
                full.jitter.as_ref(),
            ),
        };
        let field = |name: &str| match self {
            ScheduleInput::Expression(_) => path.to_string(),
            ScheduleInput::Full(_) => format!("{path}.{name}"),
        };
        let before = errors.len();
        let schedule = match moontide_schedule::Schedule::parse(cron, timezone) {
            Ok(schedule) => Some(schedule),
            Err(error) => {
                errors.push(FieldError::new(field(error.field()), error.to_string()));
                None
            }
        };
        let overlap = match overlap.map(str::parse::<moontide_schedule::Overlap>) {
            None => moontide_schedule::Overlap::Skip,
            Some(Ok(overlap)) => overlap,
            Some(Err(error)) => {
                errors.push(FieldError::new(field("overlap"), error.to_string()));
                moontide_schedule::Overlap::Skip
            }
        };
        let mut jitter_ms = 0;
        duration_field(
            &jitter.cloned(),
            &field("jitter"),
            (Duration::ZERO, moontide_schedule::MAX_JITTER),
            &mut jitter_ms,
            errors,
        );
        let schedule = schedule?;
        if errors.len() > before {
            return None;
        }
        Some(ScheduleConfig {
            cron: schedule.expression().to_string(),
            timezone: schedule.timezone().to_string(),
            overlap: overlap.as_str().to_string(),
            jitter_ms,
        })
    }
}

/// Most egress allowlist entries one function may have.
pub const MAX_EGRESS_ALLOW: usize = 64;

/// Function configuration as stored and served: normalized, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    pub timeout_ms: u64,
    pub memory_bytes: u64,
    pub min: u32,
    pub max: u32,
    /// Idle grace: after this long without a call, the function scales down to `min`.
    pub idle_timeout_ms: u64,
    /// Calls one instance serves at once, as coroutines of its Lua state (the autoscaler's
    /// target). They share the instance's memory cap and module-level state.
    #[serde(default = "defaults::concurrency")]
    pub concurrency: u32,
    /// Time constant of the slow average of observed concurrency: scaling down follows it.
    #[serde(default = "defaults::stable_window_ms")]
    pub stable_window_ms: u64,
    /// Time constant of the fast average: scaling up (pre-warming) follows it.
    #[serde(default = "defaults::panic_window_ms")]
    pub panic_window_ms: u64,
    /// Most instances created per second for this function on the node (on demand and
    /// pre-warmed together).
    #[serde(default = "defaults::max_scale_up_rate")]
    pub max_scale_up_rate: u32,
    /// Most calls waiting for an instance on the node; more are shed at once.
    #[serde(default = "defaults::queue_size")]
    pub queue_size: u32,
    /// Longest a call waits for an instance before it is shed.
    #[serde(default = "defaults::queue_timeout_ms")]
    pub queue_timeout_ms: u64,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub route: Option<String>,
    /// The function's own egress allowlist, normalised (`10.0.0.0/8`, `127.0.0.1:8081`,
    /// `[::1]:8081`); on top of the node's `serve --egress-allow`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allow: Vec<String>,
    /// When the scheduler runs the function (`triggers::scheduler`); absent in records
    /// stored before schedules existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleConfig>,
}

/// Defaults of the scaling fields, also used when reading configs stored before they
/// existed.
mod defaults {
    pub fn concurrency() -> u32 {
        1
    }
    pub fn stable_window_ms() -> u64 {
        500
    }
    pub fn panic_window_ms() -> u64 {
        100
    }
    pub fn max_scale_up_rate() -> u32 {
        1_000
    }
    pub fn queue_size() -> u32 {
        1_024
    }
    pub fn queue_timeout_ms() -> u64 {
        1_000
    }
}

impl FunctionConfig {
    pub const DEFAULT_MAX: u32 = 64;
    pub const MAX_MAX: u32 = 10_000;
    pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;

    pub fn limits(&self) -> Limits {
        Limits {
            timeout: Duration::from_millis(self.timeout_ms),
            memory_bytes: self.memory_bytes as usize,
            ..Limits::default()
        }
    }

    /// The config as shown by the API: secrets reduced to their names.
    pub fn redacted(&self) -> serde_json::Value {
        serde_json::json!({
            "timeout_ms": self.timeout_ms,
            "memory_bytes": self.memory_bytes,
            "min": self.min,
            "max": self.max,
            "idle_timeout_ms": self.idle_timeout_ms,
            "concurrency": self.concurrency,
            "stable_window_ms": self.stable_window_ms,
            "panic_window_ms": self.panic_window_ms,
            "max_scale_up_rate": self.max_scale_up_rate,
            "queue_size": self.queue_size,
            "queue_timeout_ms": self.queue_timeout_ms,
            "env_keys": self.env.keys().collect::<Vec<_>>(),
            "route": self.route,
            "egress_allow": self.egress_allow,
            "schedule": self.schedule,
        })
    }

    /// The function's own egress allowlist, for its instances (entries were validated
    /// when the config was resolved).
    pub fn egress(&self) -> std::sync::Arc<FunctionEgress> {
        if self.egress_allow.is_empty() {
            return FunctionEgress::none();
        }
        FunctionEgress::new(
            self.egress_allow
                .iter()
                .filter_map(|entry| entry.parse::<AllowRule>().ok())
                .collect(),
        )
    }
}

impl Default for FunctionConfig {
    fn default() -> Self {
        FunctionConfig {
            timeout_ms: Limits::DEFAULT_TIMEOUT.as_millis() as u64,
            memory_bytes: Limits::DEFAULT_MEMORY_BYTES as u64,
            min: 0,
            max: Self::DEFAULT_MAX,
            idle_timeout_ms: Self::DEFAULT_IDLE_TIMEOUT_MS,
            concurrency: defaults::concurrency(),
            stable_window_ms: defaults::stable_window_ms(),
            panic_window_ms: defaults::panic_window_ms(),
            max_scale_up_rate: defaults::max_scale_up_rate(),
            queue_size: defaults::queue_size(),
            queue_timeout_ms: defaults::queue_timeout_ms(),
            env: BTreeMap::new(),
            route: None,
            egress_allow: Vec::new(),
            schedule: None,
        }
    }
}

impl FunctionConfigInput {
    /// Validates and normalizes, collecting every error (paths under `prefix`).
    pub fn resolve(&self, prefix: &str, errors: &mut Vec<FieldError>) -> FunctionConfig {
        let mut config = FunctionConfig::default();
        let path = |field: &str| format!("{prefix}{field}");
        if let Some(timeout) = &self.timeout {
            match parse_duration(timeout) {
                Ok(d) if d < Limits::MIN_TIMEOUT || d > Limits::MAX_TIMEOUT => errors.push(
                    FieldError::new(path("timeout"), "must be between 1ms and 15m"),
                ),
                Ok(d) => config.timeout_ms = d.as_millis() as u64,
                Err(message) => errors.push(FieldError::new(path("timeout"), message)),
            }
        }
        if let Some(memory) = &self.memory {
            match parse_size(memory) {
                Ok(bytes)
                    if bytes < Limits::MIN_MEMORY_BYTES as u64
                        || bytes > Limits::MAX_MEMORY_BYTES as u64 =>
                {
                    errors.push(FieldError::new(
                        path("memory"),
                        "must be between 1MiB and 4GiB",
                    ))
                }
                Ok(bytes) => config.memory_bytes = bytes,
                Err(message) => errors.push(FieldError::new(path("memory"), message)),
            }
        }
        let mut duration_in = |field: &str,
                               input: &Option<DurationInput>,
                               range: (Duration, Duration),
                               target: &mut u64| {
            duration_field(input, &path(field), range, target, errors);
        };
        duration_in(
            "idle_timeout",
            &self.idle_timeout,
            (Duration::ZERO, Duration::from_secs(7 * 86_400)),
            &mut config.idle_timeout_ms,
        );
        duration_in(
            "stable_window",
            &self.stable_window,
            (Duration::from_millis(10), Duration::from_secs(3_600)),
            &mut config.stable_window_ms,
        );
        duration_in(
            "panic_window",
            &self.panic_window,
            (Duration::from_millis(10), Duration::from_secs(3_600)),
            &mut config.panic_window_ms,
        );
        duration_in(
            "queue_timeout",
            &self.queue_timeout,
            (Duration::ZERO, Duration::from_secs(60)),
            &mut config.queue_timeout_ms,
        );
        if self.panic_window.is_some() && config.panic_window_ms > config.stable_window_ms {
            errors.push(FieldError::new(
                path("panic_window"),
                "must not be longer than stable_window",
            ));
        }
        if let Some(concurrency) = self.concurrency {
            if concurrency == 0 || concurrency > MAX_CONCURRENCY {
                errors.push(FieldError::new(
                    path("concurrency"),
                    format!("must be between 1 and {MAX_CONCURRENCY} calls per instance"),
                ));
            } else {
                config.concurrency = concurrency;
            }
        }
        if let Some(rate) = self.max_scale_up_rate {
            if rate == 0 || rate > 1_000_000 {
                errors.push(FieldError::new(
                    path("max_scale_up_rate"),
                    "must be between 1 and 1000000 instances per second",
                ));
            } else {
                config.max_scale_up_rate = rate;
            }
        }
        if let Some(size) = self.queue_size {
            if size > 100_000 {
                errors.push(FieldError::new(
                    path("queue_size"),
                    "must be at most 100000 (0 sheds at once when no instance is free)",
                ));
            } else {
                config.queue_size = size;
            }
        }
        if let Some(max) = self.max {
            if max == 0 || max > FunctionConfig::MAX_MAX {
                errors.push(FieldError::new(
                    path("max"),
                    format!("must be between 1 and {}", FunctionConfig::MAX_MAX),
                ));
            } else {
                config.max = max;
            }
        }
        if let Some(min) = self.min {
            if min > config.max {
                errors.push(FieldError::new(path("min"), "must not be greater than max"));
            } else {
                config.min = min;
            }
        }
        if let Some(env) = &self.env {
            for (key, value) in env {
                if !is_env_name(key) {
                    errors.push(FieldError::new(
                        format!("{}.{key}", path("env")),
                        "environment names are letters, digits and '_', not starting with a digit",
                    ));
                } else if value.len() > 32 << 10 {
                    errors.push(FieldError::new(
                        format!("{}.{key}", path("env")),
                        "value is longer than 32 KiB",
                    ));
                }
            }
            config.env = env.clone();
        }
        if let Some(route) = &self.route {
            if let Err(message) = validate_route(route) {
                errors.push(FieldError::new(path("route"), message));
            } else {
                config.route = Some(route.trim_end_matches('/').to_string());
            }
        }
        if let Some(entries) = &self.egress_allow {
            if entries.len() > MAX_EGRESS_ALLOW {
                errors.push(FieldError::new(
                    path("egress_allow"),
                    format!("at most {MAX_EGRESS_ALLOW} entries"),
                ));
            }
            let mut rules = Vec::new();
            for (index, entry) in entries.iter().enumerate() {
                match entry.parse::<AllowRule>() {
                    Ok(rule) => rules.push(rule),
                    Err(message) => errors.push(FieldError::new(
                        format!("{}[{index}]", path("egress_allow")),
                        message,
                    )),
                }
            }
            rules.sort_unstable();
            rules.dedup();
            config.egress_allow = rules.iter().map(ToString::to_string).collect();
        }
        if let Some(schedule) = &self.schedule {
            config.schedule = schedule.resolve(&path("schedule"), errors);
        }
        config
    }
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Paths the data plane answers itself, which no function may take.
pub const RESERVED_PATHS: [&str; 3] = ["/healthz", "/readyz", "/fn"];

fn validate_route(route: &str) -> Result<(), String> {
    if !route.starts_with('/') || route.len() < 2 {
        return Err("must be a path starting with '/', e.g. /greet".into());
    }
    if route.len() > 256
        || !route
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/-_.~".contains(c))
    {
        return Err("may use letters, digits and / - _ . ~ (at most 256)".into());
    }
    let trimmed = route.trim_end_matches('/');
    // Requests are routed on their normal form (`moontide_gateway::path`).
    if !moontide_gateway::path::is_normal(trimmed) {
        return Err(
            "no request would match it: request paths are normalised before routing, so it \
             may not hold `//`, `.` or `..` segments"
                .into(),
        );
    }
    if RESERVED_PATHS
        .iter()
        .any(|reserved| trimmed == *reserved || trimmed.starts_with(&format!("{reserved}/")))
    {
        return Err(format!("{trimmed} is reserved by Moontide"));
    }
    Ok(())
}

/// Function names: 1–64 of letters, digits, `-`, `_`, starting with a letter or digit.
pub fn validate_function_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(
            "function names are 1-64 letters, digits, '-' or '_', starting with a letter or digit"
                .into(),
        )
    }
}

/// A node's name in the registry (`serve --node-name`): what `moontide nodes` shows and
/// the registry's key, so no `/`.
pub fn validate_node_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if valid {
        Ok(())
    } else {
        Err("node names are 1-253 letters, digits, '-', '_', '.' or ':', starting with a letter or digit".into())
    }
}

/// `1500` ms as `1.5s`, `250` ms as `250ms`: for error messages.
/// Validates an optional duration field into whole milliseconds within `range`; an
/// absent field leaves `target` at its default.
pub fn duration_field(
    input: &Option<DurationInput>,
    path: &str,
    range: (Duration, Duration),
    target: &mut u64,
    errors: &mut Vec<FieldError>,
) {
    let Some(input) = input else { return };
    match parse_duration(input) {
        Ok(d) if d < range.0 || d > range.1 => errors.push(FieldError::new(
            path,
            format!(
                "must be between {} and {}",
                show_duration(range.0),
                show_duration(range.1)
            ),
        )),
        Ok(d) => *target = d.as_millis() as u64,
        Err(message) => errors.push(FieldError::new(path, message)),
    }
}

fn show_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms < 1000 || !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

pub fn parse_duration(input: &DurationInput) -> Result<Duration, String> {
    match input {
        DurationInput::Millis(ms) => Ok(Duration::from_millis(*ms)),
        DurationInput::Text(text) => {
            let text = text.trim();
            let split = text
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(text.len());
            let (number, unit) = text.split_at(split);
            let value: f64 = number
                .parse()
                .map_err(|_| format!("'{text}' is not a duration like 5s, 250ms or 2m"))?;
            let seconds = match unit.trim() {
                // A bare number as text is ambiguous (a JSON number is milliseconds; `5`
                // typed on a command line usually means seconds): say so instead of guessing.
                "" => {
                    return Err(format!(
                        "'{text}' needs a unit: {text}s, {text}ms, {text}m or {text}h"
                    ));
                }
                "ms" => value / 1000.0,
                "s" => value,
                "m" | "min" => value * 60.0,
                "h" => value * 3600.0,
                _ => return Err(format!("'{text}' has an unknown unit (use ms, s, m or h)")),
            };
            if !(0.0..=86_400.0 * 365.0).contains(&seconds) {
                return Err(format!("'{text}' is out of range"));
            }
            Ok(Duration::from_secs_f64(seconds))
        }
    }
}

pub fn parse_size(input: &SizeInput) -> Result<u64, String> {
    match input {
        SizeInput::Bytes(bytes) => Ok(*bytes),
        SizeInput::Text(text) => {
            let text = text.trim();
            let split = text
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(text.len());
            let (number, unit) = text.split_at(split);
            let value: f64 = number
                .parse()
                .map_err(|_| format!("'{text}' is not a size like 64MiB or 512KiB"))?;
            let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
                "" | "b" => 1.0,
                "k" | "kb" => 1e3,
                "kib" | "ki" => 1024.0,
                "m" | "mb" => 1e6,
                "mib" | "mi" => 1024.0 * 1024.0,
                "g" | "gb" => 1e9,
                "gib" | "gi" => 1024.0 * 1024.0 * 1024.0,
                _ => return Err(format!("'{text}' has an unknown unit (use KiB, MiB, GiB)")),
            };
            let bytes = value * multiplier;
            if !(0.0..=1e15).contains(&bytes) {
                return Err(format!("'{text}' is out of range"));
            }
            Ok(bytes as u64)
        }
    }
}

/// `POST /v1/functions/{name}/rollback`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub to: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        let d = |s: &str| parse_duration(&DurationInput::Text(s.into()));
        assert_eq!(d("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(d("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(d("2m").unwrap(), Duration::from_secs(120));
        assert!(d("5 parsecs").is_err());
        assert!(d("abc").is_err());
        // Text needs a unit (a JSON number is milliseconds; "5" is not guessed at).
        assert_eq!(d("5").unwrap_err(), "'5' needs a unit: 5s, 5ms, 5m or 5h");
        assert_eq!(
            parse_duration(&DurationInput::Millis(5)).unwrap(),
            Duration::from_millis(5)
        );
        let s = |t: &str| parse_size(&SizeInput::Text(t.into()));
        assert_eq!(s("64MiB").unwrap(), 64 << 20);
        assert_eq!(s("512KiB").unwrap(), 512 << 10);
        assert_eq!(s("1GB").unwrap(), 1_000_000_000);
        assert!(s("12 apples").is_err());
    }

    #[test]
    fn resolve_reports_every_error_with_its_path() {
        let input = FunctionConfigInput {
            timeout: Some(DurationInput::Text("forever".into())),
            memory: Some(SizeInput::Text("1KiB".into())),
            max: Some(0),
            env: Some(BTreeMap::from([("1BAD".to_string(), "x".to_string())])),
            route: Some("/healthz".into()),
            egress_allow: Some(vec!["127.0.0.1:8081".into(), "localhost".into()]),
            ..Default::default()
        };
        let mut errors = Vec::new();
        input.resolve("config.", &mut errors);
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "config.timeout",
                "config.memory",
                "config.max",
                "config.env.1BAD",
                "config.route",
                "config.egress_allow[1]"
            ]
        );
    }

    #[test]
    fn a_function_route_must_be_in_normal_form() {
        for route in ["/greet", "/greet/", "/v1.2/.well-known/x", "/a/..b"] {
            assert_eq!(validate_route(route), Ok(()), "{route}");
        }
        for route in ["/a//b", "/a/./b", "/a/../b", "/..", "//a"] {
            let error = validate_route(route).expect_err(route);
            assert!(error.contains("normalised"), "{route}: {error}");
        }
    }

    #[test]
    fn egress_allow_is_normalised() {
        let input = FunctionConfigInput {
            egress_allow: Some(vec![
                "127.0.0.1/32:8081".into(),
                "10.1.0.0/8".into(),
                "[::1]:8081".into(),
                "127.0.0.1:8081".into(),
            ]),
            ..Default::default()
        };
        let mut errors = Vec::new();
        let config = input.resolve("config.", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            config.egress_allow,
            ["10.0.0.0/8", "127.0.0.1:8081", "[::1]:8081"]
        );
        assert_eq!(config.egress().allow().len(), 3);
        assert_eq!(config.redacted()["egress_allow"][0], "10.0.0.0/8");
        let too_many = FunctionConfigInput {
            egress_allow: Some(vec!["10.0.0.1".into(); MAX_EGRESS_ALLOW + 1]),
            ..Default::default()
        };
        too_many.resolve("config.", &mut errors);
        assert_eq!(errors[0].path, "config.egress_allow");
    }

    #[test]
    fn defaults_fill_in() {
        let mut errors = Vec::new();
        let config = FunctionConfigInput::default().resolve("config.", &mut errors);
        assert!(errors.is_empty());
        assert_eq!(config, FunctionConfig::default());
        assert_eq!(config.timeout_ms, 5000);
        assert_eq!(config.memory_bytes, 64 << 20);
    }

    #[test]
    fn plugins_default_to_sharing_instances_and_have_no_route() {
        let input: PluginInput = serde_json::from_value(serde_json::json!({
            "source": "return {}", "config": {"timeout": "1s"}
        }))
        .unwrap();
        let mut errors = Vec::new();
        let config = input.resolve_config(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(config.concurrency, PLUGIN_DEFAULT_CONCURRENCY);
        assert_eq!(config.timeout_ms, 1000);
        let input: PluginInput = serde_json::from_value(serde_json::json!({
            "source": "return {}", "config": {"concurrency": 2, "route": "/x", "memory": "1KiB"}
        }))
        .unwrap();
        let config = input.resolve_config(&mut errors);
        assert_eq!(config.concurrency, 2);
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["config.memory", "config.route"]);
    }

    #[test]
    fn function_names() {
        assert!(validate_function_name("greeting").is_ok());
        assert!(validate_function_name("my-fn_2").is_ok());
        assert!(validate_function_name("").is_err());
        assert!(validate_function_name("-x").is_err());
        assert!(validate_function_name("a/b").is_err());
        assert!(validate_function_name(&"a".repeat(65)).is_err());
    }

    #[test]
    fn redacted_config_hides_secret_values() {
        let config = FunctionConfig {
            env: BTreeMap::from([("API_KEY".to_string(), "s3cr3t".to_string())]),
            ..FunctionConfig::default()
        };
        let shown = config.redacted().to_string();
        assert!(shown.contains("API_KEY"));
        assert!(!shown.contains("s3cr3t"));
    }

    fn resolve_json(config: serde_json::Value) -> (FunctionConfig, Vec<FieldError>) {
        let input: FunctionConfigInput = serde_json::from_value(config).unwrap();
        let mut errors = Vec::new();
        let config = input.resolve("config.", &mut errors);
        (config, errors)
    }

    #[test]
    fn schedule_as_text_or_object() {
        let (config, errors) = resolve_json(serde_json::json!({"schedule": "@every 30s"}));
        assert!(errors.is_empty(), "{errors:?}");
        let schedule = config.schedule.unwrap();
        assert_eq!(
            (
                schedule.cron.as_str(),
                schedule.timezone.as_str(),
                schedule.overlap.as_str()
            ),
            ("@every 30s", "UTC", "skip")
        );
        let (config, errors) = resolve_json(serde_json::json!({"schedule": {
            "cron": "0 3 * * *", "timezone": "Europe/Berlin", "overlap": "queue", "jitter": "10s"
        }}));
        assert!(errors.is_empty(), "{errors:?}");
        let schedule = config.schedule.clone().unwrap();
        assert_eq!(schedule.jitter_ms, 10_000);
        assert_eq!(schedule.compile().unwrap().timezone(), "Europe/Berlin");
        // Stored and read back; a record without the field still reads.
        let stored = serde_json::to_string(&config).unwrap();
        assert_eq!(
            serde_json::from_str::<FunctionConfig>(&stored).unwrap(),
            config
        );
        let mut old = serde_json::to_value(FunctionConfig::default()).unwrap();
        old.as_object_mut().unwrap().remove("schedule");
        assert_eq!(
            serde_json::from_value::<FunctionConfig>(old)
                .unwrap()
                .schedule,
            None
        );
    }

    #[test]
    fn schedule_errors_carry_their_field_path() {
        let (_, errors) = resolve_json(serde_json::json!({"schedule": {
            "cron": "0 3 * * *", "timezone": "Mars/Base", "overlap": "later", "jitter": "2h"
        }}));
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "config.schedule.timezone",
                "config.schedule.overlap",
                "config.schedule.jitter"
            ]
        );
        assert_eq!(errors[0].message, "unknown time zone \"Mars/Base\"");
        let (_, errors) = resolve_json(serde_json::json!({"schedule": "every day"}));
        assert_eq!(errors[0].path, "config.schedule");
        let (_, errors) = resolve_json(serde_json::json!({"schedule": {"cron": "@every 0s"}}));
        assert_eq!(errors[0].path, "config.schedule.cron");
    }
}
