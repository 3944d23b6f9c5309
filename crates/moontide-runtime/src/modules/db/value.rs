//! Values between Lua and SQLite: bound parameters in, rows out.
//!
//! In: `nil` and `db.null` → NULL; booleans → 0/1; numbers → INTEGER when whole (and
//! within ±2^53, where a Luau number is exact), else REAL; strings → TEXT, or BLOB when
//! they are not UTF-8. Anything else is refused. Out: INTEGER → number, REAL → number,
//! TEXT and BLOB → string, NULL → `db.null` (so a row keeps its column and `json.encode`
//! writes `null`).
//!
//! Rows are read on the blocking thread against a byte budget (the instance's free
//! memory when the statement started): each value is charged [`VALUE_COST`] plus its
//! bytes, each row [`ROW_COST`], before it is kept; past the budget reading stops and the
//! call gets a memory error, whatever the table's size.

use mlua::{Lua, Table, Value};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ToSql};

use super::pool::DbError;
use crate::sandbox;

/// What one value costs in a Lua table (its slot, a string header), charged to the budget.
pub const VALUE_COST: usize = 48;
/// What one row table costs beyond its values.
pub const ROW_COST: usize = 64;

/// One bound parameter or result value.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl ToSql for SqlValue {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            SqlValue::Null => ValueRef::Null,
            SqlValue::Integer(i) => ValueRef::Integer(*i),
            SqlValue::Real(r) => ValueRef::Real(*r),
            SqlValue::Text(s) => ValueRef::Text(s.as_bytes()),
            SqlValue::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

const EXACT: f64 = 9.007_199_254_740_992e15;

/// Parameter `index` (1-based, as the caller counts after the SQL text) of `function`.
pub fn param(function: &str, index: usize, value: &Value) -> mlua::Result<SqlValue> {
    Ok(match value {
        Value::Nil => SqlValue::Null,
        Value::LightUserData(ud) if ud.0.is_null() => SqlValue::Null,
        Value::Boolean(b) => SqlValue::Integer(i64::from(*b)),
        Value::Integer(i) => SqlValue::Integer(*i),
        Value::Number(n) if n.fract() == 0.0 && n.abs() <= EXACT => SqlValue::Integer(*n as i64),
        Value::Number(n) => SqlValue::Real(*n),
        Value::String(s) => {
            let bytes = s.as_bytes();
            match std::str::from_utf8(&bytes) {
                Ok(text) => SqlValue::Text(text.to_string()),
                Err(_) => SqlValue::Blob(bytes.to_vec()),
            }
        }
        other => {
            return Err(mlua::Error::runtime(format!(
                "db.{function}: bad argument #{index}: expected nil, boolean, number, string \
                 or db.null, got {}",
                other.type_name()
            )));
        }
    })
}

/// The rows of a query: column names, then values row by row.
#[derive(Debug, Default)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<SqlValue>>,
}

fn sqlite(error: rusqlite::Error) -> DbError {
    DbError::Sqlite(match error {
        rusqlite::Error::SqliteFailure(_, Some(message)) => message,
        rusqlite::Error::MultipleStatement => "one statement per call".into(),
        rusqlite::Error::ExecuteReturnedResults => {
            "the statement returns rows: use db.query".into()
        }
        other => other.to_string(),
    })
}

/// Runs a statement and reads its rows within `budget` bytes (blocking).
pub fn query(
    connection: &Connection,
    sql: &str,
    params: &[SqlValue],
    budget: usize,
) -> Result<Rows, DbError> {
    let mut statement = connection.prepare(sql).map_err(sqlite)?;
    let columns: Vec<String> = statement.column_names().map(str::to_string).collect();
    let mut used = columns.iter().map(|c| c.len() + VALUE_COST).sum::<usize>();
    let mut rows = statement
        .query(rusqlite::params_from_iter(params))
        .map_err(sqlite)?;
    let mut out = Rows {
        columns,
        rows: Vec::new(),
    };
    while let Some(row) = rows.next().map_err(sqlite)? {
        used += ROW_COST;
        let mut values = Vec::with_capacity(out.columns.len());
        for index in 0..out.columns.len() {
            let value = row.get_ref(index).map_err(sqlite)?;
            let size = match value {
                ValueRef::Text(bytes) | ValueRef::Blob(bytes) => bytes.len(),
                _ => 0,
            };
            used = used.saturating_add(VALUE_COST + size);
            if used > budget {
                return Err(DbError::TooLarge(budget));
            }
            values.push(match value {
                ValueRef::Null => SqlValue::Null,
                ValueRef::Integer(i) => SqlValue::Integer(i),
                ValueRef::Real(r) => SqlValue::Real(r),
                ValueRef::Text(t) => match std::str::from_utf8(t) {
                    Ok(text) => SqlValue::Text(text.to_string()),
                    Err(_) => SqlValue::Blob(t.to_vec()),
                },
                ValueRef::Blob(b) => SqlValue::Blob(b.to_vec()),
            });
        }
        out.rows.push(values);
    }
    Ok(out)
}

/// Runs a statement that returns no rows: (rows changed, last inserted rowid).
pub fn execute(
    connection: &Connection,
    sql: &str,
    params: &[SqlValue],
) -> Result<(u64, i64), DbError> {
    let mut statement = connection.prepare(sql).map_err(sqlite)?;
    let changes = statement
        .execute(rusqlite::params_from_iter(params))
        .map_err(sqlite)?;
    Ok((changes as u64, connection.last_insert_rowid()))
}

/// Runs a statement of the module itself (`BEGIN`, `COMMIT`, `ROLLBACK`).
pub fn batch(connection: &Connection, sql: &str) -> Result<(), DbError> {
    connection.execute_batch(sql).map_err(sqlite)
}

fn value_to_lua(lua: &Lua, value: SqlValue) -> mlua::Result<Value> {
    Ok(match value {
        SqlValue::Null => Value::NULL,
        SqlValue::Integer(i) => Value::Number(i as f64),
        SqlValue::Real(r) => Value::Number(r),
        SqlValue::Text(t) => Value::String(lua.create_string(&t)?),
        SqlValue::Blob(b) => Value::String(lua.create_string(&b)?),
    })
}

/// The rows as an array of tables keyed by column name (the last of equal names wins),
/// checking the call's limits every 4096 values.
pub fn to_lua(lua: &Lua, rows: Rows) -> mlua::Result<Table> {
    let names = rows
        .columns
        .iter()
        .map(|name| lua.create_string(name))
        .collect::<mlua::Result<Vec<_>>>()?;
    let out = lua.create_table_with_capacity(rows.rows.len(), 0)?;
    let mut count = 0usize;
    for (index, values) in rows.rows.into_iter().enumerate() {
        let row = lua.create_table_with_capacity(0, names.len())?;
        for (name, value) in names.iter().zip(values) {
            count += 1;
            if count.is_multiple_of(4096) {
                sandbox::check_host_limits(lua)?;
            }
            row.raw_set(name, value_to_lua(lua, value)?)?;
        }
        out.raw_set(index + 1, row)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> Connection {
        Connection::open_in_memory().unwrap()
    }

    #[test]
    fn lua_values_bind_as_documented() {
        let lua = Lua::new();
        let cases = [
            (Value::Nil, SqlValue::Null),
            (Value::NULL, SqlValue::Null),
            (Value::Boolean(true), SqlValue::Integer(1)),
            (Value::Number(3.0), SqlValue::Integer(3)),
            (Value::Number(0.5), SqlValue::Real(0.5)),
            (Value::Number(1e300), SqlValue::Real(1e300)),
            (
                Value::String(lua.create_string("hé").unwrap()),
                SqlValue::Text("hé".into()),
            ),
            (
                Value::String(lua.create_string([0xff, 0]).unwrap()),
                SqlValue::Blob(vec![0xff, 0]),
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(param("query", 1, &value).unwrap(), expected);
        }
        let table = Value::Table(lua.create_table().unwrap());
        let error = param("query", 2, &table).unwrap_err().to_string();
        assert!(error.contains("db.query: bad argument #2"), "{error}");
    }

    #[test]
    fn rows_come_back_with_their_types_and_stop_at_the_budget() {
        let connection = memory();
        batch(
            &connection,
            "CREATE TABLE t (i INTEGER, r REAL, s TEXT, b BLOB, n)",
        )
        .unwrap();
        let params = [
            SqlValue::Integer(7),
            SqlValue::Real(1.5),
            SqlValue::Text("x".into()),
            SqlValue::Blob(vec![1, 2]),
            SqlValue::Null,
        ];
        let (changes, id) =
            execute(&connection, "INSERT INTO t VALUES (?, ?, ?, ?, ?)", &params).unwrap();
        assert_eq!((changes, id), (1, 1));
        let rows = query(&connection, "SELECT * FROM t", &[], 1 << 20).unwrap();
        assert_eq!(rows.columns, ["i", "r", "s", "b", "n"]);
        assert_eq!(rows.rows, [params.to_vec()]);
        let error = query(
            &connection,
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
             SELECT x, 'some text' FROM c",
            &[],
            10_000,
        )
        .unwrap_err();
        assert!(matches!(error, DbError::TooLarge(10_000)), "{error:?}");
    }

    #[test]
    fn sqlite_messages_are_kept() {
        let connection = memory();
        let error = query(&connection, "SELECT * FROM users", &[], 1 << 20).unwrap_err();
        assert_eq!(error.to_string(), "no such table: users");
        let error = query(&connection, "SELECT 1; SELECT 2", &[], 1 << 20).unwrap_err();
        assert_eq!(error.to_string(), "one statement per call");
        let error = execute(&connection, "SELECT 1", &[]).unwrap_err();
        assert!(error.to_string().contains("db.query"), "{error}");
    }
}
