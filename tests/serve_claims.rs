//! One owner per leg on a host: a second `serve`, a `create` or a `manage add` of a
//! leg that a running `serve` holds is refused with a line naming the leg and the
//! process that holds it; nodes of one clustered array share their legs, and a
//! node alone (`--lock-manager local`) and cluster nodes exclude each other.

mod common;

use common::{bin, Client, Lockd, Loop, Serve};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Makes an array on two new 64 MiB image files.
fn array(dir: &Path, clustered: bool) -> Vec<PathBuf> {
    common::create_array(
        dir,
        &["a.img", "b.img"],
        "64M",
        clustered.then_some("claims"),
    )
}

fn strs(p: &[PathBuf]) -> Vec<&str> {
    p.iter().map(|p| p.to_str().unwrap()).collect()
}

fn refused(cmd: Command, what: &str) -> String {
    common::refused(cmd, Duration::from_secs(20), what)
}

fn serve_cmd(socket: &Path, args: &[&str]) -> Command {
    let mut c = bin();
    c.arg("serve").arg("--socket").arg(socket).args(args);
    c
}

fn pid(s: &Serve) -> u32 {
    s.child.as_ref().unwrap().id()
}

/// Asserts a refusal names `leg` and the holder's pid and socket.
fn names_holder(err: &str, leg: &Path, holder: &Serve) {
    assert!(err.contains(leg.to_str().unwrap()), "leg not named: {err}");
    assert!(
        err.contains(&format!("in use by pid {}", pid(holder))),
        "holder's pid not named: {err}"
    );
    assert!(
        err.contains(holder.socket.to_str().unwrap()),
        "holder's socket not named: {err}"
    );
    common::one_error_line(err);
}

#[test]
fn a_second_serve_of_the_same_legs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let legs = array(dir.path(), false);
    let first = Serve::start(&dir.path().join("s1.sock"), &strs(&legs));
    let err = refused(
        serve_cmd(&dir.path().join("s2.sock"), &strs(&legs)),
        "a second serve of the same legs",
    );
    names_holder(&err, &legs[0], &first);
    // The same leg reached through another path (a symlink) is the same file.
    let link = dir.path().join("b-link.img");
    std::os::unix::fs::symlink(&legs[1], &link).unwrap();
    let other = dir.path().join("c.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let err = refused(
        serve_cmd(
            &dir.path().join("s3.sock"),
            &[link.to_str().unwrap(), other.to_str().unwrap()],
        ),
        "a serve of a leg through a symlink",
    );
    assert!(
        err.contains(&format!("in use by pid {}", pid(&first))),
        "{err}"
    );
    // `create` over a served leg is refused too, even with --force.
    let mut c = bin();
    c.args(["create", "--force", "--assume-clean"]).args(&legs);
    let err = refused(c, "create over served legs");
    names_holder(&err, &legs[0], &first);
    // The first serve still works and the refused ones wrote nothing.
    let mut client = Client::connect(&first.socket, 1, 4096);
    client.buf().fill(0x5a);
    assert_eq!(client.write(0, 0, 0, 4096), 0);
    assert_eq!(first.status()["legs"].as_array().unwrap().len(), 2);
}

#[test]
fn a_leg_served_by_another_array_cannot_be_added() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir_all(&two).unwrap();
    let legs1 = array(&one, false);
    let legs2 = array(&two, false);
    let s1 = Serve::start(&dir.path().join("s1.sock"), &strs(&legs1));
    let s2 = Serve::start(&dir.path().join("s2.sock"), &strs(&legs2));
    for op in ["fail", "remove"] {
        let (ok, out) = s2.manage(op, &legs2[1]);
        assert!(ok, "{op}: {out}");
    }
    let (ok, out) = s2.manage("add", &legs1[1]);
    assert!(!ok, "a leg array one serves was added to array two: {out}");
    assert!(
        out.contains(&format!("in use by pid {}", pid(&s1))),
        "{out}"
    );
    // Array one's leg is untouched: still in sync there, its superblock its own.
    let st = s1.status();
    assert_eq!(common::leg_state(&st, &legs1[1]), "in-sync");
    assert_eq!(st["degraded"], false);
}

#[test]
fn cluster_nodes_share_legs_and_exclude_a_node_alone() {
    let dir = tempfile::tempdir().unwrap();
    let legs = array(dir.path(), true);
    let lockd = Lockd::start();
    let lm = format!("lockd:{}", lockd.socket.display());
    let mut args = vec!["--lock-manager", lm.as_str()];
    args.extend(strs(&legs));
    let n1 = Serve::start(&dir.path().join("n1.sock"), &args);
    let mut n2 = Serve::start(&dir.path().join("n2.sock"), &args);
    // A node alone on the same legs is refused while cluster nodes hold them.
    let err = refused(
        serve_cmd(&dir.path().join("alone.sock"), &strs(&legs)),
        "a local serve of legs cluster nodes hold",
    );
    assert!(err.contains(legs[0].to_str().unwrap()), "{err}");
    assert!(
        err.contains(&format!("pid {}", pid(&n1))) || err.contains(&format!("pid {}", pid(&n2))),
        "{err}"
    );
    drop(n1);
    n2.stop();
    // A node alone on the legs of a non-clustered array keeps cluster nodes out.
    let dir2 = tempfile::tempdir().unwrap();
    let legs2 = array(dir2.path(), false);
    let alone = Serve::start(&dir2.path().join("alone.sock"), &strs(&legs2));
    let mut args = vec!["--lock-manager", lm.as_str()];
    args.extend(strs(&legs2));
    let err = refused(
        serve_cmd(&dir2.path().join("n1.sock"), &args),
        "a cluster node on legs a node alone holds",
    );
    names_holder(&err, &legs2[0], &alone);
}

/// Loop devices (block devices): the second owner is refused through the exclusive
/// open as well as the lock; any other exclusive opener of the device is refused
/// by the kernel (`EBUSY`), as for a member of a kernel md array.
#[test]
fn a_block_device_leg_has_one_owner() {
    let dir = tempfile::tempdir().unwrap();
    let legs = array(dir.path(), false);
    let loops: Vec<Loop> = legs.iter().map(|p| Loop::attach_rw(p)).collect();
    let devs: Vec<PathBuf> = loops.iter().map(|l| l.dev.clone()).collect();
    let first = Serve::start(&dir.path().join("s1.sock"), &strs(&devs));
    let err = refused(
        serve_cmd(&dir.path().join("s2.sock"), &strs(&devs)),
        "a second serve of the same loop devices",
    );
    assert!(err.contains(devs[0].to_str().unwrap()), "{err}");
    assert!(
        err.contains(&format!("in use by pid {}", pid(&first))),
        "{err}"
    );
    let mut c = bin();
    c.args(["create", "--force", "--assume-clean"]).args(&devs);
    let err = refused(c, "create over served loop devices");
    assert!(
        err.contains(&format!("in use by pid {}", pid(&first))),
        "{err}"
    );
    // The kernel itself refuses another exclusive opener (mdadm, the kernel's md,
    // mkfs, mount), which knows nothing of the flock.
    for dev in &devs {
        let e = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(dev)
            .err();
        assert_eq!(
            e.as_ref().and_then(|e| e.raw_os_error()),
            Some(libc::EBUSY),
            "{} opened O_EXCL while serve holds it: {e:?}",
            dev.display()
        );
    }
}
