//! Compile once per version: a deployed bundle becomes Luau bytecode, validated before the
//! deploy is accepted.
//!
//! A function is a bundle of `.lua` files with `main.lua` as its entry point; a single-file
//! deploy is a bundle of one `main.lua`. Every file is compiled here, so a syntax error in
//! any module is reported at deploy time with its file and line, and instances never parse
//! source: they load the bytecode held (shared, immutable) in [`CompiledFunction`].

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::Arc;

use mlua::chunk::Compiler;

/// The entry point of every bundle.
pub const MAIN_FILE: &str = "main.lua";
/// Largest bundle accepted, all files together.
pub const MAX_BUNDLE_BYTES: usize = 8 << 20;
/// Most files in one bundle.
pub const MAX_BUNDLE_FILES: usize = 1000;

/// The source of one function version: file path (relative, `/`-separated) → content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FunctionSource {
    pub files: BTreeMap<String, String>,
}

impl FunctionSource {
    /// A single-file function.
    pub fn single(source: impl Into<String>) -> FunctionSource {
        let mut files = BTreeMap::new();
        files.insert(MAIN_FILE.to_string(), source.into());
        FunctionSource { files }
    }

    /// Reads a zip archive holding `main.lua` and its modules. Directories and non-`.lua`
    /// entries are skipped.
    pub fn from_zip(bytes: &[u8]) -> Result<FunctionSource, CompileError> {
        let bad = |message: String| CompileError::bundle("", message);
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
            .map_err(|e| bad(format!("not a readable zip archive: {e}")))?;
        let mut files = BTreeMap::new();
        let mut total = 0usize;
        for index in 0..archive.len() {
            let mut entry = archive
                .by_index(index)
                .map_err(|e| bad(format!("zip entry {index}: {e}")))?;
            if entry.is_dir() || !entry.name().ends_with(".lua") {
                continue;
            }
            let name = entry.name().trim_start_matches("./").to_string();
            let mut content = String::new();
            // Read at most the remaining budget plus one byte, so a zip bomb stops early.
            let budget = (MAX_BUNDLE_BYTES - total) as u64 + 1;
            (&mut entry)
                .take(budget)
                .read_to_string(&mut content)
                .map_err(|e| CompileError::bundle(&name, format!("not UTF-8 text: {e}")))?;
            total += content.len();
            if total > MAX_BUNDLE_BYTES {
                return Err(bad(format!(
                    "bundle is larger than {MAX_BUNDLE_BYTES} bytes"
                )));
            }
            files.insert(name, content);
        }
        Ok(FunctionSource { files })
    }

    pub fn total_bytes(&self) -> usize {
        self.files.values().map(String::len).sum()
    }
}

/// Why a bundle was refused: the file, the line if the error has one, and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct CompileError {
    pub file: String,
    pub line: Option<u32>,
    pub message: String,
}

impl CompileError {
    fn bundle(file: &str, message: String) -> CompileError {
        CompileError {
            file: file.to_string(),
            line: None,
            message,
        }
    }

    fn render(&self) -> String {
        match (self.file.is_empty(), self.line) {
            (true, _) => self.message.clone(),
            (false, Some(line)) => format!("{}:{}: {}", self.file, line, self.message),
            (false, None) => format!("{}: {}", self.file, self.message),
        }
    }
}

/// One compiled module of a bundle.
#[derive(Debug)]
pub struct CompiledModule {
    /// The file it came from (its chunk name, shown in errors and tracebacks).
    pub file: String,
    pub bytecode: Vec<u8>,
}

/// A validated, compiled function version: immutable, shared by all its instances.
#[derive(Debug)]
pub struct CompiledFunction {
    pub main: CompiledModule,
    /// `require` name (`"lib.util"`) → module, for every other file of the bundle.
    pub modules: HashMap<String, Arc<CompiledModule>>,
    /// Source bytes in the bundle (for `info` and accounting).
    pub source_bytes: usize,
}

/// Validates and compiles every file of a bundle. Reports every error found, not only the
/// first.
pub fn compile(source: &FunctionSource) -> Result<CompiledFunction, Vec<CompileError>> {
    let mut errors = Vec::new();
    if source.files.len() > MAX_BUNDLE_FILES {
        errors.push(CompileError::bundle(
            "",
            format!("a bundle holds at most {MAX_BUNDLE_FILES} files"),
        ));
    }
    if source.total_bytes() > MAX_BUNDLE_BYTES {
        errors.push(CompileError::bundle(
            "",
            format!("a bundle is at most {MAX_BUNDLE_BYTES} bytes"),
        ));
    }
    if !source.files.contains_key(MAIN_FILE) {
        errors.push(CompileError::bundle(
            MAIN_FILE,
            "the bundle has no main.lua (its entry point)".to_string(),
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let compiler = compiler();
    let mut main = None;
    let mut modules = HashMap::new();
    for (path, text) in &source.files {
        let module_name = match module_name(path) {
            Ok(name) => name,
            Err(message) => {
                errors.push(CompileError::bundle(path, message));
                continue;
            }
        };
        match compile_file(&compiler, path, text) {
            Ok(bytecode) => {
                let compiled = CompiledModule {
                    file: path.clone(),
                    bytecode,
                };
                if path == MAIN_FILE {
                    main = Some(compiled);
                } else {
                    modules.insert(module_name, Arc::new(compiled));
                }
            }
            Err(error) => errors.push(error),
        }
    }
    match main {
        Some(main) if errors.is_empty() => Ok(CompiledFunction {
            main,
            modules,
            source_bytes: source.total_bytes(),
        }),
        _ => Err(errors),
    }
}

fn compiler() -> Compiler {
    Compiler::new()
        .set_optimization_level(2)
        .set_debug_level(1)
        .set_coverage_level(0)
}

/// Compiles one source text to bytecode, mapping Luau's message to file and line.
fn compile_file(compiler: &Compiler, path: &str, text: &str) -> Result<Vec<u8>, CompileError> {
    compiler.compile(text).map_err(|error| {
        let raw = match &error {
            mlua::Error::SyntaxError { message, .. } => message.clone(),
            other => other.to_string(),
        };
        let (line, message) = split_line(&raw);
        CompileError {
            file: path.to_string(),
            line,
            message: message.to_string(),
        }
    })
}

/// Luau reports `"12: Expected ..."` (mlua may prefix a chunk name: `"[string]:12: ..."`);
/// split off the line.
fn split_line(raw: &str) -> (Option<u32>, &str) {
    let raw = raw.trim();
    let mut rest = raw;
    loop {
        let Some(colon) = rest.find(':') else {
            return (None, raw);
        };
        if let Ok(line) = rest[..colon].trim().parse::<u32>() {
            return (Some(line), rest[colon + 1..].trim());
        }
        rest = &rest[colon + 1..];
    }
}

/// `lib/util.lua` → `lib.util`; `lib/init.lua` → `lib`. Rejects paths that are not plain
/// relative `.lua` paths.
fn module_name(path: &str) -> Result<String, String> {
    let stem = path
        .strip_suffix(".lua")
        .ok_or_else(|| "only .lua files may be in a bundle".to_string())?;
    let valid_segment = |segment: &str| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if path.starts_with('/') || path.contains('\\') || !stem.split('/').all(valid_segment) {
        return Err(
            "file paths must be relative, '/'-separated, of letters, digits, '_' and '-'"
                .to_string(),
        );
    }
    let name = stem.strip_suffix("/init").unwrap_or(stem);
    Ok(name.replace('/', "."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_single_file() {
        let compiled = compile(&FunctionSource::single("return function() return 1 end"))
            .expect("valid source compiles");
        assert!(!compiled.main.bytecode.is_empty());
        assert!(compiled.modules.is_empty());
    }

    #[test]
    fn syntax_error_has_file_and_line() {
        let errors = compile(&FunctionSource::single("local x = 1\nlocal y = = 2\n"))
            .expect_err("syntax error must fail");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].file, "main.lua");
        assert_eq!(errors[0].line, Some(2));
        assert!(
            errors[0].to_string().starts_with("main.lua:2: "),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn reports_every_bad_file() {
        let mut source = FunctionSource::single("return function() end");
        source.files.insert("a.lua".into(), "local = 1".into());
        source.files.insert("b/c.lua".into(), "\n\nif then".into());
        let errors = compile(&source).expect_err("two bad modules");
        let mut seen: Vec<_> = errors.iter().map(|e| (e.file.as_str(), e.line)).collect();
        seen.sort();
        assert_eq!(seen, vec![("a.lua", Some(1)), ("b/c.lua", Some(3))]);
    }

    #[test]
    fn line_numbers_are_split_from_luau_messages() {
        assert_eq!(split_line("3: Expected x"), (Some(3), "Expected x"));
        assert_eq!(split_line("[string \"main\"]:12: bad"), (Some(12), "bad"));
        assert_eq!(split_line("no line here"), (None, "no line here"));
    }

    #[test]
    fn module_names() {
        assert_eq!(module_name("util.lua").unwrap(), "util");
        assert_eq!(module_name("lib/util.lua").unwrap(), "lib.util");
        assert_eq!(module_name("lib/init.lua").unwrap(), "lib");
        assert!(module_name("../x.lua").is_err());
        assert!(module_name("/abs.lua").is_err());
        assert!(module_name("notes.txt").is_err());
        assert!(module_name("a//b.lua").is_err());
    }

    #[test]
    fn missing_main_is_refused() {
        let mut source = FunctionSource::default();
        source.files.insert("util.lua".into(), "return {}".into());
        let errors = compile(&source).expect_err("no main.lua");
        assert!(errors[0].message.contains("main.lua"));
    }

    #[test]
    fn bundle_modules_are_indexed_by_require_name() {
        let mut source = FunctionSource::single("return function() end");
        source
            .files
            .insert("lib/init.lua".into(), "return {}".into());
        source
            .files
            .insert("lib/strings.lua".into(), "return {}".into());
        let compiled = compile(&source).unwrap();
        let mut names: Vec<_> = compiled.modules.keys().cloned().collect();
        names.sort();
        assert_eq!(names, vec!["lib", "lib.strings"]);
    }

    #[test]
    fn zip_bundle_reads_lua_files_only() {
        use std::io::Write;
        let mut buffer = std::io::Cursor::new(Vec::new());
        {
            let mut writer = zip::ZipWriter::new(&mut buffer);
            let options = zip::write::SimpleFileOptions::default();
            writer.start_file("main.lua", options).unwrap();
            writer.write_all(b"return function() end").unwrap();
            writer.start_file("README.md", options).unwrap();
            writer.write_all(b"# hi").unwrap();
            writer.start_file("lib/x.lua", options).unwrap();
            writer.write_all(b"return 1").unwrap();
            writer.finish().unwrap();
        }
        let source = FunctionSource::from_zip(buffer.get_ref()).unwrap();
        assert_eq!(
            source.files.keys().cloned().collect::<Vec<_>>(),
            vec!["lib/x.lua", "main.lua"]
        );
    }
}
