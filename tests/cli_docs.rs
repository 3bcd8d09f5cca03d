//! The manual pages and completion scripts that `generate-docs` writes (what the
//! package installs) cover every command and its flags, and leave hidden ones out.

use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhost-user-md"))
}

/// The commands that `--help` lists, but `help`.
fn listed_commands() -> Vec<String> {
    let out = bin().arg("--help").output().expect("run --help");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8 help");
    text.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

/// A roff page as text: hyphens and font changes unescaped.
fn read_page(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .replace(r"\-", "-")
        .replace(r"\fB", "")
        .replace(r"\fI", "")
        .replace(r"\fR", "")
}

#[test]
fn generate_docs_writes_a_page_per_command_and_completions() {
    let commands = listed_commands();
    for c in [
        "create",
        "serve",
        "status",
        "manage",
        "lockd",
        "lock",
        "examine",
        "completions",
    ] {
        assert!(commands.iter().any(|l| l == c), "{c} not in {commands:?}");
    }
    assert!(!commands.iter().any(|c| c == "generate-docs"));

    let dir = tempfile::tempdir().expect("tempdir");
    let out = bin()
        .args(["generate-docs", "--date", "2025-01-31", "--out"])
        .arg(dir.path())
        .output()
        .expect("run generate-docs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let man = dir.path().join("man");

    let main = read_page(&man.join("vhost-user-md.1"));
    assert!(main.contains(".TH vhost-user-md 1 2025-01-31"), "{main}");
    for c in &commands {
        let name = format!("vhost-user-md-{c}");
        let page = read_page(&man.join(format!("{name}.1")));
        assert!(
            page.contains(&format!(".SH NAME\n{name} - ")),
            "{name}: {page}"
        );
        assert!(
            page.contains(&format!(".SH SYNOPSIS\nvhost-user-md {c} ")),
            "{name}: {page}"
        );
        assert!(
            main.contains(&format!("{name}(1)")),
            "{name} not in the main page"
        );
    }
    // Nothing else: no page for hidden commands or for `help`.
    let mut files: Vec<String> = std::fs::read_dir(&man)
        .expect("man dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files.len(), commands.len() + 1, "{files:?}");

    let serve = read_page(&man.join("vhost-user-md-serve.1"));
    for flag in [
        "--socket <PATH>",
        "--queues <N>",
        "--lock-manager <KIND>",
        "--read-only",
        "SIGTERM",
        "SIGHUP",
    ] {
        assert!(serve.contains(flag), "serve page lacks {flag}");
    }
    assert!(!serve.contains("--inject-fault"), "hidden flag on the page");

    let completions = dir.path().join("completions");
    let bash = std::fs::read_to_string(completions.join("vhost-user-md.bash")).expect("bash");
    for c in &commands {
        assert!(
            bash.contains(&format!("vhost__user__md,{c})")),
            "bash completion lacks {c}"
        );
    }
    assert!(bash.contains("--lock-manager"));
    assert!(!bash.contains("generate-docs") && !bash.contains("inject-fault"));
    let zsh = std::fs::read_to_string(completions.join("_vhost-user-md")).expect("zsh");
    assert!(zsh.starts_with("#compdef vhost-user-md"), "{zsh}");
    assert!(
        zsh.contains("'--queues=[") && zsh.contains("'serve:"),
        "{zsh}"
    );
    let fish = std::fs::read_to_string(completions.join("vhost-user-md.fish")).expect("fish");
    assert!(fish.contains("-a \"serve\""), "{fish}");

    // `completions bash` prints the same script.
    let out = bin().args(["completions", "bash"]).output().expect("run");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), bash);
}

#[test]
fn generate_docs_into_an_unwritable_place_is_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    std::fs::write(&file, b"").expect("write");
    let out = bin()
        .args(["generate-docs", "--out"])
        .arg(file.join("docs"))
        .output()
        .expect("run generate-docs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("vhost-user-md: cannot create directory ") && err.lines().count() == 1,
        "{err}"
    );
}
