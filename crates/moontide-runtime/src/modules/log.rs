//! The `log` module and `print`: lines go to the function's log (never to the client),
//! tagged with the level and the request id by the instance's log sink.
//!
//! Lua API: `log.debug(...)`, `log.info(...)`, `log.warn(...)`, `log.error(...)`; each
//! joins its arguments with spaces (`tostring` of each, as `print` does with tabs).
//!
//! A line is cut at the function's line cap (`Limits::log_line_bytes`) and marked with the
//! number of bytes cut; it is *built* within the cap, so the host never holds more than the
//! cap per line, however many (or however large) the arguments.

use std::rc::Rc;

use mlua::{Function, Lua, MultiValue, Table, Value};

use crate::instance::LogLevel;

/// Writes one line to the function log at a level (the instance tags it with the request id).
pub type EmitLog = Rc<LogEmitter>;

/// Where a state's log lines go: every line is cut at the line cap and marked with how many
/// bytes were cut, in one place. Lines are built within the cap ([`LogEmitter::render`]), so
/// `print(s, s, s, ...)` with thousands of references to one large string costs the host
/// `cap` bytes, not their sum.
pub struct LogEmitter {
    cap: usize,
    write: LineWriter,
}

/// Where cut lines go.
type LineWriter = Box<dyn Fn(LogLevel, &str)>;

impl LogEmitter {
    /// `write` gets each line, already cut to `cap` bytes (plus the mark).
    pub fn new(cap: usize, write: impl Fn(LogLevel, &str) + 'static) -> LogEmitter {
        LogEmitter {
            cap,
            write: Box::new(write),
        }
    }

    /// Writes `message`, cut to the cap if longer.
    pub fn emit(&self, level: LogLevel, message: &str) {
        self.emit_cut(level, message, 0);
    }

    /// Writes `text`, of which `already_cut` more bytes were left out before it was made.
    fn emit_cut(&self, level: LogLevel, text: &str, already_cut: usize) {
        if text.len() <= self.cap && already_cut == 0 {
            (self.write)(level, text);
            return;
        }
        let mut keep = text.len().min(self.cap);
        while !text.is_char_boundary(keep) {
            keep -= 1;
        }
        let cut = text.len() - keep + already_cut;
        (self.write)(level, &format!("{}… [{cut} bytes cut]", &text[..keep]));
    }

    /// Renders arguments the way `print` does — `tostring` of each, joined by `separator` —
    /// keeping at most the cap's bytes: what does not fit is counted, not copied (strings
    /// and numbers by their length; other values past the cap are not converted at all).
    fn render(&self, values: &MultiValue, separator: &str) -> mlua::Result<(String, usize)> {
        let mut line = Capped {
            text: String::new(),
            cap: self.cap,
            cut: 0,
        };
        for (index, value) in values.iter().enumerate() {
            if index > 0 {
                line.push(separator);
            }
            match value {
                Value::String(s) => {
                    let bytes = s.as_bytes();
                    // Only what can fit is decoded (a character cut in two is replaced).
                    let shown = bytes.len().min(line.room());
                    line.cut += bytes.len() - shown;
                    line.push(&String::from_utf8_lossy(&bytes[..shown]));
                }
                Value::Nil => line.push("nil"),
                Value::Boolean(b) => line.push(if *b { "true" } else { "false" }),
                Value::Integer(i) => line.push(&i.to_string()),
                Value::Number(n) => line.push(&format_number(*n)),
                _ if line.room() == 0 => {}
                other => line.push(&other.to_string()?),
            }
        }
        Ok((line.text, line.cut))
    }

    fn emit_values(
        &self,
        level: LogLevel,
        values: &MultiValue,
        separator: &str,
    ) -> mlua::Result<()> {
        let (line, cut) = self.render(values, separator)?;
        self.emit_cut(level, &line, cut);
        Ok(())
    }
}

/// A line kept within `cap` bytes; `cut` counts the bytes left out.
struct Capped {
    text: String,
    cap: usize,
    cut: usize,
}

impl Capped {
    fn room(&self) -> usize {
        self.cap.saturating_sub(self.text.len())
    }

    fn push(&mut self, text: &str) {
        let mut keep = text.len().min(self.room());
        while !text.is_char_boundary(keep) {
            keep -= 1;
        }
        self.text.push_str(&text[..keep]);
        self.cut += text.len() - keep;
    }
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
        emit.emit_values(LogLevel::Info, &values, "\t")
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
                emit.emit_values(level, &values, " ")
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
        let emit: EmitLog = Rc::new(LogEmitter::new(16 << 10, move |level, line: &str| {
            sink.borrow_mut().push((level, line.to_string()))
        }));
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

    fn capped(cap: usize) -> (Lua, Rc<RefCell<Vec<String>>>) {
        let lua = Lua::new();
        let lines: Rc<RefCell<Vec<String>>> = Rc::default();
        let sink = lines.clone();
        let emit: EmitLog = Rc::new(LogEmitter::new(cap, move |_, line: &str| {
            sink.borrow_mut().push(line.to_string())
        }));
        lua.globals()
            .set("print", print_function(&lua, emit.clone()).unwrap())
            .unwrap();
        lua.globals()
            .set("log", module(&lua, emit).unwrap())
            .unwrap();
        (lua, lines)
    }

    /// `print(s, s, ...)` with thousands of references to one 4 MiB string used to be
    /// joined whole (28 GB) before the line was cut: the node aborted. Now the line is
    /// built within the cap and the rest only counted.
    #[test]
    fn a_line_of_many_references_costs_the_cap() {
        let (lua, lines) = capped(16 << 10);
        lua.load(
            "local s = string.rep('x', 4 * 1024 * 1024)
             local t = {} for i = 1, 7000 do t[i] = s end
             print(table.unpack(t))
             log.warn(s, {}, s)",
        )
        .exec()
        .unwrap();
        let lines = lines.borrow();
        let total: usize = 7000 * (4 << 20) + 6999;
        assert_eq!(
            lines[0],
            format!(
                "{}… [{} bytes cut]",
                "x".repeat(16 << 10),
                total - (16 << 10)
            )
        );
        assert!(
            lines[1].starts_with(&"x".repeat(16 << 10)),
            "{}",
            &lines[1][..40]
        );
        assert!(lines[1].ends_with(" bytes cut]"));
    }

    #[test]
    fn cuts_keep_whole_characters() {
        let (lua, lines) = capped(5);
        lua.load("print('ab', 'é€x') print('abcde') print('abcdef') print(1, 2, 3)")
            .exec()
            .unwrap();
        assert_eq!(
            *lines.borrow(),
            [
                "ab\té… [4 bytes cut]",
                "abcde",
                "abcde… [1 bytes cut]",
                "1\t2\t3",
            ]
        );
    }
}
