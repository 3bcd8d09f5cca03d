//! The layer rules of ARCHITECTURE.md, checked on the source: which module may use
//! which, and no cycle between modules. Reads every `src/**/*.rs` (without its
//! `#[cfg(test)]` module and comments) and collects the `crate::` and `super::`
//! paths it names; a module's use of its own parent or children does not count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`raid1::array`) → its source without tests and comments.
fn modules() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(&root).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|l| l == "mod") {
                parts.pop();
            }
            let name = parts.join("::");
            // A unit-test module kept in a file of its own (`tests.rs`) is no layer's code.
            if name == "lib" || name == "main" || parts.last().is_some_and(|l| l == "tests") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let code: String = text
                .lines()
                .take_while(|l| l.trim() != "#[cfg(test)]")
                .filter(|l| !l.trim_start().starts_with("//"))
                .map(|l| format!("{l}\n"))
                .collect();
            out.insert(name, code);
        }
    }
    out
}

fn ident_end(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_') {
        i += 1;
    }
    i
}

/// The paths (as segment lists, from the crate root) that `code` of module `me` names.
fn paths(me: &str, code: &str) -> Vec<Vec<String>> {
    let s = code.as_bytes();
    let mut out = Vec::new();
    for kw in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(k) = code[from..].find(kw) {
            let at = from + k;
            from = at + kw.len();
            if at > 0
                && (s[at - 1].is_ascii_alphanumeric() || s[at - 1] == b'_' || s[at - 1] == b':')
            {
                continue;
            }
            let mut base: Vec<String> = if kw == "crate::" {
                Vec::new()
            } else {
                let mut m: Vec<String> = me.split("::").map(str::to_string).collect();
                m.pop();
                m
            };
            let mut i = from;
            // `super::super::`
            while code[i..].starts_with("super::") {
                base.pop();
                i += "super::".len();
            }
            let mut segs = base;
            loop {
                if i < s.len() && s[i] == b'{' {
                    // A group: each entry's leading segments.
                    let close = code[i..].find('}').map_or(s.len(), |c| i + c);
                    for entry in code[i + 1..close].split(',') {
                        let mut p = segs.clone();
                        p.extend(
                            entry
                                .trim()
                                .split("::")
                                .take_while(|x| !x.is_empty() && !x.contains(' '))
                                .map(str::to_string),
                        );
                        out.push(p);
                    }
                    break;
                }
                let e = ident_end(s, i);
                if e == i {
                    out.push(segs);
                    break;
                }
                segs.push(code[i..e].to_string());
                if code[e..].starts_with("::") {
                    i = e + 2;
                } else {
                    out.push(segs);
                    break;
                }
            }
        }
    }
    out
}

/// Module → the other modules it uses (longest module prefix of each path).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules();
    let names: BTreeSet<&str> = mods.keys().map(String::as_str).collect();
    let mut g = BTreeMap::new();
    for (me, code) in &mods {
        let mut uses = BTreeSet::new();
        for p in paths(me, code) {
            let target = (1..=p.len())
                .rev()
                .map(|k| p[..k].join("::"))
                .find(|t| names.contains(t.as_str()));
            let Some(t) = target else { continue };
            let related =
                t == *me || me.starts_with(&format!("{t}::")) || t.starts_with(&format!("{me}::"));
            if !related {
                uses.insert(t);
            }
        }
        g.insert(me.clone(), uses);
    }
    g
}

fn top(m: &str) -> &str {
    m.split("::").next().unwrap_or(m)
}

/// What each layer may not use (top-level modules), as ARCHITECTURE.md says.
const FORBIDDEN: &[(&str, &[&str])] = &[
    (
        "md",
        &[
            "storage", "dlm", "bitmap", "raid1", "cluster", "vhost", "serve", "cli", "unixsock",
        ],
    ),
    (
        "storage",
        &["bitmap", "raid1", "cluster", "dlm", "vhost", "serve", "cli"],
    ),
    (
        "dlm",
        &[
            "md", "storage", "bitmap", "raid1", "cluster", "vhost", "serve", "cli",
        ],
    ),
    (
        "bitmap",
        &["dlm", "raid1", "cluster", "vhost", "serve", "cli"],
    ),
    ("raid1", &["dlm", "cluster", "vhost", "serve", "cli"]),
    ("cluster", &["vhost", "serve", "cli"]),
    ("vhost", &["cluster", "dlm", "serve", "cli"]),
    ("serve", &["cli"]),
    (
        "unixsock",
        &[
            "md", "storage", "dlm", "bitmap", "raid1", "cluster", "vhost", "serve", "cli",
        ],
    ),
];

/// Uses of `raid1` the cluster layer may make: its port (the types the mirror
/// and the cluster exchange). Anything else of `raid1` is the mirror's inside.
const CLUSTER_MAY_USE_OF_RAID1: &[&str] = &["raid1::port"];

/// Uses that break the rules above and are still in the code, each with why. The
/// list only shrinks: a new use fails the test, and so does an entry no longer used.
const NOT_YET: &[(&str, &str, &str)] = &[];

#[test]
fn no_layer_uses_what_it_may_not() {
    let g = graph();
    assert!(
        g.contains_key("raid1::array") && g.contains_key("md::superblock"),
        "{g:?}"
    );
    let mut wrong = Vec::new();
    let mut excused = BTreeSet::new();
    for (m, uses) in &g {
        for u in uses {
            let banned = FORBIDDEN
                .iter()
                .any(|(layer, not)| top(m) == *layer && not.contains(&top(u)))
                || (top(m) == "cluster"
                    && top(u) == "raid1"
                    && !CLUSTER_MAY_USE_OF_RAID1
                        .iter()
                        .any(|ok| u == ok || u.starts_with(&format!("{ok}::"))));
            if !banned {
                continue;
            }
            if NOT_YET.iter().any(|(a, b, _)| a == m && b == u) {
                excused.insert((m.clone(), u.clone()));
            } else {
                wrong.push(format!("{m} uses {u}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "layer rules broken:\n{}",
        wrong.join("\n")
    );
    let stale: Vec<_> = NOT_YET
        .iter()
        .filter(|(a, b, _)| !excused.contains(&(a.to_string(), b.to_string())))
        .collect();
    assert!(
        stale.is_empty(),
        "no longer used, remove from NOT_YET: {stale:?}"
    );
}

#[test]
fn md_code_does_no_io() {
    for (m, code) in modules().iter().filter(|(m, _)| top(m) == "md") {
        for io in [
            "std::fs",
            "std::os",
            "libc::",
            "std::net",
            "std::thread",
            "File::",
        ] {
            assert!(!code.contains(io), "{m} uses {io}: md is pure format code");
        }
    }
}

#[test]
fn no_module_cycle() {
    let g = graph();
    // Depth-first search for a back edge; reports one cycle.
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(m) {
            Some(1) => {
                let from = path.iter().position(|p| p == m).unwrap_or(0);
                let mut c = path[from..].to_vec();
                c.push(m.to_string());
                return Some(c);
            }
            Some(_) => return None,
            None => {}
        }
        state.insert(m.to_string(), 1);
        path.push(m.to_string());
        for u in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(u, g, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(m.to_string(), 2);
        None
    }
    // Between top-level layers, and between the modules of one layer.
    let mut tops: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, uses) in &g {
        let e = tops.entry(top(m).to_string()).or_default();
        e.extend(
            uses.iter()
                .map(|u| top(u).to_string())
                .filter(|u| u != top(m)),
        );
    }
    for graph in [&tops, &g] {
        let mut state = BTreeMap::new();
        for m in graph.keys() {
            let cycle = visit(m, graph, &mut state, &mut Vec::new());
            assert!(
                cycle.is_none(),
                "module cycle: {}",
                cycle.unwrap().join(" -> ")
            );
        }
    }
}

#[test]
fn the_checker_sees_uses_and_cycles() {
    // The scanner itself: a check that cannot fail checks nothing.
    let p = paths(
        "raid1::aio",
        "use crate::storage::uring::Ring;\nuse super::{array::Array, offload};\nlet x = crate::md::Uuid::nil();\n",
    );
    let flat: Vec<String> = p.iter().map(|v| v.join("::")).collect();
    assert!(
        flat.contains(&"storage::uring::Ring".to_string()),
        "{flat:?}"
    );
    assert!(
        flat.contains(&"raid1::array::Array".to_string()),
        "{flat:?}"
    );
    assert!(flat.contains(&"raid1::offload".to_string()), "{flat:?}");
    assert!(flat.contains(&"md::Uuid::nil".to_string()), "{flat:?}");
}

/// Longest a source file may be without saying why at its top.
const LONG_FILE: usize = 650;

/// Every `.rs` file under `dir` (recursively).
fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "target") {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Whether a file of `text` is short, or says at its top why it is long.
fn length_explained(text: &str) -> bool {
    text.lines().count() <= LONG_FILE
        || text
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .any(|l| l.contains("Long file:"))
}

#[test]
fn no_long_file_without_a_reason_at_its_top() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for d in ["src", "tests", "benches", "fuzz/fuzz_targets"] {
        rust_files(&root.join(d), &mut files);
    }
    assert!(files.len() > 20, "found only {} files", files.len());
    let long: Vec<String> = files
        .iter()
        .filter(|p| !length_explained(&std::fs::read_to_string(p).unwrap()))
        .map(|p| p.strip_prefix(root).unwrap().display().to_string())
        .collect();
    assert!(
        long.is_empty(),
        "over {LONG_FILE} lines with no `//! Long file: <why>` at the top (split it by concern): {long:?}"
    );
}

#[test]
fn the_length_check_sees_a_long_file() {
    let long = "fn f() {}\n".repeat(LONG_FILE + 1);
    assert!(!length_explained(&long));
    assert!(length_explained(&format!(
        "//! A module.\n//! Long file: one state machine.\n{long}"
    )));
    assert!(length_explained("fn f() {}\n"));
}

/// Public items of a layer's source that are `unsafe` to use.
fn public_unsafe(code: &str) -> Vec<String> {
    code.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("pub unsafe ") || l.starts_with("pub unsafe("))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_mirror_has_no_unsafe_public_api() {
    let found: Vec<String> = modules()
        .iter()
        .filter(|(m, _)| top(m) == "raid1")
        .flat_map(|(m, code)| {
            public_unsafe(code)
                .into_iter()
                .map(move |l| format!("{m}: {l}"))
        })
        .collect();
    assert!(
        found.is_empty(),
        "raid1 takes guest memory as `Buffers`, not raw pointers its callers vouch for: {found:?}"
    );
    assert_eq!(
        public_unsafe("pub unsafe fn f() {}\npub(crate) unsafe fn g() {}\n").len(),
        1
    );
}
