//! The scheduler: runs functions whose config has a `schedule`, on the admin runtime.
//!
//! It follows the serving snapshot: one ticker task per scheduled function (restarted
//! when its schedule changes, stopped when the function or its schedule goes). A ticker
//! sleeps until the next due time (plus the schedule's jitter, drawn from a hash of the
//! function and the due time so that every node agrees), then *claims* that due time in
//! the store (`runs`: a txn that creates the run record only if it is missing). Only the
//! node whose txn won runs the function, through the same path as an admin invoke (a
//! [`Job::Invoke`] to a worker thread, same pools and limits), and writes the outcome
//! into the record.
//!
//! Overlap: a due time whose function still runs (its latest record is `running` on a
//! live process) is recorded `skipped` (policy `skip`), or waits for it (`queue`: the
//! ticker waits, so at most one is queued; due times that pass meanwhile are dropped).
//!
//! Orphans: every few seconds a ticker looks for `running` records whose process is gone
//! — its node left the node registry, or it is this node's name under an earlier process
//! — and takes the run over with a txn on the record's `mod_revision`: attempt + 1, here.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use moontide_schedule::{Overlap, Schedule};
use moontide_store::{Compare, KeyValue, Membership, Op, Store, StoreError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::runs::{self, RunRecord, RunState};
use crate::api::ScheduleConfig;
use crate::records::now_ms;
use crate::registry::Registry;
use crate::worker::{Job, Workers};

/// How often a ticker looks for orphaned runs to take over.
const ORPHAN_SWEEP: Duration = Duration::from_secs(2);
/// How often a queued run checks whether the previous one ended.
const QUEUE_POLL: Duration = Duration::from_millis(200);

/// What the scheduler needs of the node.
pub struct SchedulerContext {
    pub store: Arc<dyn Store>,
    pub membership: Arc<dyn Membership>,
    pub registry: Arc<Registry>,
    pub workers: Arc<Workers>,
    /// This node's name in the node registry.
    pub node: String,
    /// A random id of this process.
    pub process: u64,
}

/// Follows the snapshot and keeps one ticker per scheduled function; runs until aborted.
pub async fn run(context: Arc<SchedulerContext>) {
    let mut published = context.registry.subscribe();
    let mut tickers: HashMap<String, (ScheduleConfig, JoinHandle<()>)> = HashMap::new();
    let mut seen = None;
    loop {
        let snapshot = context.registry.snapshot();
        if seen
            .as_ref()
            .is_none_or(|functions| !Arc::ptr_eq(functions, &snapshot.functions))
        {
            seen = Some(snapshot.functions.clone());
            let mut wanted: HashMap<String, ScheduleConfig> = HashMap::new();
            for (name, function) in snapshot.functions.iter() {
                if let Some(schedule) = &function.config.schedule {
                    wanted.insert(name.to_string(), schedule.clone());
                }
            }
            tickers.retain(|name, (config, task)| {
                let keep = wanted.get(name) == Some(config);
                if !keep {
                    task.abort();
                }
                keep
            });
            for (name, config) in wanted {
                if tickers.contains_key(&name) {
                    continue;
                }
                let Some(schedule) = config.compile() else {
                    tracing::error!(function = %name, "stored schedule does not parse");
                    continue;
                };
                let task = tokio::spawn(tick(context.clone(), name.clone(), schedule));
                tickers.insert(name, (config, task));
            }
        }
        if published.changed().await.is_err() {
            break;
        }
    }
    for (_, (_, task)) in tickers {
        task.abort();
    }
}

fn utc_now() -> DateTime<Utc> {
    Utc::now()
}

/// The randomness of one due time's jitter: the same on every node of one build
/// (`DefaultHasher::new` has fixed keys; another Rust release may hash differently, which
/// only spreads runs differently: claims go by due time, not by when a node fires).
fn jitter_seed(function: &str, due_ms: i64) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    function.hash(&mut hasher);
    due_ms.hash(&mut hasher);
    hasher.finish()
}

/// One scheduled function's loop.
async fn tick(context: Arc<SchedulerContext>, name: String, schedule: Schedule) {
    let schedule = Arc::new(schedule);
    let mut cursor = utc_now();
    let mut last_sweep = std::time::Instant::now();
    loop {
        let Some(due) = schedule.next_after(cursor) else {
            return;
        };
        let fire = due
            + chrono::Duration::from_std(
                schedule.jitter(jitter_seed(&name, due.timestamp_millis())),
            )
            .unwrap_or_default();
        // Sleep until it fires, sweeping for orphans every ORPHAN_SWEEP meanwhile.
        loop {
            if last_sweep.elapsed() >= ORPHAN_SWEEP {
                last_sweep = std::time::Instant::now();
                if let Err(error) = take_over_orphans(&context, &name, &schedule).await {
                    tracing::warn!(function = %name, %error, "scheduler: orphan sweep failed");
                }
            }
            let until_fire = (fire - utc_now()).to_std().unwrap_or(Duration::ZERO);
            if until_fire.is_zero() {
                break;
            }
            let until_sweep = ORPHAN_SWEEP.saturating_sub(last_sweep.elapsed());
            tokio::time::sleep(until_fire.min(until_sweep)).await;
        }
        if let Err(error) = fire_due(&context, &name, &schedule, due).await {
            tracing::warn!(function = %name, %error, "scheduler: claim failed");
        }
        cursor = due;
        // A queued run waited: due times that passed meanwhile are dropped.
        if schedule
            .next_after(cursor)
            .is_some_and(|next| next < utc_now())
        {
            cursor = utc_now();
        }
    }
}

fn is_running(record: &RunRecord) -> bool {
    record.state == RunState::Running
}

/// `true` if the process that runs `record` is gone.
async fn orphaned(context: &SchedulerContext, record: &RunRecord) -> Result<bool, StoreError> {
    if record.node == context.node {
        return Ok(record.process != context.process);
    }
    let members = context.membership.members().await?;
    Ok(!members.iter().any(|member| member.name == record.node))
}

fn parse(records: &[KeyValue]) -> Vec<(&KeyValue, RunRecord)> {
    records
        .iter()
        .filter_map(|kv| RunRecord::from_bytes(&kv.value).map(|record| (kv, record)))
        .collect()
}

/// Claims `due` (or records it skipped) and starts the run if this node won.
async fn fire_due(
    context: &Arc<SchedulerContext>,
    name: &str,
    schedule: &Arc<Schedule>,
    due: DateTime<Utc>,
) -> Result<(), StoreError> {
    let due_ms = due.timestamp_millis();
    let key = runs::run_key(name, due_ms);
    let (existing, previous) = loop {
        let (kvs, _) = context.store.range(&runs::runs_prefix(name)).await?;
        if kvs.iter().any(|kv| kv.key == key) {
            return Ok(()); // another node claimed it first
        }
        let records = parse(&kvs);
        // The run still going, if any (skipped records in between do not count).
        let previous = records
            .iter()
            .rev()
            .find(|(kv, record)| kv.key < key && is_running(record))
            .map(|(kv, record)| ((*kv).clone(), record.clone()));
        let busy = match &previous {
            Some((_, record)) => !orphaned(context, record).await?,
            None => false,
        };
        if busy && schedule.overlap() == Overlap::Queue {
            tokio::time::sleep(QUEUE_POLL).await;
            continue;
        }
        let existing: Vec<(String, bool)> = records
            .iter()
            .map(|(kv, record)| (kv.key.clone(), is_running(record)))
            .collect();
        break (existing, previous.filter(|_| busy));
    };
    let mut record = RunRecord {
        scheduled_time: schedule.format(due),
        scheduled_ms: due_ms,
        state: RunState::Running,
        error: None,
        attempt: 1,
        node: context.node.clone(),
        process: context.process,
        run_id: runs::run_id(due_ms, 1),
        started_at_ms: now_ms(),
        finished_at_ms: None,
        duration_ms: None,
    };
    let mut compares = vec![Compare::Missing(key.clone())];
    if let Some((kv, _)) = &previous {
        // Skipped because that run still goes: only if it still does.
        compares.push(Compare::ModRevision(kv.key.clone(), kv.mod_revision));
        record.state = RunState::Skipped;
        record.finished_at_ms = Some(record.started_at_ms);
    }
    // Keep the newest RETENTION records (this one included); never delete a running one.
    let excess = (existing.len() + 1).saturating_sub(runs::RETENTION);
    let mut ops: Vec<Op> = existing
        .iter()
        .filter(|(_, running)| !running)
        .take(excess)
        .map(|(key, _)| Op::Delete { key: key.clone() })
        .collect();
    ops.push(Op::Put {
        key: key.clone(),
        value: record.to_bytes(),
    });
    let outcome = context.store.txn(compares, ops).await?;
    if outcome.succeeded && record.state == RunState::Running {
        start_run(context, name, schedule, key, record, outcome.revision);
    }
    Ok(())
}

/// Takes over `running` records whose process is gone, and runs them again here.
async fn take_over_orphans(
    context: &Arc<SchedulerContext>,
    name: &str,
    schedule: &Arc<Schedule>,
) -> Result<(), StoreError> {
    let (kvs, _) = context.store.range(&runs::runs_prefix(name)).await?;
    for (kv, record) in parse(&kvs) {
        if !is_running(&record) || !orphaned(context, &record).await? {
            continue;
        }
        let attempt = record.attempt + 1;
        let taken = RunRecord {
            attempt,
            node: context.node.clone(),
            process: context.process,
            run_id: runs::run_id(record.scheduled_ms, attempt),
            started_at_ms: now_ms(),
            ..record
        };
        let outcome = context
            .store
            .txn(
                vec![Compare::ModRevision(kv.key.clone(), kv.mod_revision)],
                vec![Op::Put {
                    key: kv.key.clone(),
                    value: taken.to_bytes(),
                }],
            )
            .await?;
        if outcome.succeeded {
            tracing::info!(function = %name, key = %kv.key, attempt, "scheduler: took over an orphaned run");
            start_run(
                context,
                name,
                schedule,
                kv.key.clone(),
                taken,
                outcome.revision,
            );
        }
    }
    Ok(())
}

/// The event a scheduled call gets (`docs/triggers.md`).
pub fn event(schedule: &Schedule, record: &RunRecord) -> serde_json::Value {
    serde_json::json!({
        "source": "moontide.schedule",
        "schedule": schedule.expression(),
        "timezone": schedule.timezone(),
        "scheduled_time": record.scheduled_time,
        "attempt": record.attempt,
        "run_id": record.run_id,
    })
}

/// Runs the claimed record on a worker and writes its outcome (a task of its own: a
/// schedule change does not abandon a run).
fn start_run(
    context: &Arc<SchedulerContext>,
    name: &str,
    schedule: &Arc<Schedule>,
    key: String,
    record: RunRecord,
    revision: u64,
) {
    let context = context.clone();
    let name = name.to_string();
    let payload = event(schedule, &record);
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let (reply, result) = oneshot::channel();
        let outcome = match context.workers.submit(Job::Invoke {
            name: name.clone(),
            payload,
            request_id: record.run_id.clone(),
            reply,
        }) {
            Ok(()) => match result.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(error)) => Err(error.code.to_string()),
                Err(_) => Err("internal".to_string()),
            },
            Err(error) => Err(error.code.to_string()),
        };
        let done = RunRecord {
            state: if outcome.is_ok() {
                RunState::Ok
            } else {
                RunState::Error
            },
            error: outcome.err(),
            finished_at_ms: Some(now_ms()),
            duration_ms: Some(started.elapsed().as_millis() as u64),
            ..record
        };
        // Only if nobody took it over meanwhile.
        let written = context
            .store
            .txn(
                vec![Compare::ModRevision(key.clone(), revision)],
                vec![Op::Put {
                    key,
                    value: done.to_bytes(),
                }],
            )
            .await;
        if let Err(error) = written {
            tracing::warn!(function = %name, %error, "scheduler: could not record a run's outcome");
        }
    });
}

/// `next_runs` and `recent_runs` of a function for the API: the next `count` due times
/// (RFC 3339 in the schedule's zone) and its run records, newest first.
pub async fn runs_view(
    store: &dyn Store,
    name: &str,
    schedule: Option<&ScheduleConfig>,
) -> Result<(Vec<String>, Vec<RunRecord>), StoreError> {
    let next = schedule
        .and_then(ScheduleConfig::compile)
        .map(|schedule| {
            schedule
                .upcoming(utc_now(), 3)
                .into_iter()
                .map(|time| schedule.format(time))
                .collect()
        })
        .unwrap_or_default();
    let (kvs, _) = store.range(&runs::runs_prefix(name)).await?;
    let mut recent: Vec<RunRecord> = parse(&kvs).into_iter().map(|(_, record)| record).collect();
    recent.reverse();
    Ok((next, recent))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn the_event_is_the_documented_object() {
        let schedule = Schedule::parse("0 3 * * *", Some("Europe/Berlin")).unwrap();
        let due = Utc.with_ymd_and_hms(2026, 1, 10, 2, 0, 0).unwrap();
        let record = RunRecord {
            scheduled_time: schedule.format(due),
            scheduled_ms: due.timestamp_millis(),
            state: RunState::Running,
            error: None,
            attempt: 1,
            node: "n1".into(),
            process: 7,
            run_id: runs::run_id(due.timestamp_millis(), 1),
            started_at_ms: 0,
            finished_at_ms: None,
            duration_ms: None,
        };
        assert_eq!(
            event(&schedule, &record),
            serde_json::json!({
                "source": "moontide.schedule",
                "schedule": "0 3 * * *",
                "timezone": "Europe/Berlin",
                "scheduled_time": "2026-01-10T03:00:00+01:00",
                "attempt": 1,
                "run_id": format!("sch-{}-1", due.timestamp_millis()),
            })
        );
        assert_eq!(jitter_seed("f", 1), jitter_seed("f", 1));
    }
}
