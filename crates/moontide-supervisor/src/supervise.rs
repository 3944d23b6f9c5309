//! The supervisor process: `moontide serve` binds the listeners, then runs the node as a
//! child process (the same binary, re-executed) that inherits them, and starts it again
//! when it dies of a signal.
//!
//! What this buys (issue 13, "contain the next VM bug"): a crash while tenant Lua runs
//! ends one child, not the service. The listening sockets belong to the supervisor, so
//! connections that arrive while the next child starts wait in the kernel's accept queue —
//! none is refused. The flight recorder (`recorder`) names the function version that was
//! running on the crashing thread; the ledger (`ledger`) counts it and quarantines it at
//! its second crash, so a crash loop stops there.
//!
//! Signals: SIGTERM and SIGINT are passed to the child (graceful drain) and the supervisor
//! exits with the child's status. The child asks the kernel to kill it if the supervisor
//! dies (`PR_SET_PDEATHSIG`), so `kill -9` of the supervisor still stops the node.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::ledger::{Ledger, signal_name};
use crate::recorder::{self, Culprit};

/// The environment variable that tells a child it runs under the supervisor:
/// `DATA_FD,ADMIN_FD,SUPERVISOR_PID,RESTARTS`.
pub const SUPERVISED_ENV: &str = "MOONTIDE_SUPERVISED";

/// Pending connections a listener queues before the kernel drops new ones. Rust's std
/// listens with 128; a burst of new clients after a stall overflowed it (each dropped SYN
/// costs the client a 1 s retransmit). It also holds the connections that arrive while a
/// crashed node restarts.
const LISTEN_BACKLOG: i32 = 4096;

/// Unattributed crashes after which the supervisor waits before starting the next child,
/// if they came fast (a node that crashes at start, for reasons no quarantine covers).
const QUICK_RESTARTS: usize = 3;
const QUICK_WINDOW: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the node process: {0}")]
    Spawn(#[source] io::Error),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Binds a listener as the node wants it (address reuse, a deep backlog).
pub fn bind(addr: SocketAddr) -> Result<TcpListener, SuperviseError> {
    let listen = || -> io::Result<TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        // As std does on Unix: a restarted node may bind while old connections linger.
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        Ok(socket.into())
    };
    listen().map_err(|source| SuperviseError::Bind { addr, source })
}

/// What a supervised node is handed.
pub struct Inherited {
    pub data: TcpListener,
    pub admin: TcpListener,
    /// Children started before this one because an earlier one crashed.
    pub restarts: u64,
}

/// In the node: the listeners inherited from the supervisor, if this process is its
/// child. Also asks the kernel to kill this process when the supervisor dies.
pub fn inherited() -> Option<io::Result<Inherited>> {
    let value = std::env::var(SUPERVISED_ENV).ok()?;
    Some(parse_inherited(&value))
}

fn parse_inherited(value: &str) -> io::Result<Inherited> {
    let invalid = || io::Error::new(io::ErrorKind::InvalidInput, format!("bad {SUPERVISED_ENV}"));
    let fields: Vec<u64> = value
        .split(',')
        .map(|field| field.parse().map_err(|_| invalid()))
        .collect::<io::Result<_>>()?;
    let [data_fd, admin_fd, supervisor, restarts] = fields[..] else {
        return Err(invalid());
    };
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
    // The supervisor may have died before the line above: then nobody would kill us.
    if rustix::process::getppid().map(|pid| pid.as_raw_nonzero().get() as u64) != Some(supervisor) {
        return Err(io::Error::other("the supervisor is gone"));
    }
    Ok(Inherited {
        data: take_listener(data_fd as RawFd)?,
        admin: take_listener(admin_fd as RawFd)?,
        restarts,
    })
}

fn take_listener(fd: RawFd) -> io::Result<TcpListener> {
    // Only descriptors the supervisor named, once each.
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad listener fd",
        ));
    }
    // SAFETY: the supervisor passed these descriptors to this process (inherited across
    // exec, CLOEXEC cleared) and names each once; nothing else in this process owns them.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    Ok(TcpListener::from(owned))
}

/// What the supervisor runs.
pub struct Supervisor {
    pub data_dir: PathBuf,
    pub data: TcpListener,
    pub admin: TcpListener,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Raises the soft limit on open files to the hard limit, as nginx's `worker_rlimit_nofile`
/// and Go's runtime do: every connection is a file, and under the usual soft limit of 1 024
/// `accept` fails long before the node's connection cap (16 384 by default) answers
/// cleanly. The node inherits it. Returns the limit now in force (`None`: unlimited).
pub fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(error) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(%error, "could not raise the open-files limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

impl Supervisor {
    /// Runs children until one exits on its own or a stop signal was passed on; returns
    /// the exit code to leave with.
    pub async fn run(self) -> Result<ExitCode, SuperviseError> {
        use tokio::signal::unix::{SignalKind, signal};
        let io = |what| move |source| SuperviseError::Io { what, source };
        let open_files = raise_open_files_limit();
        tracing::debug!(?open_files, "open-files limit");
        // The children inherit the listeners: clear close-on-exec on them.
        for listener in [&self.data, &self.admin] {
            rustix::io::fcntl_setfd(listener.as_fd(), rustix::io::FdFlags::empty())
                .map_err(|e| io("sharing the listeners")(e.into()))?;
        }
        let mut terminate = signal(SignalKind::terminate()).map_err(io("watching SIGTERM"))?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(io("watching SIGINT"))?;
        let exe = std::env::current_exe().map_err(io("finding the moontide binary"))?;
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        let mut ledger = Ledger::load(&self.data_dir).unwrap_or_else(|error| {
            tracing::error!(%error, "the crash ledger is unreadable; starting a new one");
            Ledger::default()
        });
        let mut recent_restarts: Vec<Instant> = Vec::new();
        loop {
            recorder::reset(&self.data_dir).map_err(io("resetting the flight recorder"))?;
            let mut child = tokio::process::Command::new(&exe)
                .args(&args)
                .env(
                    SUPERVISED_ENV,
                    format!(
                        "{},{},{},{}",
                        self.data.as_raw_fd(),
                        self.admin.as_raw_fd(),
                        std::process::id(),
                        ledger.restarts
                    ),
                )
                .spawn()
                .map_err(SuperviseError::Spawn)?;
            let pid = child.id();
            let mut stopping = false;
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status.map_err(io("waiting for the node"))?,
                    _ = terminate.recv() => { stopping = true; pass_on(pid, rustix::process::Signal::TERM) }
                    _ = interrupt.recv() => { stopping = true; pass_on(pid, rustix::process::Signal::INT) }
                }
            };
            let Some(signal) = status.signal().filter(|_| !stopping) else {
                let code = status.code().unwrap_or(1);
                return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
            };
            let blamed = self.learn_from_crash(&mut ledger, signal);
            ledger.restarts += 1;
            if let Err(error) = ledger.save(&self.data_dir) {
                tracing::error!(%error, "cannot write the crash ledger");
            }
            // A crash blamed on a function version restarts at once: the quarantine bounds
            // them, and waiting would only stall every neighbour (measured: p99 3 s with a
            // backoff). Crashes nobody is blamed for may be a node that cannot start:
            // those back off when they come fast.
            if blamed {
                continue;
            }
            let now = Instant::now();
            recent_restarts.retain(|at| now.duration_since(*at) < QUICK_WINDOW);
            recent_restarts.push(now);
            if recent_restarts.len() > QUICK_RESTARTS {
                let excess = (recent_restarts.len() - QUICK_RESTARTS) as u32;
                let backoff =
                    (Duration::from_millis(100) * 2u32.saturating_pow(excess)).min(MAX_BACKOFF);
                tracing::warn!(
                    ?backoff,
                    "the node keeps crashing; waiting before restarting"
                );
                tokio::time::sleep(backoff).await;
            }
        }
    }

    /// Counts the crash in the ledger; `true` if a function version was blamed.
    fn learn_from_crash(&self, ledger: &mut Ledger, signal: i32) -> bool {
        let culprit = recorder::read_crash(&self.data_dir).unwrap_or(Culprit::Unknown);
        let recorded = recorder::recorded_signal(&self.data_dir).unwrap_or(0);
        let signal = signal_name(if recorded != 0 { recorded } else { signal });
        match culprit {
            Culprit::Function { name, version } => {
                let record = ledger.record_crash(&name, version, &signal, now_ms());
                tracing::error!(
                    function = %name,
                    version,
                    %signal,
                    crashes = record.crashes,
                    quarantined = record.quarantined_since_ms.is_some(),
                    "the node crashed while this function ran; restarting it"
                );
                true
            }
            Culprit::Host | Culprit::Unknown => {
                ledger.unattributed += 1;
                tracing::error!(%signal, "the node crashed outside tenant code; restarting it");
                false
            }
        }
    }
}

fn pass_on(pid: Option<u32>, signal: rustix::process::Signal) {
    if let Some(pid) = pid.and_then(|pid| rustix::process::Pid::from_raw(pid as i32)) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}
