//! A real Redis server for tests: `redis-server` on a free loopback port, without
//! persistence, killed when dropped; it can be stopped and started again on the same port
//! (a restart, as an operator's Redis restarts). Also a tiny blocking client for the
//! tests' own setup and checks.
//!
//! The binary comes from Debian's `redis-server` package, which
//! `scripts/install-test-deps.sh` installs; a test fails (it does not skip) without it.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bound on waiting for a started server to answer PING (not a timing assertion).
const READY_LIMIT: Duration = Duration::from_secs(30);

/// Tries with a new port when another process took the free one first.
const PORT_ATTEMPTS: usize = 5;

/// A running `redis-server` (SIGKILLed when dropped).
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// Extra `redis-server` arguments (e.g. `--requirepass`).
    extra: Vec<String>,
    /// The password the harness's own commands authenticate with.
    password: Option<String>,
}

impl Redis {
    /// Starts a server on a free loopback port and waits until it answers PING.
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// Starts a server with extra arguments; `--requirepass P` makes the harness's own
    /// commands authenticate with `P`.
    pub fn start_with(extra: &[&str]) -> Redis {
        let password = extra
            .iter()
            .position(|a| *a == "--requirepass")
            .map(|at| extra[at + 1].to_string());
        let mut redis = Redis {
            child: None,
            port: 0,
            dir: tempfile::tempdir().expect("tempdir"),
            extra: extra.iter().map(|a| a.to_string()).collect(),
            password,
        };
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            redis.port = free_port();
            match redis.spawn() {
                Ok(()) => return redis,
                Err(log) => last = log,
            }
        }
        panic!("redis-server found no free port; last log:\n{last}");
    }

    /// `redis://127.0.0.1:PORT`, for `serve --redis`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log_path = self.dir.path().join("redis.log");
        let log = std::fs::File::create(&log_path).expect("redis log file");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(&self.extra)
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "spawn redis-server: {e} (not installed? run scripts/install-test-deps.sh, \
                     which installs Debian's `redis-server` package)"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            if let Ok(reply) = self.try_command(&["PING"])
                && reply == "PONG"
            {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() >= deadline {
                self.kill();
                return Err(std::fs::read_to_string(&log_path).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL): connections drop, the port is closed.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the server again on the same port (empty: no persistence).
    pub fn restart(&mut self) {
        self.kill();
        if let Err(log) = self.spawn() {
            panic!(
                "redis-server did not start again on {}; log:\n{log}",
                self.port
            );
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs one command; the reply as text (`nil` for a nil reply, `ERR:...` for an
    /// error, arrays' elements joined by `,`). Panics if the server cannot be reached.
    pub fn command(&self, args: &[&str]) -> String {
        self.command_in(0, args)
    }

    /// [`Redis::command`] in database `db`.
    pub fn command_in(&self, db: u32, args: &[&str]) -> String {
        self.try_command_in(db, args)
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    fn try_command(&self, args: &[&str]) -> std::io::Result<String> {
        self.try_command_in(0, args)
    }

    /// On a new connection: `AUTH` if the server wants a password, `SELECT db` if not 0,
    /// then the command; the command's reply.
    fn try_command_in(&self, db: u32, args: &[&str]) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let db = db.to_string();
        let mut commands: Vec<Vec<&str>> = Vec::new();
        if let Some(password) = &self.password {
            commands.push(vec!["AUTH", password.as_str()]);
        }
        if db != "0" {
            commands.push(vec!["SELECT", &db]);
        }
        commands.push(args.to_vec());
        let mut text = String::new();
        for command in &commands {
            text.push_str(&format!("*{}\r\n", command.len()));
            for arg in command {
                text.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
            }
        }
        stream.write_all(text.as_bytes())?;
        let mut reader = BufReader::new(stream);
        let mut reply = String::new();
        for _ in &commands {
            reply = read_reply(&mut reader)?;
        }
        Ok(reply)
    }
}

fn read_reply(reader: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let line = line.trim_end();
    let (kind, rest) = line.split_at(1);
    Ok(match kind {
        "+" | ":" => rest.to_string(),
        "-" => format!("ERR:{rest}"),
        "$" if rest == "-1" => "nil".into(),
        "$" => {
            let n: usize = rest.parse().expect("bulk length");
            let mut bytes = vec![0; n + 2];
            std::io::Read::read_exact(reader, &mut bytes)?;
            String::from_utf8_lossy(&bytes[..n]).into_owned()
        }
        "*" if rest == "-1" => "nil".into(),
        "*" => {
            let n: usize = rest.parse().expect("array length");
            (0..n)
                .map(|_| read_reply(reader))
                .collect::<std::io::Result<Vec<_>>>()?
                .join(",")
        }
        _ => panic!("unexpected reply line {line:?}"),
    })
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}
