//! The crash ledger: which function versions crashed the node, how often, and which are
//! quarantined.
//!
//! Written only by the supervisor, after a child died and before it starts the next one
//! (write to a temporary file, fsync, rename, fsync the directory: a crash of the
//! supervisor itself leaves the old or the new ledger, never half of one). Read by each
//! node at start: it serves a quarantined version's calls with `503 function_quarantined`
//! and says why in `moontide info` and the function log. A version is quarantined after
//! [`QUARANTINE_AFTER`] crashes — after one, if another version of the same function was
//! quarantined before; a new deploy is a new version, so it lifts the quarantine (a
//! rollback to the crashing version does not).

use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The file's name in the data dir.
pub const FILE_NAME: &str = "crashes.json";

/// Crashes of one function version after which its calls are refused. Two: one crash can be
/// bad luck of attribution (a host bug hit while that version ran); a second is the
/// version's doing, and each crash costs every neighbour its calls in flight.
pub const QUARANTINE_AFTER: u32 = 2;

/// Most versions remembered; the ones that crashed longest ago are forgotten first.
const MAX_RECORDS: usize = 1000;

/// One function version that crashed the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrashRecord {
    pub function: String,
    pub version: u64,
    pub crashes: u32,
    /// Milliseconds since the Unix epoch.
    pub first_crash_ms: u64,
    pub last_crash_ms: u64,
    /// The signal of the last crash, e.g. `SIGSEGV`.
    pub last_signal: String,
    /// When the version was quarantined (ms since the epoch), if it is.
    pub quarantined_since_ms: Option<u64>,
}

/// Everything the supervisor learnt from its children's deaths.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    #[serde(default)]
    pub versions: Vec<CrashRecord>,
    /// Children started again after a crash, all causes.
    #[serde(default)]
    pub restarts: u64,
    /// Crashes no function was blamed for (host code, or no handler ran).
    #[serde(default)]
    pub unattributed: u64,
}

impl Ledger {
    /// Reads the ledger of `data_dir` (empty if there is none yet).
    pub fn load(data_dir: &Path) -> io::Result<Ledger> {
        match std::fs::read(data_dir.join(FILE_NAME)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Ledger::default()),
            Err(error) => Err(error),
        }
    }

    /// Writes the ledger atomically (see the module doc).
    pub fn save(&self, data_dir: &Path) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        let temporary = data_dir.join(format!("{FILE_NAME}.tmp"));
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temporary, data_dir.join(FILE_NAME))?;
        std::fs::File::open(data_dir)?.sync_all()
    }

    /// Counts a crash of `function` `version`; returns its record (quarantined once it
    /// reached [`QUARANTINE_AFTER`]).
    pub fn record_crash(
        &mut self,
        function: &str,
        version: u64,
        signal: &str,
        now_ms: u64,
    ) -> &CrashRecord {
        let index = match self
            .versions
            .iter()
            .position(|r| r.function == function && r.version == version)
        {
            Some(index) => index,
            None => {
                if self.versions.len() >= MAX_RECORDS
                    && let Some(oldest) = self
                        .versions
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, r)| r.last_crash_ms)
                        .map(|(i, _)| i)
                {
                    self.versions.swap_remove(oldest);
                }
                self.versions.push(CrashRecord {
                    function: function.to_string(),
                    version,
                    crashes: 0,
                    first_crash_ms: now_ms,
                    last_crash_ms: now_ms,
                    last_signal: String::new(),
                    quarantined_since_ms: None,
                });
                self.versions.len() - 1
            }
        };
        // A function that already had a version quarantined gets no second chance: its
        // next versions are quarantined at their first crash (a tenant redeploying a
        // crasher would otherwise buy two crashes per deploy).
        let repeat_offender = self.versions.iter().any(|r| {
            r.function == function && r.version != version && r.quarantined_since_ms.is_some()
        });
        let threshold = if repeat_offender { 1 } else { QUARANTINE_AFTER };
        let record = &mut self.versions[index];
        record.crashes += 1;
        record.last_crash_ms = now_ms;
        record.last_signal = signal.to_string();
        if record.crashes >= threshold && record.quarantined_since_ms.is_none() {
            record.quarantined_since_ms = Some(now_ms);
        }
        record
    }

    /// The record of `function` `version`, if it ever crashed the node.
    pub fn get(&self, function: &str, version: u64) -> Option<&CrashRecord> {
        self.versions
            .iter()
            .find(|r| r.function == function && r.version == version)
    }
}

/// A signal's name (`SIGSEGV`), or its number.
pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGABRT => "SIGABRT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_is_quarantined_at_its_second_crash_and_the_ledger_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::load(dir.path()).unwrap();
        assert_eq!(ledger, Ledger::default());
        let first = ledger.record_crash("f", 3, "SIGSEGV", 1000).clone();
        assert_eq!(first.crashes, 1);
        assert_eq!(first.quarantined_since_ms, None);
        ledger.record_crash("g", 1, "SIGBUS", 1500);
        let second = ledger.record_crash("f", 3, "SIGABRT", 2000).clone();
        assert_eq!(second.crashes, 2);
        assert_eq!(second.first_crash_ms, 1000);
        assert_eq!(second.last_signal, "SIGABRT");
        assert_eq!(second.quarantined_since_ms, Some(2000));
        // Another version of the same function is not touched...
        assert_eq!(ledger.get("f", 4), None);
        // ...but once one of its versions was quarantined, the next goes at its first crash.
        let next = ledger.record_crash("f", 4, "SIGSEGV", 3000).clone();
        assert_eq!(next.quarantined_since_ms, Some(3000));
        // Other functions keep their two chances.
        assert_eq!(ledger.record_crash("g", 1, "SIGSEGV", 3500).crashes, 2);
        let other = ledger.record_crash("h", 1, "SIGSEGV", 4000).clone();
        assert_eq!(other.quarantined_since_ms, None);
        ledger.save(dir.path()).unwrap();
        assert_eq!(Ledger::load(dir.path()).unwrap(), ledger);
    }
}
