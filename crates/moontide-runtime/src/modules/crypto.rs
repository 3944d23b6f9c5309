//! The `crypto` module: SHA-256, HMAC-SHA256, base64 / base64url / hex codecs, OS-backed
//! random bytes, random v4 UUIDs and constant-time string comparison.
//!
//! Every function takes Lua strings as raw bytes (never assumes UTF-8) and validates its
//! arguments, raising a Lua error such as `crypto.sha256: expected string, got table`.
//! Decoders report malformed input the Lua way, returning `nil, "error message"`.

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use mlua::{Lua, LuaString, MultiValue, Table, Value};
use rand::TryRngCore as _;
use sha2::{Digest, Sha256};

use super::json::lua_type_name;

/// Largest `n` accepted by `crypto.random_bytes(n)`.
pub const MAX_RANDOM_BYTES: usize = 65536;

/// Standard alphabet; encodes with padding, decodes with or without it.
const BASE64_STD: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// URL-safe alphabet; encodes without padding, decodes with or without it.
const BASE64_URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Builds the `crypto` module table.
pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 16)?;

    t.raw_set(
        "sha256",
        lua.create_function(|lua, args: MultiValue| {
            let data = bytes_arg(&args, 0, "crypto.sha256", "data")?;
            lua.create_string(hex::encode(sha256(&data)))
        })?,
    )?;
    t.raw_set(
        "sha256_raw",
        lua.create_function(|lua, args: MultiValue| {
            let data = bytes_arg(&args, 0, "crypto.sha256_raw", "data")?;
            lua.create_string(sha256(&data))
        })?,
    )?;
    t.raw_set(
        "hmac_sha256",
        lua.create_function(|lua, args: MultiValue| {
            let mac = hmac_args(&args, "crypto.hmac_sha256")?;
            lua.create_string(hex::encode(mac))
        })?,
    )?;
    t.raw_set(
        "hmac_sha256_raw",
        lua.create_function(|lua, args: MultiValue| {
            let mac = hmac_args(&args, "crypto.hmac_sha256_raw")?;
            lua.create_string(mac)
        })?,
    )?;
    t.raw_set(
        "base64_encode",
        lua.create_function(|lua, args: MultiValue| {
            let data = bytes_arg(&args, 0, "crypto.base64_encode", "data")?;
            lua.create_string(BASE64_STD.encode(&data))
        })?,
    )?;
    t.raw_set(
        "base64_decode",
        lua.create_function(|lua, args: MultiValue| {
            let text = bytes_arg(&args, 0, "crypto.base64_decode", "text")?;
            let decoded = BASE64_STD.decode(&text);
            decoded_or_error(lua, decoded.map_err(|e| format!("invalid base64: {e}")))
        })?,
    )?;
    t.raw_set(
        "base64url_encode",
        lua.create_function(|lua, args: MultiValue| {
            let data = bytes_arg(&args, 0, "crypto.base64url_encode", "data")?;
            lua.create_string(BASE64_URL.encode(&data))
        })?,
    )?;
    t.raw_set(
        "base64url_decode",
        lua.create_function(|lua, args: MultiValue| {
            let text = bytes_arg(&args, 0, "crypto.base64url_decode", "text")?;
            let decoded = BASE64_URL.decode(&text);
            decoded_or_error(lua, decoded.map_err(|e| format!("invalid base64url: {e}")))
        })?,
    )?;
    t.raw_set(
        "hex_encode",
        lua.create_function(|lua, args: MultiValue| {
            let data = bytes_arg(&args, 0, "crypto.hex_encode", "data")?;
            lua.create_string(hex::encode(&data))
        })?,
    )?;
    t.raw_set(
        "hex_decode",
        lua.create_function(|lua, args: MultiValue| {
            let text = bytes_arg(&args, 0, "crypto.hex_decode", "text")?;
            let decoded = hex::decode(&text);
            decoded_or_error(lua, decoded.map_err(|e| format!("invalid hex: {e}")))
        })?,
    )?;
    t.raw_set(
        "random_bytes",
        lua.create_function(|lua, args: MultiValue| {
            let n = count_arg(&args, 0, "crypto.random_bytes", MAX_RANDOM_BYTES)?;
            let mut buf = vec![0u8; n];
            fill_random(&mut buf, "crypto.random_bytes")?;
            lua.create_string(&buf)
        })?,
    )?;
    t.raw_set(
        "uuid",
        lua.create_function(|lua, ()| {
            let mut b = [0u8; 16];
            fill_random(&mut b, "crypto.uuid")?;
            lua.create_string(format_uuid_v4(b))
        })?,
    )?;
    t.raw_set(
        "equal",
        lua.create_function(|_, args: MultiValue| {
            let a = bytes_arg(&args, 0, "crypto.equal", "a")?;
            let b = bytes_arg(&args, 1, "crypto.equal", "b")?;
            Ok(constant_time_eq(&a, &b))
        })?,
    )?;
    Ok(t)
}

/// Argument `index` (0-based) as a Lua string, or a Lua error naming the function.
fn string_arg(
    args: &MultiValue,
    index: usize,
    function: &str,
    name: &str,
) -> mlua::Result<LuaString> {
    match args.get(index) {
        Some(Value::String(s)) => Ok(s.clone()),
        other => Err(mlua::Error::runtime(format!(
            "{function}: bad argument #{} ({name}): expected string, got {}",
            index + 1,
            lua_type_name(other.unwrap_or(&Value::Nil))
        ))),
    }
}

fn bytes_arg(
    args: &MultiValue,
    index: usize,
    function: &str,
    name: &str,
) -> mlua::Result<mlua::BorrowedBytes> {
    Ok(string_arg(args, index, function, name)?.as_bytes())
}

/// Argument `index` as a whole number in `0..=max`.
fn count_arg(args: &MultiValue, index: usize, function: &str, max: usize) -> mlua::Result<usize> {
    let n = match args.get(index) {
        Some(Value::Integer(i)) => *i as f64,
        Some(Value::Number(n)) => *n,
        other => {
            return Err(mlua::Error::runtime(format!(
                "{function}: bad argument #{}: expected number, got {}",
                index + 1,
                lua_type_name(other.unwrap_or(&Value::Nil))
            )));
        }
    };
    if !(n >= 0.0 && n <= max as f64 && n.fract() == 0.0) {
        return Err(mlua::Error::runtime(format!(
            "{function}: bad argument #{}: expected a whole number between 0 and {max}",
            index + 1
        )));
    }
    Ok(n as usize)
}

fn hmac_args(args: &MultiValue, function: &str) -> mlua::Result<[u8; 32]> {
    let key = bytes_arg(args, 0, function, "key")?;
    let data = bytes_arg(args, 1, function, "data")?;
    Ok(hmac_sha256(&key, &data))
}

/// HMAC-SHA256 of `data` under `key` (any key length).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length (long keys are hashed first), so `new_from_slice`
    // cannot fail; the fallback only exists to avoid an `unwrap`.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| <Hmac<Sha256> as KeyInit>::new(&Default::default()));
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// `s` on success, `nil, message` on failure.
fn decoded_or_error(lua: &Lua, decoded: Result<Vec<u8>, String>) -> mlua::Result<MultiValue> {
    match decoded {
        Ok(bytes) => Ok(MultiValue::from_iter([Value::String(
            lua.create_string(bytes)?,
        )])),
        Err(msg) => Ok(MultiValue::from_iter([
            Value::Nil,
            Value::String(lua.create_string(msg)?),
        ])),
    }
}

fn fill_random(buf: &mut [u8], function: &str) -> mlua::Result<()> {
    rand::rngs::OsRng.try_fill_bytes(buf).map_err(|e| {
        mlua::Error::runtime(format!(
            "{function}: OS random number generator failed: {e}"
        ))
    })
}

/// Formats 16 random bytes as a version 4, RFC 4122 variant UUID.
fn format_uuid_v4(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= std::hint::black_box(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandboxed() -> Lua {
        let lua = Lua::new();
        lua.globals().set("crypto", module(&lua).unwrap()).unwrap();
        lua.sandbox(true).unwrap();
        lua
    }

    fn eval<T: mlua::FromLuaMulti>(lua: &Lua, code: &str) -> T {
        lua.load(code)
            .eval()
            .unwrap_or_else(|e| panic!("{code}: {e}"))
    }

    fn eval_bytes(lua: &Lua, code: &str) -> Vec<u8> {
        eval::<LuaString>(lua, code).as_bytes().to_vec()
    }

    fn eval_err(lua: &Lua, code: &str) -> String {
        match lua.load(code).exec() {
            Ok(()) => panic!("expected an error from {code}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn sha256_known_vectors() {
        let lua = sandboxed();
        let s: String = eval(&lua, "return crypto.sha256('')");
        assert_eq!(
            s,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let s: String = eval(&lua, "return crypto.sha256('abc')");
        assert_eq!(
            s,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let raw = eval_bytes(&lua, "return crypto.sha256_raw('abc')");
        assert_eq!(hex::encode(raw), s);
        // Binary input is hashed as bytes.
        let s: String = eval(&lua, "return crypto.sha256('\\0\\255')");
        assert_eq!(s, hex::encode(Sha256::digest([0u8, 255])));
    }

    #[test]
    fn hmac_rfc4231_case_2() {
        let lua = sandboxed();
        let s: String = eval(
            &lua,
            "return crypto.hmac_sha256('Jefe', 'what do ya want for nothing?')",
        );
        assert_eq!(
            s,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let raw = eval_bytes(
            &lua,
            "return crypto.hmac_sha256_raw('Jefe', 'what do ya want for nothing?')",
        );
        assert_eq!(hex::encode(raw), s);
    }

    #[test]
    fn base64_codecs() {
        let lua = sandboxed();
        let s: String = eval(&lua, "return crypto.base64_encode('hello')");
        assert_eq!(s, "aGVsbG8=");
        let s: String = eval(&lua, "return crypto.base64_decode('aGVsbG8=')");
        assert_eq!(s, "hello");
        let s: String = eval(&lua, "return crypto.base64_decode('aGVsbG8')");
        assert_eq!(s, "hello");
        let s: String = eval(
            &lua,
            "return crypto.base64url_encode('\\251\\255\\191hello')",
        );
        assert_eq!(s, "-_-_aGVsbG8");
        let b = eval_bytes(&lua, "return crypto.base64url_decode('-_-_aGVsbG8')");
        assert_eq!(b, b"\xfb\xff\xbfhello");
        let (v, err): (Value, String) = eval(&lua, "return crypto.base64_decode('a$b=')");
        assert!(v.is_nil());
        assert!(err.starts_with("invalid base64"), "{err}");
        let (v, err): (Value, String) = eval(&lua, "return crypto.base64url_decode('a+b/')");
        assert!(v.is_nil());
        assert!(err.starts_with("invalid base64url"), "{err}");
        let ok: bool = eval(
            &lua,
            "local s = '' for i = 0, 255 do s = s .. string.char(i) end
             return crypto.base64_decode(crypto.base64_encode(s)) == s
                and crypto.base64url_decode(crypto.base64url_encode(s)) == s",
        );
        assert!(ok);
    }

    #[test]
    fn hex_codecs() {
        let lua = sandboxed();
        let s: String = eval(&lua, "return crypto.hex_encode('\\0\\1\\171\\255')");
        assert_eq!(s, "0001abff");
        let b = eval_bytes(&lua, "return crypto.hex_decode('0001ABff')");
        assert_eq!(b, [0, 1, 0xab, 0xff]);
        let (v, err): (Value, String) = eval(&lua, "return crypto.hex_decode('abc')");
        assert!(v.is_nil());
        assert!(err.starts_with("invalid hex"), "{err}");
        let (v, _): (Value, String) = eval(&lua, "return crypto.hex_decode('zz')");
        assert!(v.is_nil());
    }

    #[test]
    fn random_bytes_and_uuid() {
        let lua = sandboxed();
        let (a, b): (LuaString, LuaString) = eval(
            &lua,
            "return crypto.random_bytes(32), crypto.random_bytes(32)",
        );
        assert_eq!(a.as_bytes().len(), 32);
        assert_ne!(a.as_bytes().to_vec(), b.as_bytes().to_vec());
        let n: usize = eval(
            &lua,
            "return #crypto.random_bytes(0) + #crypto.random_bytes(65536)",
        );
        assert_eq!(n, 65536);
        for code in [
            "crypto.random_bytes(-1)",
            "crypto.random_bytes(65537)",
            "crypto.random_bytes(1.5)",
            "crypto.random_bytes(0/0)",
            "crypto.random_bytes('8')",
        ] {
            let e = eval_err(&lua, code);
            assert!(
                e.contains("crypto.random_bytes: bad argument #1"),
                "{code}: {e}"
            );
        }
        let (u1, u2): (String, String) = eval(&lua, "return crypto.uuid(), crypto.uuid()");
        assert_ne!(u1, u2);
        let parts: Vec<&str> = u1.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(
            u1.chars()
                .all(|c| c == '-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(&parts[2][..1], "4");
        assert!("89ab".contains(&parts[3][..1]));
    }

    #[test]
    fn equal_compares_bytes() {
        let lua = sandboxed();
        let r: (bool, bool, bool, bool) = eval(
            &lua,
            "return crypto.equal('abc', 'abc'), crypto.equal('abc', 'abd'),
                    crypto.equal('abc', 'abcd'), crypto.equal('', '')",
        );
        assert_eq!(r, (true, false, false, true));
        assert!(constant_time_eq(b"\xff\x00", b"\xff\x00"));
        assert!(!constant_time_eq(b"\xff\x00", b"\xff\x01"));
    }

    #[test]
    fn bad_arguments_raise_errors() {
        let lua = sandboxed();
        let cases = [
            (
                "crypto.sha256({})",
                "crypto.sha256: bad argument #1 (data): expected string, got table",
            ),
            ("crypto.sha256()", "expected string, got nil"),
            ("crypto.sha256(1)", "expected string, got number"),
            ("crypto.sha256_raw(true)", "expected string, got boolean"),
            (
                "crypto.hmac_sha256('k')",
                "crypto.hmac_sha256: bad argument #2 (data): expected string, got nil",
            ),
            ("crypto.hmac_sha256_raw(nil, 'x')", "bad argument #1 (key)"),
            (
                "crypto.base64_encode(print)",
                "expected string, got function",
            ),
            (
                "crypto.base64_decode({})",
                "crypto.base64_decode: bad argument #1",
            ),
            (
                "crypto.base64url_encode()",
                "crypto.base64url_encode: bad argument #1",
            ),
            (
                "crypto.base64url_decode(1)",
                "crypto.base64url_decode: bad argument #1",
            ),
            ("crypto.hex_encode()", "crypto.hex_encode: bad argument #1"),
            ("crypto.hex_decode()", "crypto.hex_decode: bad argument #1"),
            ("crypto.equal('a')", "crypto.equal: bad argument #2 (b)"),
            ("crypto.random_bytes()", "expected number, got nil"),
        ];
        for (code, want) in cases {
            let e = eval_err(&lua, code);
            assert!(e.contains(want), "{code}: {e} should contain {want}");
        }
    }
}
