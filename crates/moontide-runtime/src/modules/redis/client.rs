//! The node's Redis client: the operator's address (`serve --redis`), and a pool of
//! plain connections per worker thread, each running one command at a time.
//!
//! Why per thread: every worker runs its own current-thread tokio runtime and its Lua
//! instances never leave it, so a thread's connections are driven by the runtime that
//! uses them (no cross-thread wake-ups, no lock), like the gateway's keep-alive pools.
//! Why one command per connection rather than one multiplexed connection: a command
//! whose call is abandoned (its timeout, a client gone) drops its connection with it, so
//! no late reply can ever be read as another command's; and the reply reader stops at the
//! instance's free memory before it buffers a huge reply, after which the connection is
//! mid-reply and must go anyway.
//!
//! A thread opens at most [`MAX_CONNECTIONS_PER_THREAD`] connections at once; more
//! commands wait for one (the wait counts toward the command's timeout). An idle
//! connection is checked before reuse (a non-blocking read: a server that closed it, as a
//! restarted Redis did, shows end of file), so a restart costs no failed call.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::resp::{self, ReadError, Reply};

/// Most connections one thread holds open to Redis at once.
pub const MAX_CONNECTIONS_PER_THREAD: usize = 64;

/// Where the node's Redis is and how long to wait for it (node config, never tenant's).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    pub host: String,
    pub port: u16,
    pub db: u32,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Bound on opening a connection (TCP connect, `AUTH` and `SELECT`).
    pub connect_timeout: Duration,
    /// Bound on one command: waiting for a connection, writing it, reading its reply.
    pub command_timeout: Duration,
}

impl RedisConfig {
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

    /// Parses `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]` (port 6379, database 0 by
    /// default).
    pub fn parse(text: &str) -> Result<RedisConfig, String> {
        let url = url::Url::parse(text).map_err(|e| format!("invalid redis url: {e}"))?;
        match url.scheme() {
            "redis" => {}
            "rediss" => return Err("rediss:// (TLS) is not supported; use redis://".into()),
            other => return Err(format!("unsupported scheme '{other}': use redis://")),
        }
        let host = match url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(host) => host.to_string(),
            None => return Err("the redis url has no host".into()),
        };
        let db = match url.path().trim_start_matches('/') {
            "" => 0,
            db => db
                .parse()
                .map_err(|_| format!("the database must be a number, got '{db}'"))?,
        };
        if url.query().is_some() || url.fragment().is_some() {
            return Err("the redis url takes no query or fragment".into());
        }
        let decode = |s: &str| {
            percent_decode(s).ok_or_else(|| "invalid percent-encoding in the url".to_string())
        };
        let username = match url.username() {
            "" => None,
            name => Some(decode(name)?),
        };
        let password = url.password().map(decode).transpose()?;
        Ok(RedisConfig {
            host,
            port: url.port().unwrap_or(6379),
            db,
            username,
            password,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            command_timeout: Self::DEFAULT_COMMAND_TIMEOUT,
        })
    }

    /// `redis://HOST:PORT/DB`, without credentials (for logs and `/v1/node`).
    pub fn redacted(&self) -> String {
        format!("redis://{}:{}/{}", self.redacted_host(), self.port, self.db)
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redacted())
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .finish_non_exhaustive()
    }
}

/// The node's client: its config and an id that names its per-thread pools.
#[derive(Debug)]
pub struct RedisClient {
    id: u64,
    config: RedisConfig,
}

/// A failed command that the caller should handle (`nil, message` in Lua): the
/// connection or the server could not answer in time. A reply that is a Redis error is
/// not a failure (it is [`Reply::Error`]).
#[derive(Debug)]
pub enum Failure {
    /// The reply would not fit in the instance's free memory.
    TooLarge(usize),
    Other(String),
}

thread_local! {
    /// This thread's pools, by client id (a node has one client; tests build several).
    static POOLS: RefCell<HashMap<u64, Rc<ThreadPool>>> = RefCell::default();
}

/// One thread's connections to one Redis.
pub struct ThreadPool {
    idle: RefCell<Vec<Connection>>,
    permits: Semaphore,
}

struct Connection {
    stream: BufReader<TcpStream>,
}

impl RedisClient {
    pub fn new(config: RedisConfig) -> RedisClient {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        RedisClient {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            config,
        }
    }

    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// The calling thread's pool for this client (created on first use).
    pub fn thread_pool(&self) -> Rc<ThreadPool> {
        POOLS.with(|pools| {
            pools
                .borrow_mut()
                .entry(self.id)
                .or_insert_with(|| {
                    Rc::new(ThreadPool {
                        idle: RefCell::default(),
                        permits: Semaphore::new(MAX_CONNECTIONS_PER_THREAD),
                    })
                })
                .clone()
        })
    }

    /// Runs one command on a connection of `pool` (which must be this thread's) and
    /// reads its reply within `budget` bytes, all within the command timeout. A dropped
    /// future drops its connection.
    pub async fn execute(
        &self,
        pool: &ThreadPool,
        args: &[Vec<u8>],
        budget: usize,
    ) -> Result<Reply, Failure> {
        let timeout = self.config.command_timeout;
        match tokio::time::timeout(timeout, self.execute_untimed(pool, args, budget)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Other(format!(
                "redis command timed out after {} ms",
                timeout.as_millis()
            ))),
        }
    }

    async fn execute_untimed(
        &self,
        pool: &ThreadPool,
        args: &[Vec<u8>],
        budget: usize,
    ) -> Result<Reply, Failure> {
        let _permit = pool
            .permits
            .acquire()
            .await
            .map_err(|_| Failure::Other("redis pool closed".into()))?;
        let mut connection = match pool.take_idle() {
            Some(connection) => connection,
            None => self.connect().await.map_err(Failure::Other)?,
        };
        let mut command = Vec::new();
        resp::encode_command(args, &mut command);
        let io = |e: std::io::Error| Failure::Other(format!("redis: {e}"));
        connection
            .stream
            .get_mut()
            .write_all(&command)
            .await
            .map_err(io)?;
        let reply = match resp::read_reply(&mut connection.stream, budget).await {
            Ok(reply) => reply,
            Err(ReadError::TooLarge { budget }) => return Err(Failure::TooLarge(budget)),
            Err(e) => return Err(Failure::Other(format!("redis: {e}"))),
        };
        pool.idle.borrow_mut().push(connection);
        Ok(reply)
    }

    /// Opens a connection: TCP, then `AUTH` and `SELECT` when configured.
    async fn connect(&self) -> Result<Connection, String> {
        let config = &self.config;
        let address = format!("{}:{}", config.redacted_host(), config.port);
        let open = async {
            let stream = TcpStream::connect((config.host.as_str(), config.port))
                .await
                .map_err(|e| format!("redis: connect to {address}: {e}"))?;
            let _ = stream.set_nodelay(true);
            let mut connection = Connection {
                stream: BufReader::new(stream),
            };
            if let Some(password) = &config.password {
                let mut args = vec![b"AUTH".to_vec()];
                if let Some(user) = &config.username {
                    args.push(user.as_bytes().to_vec());
                }
                args.push(password.as_bytes().to_vec());
                connection.setup(&args, "AUTH").await?;
            }
            if config.db != 0 {
                let args = [b"SELECT".to_vec(), config.db.to_string().into_bytes()];
                connection.setup(&args, "SELECT").await?;
            }
            Ok(connection)
        };
        match tokio::time::timeout(config.connect_timeout, open).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "redis: connect to {address} timed out after {} ms",
                config.connect_timeout.as_millis()
            )),
        }
    }
}

impl RedisConfig {
    fn redacted_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

impl ThreadPool {
    /// The most recently used idle connection that the server has not closed.
    fn take_idle(&self) -> Option<Connection> {
        let mut idle = self.idle.borrow_mut();
        while let Some(connection) = idle.pop() {
            if connection.is_open() {
                return Some(connection);
            }
        }
        None
    }

    /// Idle connections (tests).
    pub fn idle_count(&self) -> usize {
        self.idle.borrow().len()
    }
}

impl Connection {
    /// Between commands nothing is due from the server: readable means closed (end of
    /// file), reset, or out of step; only "would block" is a healthy idle connection.
    fn is_open(&self) -> bool {
        if !self.stream.buffer().is_empty() {
            return false;
        }
        let mut byte = [0u8; 1];
        matches!(
            self.stream.get_ref().try_read(&mut byte),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
    }

    /// A setup command that must answer `+OK`.
    async fn setup(&mut self, args: &[Vec<u8>], name: &str) -> Result<(), String> {
        let mut command = Vec::new();
        resp::encode_command(args, &mut command);
        self.stream
            .get_mut()
            .write_all(&command)
            .await
            .map_err(|e| format!("redis: {name}: {e}"))?;
        match resp::read_reply(&mut self.stream, resp::MAX_LINE_BYTES).await {
            Ok(Reply::Status(_)) => Ok(()),
            Ok(Reply::Error(message)) => Err(format!("redis: {name} failed: {message}")),
            Ok(other) => Err(format!("redis: {name}: unexpected reply {other:?}")),
            Err(e) => Err(format!("redis: {name}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_and_redacted() {
        let config = RedisConfig::parse("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!(
            (config.host.as_str(), config.port, config.db),
            ("127.0.0.1", 6380, 2)
        );
        assert_eq!(config.password, None);
        let config = RedisConfig::parse("redis://app:p%40ss@localhost").unwrap();
        assert_eq!(
            (config.host.as_str(), config.port, config.db),
            ("localhost", 6379, 0)
        );
        assert_eq!(config.username.as_deref(), Some("app"));
        assert_eq!(config.password.as_deref(), Some("p@ss"));
        assert_eq!(config.redacted(), "redis://localhost:6379/0");
        assert!(!format!("{config:?}").contains("p@ss"));
        let config = RedisConfig::parse("redis://:secret@[::1]:7000").unwrap();
        assert_eq!(config.redacted(), "redis://[::1]:7000/0");
        assert_eq!(
            (config.username, config.password.as_deref()),
            (None, Some("secret"))
        );
        for (bad, why) in [
            ("rediss://h", "TLS"),
            ("http://h", "unsupported scheme"),
            ("redis://h/x", "database must be a number"),
            ("redis://h?db=1", "no query"),
            ("not a url", "invalid redis url"),
        ] {
            let error = RedisConfig::parse(bad).unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }
}
