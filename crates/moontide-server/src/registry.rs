//! The config snapshot the data plane serves from, and the task that keeps it current.
//!
//! The snapshot is immutable and swapped whole ([`arc_swap`]); the request path loads it
//! without a lock. The builder task watches the store: a change rebuilds only the
//! functions it touches (compiling their new version off the request path), reuses every
//! other [`DeployedFunction`] as is — with its warm instances — and publishes a new
//! snapshot. Copying the name map is O(functions) pointer copies per change; compile work
//! is O(changed).
//!
//! Admin writes wait for the snapshot to reach their store revision before they answer, so
//! a deploy that was acknowledged serves the very next request.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use moontide_runtime::plugin::Phases;
use moontide_runtime::{CompiledFunction, FunctionSource, compile};
use moontide_runtime::{InstanceSpec, UnitKind};
use moontide_store::{Revision, Store, StoreError, WatchEvent};
use tokio::sync::watch;

use crate::api::FunctionConfig;
use crate::budget::NodeBudget;
use crate::gateway::Gateway;
use crate::gateway::config::{RouteConfig, UpstreamConfig};
use crate::logs::{LogHub, VersionLogSink};
use crate::metrics::{FunctionMetrics, Metrics, PluginMetrics};
use crate::pool::PoolShared;
use crate::records::{self, FunctionRecord, PluginRecord, VersionRecord};

/// One version of one function, ready to serve: compiled, with its pool counters, limits,
/// log and metric handles.
pub struct DeployedFunction {
    /// Unique per deployment in this process (a rollback to an old version gets a new id).
    pub id: u64,
    pub name: Arc<str>,
    pub version: u64,
    pub compiled: Arc<CompiledFunction>,
    pub spec: InstanceSpec,
    pub config: FunctionConfig,
    pub pool: Arc<PoolShared>,
    pub metrics: FunctionMetrics,
    /// Store revision of the version record (to tell an unchanged function on rebuild).
    pub source_revision: Revision,
    /// Set once a call of this function held its thread longer than a timeslice; shared
    /// by every version of the function, so a redeploy does not reset it.
    long_running: Arc<AtomicBool>,
    /// Set when this version crashed the node often enough to be quarantined (the crash
    /// ledger): its calls are refused with `503 function_quarantined`.
    pub quarantine: Option<Arc<moontide_supervisor::ledger::CrashRecord>>,
}

impl DeployedFunction {
    /// `true` if this function's calls run on the long-call worker (see `worker`).
    pub fn is_long_running(&self) -> bool {
        self.long_running.load(Ordering::Relaxed)
    }

    /// Sends this function's later calls to the long-call worker; `true` the first time.
    pub fn mark_long_running(&self) -> bool {
        !self.long_running.swap(true, Ordering::Relaxed)
    }
}

/// A plugin, ready to run: its instances are a [`DeployedFunction`]'s (same pools,
/// limits and autoscaling; `kind` plugin), named `plugin:{name}` in metrics and logs.
pub struct DeployedPlugin {
    pub name: Arc<str>,
    pub unit: Arc<DeployedFunction>,
    /// The phases its table defines (checked when it was `PUT`).
    pub phases: Phases,
    /// What is stored: an identical rewrite (see `gateway::admin::put_route`) keeps the
    /// serving plugin and its warm instances.
    pub record: PluginRecord,
    pub metrics: PluginMetrics,
}

/// The name under which a plugin's instances, metrics and logs are kept (`:` is not in
/// function names, so it never collides with one).
pub fn plugin_label(name: &str) -> String {
    format!("plugin:{name}")
}

/// What serves traffic now.
#[derive(Default)]
pub struct Snapshot {
    pub revision: Revision,
    /// Shared with the next snapshot when a change touches no function (a gateway edit
    /// then costs nothing here).
    pub functions: Arc<HashMap<Arc<str>, Arc<DeployedFunction>>>,
    /// Plugins by name (`/v1/plugins`).
    pub plugins: HashMap<Arc<str>, Arc<DeployedPlugin>>,
    /// `(path prefix, function)`, longest prefix first; shared like `functions`.
    pub routes: Arc<Vec<(String, Arc<DeployedFunction>)>>,
    /// Routes and upstreams (`/v1/routes`, `/v1/upstreams`).
    pub gateway: Gateway,
}

impl Snapshot {
    /// The function whose configured route is a prefix of `path` (at a `/` boundary).
    pub fn route(&self, path: &str) -> Option<&Arc<DeployedFunction>> {
        self.routes.iter().find_map(|(prefix, function)| {
            let rest = path.strip_prefix(prefix.as_str())?;
            (rest.is_empty() || rest.starts_with('/')).then_some(function)
        })
    }
}

/// The current snapshot and its readers' handles.
pub struct Registry {
    current: Arc<ArcSwap<Snapshot>>,
    published: watch::Sender<Option<Revision>>,
    next_id: AtomicU64,
    pub metrics: Arc<Metrics>,
    pub logs: Arc<LogHub>,
    /// The node's instance and memory budget, shared by every function's pool.
    pub budget: Arc<NodeBudget>,
    /// Per function name: whether its calls are long-running (outlives versions).
    long_running: parking_lot::Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// The crash ledger as this node process found it at start (only the supervisor
    /// writes it, between node processes).
    pub crashes: moontide_supervisor::ledger::Ledger,
    /// Set at shutdown: `/readyz` answers 503 from then on.
    draining: AtomicBool,
}

impl Registry {
    pub fn new(
        metrics: Arc<Metrics>,
        logs: Arc<LogHub>,
        budget: Arc<NodeBudget>,
        crashes: moontide_supervisor::ledger::Ledger,
    ) -> Registry {
        Registry {
            crashes,
            budget,
            current: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            published: watch::channel(None).0,
            next_id: AtomicU64::new(1),
            metrics,
            logs,
            long_running: parking_lot::Mutex::default(),
            draining: AtomicBool::new(false),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The swap cell itself, for per-thread caches on the request path.
    pub fn cell(&self) -> Arc<ArcSwap<Snapshot>> {
        self.current.clone()
    }

    /// `true` once the first snapshot from the store is serving, until the node starts
    /// draining (`/readyz` answers 503 then, so load balancers stop sending).
    pub fn is_ready(&self) -> bool {
        self.published.borrow().is_some() && !self.draining.load(Ordering::Relaxed)
    }

    /// The node is shutting down: it still serves, but no longer says it is ready.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// A receiver told of every published snapshot (its revision).
    pub fn subscribe(&self) -> watch::Receiver<Option<Revision>> {
        self.published.subscribe()
    }

    /// Waits until the serving snapshot has reached `revision` (or `limit` passes).
    pub async fn wait_for(&self, revision: Revision, limit: Duration) -> bool {
        let mut receiver = self.published.subscribe();
        tokio::time::timeout(
            limit,
            receiver.wait_for(|published| published.is_some_and(|r| r >= revision)),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    fn publish(&self, snapshot: Snapshot) {
        let revision = snapshot.revision;
        self.metrics.config_revision.set(revision as i64);
        self.metrics.functions.set(snapshot.functions.len() as i64);
        let old = self.current.swap(Arc::new(snapshot));
        let new = self.current.load();
        // Versions no longer served stop taking new calls; their idle instances are reaped.
        // (A change that touched no function shares the map: nothing to compare.)
        if !Arc::ptr_eq(&old.functions, &new.functions) {
            for (name, function) in old.functions.iter() {
                match new.functions.get(name) {
                    Some(current) if current.id == function.id => {}
                    _ => function.pool.retire(),
                }
            }
        }
        for (name, plugin) in &old.plugins {
            match new.plugins.get(name) {
                Some(current) if current.unit.id == plugin.unit.id => {}
                _ => plugin.unit.pool.retire(),
            }
        }
        self.published.send_replace(Some(revision));
    }

    fn deploy(
        &self,
        record: &VersionRecord,
        source_revision: Revision,
    ) -> Result<DeployedFunction, String> {
        self.build_unit(
            &record.name,
            record.version,
            record.files.clone(),
            &record.config,
            UnitKind::Function,
            source_revision,
        )
    }

    /// Builds a plugin from its record; its version is the record's store revision.
    fn deploy_plugin(
        &self,
        name: &str,
        record: PluginRecord,
        revision: Revision,
    ) -> Result<DeployedPlugin, String> {
        let unit = self.build_unit(
            &plugin_label(name),
            revision,
            FunctionSource::single(record.source.clone()).files,
            &record.config,
            UnitKind::Plugin,
            revision,
        )?;
        Ok(DeployedPlugin {
            name: Arc::from(name),
            unit: Arc::new(unit),
            phases: Phases::from_names(record.phases.iter().map(String::as_str)),
            metrics: self.metrics.plugin(name),
            record,
        })
    }

    fn build_unit(
        &self,
        name: &str,
        version: u64,
        files: std::collections::BTreeMap<String, String>,
        config: &FunctionConfig,
        kind: UnitKind,
        source_revision: Revision,
    ) -> Result<DeployedFunction, String> {
        let source = FunctionSource { files };
        let compiled = compile(&source).map_err(|errors| {
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let label: Arc<str> = Arc::from(name);
        let metrics = self.metrics.function(name);
        let quarantine = self
            .crashes
            .get(name, version)
            .filter(|record| record.quarantined_since_ms.is_some())
            .map(|record| Arc::new(record.clone()));
        self.metrics.set_quarantined(name, quarantine.is_some());
        let spec = InstanceSpec {
            function_name: label.clone(),
            version,
            limits: config.limits(),
            env: Arc::new(config.env.clone()),
            log: Arc::new(VersionLogSink {
                log: self.logs.function(name),
                version,
            }),
            kind,
            egress: config.egress(),
        };
        Ok(DeployedFunction {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            name: label,
            version,
            compiled: Arc::new(compiled),
            pool: Arc::new(PoolShared::new(
                config.max as usize,
                config.max_scale_up_rate,
                self.budget.clone(),
            )),
            spec,
            config: config.clone(),
            metrics,
            source_revision,
            quarantine,
            long_running: self
                .long_running
                .lock()
                .entry(name.to_string())
                .or_default()
                .clone(),
        })
    }
}

/// Reads the head and active version of `name` from the store and builds it, reusing the
/// currently deployed one when nothing changed. `Ok(None)`: the function is gone.
async fn load_function(
    registry: &Registry,
    store: &dyn Store,
    name: &str,
    current: Option<&Arc<DeployedFunction>>,
) -> Result<Option<Arc<DeployedFunction>>, StoreError> {
    let Some(head) = store.get(&records::head_key(name)).await? else {
        return Ok(None);
    };
    let head: FunctionRecord = match serde_json::from_slice(&head.value) {
        Ok(head) => head,
        Err(error) => {
            tracing::error!(function = name, %error, "unreadable function record; skipped");
            return Ok(current.cloned());
        }
    };
    let Some(version) = store
        .get(&records::version_key(name, head.active_version))
        .await?
    else {
        tracing::error!(
            function = name,
            version = head.active_version,
            "active version missing"
        );
        return Ok(current.cloned());
    };
    if let Some(current) = current
        && current.version == head.active_version
        && current.source_revision == version.mod_revision
    {
        return Ok(Some(current.clone()));
    }
    let record: VersionRecord = match serde_json::from_slice(&version.value) {
        Ok(record) => record,
        Err(error) => {
            tracing::error!(function = name, %error, "unreadable version record; skipped");
            return Ok(current.cloned());
        }
    };
    match registry.deploy(&record, version.mod_revision) {
        Ok(deployed) => Ok(Some(Arc::new(deployed))),
        Err(error) => {
            tracing::error!(function = name, %error, "stored version does not compile; skipped");
            Ok(current.cloned())
        }
    }
}

fn name_of_key(key: &str) -> Option<&str> {
    if let Some(name) = key.strip_prefix(records::HEAD_PREFIX) {
        return Some(name);
    }
    key.strip_prefix(records::VERSION_PREFIX)
        .and_then(|rest| rest.split('/').next())
}

fn with_routes(mut snapshot: Snapshot) -> Snapshot {
    let mut routes: Vec<(String, Arc<DeployedFunction>)> = snapshot
        .functions
        .values()
        .filter_map(|f| f.config.route.clone().map(|route| (route, f.clone())))
        .collect();
    routes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
    snapshot.routes = Arc::new(routes);
    snapshot
}

/// First wait after the store failed; doubled after each failure in a row.
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest wait between two tries while the store is unreachable.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Keeps the registry in step with the store, forever: a full load, then incremental
/// updates from a watch.
///
/// - A watch that breaks (the store unreachable: etcd down, a partition) is reopened from
///   the last revision applied, with a backoff (100 ms doubling to 2 s) while it keeps
///   failing; meanwhile the node serves its last snapshot.
/// - A watch whose history is gone ([`StoreError::Compacted`]: etcd compacted past the
///   revision to resume from, or a watcher fell behind) never skips the lost events:
///   the keyspace is reloaded at the current revision and diffed against what is served
///   (functions and gateway objects gone from the store are dropped, unchanged ones keep
///   their instances and health state), and the watch resumes from there. So does a store
///   whose revision went back below what this node applied (etcd restored or replaced).
pub async fn run_builder(registry: Arc<Registry>, store: Arc<dyn Store>) {
    let mut retry = RETRY_FIRST;
    loop {
        let mut applied = match load_all(&registry, &*store).await {
            Ok(revision) => revision,
            Err(error) => {
                tracing::warn!(%error, "config load failed; retrying");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        };
        loop {
            match follow(&registry, &*store, &mut applied, &mut retry).await {
                Ok(()) => return,
                Err(StoreError::Compacted(oldest)) => {
                    tracing::warn!(
                        after = applied,
                        oldest,
                        "config history was compacted past this node's revision; reloading"
                    );
                    registry.metrics.config_reloads.inc();
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, after = applied, "config watch interrupted; resuming");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

/// Loads the whole keyspace, publishes it as the snapshot (reusing what is unchanged) and
/// returns the revision it was read at.
async fn load_all(registry: &Registry, store: &dyn Store) -> Result<Revision, StoreError> {
    let (heads, revision) = store.range(records::HEAD_PREFIX).await?;
    let previous = registry.snapshot();
    let mut functions = HashMap::new();
    for head in heads {
        let Some(name) = name_of_key(&head.key) else {
            continue;
        };
        if let Some(deployed) =
            load_function(registry, store, name, previous.functions.get(name)).await?
        {
            functions.insert(deployed.name.clone(), deployed);
        }
    }
    // A reload (after a compacted watch) starts from the serving upstreams, so
    // that the nodes that stay keep their health and breaker state; upstreams gone from
    // the store are dropped below.
    let mut gateway = Gateway {
        upstreams: previous.gateway.upstreams.clone(),
        events: registry.metrics.upstream_events(),
        ..Gateway::default()
    };
    let (upstreams, _) = store.range(records::UPSTREAM_PREFIX).await?;
    let (routes, _) = store.range(records::ROUTE_PREFIX).await?;
    let stored: BTreeSet<&str> = upstreams
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(records::UPSTREAM_PREFIX))
        .collect();
    gateway
        .upstreams
        .retain(|name, _| stored.contains(name.as_ref()));
    for kv in upstreams.iter().chain(&routes) {
        apply_gateway_change(&mut gateway, &kv.key, Some(&kv.value));
    }
    let mut plugins = HashMap::new();
    let (stored_plugins, _) = store.range(records::PLUGIN_PREFIX).await?;
    for kv in &stored_plugins {
        apply_plugin_change(
            registry,
            &mut plugins,
            &previous.plugins,
            &kv.key,
            Some((&kv.value, kv.mod_revision)),
        );
    }
    // Functions deleted while the watch could not see it.
    for name in previous.functions.keys() {
        if !functions.contains_key(name) {
            registry.metrics.forget(name);
            registry.long_running.lock().remove(&**name);
        }
    }
    registry.publish(with_routes(Snapshot {
        revision,
        functions: Arc::new(functions),
        plugins,
        routes: Arc::default(),
        gateway,
    }));
    Ok(revision)
}

/// Applies every change after `applied` as it comes, advancing `applied`; returns when
/// the store closes or the watch fails.
async fn follow(
    registry: &Registry,
    store: &dyn Store,
    applied: &mut Revision,
    retry: &mut Duration,
) -> Result<(), StoreError> {
    // Everything under the root: functions (`f/`) and gateway objects (`g/`).
    // A store whose revision went back (etcd restored from a backup, or replaced by an
    // empty one) would never send the revisions this node waits for: reload instead.
    let current = store.revision().await?;
    if current < *applied {
        tracing::warn!(
            applied = *applied,
            current,
            "the store's revision went back (restored or replaced?); reloading"
        );
        return Err(StoreError::Compacted(current));
    }
    let mut watch = store.watch("", *applied).await?;
    *retry = RETRY_FIRST;
    while let Some(batch) = watch.next().await? {
        let Some(revision) = batch.iter().map(|e| e.revision()).max() else {
            continue;
        };
        *applied = revision;
        let names: BTreeSet<String> = batch
            .iter()
            .filter_map(|event| name_of_key(event.key()).map(str::to_string))
            .collect();
        let current = registry.snapshot();
        let mut gateway = current.gateway.clone();
        let mut plugins = current.plugins.clone();
        for event in &batch {
            let value = match event {
                WatchEvent::Put(kv) => Some((kv.value.as_slice(), kv.mod_revision)),
                WatchEvent::Delete { .. } => None,
            };
            apply_gateway_change(&mut gateway, event.key(), value.map(|(bytes, _)| bytes));
            apply_plugin_change(registry, &mut plugins, &current.plugins, event.key(), value);
        }
        if names.is_empty() {
            // Only gateway objects changed: functions and their routes are shared as is.
            registry.publish(Snapshot {
                revision,
                functions: current.functions.clone(),
                plugins,
                routes: current.routes.clone(),
                gateway,
            });
            continue;
        }
        let mut functions = (*current.functions).clone();
        for name in names {
            match load_function(registry, store, &name, current.functions.get(name.as_str()))
                .await?
            {
                Some(deployed) => {
                    functions.insert(deployed.name.clone(), deployed);
                }
                None => {
                    if functions.remove(name.as_str()).is_some() {
                        registry.metrics.forget(&name);
                        registry.long_running.lock().remove(&name);
                    }
                }
            }
        }
        registry.publish(with_routes(Snapshot {
            revision,
            functions: Arc::new(functions),
            plugins,
            routes: Arc::default(),
            gateway,
        }));
    }
    Ok(())
}

/// Applies one stored plugin (`None`: deleted) to `plugins`; other keys are ignored. An
/// identical record keeps the serving plugin; one that does not compile is logged and
/// the serving one (if any) stays.
fn apply_plugin_change(
    registry: &Registry,
    plugins: &mut HashMap<Arc<str>, Arc<DeployedPlugin>>,
    current: &HashMap<Arc<str>, Arc<DeployedPlugin>>,
    key: &str,
    value: Option<(&[u8], Revision)>,
) {
    let Some(name) = key.strip_prefix(records::PLUGIN_PREFIX) else {
        return;
    };
    let Some((bytes, revision)) = value else {
        if plugins.remove(name).is_some() {
            let label = plugin_label(name);
            registry.metrics.forget(&label);
            registry.metrics.forget_plugin(name);
            registry.long_running.lock().remove(&label);
        }
        return;
    };
    let record: PluginRecord = match serde_json::from_slice(bytes) {
        Ok(record) => record,
        Err(error) => {
            tracing::error!(plugin = name, %error, "unreadable plugin record; skipped");
            return;
        }
    };
    if let Some(serving) = current.get(name)
        && serving.record == record
    {
        plugins.insert(serving.name.clone(), serving.clone());
        return;
    }
    match registry.deploy_plugin(name, record, revision) {
        Ok(plugin) => {
            plugins.insert(plugin.name.clone(), Arc::new(plugin));
        }
        Err(error) => {
            tracing::error!(plugin = name, %error, "stored plugin does not compile; skipped")
        }
    }
}

/// Applies one stored gateway object (`None`: deleted) to `gateway`; other keys are ignored.
fn apply_gateway_change(gateway: &mut Gateway, key: &str, value: Option<&[u8]>) {
    if let Some(name) = key.strip_prefix(records::UPSTREAM_PREFIX) {
        let config = value.and_then(|bytes| {
            serde_json::from_slice::<UpstreamConfig>(bytes)
                .inspect_err(|error| {
                    tracing::error!(upstream = name, %error, "unreadable upstream; removed")
                })
                .ok()
        });
        gateway.set_upstream(name, config);
    } else if let Some(name) = key.strip_prefix(records::ROUTE_PREFIX) {
        let config = value.and_then(|bytes| {
            serde_json::from_slice::<RouteConfig>(bytes)
                .inspect_err(
                    |error| tracing::error!(route = name, %error, "unreadable route; removed"),
                )
                .ok()
        });
        gateway.set_route(name, config);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_function_names() {
        assert_eq!(name_of_key("f/head/greeting"), Some("greeting"));
        assert_eq!(name_of_key("f/ver/greeting/0000000002"), Some("greeting"));
        assert_eq!(name_of_key("other"), None);
    }
}
