//! One owner, never two: `serve` and `lockd` never replace anything but a stale
//! socket, refuse a socket another process listens on, create their sockets with
//! the asked-for owner and mode whatever the umask, remove at exit only the socket
//! they bound, survive SIGHUP and SIGUSR1, and a start that fails leaves the legs
//! clean and no file behind.

mod common;

use common::{bin, Serve};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Two 16 MiB legs made with `create --assume-clean`.
fn make_array(dir: &Path, a: &str, b: &str) -> (PathBuf, PathBuf) {
    let legs = common::create_array(dir, &[a, b], "16M", None);
    (legs[0].clone(), legs[1].clone())
}

/// The superblock state ("clean" or "active") of every leg.
fn leg_states(legs: &[&Path]) -> Vec<String> {
    let out = bin()
        .args(["examine", "--json"])
        .args(legs)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["legs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["superblock"]["state"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// `vhost-user-md ARGS` with no log output and the umask of the child set to `umask`.
fn command(args: &[&str], umask: u32) -> Command {
    let mut c = bin();
    c.args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: umask(2) is async-signal-safe and touches nothing but the child's mask.
    unsafe {
        c.pre_exec(move || {
            libc::umask(umask as libc::mode_t);
            Ok(())
        });
    }
    c
}

/// Waits for `child` to exit (`limit` at most); kills it and panics if it does not,
/// naming `what`. Returns the exit status and the standard error.
fn exits_within(mut child: Child, limit: Duration, what: &str) -> (ExitStatus, String) {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (st, err);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn ctl(sock: &Path) -> PathBuf {
    PathBuf::from(format!("{}.ctl", sock.display()))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: plain kill(2) on our child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_regular_file_at_the_socket_path_is_refused_and_kept() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = make_array(d.path(), "a.img", "b.img");
    let victim = d.path().join("victim.img");
    std::fs::write(&victim, b"precious data").unwrap();
    let child = command(&["serve", "--socket", s(&victim), s(&a), s(&b)], 0o022)
        .spawn()
        .unwrap();
    let (st, err) = exits_within(child, Duration::from_secs(20), "serve on a regular file");
    assert!(!st.success());
    assert_eq!(
        err.trim_end(),
        format!(
            "vhost-user-md: {} exists and is not a socket; refusing to replace it",
            victim.display()
        )
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious data");
    assert!(!ctl(&victim).exists(), "a stale control socket was left");
    assert_eq!(leg_states(&[&a, &b]), ["clean", "clean"]);
}

#[test]
fn a_regular_file_at_the_control_path_is_refused_and_kept() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = make_array(d.path(), "a.img", "b.img");
    let sock = d.path().join("vm.sock");
    let victim = d.path().join("victim.ctl");
    std::fs::write(&victim, b"precious data").unwrap();
    let child = command(
        &[
            "serve",
            "--socket",
            s(&sock),
            "--control",
            s(&victim),
            s(&a),
            s(&b),
        ],
        0o022,
    )
    .spawn()
    .unwrap();
    let (st, err) = exits_within(child, Duration::from_secs(20), "serve on a regular file");
    assert!(!st.success());
    assert!(
        err.contains("victim.ctl exists and is not a socket; refusing to replace it"),
        "{err}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious data");
    assert!(!sock.exists(), "the vhost-user socket was left behind");
    assert_eq!(leg_states(&[&a, &b]), ["clean", "clean"]);
}

#[test]
fn a_live_socket_is_refused_with_the_owners_pid() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = make_array(d.path(), "a.img", "b.img");
    let (c, e) = make_array(d.path(), "c.img", "d.img");
    let sock = d.path().join("vm.sock");
    let mut first = Serve::start(&sock, &[s(&a), s(&b)]);
    let pid = first.child.as_ref().unwrap().id();
    let ino = std::fs::metadata(&sock).unwrap().ino();
    let ctl_ino = std::fs::metadata(ctl(&sock)).unwrap().ino();
    let child = command(&["serve", "--socket", s(&sock), s(&c), s(&e)], 0o022)
        .spawn()
        .unwrap();
    let (st, err) = exits_within(child, Duration::from_secs(20), "second serve");
    assert!(!st.success());
    assert_eq!(
        err.trim_end(),
        format!(
            "vhost-user-md: socket {} is in use by pid {pid}",
            sock.display()
        )
    );
    // The first one still owns both sockets and answers.
    assert_eq!(std::fs::metadata(&sock).unwrap().ino(), ino);
    assert_eq!(std::fs::metadata(ctl(&sock)).unwrap().ino(), ctl_ino);
    assert_eq!(first.status()["raid_disks"], 2);
    assert_eq!(leg_states(&[&c, &e]), ["clean", "clean"]);
    assert!(first.stop().success(), "{}", first.log_text());
}

#[test]
fn a_stale_socket_is_replaced() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = make_array(d.path(), "a.img", "b.img");
    let sock = d.path().join("vm.sock");
    // Sockets nobody listens on any more (a killed serve leaves them).
    drop(UnixListener::bind(&sock).unwrap());
    drop(UnixListener::bind(ctl(&sock)).unwrap());
    let child = command(&["serve", "--socket", s(&sock), s(&a), s(&b)], 0o022)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut serve = Serve {
        child: Some(child),
        socket: sock.clone(),
        log: d.path().join("none.log"),
    };
    let start = Instant::now();
    while status_ok(&serve.socket).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "serve did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(serve.stop().success());
    assert!(!sock.exists() && !ctl(&sock).exists());
}

/// `status --format json` of the serve on `sock`, if it answers.
fn status_ok(sock: &Path) -> Option<serde_json::Value> {
    let out = bin()
        .args(["status", "--format", "json"])
        .arg(sock)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// Starts `serve` with the child's umask set to `umask`; waits until it answers.
fn start_serve(sock: &Path, args: &[&str], umask: u32) -> Serve {
    let log = sock.with_extension("log");
    let out = std::fs::File::create(&log).unwrap();
    let child = command(&["serve", "--socket", s(sock)], umask)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let mut serve = Serve {
        child: Some(child),
        socket: sock.to_path_buf(),
        log,
    };
    let start = Instant::now();
    while status_ok(&serve.socket).is_none() {
        if let Some(st) = serve.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("serve exited with {st}: {}", serve.log_text());
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "serve did not start: {}",
            serve.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    serve
}

#[test]
fn sockets_are_0600_whatever_the_umask() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = make_array(d.path(), "a.img", "b.img");
    let sock = d.path().join("vm.sock");
    let mut serve = start_serve(&sock, &[s(&a), s(&b)], 0);
    assert_eq!(mode(&sock), 0o600, "vhost-user socket");
    assert_eq!(mode(&ctl(&sock)), 0o600, "control socket");
    assert!(serve.stop().success());
}

#[test]
fn socket_owner_group_and_mode_apply_to_the_vhost_user_socket_only() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = make_array(d.path(), "a.img", "b.img");
    let sock = d.path().join("vm.sock");
    let mut serve = start_serve(
        &sock,
        &[
            "--socket-mode",
            "0660",
            "--socket-owner",
            "nobody",
            "--socket-group",
            "nogroup",
            s(&a),
            s(&b),
        ],
        0o022,
    );
    let m = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o660);
    assert_eq!((m.uid(), m.gid()), (65534, 65534), "nobody:nogroup");
    let c = std::fs::symlink_metadata(ctl(&sock)).unwrap();
    assert_eq!(c.permissions().mode() & 0o7777, 0o600);
    // SAFETY: geteuid/getegid cannot fail.
    let me = unsafe { (libc::geteuid(), libc::getegid()) };
    assert_eq!((c.uid(), c.gid()), me, "the control socket stays ours");
    assert!(serve.stop().success(), "{}", serve.log_text());
    assert!(!sock.exists() && !ctl(&sock).exists());
}

#[test]
fn bad_socket_owner_group_or_mode_get_one_line() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = make_array(d.path(), "a.img", "b.img");
    let sock = d.path().join("vm.sock");
    for (flags, needle) in [
        (
            ["--socket-owner", "no-such-user-vumd"],
            "no user named \"no-such-user-vumd\"",
        ),
        (
            ["--socket-group", "no-such-group-vumd"],
            "no group named \"no-such-group-vumd\"",
        ),
        (["--socket-mode", "0999"], "0999"),
    ] {
        let child = command(&["serve", "--socket", s(&sock)], 0o022)
            .args(flags)
            .args([s(&a), s(&b)])
            .spawn()
            .unwrap();
        let (st, err) = exits_within(child, Duration::from_secs(20), "serve with a bad flag");
        assert!(!st.success(), "{flags:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{flags:?}: {err}");
        assert!(err.contains(needle), "{flags:?}: {err}");
        assert!(!sock.exists() && !ctl(&sock).exists(), "{flags:?}");
        assert_eq!(leg_states(&[&a, &b]), ["clean", "clean"]);
    }
}

#[test]
fn at_exit_only_the_sockets_this_process_bound_are_removed() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = make_array(d.path(), "a.img", "b.img");
    let sock = d.path().join("vm.sock");
    let mut serve = Serve::start(&sock, &[s(&a), s(&b)]);
    // Someone moves our sockets away and puts others in their place.
    std::fs::rename(&sock, d.path().join("moved.sock")).unwrap();
    std::fs::rename(ctl(&sock), d.path().join("moved.sock.ctl")).unwrap();
    let _theirs = UnixListener::bind(&sock).unwrap();
    let _theirs_ctl = UnixListener::bind(ctl(&sock)).unwrap();
    let ino = std::fs::metadata(&sock).unwrap().ino();
    let ctl_ino = std::fs::metadata(ctl(&sock)).unwrap().ino();
    assert!(serve.stop().success(), "{}", serve.log_text());
    assert_eq!(
        std::fs::metadata(&sock).map(|m| m.ino()).ok(),
        Some(ino),
        "serve removed a socket it did not bind"
    );
    assert_eq!(
        std::fs::metadata(ctl(&sock)).map(|m| m.ino()).ok(),
        Some(ctl_ino),
        "serve removed a control socket it did not bind"
    );
}

#[test]
fn hangup_and_usr1_do_not_stop_serve() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = make_array(d.path(), "a.img", "b.img");
    let sock = d.path().join("vm.sock");
    let mut serve = Serve::start(&sock, &[s(&a), s(&b)]);
    assert_eq!(serve.status()["raid_disks"], 2);
    for sig in [libc::SIGHUP, libc::SIGUSR1] {
        signal(serve.child.as_ref().unwrap(), sig);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            serve.child.as_mut().unwrap().try_wait().unwrap().is_none(),
            "signal {sig} stopped serve: {}",
            serve.log_text()
        );
        assert_eq!(serve.status()["raid_disks"], 2);
    }
    assert_eq!(leg_states(&[&a, &b]), ["active", "active"]);
    assert!(serve.stop().success(), "{}", serve.log_text());
    assert_eq!(leg_states(&[&a, &b]), ["clean", "clean"]);
    assert!(!sock.exists() && !ctl(&sock).exists());
}

#[test]
fn a_failed_create_size_leaves_no_image_behind() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.img");
    // The second leg cannot be created: its path leads into a missing directory.
    let b = d.path().join("b.img");
    std::os::unix::fs::symlink(d.path().join("missing/b.img"), &b).unwrap();
    let sock = d.path().join("vm.sock");
    failed_create_size(&sock, "16M", &a, &b);
    assert!(!a.exists(), "the first leg's image file was left behind");
    assert!(!d.path().join("missing").exists());
}

/// Runs `serve --create-size SIZE` on legs `a` and `b`, which must fail to
/// create an image; checks that it failed saying so and left no socket.
fn failed_create_size(sock: &Path, size: &str, a: &Path, b: &Path) {
    let args = [
        "serve",
        "--socket",
        s(sock),
        "--create-size",
        size,
        s(a),
        s(b),
    ];
    let child = command(&args, 0o022).spawn().unwrap();
    let (st, err) = exits_within(child, Duration::from_secs(20), "serve --create-size");
    assert!(!st.success());
    assert!(err.contains("cannot create"), "{err}");
    assert!(!sock.exists() && !ctl(sock).exists());
}

/// A size the file system refuses (`EFBIG`: beyond ext4's and xfs's largest file):
/// the image the run created before its size was refused is removed.
#[test]
fn an_oversized_create_size_leaves_no_image_behind() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    failed_create_size(&d.path().join("vm.sock"), "100000000G", &a, &b);
    assert!(!a.exists(), "the first leg's image file was left behind");
    assert!(!b.exists(), "the second leg's image file was left behind");
}

/// A start that fails after the array was marked active (here: a thread that
/// cannot start, by the hidden fault drill) marks it clean again and leaves
/// neither socket behind.
#[test]
fn a_start_failing_after_assembly_leaves_the_array_clean() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = make_array(d.path(), "a.img", "b.img");
    let sock = d.path().join("vm.sock");
    for thread in ["resync", "bitmap", "control", "vhost-user"] {
        let child = command(
            &[
                "serve",
                "--socket",
                s(&sock),
                "--heartbeat-interval",
                "100ms",
                "--inject-thread-failure",
                thread,
                s(&a),
                s(&b),
            ],
            0o022,
        )
        .spawn()
        .unwrap();
        let (st, err) = exits_within(child, Duration::from_secs(20), "serve failing to start");
        assert!(!st.success(), "{thread}");
        assert_eq!(
            err.trim_end(),
            format!(
                "vhost-user-md: cannot start the {thread} thread: Resource temporarily unavailable (os error 11)"
            )
        );
        assert_eq!(leg_states(&[&a, &b]), ["clean", "clean"], "{thread}");
        assert!(!sock.exists() && !ctl(&sock).exists(), "{thread}");
    }
}

/// A cluster node whose start fails after it joined tells the others it leaves.
#[test]
fn a_cluster_node_failing_to_start_leaves_the_cluster() {
    let d = tempfile::tempdir().unwrap();
    let legs = common::create_array(d.path(), &["a.img", "b.img"], "16M", Some("own"));
    let lockd = common::Lockd::start();
    let lm = format!("lockd:{}", lockd.socket.display());
    let n1 = Serve::start(
        &d.path().join("n1.sock"),
        &["--lock-manager", &lm, s(&legs[0]), s(&legs[1])],
    );
    let sock = d.path().join("n2.sock");
    let child = command(
        &[
            "serve",
            "--socket",
            s(&sock),
            "--lock-manager",
            &lm,
            "--inject-thread-failure",
            "vhost-user",
            s(&legs[0]),
            s(&legs[1]),
        ],
        0o022,
    )
    .spawn()
    .unwrap();
    let (st, err) = exits_within(child, Duration::from_secs(20), "node failing to start");
    assert!(!st.success());
    assert!(err.contains("cannot start the vhost-user thread"), "{err}");
    assert!(!sock.exists() && !ctl(&sock).exists());
    let start = Instant::now();
    let left = |log: String| {
        log.lines()
            .any(|l| l.contains("node slot ") && l.ends_with(" leaves"))
    };
    while !left(n1.log_text()) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the node did not leave: {}",
            n1.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(n1.status()["degraded"], false);
}

#[test]
fn create_size_images_are_0600() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    let sock = d.path().join("vm.sock");
    let mut serve = start_serve(&sock, &["--create-size", "16M", s(&a), s(&b)], 0o022);
    assert_eq!((mode(&a), mode(&b)), (0o600, 0o600));
    assert!(serve.stop().success());
}

/// Starts `lockd` on `sock`; waits for its socket.
fn start_lockd(sock: &Path) -> Child {
    let mut child = command(&["lockd", "--socket", s(sock)], 0).spawn().unwrap();
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("lockd exited with {st}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "lockd did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn a_second_lockd_on_a_live_socket_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("lockd.sock");
    let mut first = start_lockd(&sock);
    let ino = std::fs::metadata(&sock).unwrap().ino();
    let second = command(&["lockd", "--socket", s(&sock)], 0o022)
        .spawn()
        .unwrap();
    let (st, err) = exits_within(second, Duration::from_secs(10), "second lockd");
    assert!(!st.success());
    assert_eq!(
        err.trim_end(),
        format!(
            "vhost-user-md: socket {} is in use by pid {}",
            sock.display(),
            first.id()
        )
    );
    assert_eq!(std::fs::metadata(&sock).unwrap().ino(), ino);
    assert!(first.try_wait().unwrap().is_none());
    let _ = first.kill();
    let _ = first.wait();
}

#[test]
fn lockd_refuses_a_regular_file() {
    let d = tempfile::tempdir().unwrap();
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"precious data").unwrap();
    let child = command(&["lockd", "--socket", s(&victim)], 0o022)
        .spawn()
        .unwrap();
    let (st, err) = exits_within(child, Duration::from_secs(10), "lockd on a regular file");
    assert!(!st.success());
    assert!(
        err.contains("victim exists and is not a socket; refusing to replace it"),
        "{err}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious data");
}

#[test]
fn lockd_survives_hangup_and_removes_its_own_socket_at_sigterm() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("lockd.sock");
    let mut child = start_lockd(&sock);
    assert_eq!(mode(&sock), 0o600, "lockd socket with umask 0");
    for sig in [libc::SIGHUP, libc::SIGUSR1] {
        signal(&child, sig);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            child.try_wait().unwrap().is_none(),
            "signal {sig} stopped lockd"
        );
    }
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
    signal(&child, libc::SIGTERM);
    let (st, _) = exits_within(child, Duration::from_secs(10), "lockd after SIGTERM");
    assert!(st.success(), "{st}");
    assert!(!sock.exists(), "lockd left its socket behind");
}
