//! The README is run, not trusted. Its first command serves the demo (its arguments, in a
//! directory laid out like a clone), and its five-minute tour then runs line by line in a
//! shell against that node, each line's output checked against the comment beside it.
//! Change the tour and this test tells you which line stopped being true.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::Node;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn readme() -> String {
    std::fs::read_to_string(repo_root().join("README.md")).expect("README.md")
}

/// The fenced ```sh blocks of the README section under `heading`.
fn sh_blocks(readme: &str, heading: &str) -> Vec<String> {
    let start = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README has no section {heading:?}"));
    let section = &readme[start + heading.len() + 2..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some(open) = rest.find("```sh\n") {
        let body = &rest[open + 6..];
        let close = body.find("```").expect("a closed code block");
        blocks.push(body[..close].to_string());
        rest = &body[close + 3..];
    }
    blocks
}

/// One command of a block: its text (continuation lines joined) and the comment after it.
#[derive(Debug)]
struct Line {
    command: String,
    comment: String,
}

fn lines(block: &str) -> Vec<Line> {
    let mut lines = Vec::new();
    let mut pending = String::new();
    for raw in block.lines() {
        let (text, comment) = match raw.find("  # ") {
            Some(at) => (&raw[..at], raw[at + 4..].trim()),
            None => (raw, ""),
        };
        let text = text.trim_end();
        if let Some(continued) = text.strip_suffix('\\') {
            pending.push_str(continued.trim());
            pending.push(' ');
            continue;
        }
        pending.push_str(text.trim());
        if !pending.is_empty() {
            lines.push(Line {
                command: std::mem::take(&mut pending),
                comment: comment.to_string(),
            });
        }
    }
    lines
}

/// What a tour line must do. `Prints` and `Fails` texts must also appear in the README's
/// comment on that line, so the comment and the check cannot drift apart.
enum Expect {
    /// Exit 0, and stdout contains the text.
    Prints(&'static str),
    /// Exit non-zero, and stderr contains the text.
    Fails(&'static str),
    /// Exit 0, and the check holds for stdout (a comment that describes, not quotes).
    Shows(fn(&str) -> Result<(), String>),
    /// Runs until stopped (`--follow`): stopped after a while, its output so far checked.
    Follows(fn(&str) -> Result<(), String>),
    /// Exit 0 (a setup line without a comment).
    Succeeds,
}

/// The tour, in README order: a command prefix and what that line must do.
fn tour() -> Vec<(&'static str, Expect)> {
    use Expect::*;
    vec![
        (
            "curl http://127.0.0.1:8080/fn/greeting",
            Prints("Hello, World!"),
        ),
        (
            "moontide invoke greeting",
            Prints(r#"{"statusCode":200,"body":"Hello, Ada!"}"#),
        ),
        (
            "curl -X POST http://127.0.0.1:8080/fn/orders",
            Prints(r#""total":39.98}"#),
        ),
        ("sed 's/Hello/Hi/' examples/greeting.lua", Succeeds),
        (
            "moontide deploy greeting /tmp/greeting.lua",
            Prints("deployed greeting version 2"),
        ),
        (
            "curl http://127.0.0.1:8080/fn/greeting",
            Prints("Hi, World!"),
        ),
        (
            "moontide versions greeting",
            Shows(|out| {
                let rows: Vec<&str> = out.lines().skip(1).collect();
                let active: Vec<&&str> = rows.iter().filter(|row| row.contains(" * ")).collect();
                if rows.len() == 2 && active.len() == 1 && active[0].trim_start().starts_with('2') {
                    Ok(())
                } else {
                    Err("expected two versions, version 2 marked active".into())
                }
            }),
        ),
        (
            "moontide rollback greeting",
            Prints("greeting now serves version 1 (was 2)"),
        ),
        ("echo 'return function(' > /tmp/broken.lua", Succeeds),
        (
            "moontide deploy greeting /tmp/broken.lua",
            Fails("/tmp/broken.lua:2: Expected identifier when parsing variable name, got <eof>"),
        ),
        (
            "curl http://127.0.0.1:8080/fn/greeting",
            Prints("Hello, World!"),
        ),
        ("moontide deploy slow examples/greeting.lua", Succeeds),
        (
            "moontide ls",
            Shows(|out| {
                let header = out.lines().next().unwrap_or("");
                let slow = out
                    .lines()
                    .find(|line| line.starts_with("slow "))
                    .unwrap_or("");
                // Aligned: every row's ROUTE column starts where the header's does.
                let column = header.find("ROUTE");
                let aligned = out.lines().skip(1).all(|row| {
                    column.is_some_and(|c| row.get(c..).is_some_and(|r| !r.starts_with(' ')))
                });
                if header.starts_with("NAME") && !slow.is_empty() && aligned {
                    Ok(())
                } else {
                    Err("expected an aligned table with a row for slow".into())
                }
            }),
        ),
        (
            "moontide info slow",
            Shows(|out| {
                if out.contains("\"API_KEY\"") && !out.contains("s3cr3t") {
                    Ok(())
                } else {
                    Err("expected the env key name and never its value".into())
                }
            }),
        ),
        (
            "moontide logs orders --follow",
            Follows(|out| {
                // `2026-12-05T00:33:57.123Z INFO  v1 <request id> priced 1 items: 39.98`
                let line = out
                    .lines()
                    .find(|line| line.contains("priced 1 items: 39.98"))
                    .ok_or("expected the orders call's print() line")?;
                let time = line.split(' ').next().unwrap_or("");
                let rfc3339 = time.len() == 24 && time.ends_with('Z') && &time[10..11] == "T";
                let request_id = line.split_whitespace().nth(3).unwrap_or("-");
                if rfc3339 && request_id != "-" {
                    Ok(())
                } else {
                    Err("expected an RFC 3339 time and a request id".into())
                }
            }),
        ),
        (
            "curl -s -H \"Authorization: Bearer $(cat moontide-data/admin.token)\" http://127.0.0.1:9080/metrics",
            Shows(|out| {
                if out.contains("moontide_requests_total{function=\"greeting\"") {
                    Ok(())
                } else {
                    Err("expected greeting's request counter".into())
                }
            }),
        ),
    ]
}

fn run_in(dir: &Path, script: &str, path: &str) -> Output {
    Command::new("bash")
        .args(["-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("MOONTIDE_TOKEN")
        .env_remove("MOONTIDE_DATA_DIR")
        .env("NO_COLOR", "1")
        .output()
        .expect("bash")
}

#[tokio::test]
async fn the_readme_serves_the_demo_and_its_tour_is_true() {
    let readme = readme();

    // The first command, as the README gives it: `cargo run --release -- ARGS`. That cargo
    // picks the `moontide` binary is checked by `scripts/test.sh` (`cargo run --locked -q --
    // --help`, once the tests are done: building a second copy of the binary here would
    // replace the one the other tests are running). Here the ARGS serve the demo, in a
    // directory of their own with the examples beside them, as in a clone, so the node's
    // `./moontide-data` is this test's; only the ports are changed, to free ones.
    let serve_blocks = sh_blocks(&readme, "## The two commands");
    let serve = lines(&serve_blocks[0]).remove(0).command;
    let (cargo, app) = serve
        .split_once(" -- ")
        .unwrap_or_else(|| panic!("the serve command is not `cargo run ... -- ...`: {serve}"));
    assert_eq!(cargo, "cargo run --release", "{serve}");
    let test_script =
        std::fs::read_to_string(repo_root().join("scripts/test.sh")).expect("scripts/test.sh");
    assert!(
        test_script.contains("\ncargo run --locked -q -- --help"),
        "scripts/test.sh checks that `cargo run` picks the moontide binary"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(repo_root().join("examples"), dir.path().join("examples"))
        .expect("examples link");
    let mut command = Command::new(common::BIN);
    command
        .args(app.split_whitespace())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--workers",
            "2",
        ])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .env_remove("MOONTIDE_DATA_DIR");
    let node = Node::start_command(command, dir.path().join("moontide-data"));
    // `--examples` deploys through the admin API once it listens, so just after the
    // addresses are printed: wait for greeting to serve (bounded).
    let mut greeting = String::new();
    for _ in 0..300 {
        greeting = node.get("/fn/greeting").await.text().await.unwrap();
        if greeting == "Hello, World!" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(greeting, "Hello, World!");

    // The tour: `moontide` is the binary under test, the README's ports are the node's,
    // and `/tmp/` is a directory of this test's own.
    let bin_dir = Path::new(common::BIN).parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let scratch = tempfile::tempdir().expect("scratch dir");
    let scratch_prefix = format!("{}/", scratch.path().display());
    let data = node.data.trim_start_matches("http://");
    let admin = node.admin.trim_start_matches("http://");
    let substitute = |text: &str| {
        text.replace("127.0.0.1:8080", data)
            .replace("127.0.0.1:9080", admin)
            .replace("/tmp/", &scratch_prefix)
    };
    let tour_lines: Vec<Line> = sh_blocks(&readme, "## A five-minute tour")
        .first()
        .map(|block| lines(block))
        .expect("the tour's code block");
    let mut tour_lines = tour_lines.into_iter();
    let alias = tour_lines.next().expect("the alias line");
    assert_eq!(alias.command, "alias moontide=target/release/moontide");
    let tour_lines: Vec<Line> = tour_lines.collect();
    let expected = tour();
    assert_eq!(
        tour_lines.len(),
        expected.len(),
        "the README's tour has {} commands, this test knows {}: {:#?}",
        tour_lines.len(),
        expected.len(),
        tour_lines
    );
    let env_prefix = format!("export MOONTIDE_ADMIN={};", node.admin);
    let mut failures = Vec::new();
    for (line, (prefix, expect)) in tour_lines.iter().zip(&expected) {
        assert!(
            line.command.starts_with(prefix),
            "README tour line {:?} is not the expected {prefix:?}",
            line.command
        );
        if let Expect::Prints(text) | Expect::Fails(text) = expect {
            assert!(
                line.comment.contains(text),
                "the README's comment on {:?} should say {text:?}",
                line.command
            );
        }
        let command = substitute(&line.command);
        let script = match expect {
            Expect::Follows(_) => format!("{env_prefix} timeout 3 {command}"),
            _ => format!("{env_prefix} {command}"),
        };
        let output = run_in(dir.path(), &script, &path);
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        let outcome = match expect {
            Expect::Prints(text) if output.status.success() => stdout
                .contains(&substitute(text))
                .then_some(())
                .ok_or(format!("expected {text:?}")),
            Expect::Fails(text) if !output.status.success() => stderr
                .contains(&substitute(text))
                .then_some(())
                .ok_or(format!("expected {text:?} on stderr")),
            Expect::Fails(_) => Err("expected a failure exit".into()),
            Expect::Shows(check) if output.status.success() => check(&stdout),
            Expect::Follows(check) if output.status.code() == Some(124) => check(&stdout),
            Expect::Follows(_) => Err("expected to run until stopped".into()),
            Expect::Succeeds if output.status.success() => Ok(()),
            _ => Err(format!("exit {:?}", output.status.code())),
        };
        if let Err(why) = outcome {
            failures.push(format!(
                "{}\n  {why}\n  stdout: {stdout}\n  stderr: {stderr}",
                line.command
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "README tour lines that are not true:\n{}",
        failures.join("\n")
    );
}
