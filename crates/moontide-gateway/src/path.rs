//! Request-path normalisation: the one place that decides which path a request *is*, before
//! anything routes on it. The data plane calls [`normalize`] once per request, on both of its
//! paths (the front and hyper), routes on the result, hands it to functions and plugins
//! (`event.path`, `pathParameters`, `req.path`) and forwards that same text upstream — so a
//! backend that normalises on its own sees nothing the router did not see, and
//! `/api/public/../private/x` cannot reach `/api/private/x` past that route's plugins.
//!
//! The rules, in order (Envoy's `normalize_path` + `merge_slashes` +
//! `path_with_escaped_slashes_action: REJECT_REQUEST`, with RFC 3986 §6.2.2 as the base):
//!
//! 1. **Percent-encodings.** `%XX` of an unreserved character (`A–Z a–z 0–9 - . _ ~`) is
//!    decoded (`%70` → `p`, `%2e` → `.`); every other one stays encoded with its hex digits
//!    uppercased (`%3a` → `%3A`), so `%25` stays `%25` (never decoded twice). An encoded `/`
//!    or `\` (`%2F`, `%5C`, either case) is **rejected**: decoding it changes the segments,
//!    keeping it lets a backend that decodes it see other segments than the router did. A
//!    `%` not followed by two hex digits is rejected.
//! 2. **Backslash.** A literal `\` is **rejected**: some servers and frameworks treat it as
//!    `/` (IIS, some Windows file servers, several web frameworks), so it would be a second
//!    spelling of a separator.
//! 3. **Slashes.** Runs of `/` are merged into one (`/a//b` → `/a/b`), before dot segments
//!    are looked at (so `/a//..` is `/`).
//! 4. **Dot segments** (RFC 3986 §5.2.4, after step 1, so `%2e%2e` counts): `.` segments
//!    go, `..` removes the segment before it; a path ending in `.` or `..` keeps its
//!    trailing `/` (`/a/b/..` → `/a/`). A `..` that would climb above the root is
//!    **rejected** rather than clamped: no honest client sends one, and clamping would
//!    route `/api/../../admin` somewhere its author did not write.
//!
//! Left as sent: the query string (callers pass the path only), `;` and every other
//! character. A path that does not start with `/` (`*` of `OPTIONS *`) is returned as it is
//! (it matches no route). There is no setting to loosen these rules: each loosening is a
//! way to make the router and a backend disagree.
//!
//! Cost: a path with no `%`, no `\`, no `//` and no `.`/`..` segment — nearly every request
//! — is recognised by one pass over its bytes and returned borrowed (no allocation).

use std::borrow::Cow;

/// Why a request path is refused (the data plane answers `400`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathRejection {
    #[error("the path holds an encoded `/` or `\\` (`%2F`, `%5C`), which is refused")]
    EscapedSlash,
    #[error("the path holds a `\\`, which is refused")]
    Backslash,
    #[error("the path holds a `%` that is not followed by two hex digits")]
    BadPercentEncoding,
    #[error("the path's `..` segments climb above the root")]
    AboveRoot,
}

/// The normal form of `path` (see the module doc), borrowed when it is already normal.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathRejection> {
    if !path.starts_with('/') || is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    remove_dot_segments(&decoded).map(Cow::Owned)
}

/// Whether `path` (starting with `/`) is already in normal form: no `%`, no `\\`, no `//`,
/// no `.` or `..` segment. No allocation; branch-free passes over the bytes (which the
/// compiler vectorises), then a closer look only where a segment starts with `.`.
pub fn is_normal(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut escaped = false;
    for &byte in bytes {
        escaped |= (byte == b'%') | (byte == b'\\');
    }
    let mut slash_then_slash_or_dot = false;
    for pair in bytes.windows(2) {
        slash_then_slash_or_dot |= (pair[0] == b'/') & ((pair[1] == b'/') | (pair[1] == b'.'));
    }
    if escaped {
        return false;
    }
    if !slash_then_slash_or_dot {
        return true;
    }
    // Rare: a `//`, or a segment that starts with `.` (`/.well-known`, `/../`).
    for (at, pair) in bytes.windows(2).enumerate() {
        if pair[0] != b'/' {
            continue;
        }
        if pair[1] == b'/' {
            return false;
        }
        if pair[1] == b'.' {
            let segment = &bytes[at + 1..];
            let end = segment
                .iter()
                .position(|&b| b == b'/')
                .unwrap_or(segment.len());
            if matches!(&segment[..end], b"." | b"..") {
                return false;
            }
        }
    }
    true
}

/// Step 1 and 2: unreserved characters decoded, other encodings uppercased, encoded or
/// literal separators refused.
fn decode_unreserved(path: &str) -> Result<String, PathRejection> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'\\' => return Err(PathRejection::Backslash),
            b'%' => {
                let (Some(high), Some(low)) = (
                    bytes.get(at + 1).and_then(|&b| hex_value(b)),
                    bytes.get(at + 2).and_then(|&b| hex_value(b)),
                ) else {
                    return Err(PathRejection::BadPercentEncoding);
                };
                let value = high << 4 | low;
                match value {
                    b'/' | b'\\' => return Err(PathRejection::EscapedSlash),
                    b if is_unreserved(b) => out.push(b as char),
                    _ => {
                        const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
                        out.push('%');
                        out.push(DIGITS[(value >> 4) as usize] as char);
                        out.push(DIGITS[(value & 0xf) as usize] as char);
                    }
                }
                at += 3;
            }
            _ => {
                // Copy the run up to the next `%` or `\` at once (UTF-8 boundaries are
                // safe: both are ASCII).
                let end = bytes[at..]
                    .iter()
                    .position(|&b| b == b'%' || b == b'\\')
                    .map_or(bytes.len(), |n| at + n);
                out.push_str(&path[at..end]);
                at = end;
            }
        }
    }
    Ok(out)
}

/// Steps 3 and 4 on a decoded path that starts with `/`.
fn remove_dot_segments(path: &str) -> Result<String, PathRejection> {
    let below_root = &path[1..];
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    let mut segments = below_root.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "" | "." => trailing_slash = last,
            ".." => {
                if kept.pop().is_none() {
                    return Err(PathRejection::AboveRoot);
                }
                trailing_slash = last;
            }
            _ => {
                kept.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if kept.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §2.3.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    use PathRejection::*;

    /// Input → normal form, or the rejection (`docs/edge.md` shows these cases).
    const CASES: &[(&str, Result<&str, PathRejection>)] = &[
        // Already normal: returned as it is.
        ("/", Ok("/")),
        ("/api/private/secret.txt", Ok("/api/private/secret.txt")),
        ("/a/b/", Ok("/a/b/")),
        ("/a/.hidden/..x/x..", Ok("/a/.hidden/..x/x..")),
        ("/a;b=c/d:e@f", Ok("/a;b=c/d:e@f")),
        ("", Ok("")),
        ("*", Ok("*")),
        // Dot segments.
        (
            "/api/public/../private/secret.txt",
            Ok("/api/private/secret.txt"),
        ),
        ("/api/./private/secret.txt", Ok("/api/private/secret.txt")),
        ("/a/b/..", Ok("/a/")),
        ("/a/b/.", Ok("/a/b/")),
        ("/a/..", Ok("/")),
        ("/.", Ok("/")),
        ("/a/b/../../c", Ok("/c")),
        ("/..", Err(AboveRoot)),
        ("/api/../../secret.txt", Err(AboveRoot)),
        ("/a/../..", Err(AboveRoot)),
        // Merged slashes.
        ("/api//private/secret.txt", Ok("/api/private/secret.txt")),
        ("//api/private/secret.txt", Ok("/api/private/secret.txt")),
        ("/api/../secret.txt", Ok("/secret.txt")),
        ("//api///x//", Ok("/api/x/")),
        ("//", Ok("/")),
        ("/a//..", Ok("/")),
        // Percent-encodings.
        ("/api/%70rivate/secret.txt", Ok("/api/private/secret.txt")),
        (
            "/api/public/%2e%2e/private/secret.txt",
            Ok("/api/private/secret.txt"),
        ),
        (
            "/api/public/%2E%2E/private/secret.txt",
            Ok("/api/private/secret.txt"),
        ),
        (
            "/api/public/.%2e/private/secret.txt",
            Ok("/api/private/secret.txt"),
        ),
        ("/api/%2e/private/secret.txt", Ok("/api/private/secret.txt")),
        ("/%41%7a%30%2D%5f%7E", Ok("/Az0-_~")),
        ("/a%20b%3ac", Ok("/a%20b%3Ac")),
        ("/a%252e%252e/x", Ok("/a%252e%252e/x")),
        ("/caf%C3%A9", Ok("/caf%C3%A9")),
        ("/a%2fb", Err(EscapedSlash)),
        ("/a%2Fb", Err(EscapedSlash)),
        ("/a%5cb", Err(EscapedSlash)),
        ("/a%5C..%5Cb", Err(EscapedSlash)),
        ("/a%zzb", Err(BadPercentEncoding)),
        ("/a%2", Err(BadPercentEncoding)),
        ("/100%", Err(BadPercentEncoding)),
        // Backslash.
        ("/api\\..\\private", Err(Backslash)),
        ("/a\\b", Err(Backslash)),
    ];

    #[test]
    fn the_table() {
        for (input, expected) in CASES {
            let got = normalize(input);
            let got = got.as_ref().map(|path| path.as_ref()).map_err(|e| *e);
            assert_eq!(got, *expected, "normalize({input:?})");
        }
    }

    #[test]
    fn normal_forms_are_fixed_points_and_plain_ones_are_borrowed() {
        for (input, expected) in CASES {
            if let Ok(normal) = expected {
                let again = normalize(normal).unwrap();
                assert_eq!(again, *normal, "normalize is not idempotent on {input:?}");
                // Only a `%` sends an already normal path the long way.
                if !normal.contains('%') {
                    assert!(
                        matches!(again, Cow::Borrowed(_)),
                        "{normal:?} (from {input:?}) is not recognised as normal"
                    );
                }
            }
        }
    }

    #[test]
    fn the_quick_check_misses_no_path_that_changes() {
        // Every short path over an alphabet that holds each special character.
        let alphabet = ['/', '.', '%', '2', 'e', 'f', 'a', '\\'];
        let mut paths = vec![String::from("/")];
        for _ in 0..5 {
            let mut longer = Vec::new();
            for path in &paths {
                for c in alphabet {
                    longer.push(format!("{path}{c}"));
                }
            }
            for path in longer {
                let normal = is_normal(&path);
                match decode_unreserved(&path).and_then(|d| remove_dot_segments(&d)) {
                    Ok(full) if normal => assert_eq!(full, path, "{path:?} passed the check"),
                    Err(error) if normal => panic!("{path:?} passed the check but is {error}"),
                    _ => {}
                }
                paths.push(path);
            }
        }
    }
}
