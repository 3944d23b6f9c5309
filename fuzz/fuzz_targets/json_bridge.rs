//! The Lua↔JSON bridge (`json.decode`, `json.encode`, and the host's conversions of
//! `serde_json` values) on arbitrary input.
//!
//! Properties, for any bytes:
//! - decoding never panics; it returns a Lua value or an error;
//! - what decodes re-encodes to valid JSON, and encoding is a fixed point after one round
//!   trip: `encode(decode(encode(v))) == encode(v)`;
//! - a `serde_json` value taken into Lua and back (`json_to_lua` → `lua_to_json`) encodes
//!   to the same text as the direct encoding of the Lua value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moontide_runtime::modules::json::{decode_to_lua, encode_value, json_to_lua, lua_to_json};

thread_local! {
    static LUA: mlua::Lua = mlua::Lua::new();
}

fuzz_target!(|data: &[u8]| {
    LUA.with(|lua| {
        let Ok(value) = decode_to_lua(lua, data) else {
            return;
        };
        let mut first = Vec::new();
        if encode_value(&value, &mut first).is_err() {
            // Only values JSON cannot hold fail to encode (e.g. NaN is not decodable, so
            // this would be a bug), and the output limit.
            assert!(first.len() > 1 << 20, "decoded value does not encode");
            return;
        }
        let reparsed: serde_json::Value =
            serde_json::from_slice(&first).expect("the encoder writes valid JSON");
        let again = decode_to_lua(lua, &first).expect("the encoder's output decodes");
        let mut second = Vec::new();
        encode_value(&again, &mut second).expect("re-encodes");
        assert_eq!(
            first, second,
            "encoding is a fixed point after one round trip"
        );

        let through_host = json_to_lua(lua, &reparsed).expect("host conversion into Lua");
        let back = lua_to_json(&through_host).expect("host conversion out of Lua");
        let mut third = Vec::new();
        encode_value(&through_host, &mut third).expect("encodes");
        assert_eq!(first, third, "host conversion agrees with json.decode");
        let text = serde_json::to_vec(&back).expect("lua_to_json gives serializable JSON");
        assert!(!text.is_empty());
    });
    // Keep the state small across iterations.
    LUA.with(|lua| lua.gc_collect().ok());
});
