//! The `log` module and `print`: lines go to the function's log (never to the client),
//! tagged with the level and the request id by the instance's log sink.
//!
//! Lua API: `log.debug(...)`, `log.info(...)`, `log.warn(...)`, `log.error(...)`; each
//! joins its arguments with spaces (`tostring` of each, as `print` does with tabs).

use std::rc::Rc;

use mlua::{Function, Lua, MultiValue, Table, Value};

use crate::instance::LogLevel;

/// Writes one line to the function log at a level (the instance tags it with the request id).
pub type EmitLog = Rc<dyn Fn(LogLevel, &str)>;

/// Renders arguments the way `print` does: `tostring` of each, joined by `separator`.
fn render(values: &MultiValue, separator: &str) -> mlua::Result<String> {
    let mut line = String::new();
    for (index, value) in values.iter().enumerate() {
        if index > 0 {
            line.push_str(separator);
        }
        match value {
            Value::String(s) => line.push_str(&s.to_string_lossy()),
            Value::Nil => line.push_str("nil"),
            Value::Boolean(b) => line.push_str(if *b { "true" } else { "false" }),
            Value::Integer(i) => line.push_str(&i.to_string()),
            Value::Number(n) => line.push_str(&format_number(*n)),
            other => line.push_str(&other.to_string()?),
        }
    }
    Ok(line)
}

/// Lua's `%.14g` number format: integral values print without a fraction.
fn format_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// The global `print`: tab-separated, level info.
pub fn print_function(lua: &Lua, emit: EmitLog) -> mlua::Result<Function> {
    lua.create_function(move |_, values: MultiValue| {
        emit(LogLevel::Info, &render(&values, "\t")?);
        Ok(())
    })
}

/// Builds the `log` module table.
pub fn module(lua: &Lua, emit: EmitLog) -> mlua::Result<Table> {
    let table = lua.create_table_with_capacity(0, 4)?;
    for (name, level) in [
        ("debug", LogLevel::Debug),
        ("info", LogLevel::Info),
        ("warn", LogLevel::Warn),
        ("error", LogLevel::Error),
    ] {
        let emit = emit.clone();
        table.raw_set(
            name,
            lua.create_function(move |_, values: MultiValue| {
                emit(level, &render(&values, " ")?);
                Ok(())
            })?,
        )?;
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn print_and_levels_render_like_lua() {
        let lua = Lua::new();
        let lines: Rc<RefCell<Vec<(LogLevel, String)>>> = Rc::default();
        let sink = lines.clone();
        let emit: EmitLog =
            Rc::new(move |level, line: &str| sink.borrow_mut().push((level, line.to_string())));
        lua.globals()
            .set("print", print_function(&lua, emit.clone()).unwrap())
            .unwrap();
        lua.globals()
            .set("log", module(&lua, emit).unwrap())
            .unwrap();
        lua.load(r#"print("a", 1, 2.5, nil, true) log.warn("x", 3) log.error()"#)
            .exec()
            .unwrap();
        assert_eq!(
            *lines.borrow(),
            vec![
                (LogLevel::Info, "a\t1\t2.5\tnil\ttrue".to_string()),
                (LogLevel::Warn, "x 3".to_string()),
                (LogLevel::Error, String::new()),
            ]
        );
    }
}
