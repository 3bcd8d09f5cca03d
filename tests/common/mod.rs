//! Helpers shared by the integration tests: reading mdadm's output, loop devices.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `Key : Value` lines of an `mdadm -E` / `-X` text, in order, with values
/// right-trimmed. Lines that are not of that form are dropped.
pub fn key_values(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(" : ")?;
            Some((k.trim().to_string(), v.trim_end().to_string()))
        })
        .collect()
}

/// The first value of `key`.
pub fn value<'a>(kv: &'a [(String, String)], key: &str) -> Option<&'a str> {
    kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Every value of `key`, in order.
pub fn values<'a>(kv: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    kv.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Keys mdadm prints that depend on the device mdadm looked at rather than on the
/// metadata (the fixtures are 1 MiB cuts of 64 MiB legs).
const DEVICE_DEPENDENT: &[&str] = &["Unused Space"];

/// Asserts that `ours` shows every `Key : Value` line of `mdadm`, in the same order.
pub fn assert_same_lines(mdadm: &str, ours: &str, what: &str) {
    let theirs: Vec<_> = key_values(mdadm)
        .into_iter()
        .filter(|(k, _)| !DEVICE_DEPENDENT.contains(&k.as_str()))
        .collect();
    let mine = key_values(ours);
    let mut at = 0;
    for (k, v) in &theirs {
        match mine[at..].iter().position(|(mk, mv)| mk == k && mv == v) {
            Some(p) => at += p + 1,
            None => panic!(
                "{what}: mdadm shows `{k} : {v}` but ours (from line {at}) does not:\n--- mdadm\n{mdadm}\n--- ours\n{ours}"
            ),
        }
    }
}

/// A read-only loop device over an image file, detached on drop.
pub struct Loop {
    pub dev: PathBuf,
}

impl Loop {
    pub fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-r", "-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup (util-linux) must be installed");
        assert!(
            out.status.success(),
            "losetup -r -f --show {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Runs mdadm with `args`; panics with a clear message when mdadm is missing.
pub fn mdadm(args: &[&str], dev: &Path) -> String {
    let out = Command::new("mdadm")
        .args(args)
        .arg(dev)
        .output()
        .expect("mdadm must be installed (apt-get install mdadm); .ci/run installs it");
    assert!(
        out.status.success(),
        "mdadm {args:?} {} failed: {}{}",
        dev.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The project's binary.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhost-user-md"))
}
