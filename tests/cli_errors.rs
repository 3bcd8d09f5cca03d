//! Bad legs and CLI mistakes give one line naming the leg and the field, and
//! nothing is written.

mod common;

use common::bin;
use std::path::{Path, PathBuf};
use vhost_user_md::md::Superblock;

fn make_array(dir: &Path, clustered: bool) -> Vec<PathBuf> {
    let legs = vec![dir.join("a.img"), dir.join("b.img")];
    let mut cmd = bin();
    cmd.args(["create", "--size", "64M", "--bitmap-chunk", "1M"]);
    if clustered {
        cmd.args(["--cluster-name", "prod"]);
    }
    let out = cmd.args(&legs).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    legs
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// Rewrites the superblock of `path` after `change`, with a valid checksum.
fn edit_superblock(path: &Path, change: impl FnOnce(&mut Superblock)) {
    let bytes = std::fs::read(path).unwrap();
    let mut sb = Superblock::decode(&bytes[4096..8192]).unwrap();
    change(&mut sb);
    patch(path, 4096, &sb.encode());
}

/// Runs examine on `legs`; returns (success, the lines about `leg`).
fn examine_lines(legs: &[PathBuf], leg: &Path) -> (bool, Vec<String>) {
    let out = bin().arg("examine").args(legs).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines = text
        .lines()
        .filter(|l| l.starts_with(&format!("{}:", leg.display())))
        .map(str::to_string)
        .collect();
    (out.status.success(), lines)
}

fn assert_refused(legs: &[PathBuf], leg: &Path, needles: &[&str]) {
    let before: Vec<Vec<u8>> = legs.iter().map(|l| std::fs::read(l).unwrap()).collect();
    let (ok, lines) = examine_lines(legs, leg);
    assert!(!ok, "examine must fail");
    let line = lines
        .iter()
        .find(|l| l.len() > leg.display().to_string().len() + 2)
        .unwrap_or_else(|| panic!("no error line for {}: {lines:?}", leg.display()));
    for n in needles {
        assert!(line.contains(n), "{line:?} should mention {n:?}");
    }
    let after: Vec<Vec<u8>> = legs.iter().map(|l| std::fs::read(l).unwrap()).collect();
    assert!(before == after, "examine must not write");
}

#[test]
fn bad_magic_is_named() {
    let d = tempfile::tempdir().unwrap();
    let legs = make_array(d.path(), true);
    patch(&legs[1], 4096, &[0, 0, 0, 0]);
    assert_refused(&legs, &legs[1], &["magic", "0x00000000"]);
}

#[test]
fn bad_checksum_is_named() {
    let d = tempfile::tempdir().unwrap();
    let legs = make_array(d.path(), true);
    patch(&legs[0], 4096 + 80, &[0x55]); // inside `size`
    assert_refused(&legs, &legs[0], &["sb_csum"]);
}

#[test]
fn impossible_data_offset_is_named() {
    let d = tempfile::tempdir().unwrap();
    let legs = make_array(d.path(), true);
    edit_superblock(&legs[0], |sb| sb.data_offset = 4);
    assert_refused(&legs, &legs[0], &["data_offset", "4"]);
}

#[test]
fn impossible_bitmap_offset_is_named() {
    let d = tempfile::tempdir().unwrap();
    let legs = make_array(d.path(), true);
    edit_superblock(&legs[0], |sb| sb.bitmap_offset = 0);
    assert_refused(&legs, &legs[0], &["bitmap_offset"]);
}

#[test]
fn truncated_leg_is_named() {
    let d = tempfile::tempdir().unwrap();
    let legs = make_array(d.path(), false);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&legs[1])
        .unwrap();
    f.set_len(32 << 20).unwrap();
    assert_refused(&legs, &legs[1], &["data_size", "beyond the end"]);
    f.set_len(6000).unwrap();
    assert_refused(&legs, &legs[1], &["truncated"]);
}

#[test]
fn corrupt_node_bitmap_is_named() {
    let d = tempfile::tempdir().unwrap();
    let legs = make_array(d.path(), true);
    patch(&legs[0], 8192 + 2 * 4096, b"XXXX");
    assert_refused(&legs, &legs[0], &["node slot 2", "magic"]);
    patch(&legs[0], 8192 + 2 * 4096, b"bitm");
    patch(&legs[0], 8192 + 2 * 4096 + 52, &3000u32.to_le_bytes());
    assert_refused(&legs, &legs[0], &["node slot 2", "chunksize", "3000"]);
}

#[test]
fn legs_of_different_arrays_are_not_one_array() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let a = make_array(d1.path(), true);
    let b = make_array(d2.path(), true);
    let out = bin().arg("examine").arg(&a[0]).arg(&b[1]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("do NOT form one consistent array"), "{text}");
    assert!(text.contains("array uuid"), "{text}");
    // The same leg twice is caught too.
    let out = bin().arg("examine").arg(&a[0]).arg(&a[0]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("dev_number 0 is also used"));
}

#[test]
fn stale_leg_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let legs = make_array(d.path(), true);
    edit_superblock(&legs[0], |sb| sb.events = 7);
    let out = bin().arg("examine").args(&legs).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "{}: events 0 is behind 7 (stale leg)",
            legs[1].display()
        )),
        "{text}"
    );
}

fn create_err(args: &[&str]) -> (String, bool) {
    let out = bin().arg("create").args(args).output().unwrap();
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

#[test]
fn create_refuses_to_overwrite_an_array_without_force() {
    let d = tempfile::tempdir().unwrap();
    let legs = make_array(d.path(), true);
    let fresh = d.path().join("c.img");
    let before = std::fs::read(&legs[0]).unwrap();
    let (err, ok) = create_err(&[
        "--size",
        "64M",
        fresh.to_str().unwrap(),
        legs[0].to_str().unwrap(),
    ]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("already carries an md superblock") && err.contains("--force"),
        "{err}"
    );
    assert!(err.contains(&legs[0].display().to_string()), "{err}");
    assert_eq!(std::fs::read(&legs[0]).unwrap(), before, "nothing written");
    assert!(!fresh.exists(), "no image file created when refusing");
    let (err, ok) = create_err(&[
        "--force",
        "--size",
        "64M",
        fresh.to_str().unwrap(),
        legs[0].to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_ne!(std::fs::read(&legs[0]).unwrap(), before);
}

#[test]
fn create_mistakes_get_one_line() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.img");
    let b = d.path().join("b.img");
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    for (args, needle) in [
        (vec![a, b], "give --size"),
        (vec!["--size", "64M", a, a], "same leg"),
        (
            vec!["--size", "64M", "--cluster-name", "x", "--nodes", "1", a, b],
            "--nodes must be at least 2",
        ),
        (
            vec!["--size", "64M", "--bitmap-chunk", "3000", a, b],
            "power of two",
        ),
        (vec!["--size", "1M", a, b], "too small"),
        (
            vec!["--size", "64M", "--cluster-name", &"n".repeat(64), a, b],
            "1 to 63 bytes",
        ),
    ] {
        let (err, ok) = create_err(&args);
        assert!(!ok, "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(
            !Path::new(a).exists(),
            "{args:?}: refused, yet an image was created"
        );
    }
}

#[test]
fn usage_mistakes_get_one_line_and_exit_2() {
    for args in [
        vec!["examine"],
        vec!["create", "only-one-leg"],
        vec!["create", "--nodes", "3", "a", "b"],
        vec!["create", "--size", "x", "a", "b"],
        vec!["frobnicate"],
    ] {
        let out = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("--help"), "{args:?}: {err}");
    }
    let out = bin()
        .args(["create", "--nodes", "3", "a", "b"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cluster-name"));
}

#[test]
fn a_closed_output_pipe_is_not_a_crash() {
    use std::io::Read;
    let d = tempfile::tempdir().unwrap();
    let legs = make_array(d.path(), true);
    // Far more output than a pipe buffer holds.
    let many: Vec<&PathBuf> = legs.iter().cycle().take(80).collect();
    let mut child = bin()
        .args(["examine", "--json"])
        .args(&many)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 8];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // The reader is gone (like `| head -c 8`).
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        out.status.success() || out.status.code() == Some(1),
        "{err}"
    );
}
