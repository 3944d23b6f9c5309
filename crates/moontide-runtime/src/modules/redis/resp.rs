//! RESP2, the Redis wire protocol: a command written as an array of bulk strings, and a
//! reader of one reply that stops at a byte budget *before* it buffers what would exceed
//! it (a `GET` of a 512 MiB string must end as a memory error having read a few bytes,
//! not after the host allocated the string). It knows nothing about sockets beyond
//! `AsyncBufRead`, Lua or pools.

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// Longest status or error line accepted (Redis's are a few hundred bytes).
pub const MAX_LINE_BYTES: usize = 64 << 10;
/// Deepest nesting of arrays accepted (an `EVAL` script can return nested tables).
pub const MAX_DEPTH: usize = 128;
/// What one element of an array costs against the budget besides its own bytes: a
/// slot in a Lua table (a `TValue`, 16 bytes) and a Lua string header (~24 bytes).
pub const ELEMENT_COST: usize = 40;

/// One reply, as read.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `$-1` or `*-1`.
    Nil,
    /// `+OK`.
    Status(Vec<u8>),
    /// `-ERR ...`, the message as Redis sent it.
    Error(String),
    /// `:42`.
    Int(i64),
    /// `$3\r\nfoo`.
    Bulk(Vec<u8>),
    /// `*2\r\n...`.
    Array(Vec<Reply>),
}

/// Why a reply could not be read. Every one leaves the connection mid-reply: drop it.
#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    /// The reply would cost more than the budget (the instance's free memory).
    TooLarge {
        budget: usize,
    },
    Protocol(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                f.write_str("connection closed by the server")
            }
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::TooLarge { budget } => write!(
                f,
                "reply larger than the instance's free memory ({budget} bytes)"
            ),
            ReadError::Protocol(message) => write!(f, "protocol error: {message}"),
        }
    }
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// Appends `args` as one command (an array of bulk strings).
pub fn encode_command(args: &[Vec<u8>], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Reads one line (without its CRLF), at most [`MAX_LINE_BYTES`].
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Vec<u8>, ReadError> {
    let mut line = Vec::new();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let (taken, done) = match available.iter().position(|&b| b == b'\n') {
            Some(at) => (at + 1, true),
            None => (available.len(), false),
        };
        line.extend_from_slice(&available[..taken]);
        reader.consume(taken);
        if line.len() > MAX_LINE_BYTES + 2 {
            return Err(ReadError::Protocol("reply line too long".into()));
        }
        if done {
            if line.len() < 2 || line[line.len() - 2] != b'\r' {
                return Err(ReadError::Protocol("line not ended by CRLF".into()));
            }
            line.truncate(line.len() - 2);
            return Ok(line);
        }
    }
}

fn parse_int(digits: &[u8]) -> Result<i64, ReadError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            ReadError::Protocol(format!("bad number '{}'", String::from_utf8_lossy(digits)))
        })
}

/// Charges `bytes` to the budget, or fails before anything is read or allocated.
fn charge(left: &mut usize, bytes: usize, budget: usize) -> Result<(), ReadError> {
    *left = left
        .checked_sub(bytes)
        .ok_or(ReadError::TooLarge { budget })?;
    Ok(())
}

/// Reads one whole reply. `budget` bounds what it may cost once in Lua: every string's
/// bytes plus [`ELEMENT_COST`] per value; an array's length is charged before any of its
/// elements is read, a bulk string's before its bytes are.
pub async fn read_reply<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    budget: usize,
) -> Result<Reply, ReadError> {
    let mut left = budget;
    // Arrays being filled: their elements so far and how many are still to come.
    let mut open: Vec<(Vec<Reply>, usize)> = Vec::new();
    loop {
        let line = read_line(reader).await?;
        let Some((&kind, rest)) = line.split_first() else {
            return Err(ReadError::Protocol("empty line".into()));
        };
        let mut value = match kind {
            b'+' => {
                charge(&mut left, rest.len() + ELEMENT_COST, budget)?;
                Reply::Status(rest.to_vec())
            }
            b'-' => {
                charge(&mut left, rest.len() + ELEMENT_COST, budget)?;
                Reply::Error(String::from_utf8_lossy(rest).into_owned())
            }
            b':' => {
                charge(&mut left, ELEMENT_COST, budget)?;
                Reply::Int(parse_int(rest)?)
            }
            b'$' => match parse_int(rest)? {
                -1 => Reply::Nil,
                n if n < 0 => return Err(ReadError::Protocol(format!("bulk length {n}"))),
                n => {
                    let n = usize::try_from(n)
                        .map_err(|_| ReadError::Protocol(format!("bulk length {n}")))?;
                    charge(&mut left, n.saturating_add(ELEMENT_COST), budget)?;
                    let mut bytes = vec![0; n + 2];
                    reader.read_exact(&mut bytes).await?;
                    if !bytes.ends_with(b"\r\n") {
                        return Err(ReadError::Protocol("bulk string not ended by CRLF".into()));
                    }
                    bytes.truncate(n);
                    Reply::Bulk(bytes)
                }
            },
            b'*' => match parse_int(rest)? {
                -1 => Reply::Nil,
                n if n < 0 => return Err(ReadError::Protocol(format!("array length {n}"))),
                0 => Reply::Array(Vec::new()),
                n => {
                    let n = usize::try_from(n)
                        .map_err(|_| ReadError::Protocol(format!("array length {n}")))?;
                    // The slots of the table; each element pays for its own value.
                    charge(&mut left, n.saturating_mul(16), budget)?;
                    if open.len() >= MAX_DEPTH {
                        return Err(ReadError::Protocol(format!(
                            "arrays nested deeper than {MAX_DEPTH}"
                        )));
                    }
                    // Never trust a length for an allocation: grow as elements come.
                    open.push((Vec::with_capacity(n.min(1024)), n));
                    continue;
                }
            },
            other => {
                return Err(ReadError::Protocol(format!(
                    "unexpected reply type {:?}",
                    other as char
                )));
            }
        };
        // Place the value; close every array it completes.
        loop {
            let Some((elements, remaining)) = open.last_mut() else {
                return Ok(value);
            };
            elements.push(value);
            *remaining -= 1;
            if *remaining > 0 {
                break;
            }
            let (elements, _) = open.pop().expect("an open array");
            value = Reply::Array(elements);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8], budget: usize) -> Result<Reply, ReadError> {
        let mut reader = tokio::io::BufReader::new(bytes);
        read_reply(&mut reader, budget).await
    }

    #[test]
    fn a_command_is_an_array_of_bulk_strings() {
        let mut out = Vec::new();
        encode_command(
            &[b"SET".to_vec(), b"k".to_vec(), b"a\r\nb".to_vec()],
            &mut out,
        );
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\na\r\nb\r\n");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn every_reply_type_is_read() {
        let big = usize::MAX;
        assert_eq!(
            read(b"+OK\r\n", big).await.unwrap(),
            Reply::Status(b"OK".to_vec())
        );
        assert_eq!(
            read(b"-WRONGTYPE Operation\r\n", big).await.unwrap(),
            Reply::Error("WRONGTYPE Operation".into())
        );
        assert_eq!(read(b":-42\r\n", big).await.unwrap(), Reply::Int(-42));
        assert_eq!(read(b"$-1\r\n", big).await.unwrap(), Reply::Nil);
        assert_eq!(read(b"*-1\r\n", big).await.unwrap(), Reply::Nil);
        assert_eq!(
            read(b"$4\r\na\r\nb\r\n", big).await.unwrap(),
            Reply::Bulk(b"a\r\nb".to_vec())
        );
        assert_eq!(
            read(b"*3\r\n:1\r\n*2\r\n$1\r\nx\r\n$-1\r\n*0\r\n", big)
                .await
                .unwrap(),
            Reply::Array(vec![
                Reply::Int(1),
                Reply::Array(vec![Reply::Bulk(b"x".to_vec()), Reply::Nil]),
                Reply::Array(vec![]),
            ])
        );
    }

    /// A reply over the budget is refused from its header: a 512 MiB bulk string or an
    /// array of a billion elements costs the reader a line, not the allocation.
    #[tokio::test(flavor = "current_thread")]
    async fn a_reply_over_the_budget_is_refused_before_it_is_read() {
        let error = read(b"$536870912\r\n", 1 << 20).await.unwrap_err();
        assert!(matches!(error, ReadError::TooLarge { budget } if budget == 1 << 20));
        let error = read(b"*1000000000\r\n", 1 << 20).await.unwrap_err();
        assert!(matches!(error, ReadError::TooLarge { .. }));
        // Many small elements add up.
        let mut many = b"*100000\r\n".to_vec();
        for _ in 0..100_000 {
            many.extend_from_slice(b"$1\r\nx\r\n");
        }
        assert!(matches!(
            read(&many, 1 << 20).await.unwrap_err(),
            ReadError::TooLarge { .. }
        ));
        assert!(
            matches!(read(&many, 8 << 20).await.unwrap(), Reply::Array(a) if a.len() == 100_000)
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn malformed_replies_are_protocol_errors() {
        let big = usize::MAX;
        for bytes in [
            &b"?what\r\n"[..],
            b"+OK\n",
            b":abc\r\n",
            b"$-2\r\n",
            b"$3\r\nabcd\r\n",
        ] {
            assert!(
                matches!(read(bytes, big).await, Err(ReadError::Protocol(_))),
                "{bytes:?}"
            );
        }
        let deep = b"*1\r\n".repeat(MAX_DEPTH + 1);
        assert!(matches!(
            read(&deep, big).await,
            Err(ReadError::Protocol(_))
        ));
        assert!(matches!(
            read(b"$5\r\nab", big).await,
            Err(ReadError::Io(_))
        ));
    }
}
