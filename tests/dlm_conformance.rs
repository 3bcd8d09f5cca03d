//! One conformance suite for every lock manager backend: the DLM semantics the
//! md-cluster protocol depends on (spec §3, §8).
//!
//! Long file: one suite run against every backend; splitting it would split the
//! semantics it states from the backends that must meet them.

use crossbeam_channel::Receiver;
use std::time::Duration;
use vhost_user_md::dlm::local::LocalDlm;
use vhost_user_md::dlm::lockd::LockdMember;

mod common;
use common::Lockd;
use vhost_user_md::dlm::{flags, Event, LockId, LockSpace, Mode, Status};

/// A lock manager under test: makes members of named lockspaces and kills them.
pub trait Harness {
    /// A new member (node) of lockspace `ls`.
    fn member(&self, ls: &str) -> Box<dyn Member>;
    /// Whether members are told of joins and deaths (libdlm is not, spec §6.5).
    fn membership_events(&self) -> bool {
        true
    }
    /// Whether a BAST says the blocked mode (libdlm's does not).
    fn bast_mode(&self) -> bool {
        true
    }
}

/// A member that can be killed (its process/node dies).
pub trait Member: LockSpace {
    /// Dies: locks are released by the lock manager.
    fn kill(self: Box<Self>);
    /// As a plain `LockSpace`.
    fn ls(&self) -> &dyn LockSpace;
}

struct Local(LocalDlm);

impl Member for vhost_user_md::dlm::local::LocalMember {
    fn kill(self: Box<Self>) {
        (*self).kill()
    }
    fn ls(&self) -> &dyn LockSpace {
        self
    }
}

impl Harness for Local {
    fn member(&self, ls: &str) -> Box<dyn Member> {
        Box::new(self.0.join(ls, 32))
    }
}

const WAIT: Duration = Duration::from_secs(5);

/// The next AST for `lock`, skipping other events (which are returned too).
fn ast(rx: &Receiver<Event>, lock: LockId) -> (Status, Option<Vec<u8>>, bool) {
    loop {
        match rx.recv_timeout(WAIT).expect("no completion within 5 s") {
            Event::Ast {
                lock: l,
                status,
                lvb,
                lvb_invalid,
            } if l == lock => return (status, lvb, lvb_invalid),
            _ => {}
        }
    }
}

fn lock_sync(m: &dyn LockSpace, name: &str, mode: Mode, fl: u32) -> (LockId, Status) {
    let rx = m.events();
    let id = m.lock(name.as_bytes(), mode, fl, None).unwrap();
    (id, ast(&rx, id).0)
}

fn convert_sync(
    m: &dyn LockSpace,
    id: LockId,
    mode: Mode,
    fl: u32,
    lvb: Option<&[u8]>,
) -> (Status, Option<Vec<u8>>, bool) {
    let rx = m.events();
    m.convert(id, mode, fl | flags::CONVERT, lvb).unwrap();
    ast(&rx, id)
}

/// No lock event for a while (membership events are allowed).
fn quiet(rx: &Receiver<Event>, what: &str) {
    while let Ok(e) = rx.recv_timeout(Duration::from_millis(150)) {
        if !matches!(e, Event::NodeUp(_) | Event::NodeDown(_)) {
            panic!("{what}: unexpected event {e:?}");
        }
    }
}

/// The BASTs that arrive: waits up to 5 s for `want` of them, then until nothing more
/// comes for a while (a slow lock manager is not mistaken for a missing BAST).
fn basts(rx: &Receiver<Event>, want: usize) -> Vec<(LockId, Option<Mode>)> {
    let mut v = Vec::new();
    loop {
        let wait = if v.len() < want {
            WAIT
        } else {
            Duration::from_millis(150)
        };
        match rx.recv_timeout(wait) {
            Ok(Event::Bast { lock, mode }) => v.push((lock, mode)),
            Ok(_) => {}
            Err(_) => return v,
        }
    }
}

/// The DLM compatibility matrix (spec §8.1), granted row × requested column.
const COMPAT: [[bool; 6]; 6] = [
    [true, true, true, true, true, true],
    [true, true, true, true, true, false],
    [true, true, true, false, false, false],
    [true, true, false, true, false, false],
    [true, true, false, false, false, false],
    [true, false, false, false, false, false],
];

fn compatibility_matrix(h: &dyn Harness) {
    for held in Mode::ALL {
        for req in Mode::ALL {
            let a = h.member("matrix");
            let b = h.member("matrix");
            let (_, st) = lock_sync(a.ls(), "r", held, 0);
            assert_eq!(st, Status::Granted);
            let (_, st) = lock_sync(b.ls(), "r", req, flags::NOQUEUE);
            let want = if COMPAT[held as usize][req as usize] {
                Status::Granted
            } else {
                Status::Again
            };
            assert_eq!(st, want, "held {held:?}, requested {req:?}");
            quiet(&a.events(), "NOQUEUE requests send no BAST");
        }
    }
}

fn queued_requests_are_granted_in_order(h: &dyn Harness) {
    let a = h.member("queue");
    let b = h.member("queue");
    let c = h.member("queue");
    let (la, _) = lock_sync(a.ls(), "r", Mode::Ex, 0);
    let (rb, rc) = (b.events(), c.events());
    let lb = b.lock(b"r", Mode::Pr, 0, None).unwrap();
    let lc = c.lock(b"r", Mode::Ex, 0, None).unwrap();
    quiet(&rb, "b waits");
    a.unlock(la, 0, None).unwrap();
    assert_eq!(ast(&rb, lb).0, Status::Granted);
    quiet(&rc, "c waits behind b's PR");
    b.unlock(lb, 0, None).unwrap();
    assert_eq!(ast(&rb, lb).0, Status::Unlocked);
    assert_eq!(ast(&rc, lc).0, Status::Granted);
    // A conversion beats a waiting new request.
    let d = h.member("queue");
    let (ld, _) = lock_sync(d.ls(), "s", Mode::Cr, 0);
    let (le, _) = lock_sync(a.ls(), "s", Mode::Cr, 0);
    let rd = d.events();
    d.convert(ld, Mode::Ex, flags::CONVERT, None).unwrap();
    let ra = a.events();
    let waiting = b.lock(b"s", Mode::Cr, 0, None).unwrap();
    quiet(&rb, "new CR waits behind the queued conversion");
    a.unlock(le, 0, None).unwrap();
    assert_eq!(ast(&ra, le).0, Status::Unlocked);
    assert_eq!(ast(&rd, ld).0, Status::Granted);
    quiet(&rb, "still blocked by EX");
    d.convert(ld, Mode::Nl, flags::CONVERT, None).unwrap();
    assert_eq!(ast(&rb, waiting).0, Status::Granted);
}

fn lvb_is_written_on_down_conversion_and_read_on_grant(h: &dyn Harness) {
    let a = h.member("lvb");
    let b = h.member("lvb");
    let n = a.lvb_len();
    assert!(n >= 32);
    let (la, _) = lock_sync(
        a.ls(),
        "bitmap0000",
        Mode::Nl,
        flags::VALBLK | flags::EXPEDITE,
    );
    assert_eq!(
        convert_sync(a.ls(), la, Mode::Pw, flags::VALBLK, None).0,
        Status::Granted
    );
    let mut info = vec![0u8; n];
    info[..16].copy_from_slice(b"lo=0016 hi=0032.");
    // PW -> PW refresh writes the LVB (the resync window update of spec §3.4); a
    // grant that writes reads nothing back.
    let (st, lvb, _) = convert_sync(a.ls(), la, Mode::Pw, flags::VALBLK, Some(&info));
    assert_eq!(st, Status::Granted);
    assert_eq!(lvb, None, "PW -> PW writes, it does not read");
    let (lb, _) = lock_sync(
        b.ls(),
        "bitmap0000",
        Mode::Nl,
        flags::VALBLK | flags::EXPEDITE,
    );
    let (st, lvb, invalid) = convert_sync(b.ls(), lb, Mode::Cr, flags::VALBLK, None);
    assert_eq!(st, Status::Granted);
    assert_eq!(lvb.as_deref(), Some(&info[..]));
    assert!(!invalid);
    // A CR -> NL down-conversion neither writes nor reads.
    let junk = vec![0xaa; n];
    let (_, lvb, _) = convert_sync(b.ls(), lb, Mode::Nl, flags::VALBLK, Some(&junk));
    assert_eq!(lvb, None, "CR -> NL reads nothing");
    let (_, lvb, _) = convert_sync(b.ls(), lb, Mode::Cr, flags::VALBLK, None);
    assert_eq!(lvb.as_deref(), Some(&info[..]));
    // The message lock dance: EX -> CW writes, a CR reader sees it.
    let (m, _) = lock_sync(a.ls(), "message", Mode::Nl, flags::VALBLK | flags::EXPEDITE);
    convert_sync(a.ls(), m, Mode::Ex, flags::VALBLK, None);
    let mut msg = vec![0u8; n];
    msg[0] = 1;
    msg[4] = 2;
    convert_sync(a.ls(), m, Mode::Cw, flags::VALBLK, Some(&msg));
    let (r, st) = lock_sync(b.ls(), "message", Mode::Cr, flags::VALBLK);
    assert_eq!(st, Status::Granted);
    let rx = b.events();
    b.convert(r, Mode::Pr, flags::CONVERT | flags::VALBLK, None)
        .unwrap();
    quiet(&rx, "PR waits for the sender's CW");
    a.convert(m, Mode::Nl, flags::CONVERT | flags::VALBLK, None)
        .unwrap();
    let (st, lvb, _) = ast(&rx, r);
    assert_eq!(st, Status::Granted);
    assert_eq!(lvb.as_deref(), Some(&msg[..]));
}

fn bast_goes_exactly_to_blocking_holders(h: &dyn Harness) {
    let ex = if h.bast_mode() { Some(Mode::Ex) } else { None };
    let a = h.member("bast");
    let b = h.member("bast");
    let c = h.member("bast");
    let d = h.member("bast");
    let (la, _) = lock_sync(a.ls(), "ack", Mode::Cr, 0);
    let (lb, _) = lock_sync(b.ls(), "ack", Mode::Cr, 0);
    let (_ld, _) = lock_sync(d.ls(), "ack", Mode::Nl, 0);
    let (lc, _) = lock_sync(c.ls(), "ack", Mode::Nl, 0);
    let (ra, rb, rc, rd) = (a.events(), b.events(), c.events(), d.events());
    c.convert(lc, Mode::Ex, flags::CONVERT, None).unwrap();
    assert_eq!(basts(&ra, 1), vec![(la, ex)]);
    assert_eq!(basts(&rb, 1), vec![(lb, ex)]);
    assert!(basts(&rd, 0).is_empty(), "an NL holder blocks nothing");
    a.convert(la, Mode::Nl, flags::CONVERT, None).unwrap();
    assert_eq!(ast(&ra, la).0, Status::Granted);
    quiet(&rc, "c still waits for b");
    b.convert(lb, Mode::Nl, flags::CONVERT, None).unwrap();
    assert_eq!(ast(&rc, lc).0, Status::Granted);
}

fn death_releases_locks_and_grants_waiters(h: &dyn Harness) {
    let a = h.member("death");
    let b = h.member("death");
    let c = h.member("death");
    // The owner takes its slot PW and writes its resync window (PW -> PW), as
    // md-cluster does with bitmap%04d; it also holds a PW whose LVB it never wrote.
    let (la, _) = lock_sync(
        a.ls(),
        "bitmap0001",
        Mode::Nl,
        flags::VALBLK | flags::EXPEDITE,
    );
    convert_sync(a.ls(), la, Mode::Pw, flags::VALBLK, None);
    let mut info = vec![0u8; a.lvb_len()];
    info[0] = 9;
    assert_eq!(
        convert_sync(a.ls(), la, Mode::Pw, flags::VALBLK, Some(&info)).0,
        Status::Granted
    );
    let (_, st) = lock_sync(a.ls(), "bitmap0002", Mode::Pw, flags::VALBLK);
    assert_eq!(st, Status::Granted);
    let (lb, _) = lock_sync(
        b.ls(),
        "bitmap0001",
        Mode::Nl,
        flags::VALBLK | flags::EXPEDITE,
    );
    let rb = b.events();
    // The "watch": a blocking PW behind the owner's PW.
    b.convert(lb, Mode::Pw, flags::CONVERT | flags::VALBLK, None)
        .unwrap();
    let lb2 = b
        .lock(b"bitmap0002", Mode::Pw, flags::VALBLK, None)
        .unwrap();
    quiet(&rb, "watch waits");
    let dead = a.node();
    a.kill();
    let (mut granted, mut granted2, mut told) = (false, false, false);
    for _ in 0..6 {
        match rb.recv_timeout(WAIT) {
            Ok(Event::Ast {
                lock,
                status: Status::Granted,
                lvb_invalid,
                ..
            }) if lock == lb => {
                granted = true;
                assert!(lvb_invalid, "the dead PW holder's LVB is not valid");
            }
            Ok(Event::Ast {
                lock,
                status: Status::Granted,
                lvb_invalid,
                ..
            }) if lock == lb2 => {
                granted2 = true;
                // The DLM flags an LVB only once it exists (some holder wrote it).
                assert!(!lvb_invalid, "an LVB never written is not flagged");
            }
            Ok(Event::NodeDown(n)) if n == dead => told = true,
            Ok(_) => {}
            Err(_) => break,
        }
        if granted && granted2 && (told || !h.membership_events()) {
            break;
        }
    }
    assert!(
        granted && granted2,
        "the waiters are granted when the owner dies"
    );
    assert!(
        told || !h.membership_events(),
        "survivors are told of the death"
    );
    // The flag stays until a PW/EX holder writes the LVB again.
    let (lc, _) = lock_sync(
        c.ls(),
        "bitmap0001",
        Mode::Nl,
        flags::VALBLK | flags::EXPEDITE,
    );
    let info2 = vec![7u8; b.lvb_len()];
    convert_sync(b.ls(), lb, Mode::Nl, flags::VALBLK, Some(&info2));
    let (st, lvb, invalid) = convert_sync(c.ls(), lc, Mode::Cr, flags::VALBLK, None);
    assert_eq!(st, Status::Granted);
    assert!(!invalid, "written again: valid");
    assert_eq!(lvb.as_deref(), Some(&info2[..]));
}

fn lockspaces_are_isolated(h: &dyn Harness) {
    let a = h.member("space-one");
    let b = h.member("space-two");
    lock_sync(a.ls(), "token", Mode::Ex, 0);
    let (_, st) = lock_sync(b.ls(), "token", Mode::Ex, flags::NOQUEUE);
    assert_eq!(st, Status::Granted);
}

fn cancel_and_deadlock(h: &dyn Harness) {
    let a = h.member("cancel");
    let b = h.member("cancel");
    let (la, _) = lock_sync(a.ls(), "resync", Mode::Ex, 0);
    let (lb, _) = lock_sync(b.ls(), "resync", Mode::Nl, 0);
    let rb = b.events();
    b.convert(lb, Mode::Ex, flags::CONVERT, None).unwrap();
    quiet(&rb, "queued");
    b.unlock(lb, flags::CANCEL, None).unwrap();
    assert_eq!(ast(&rb, lb).0, Status::Cancelled);
    a.unlock(la, 0, None).unwrap();
    // b still holds NL: a PW NOQUEUE now succeeds (nothing left queued).
    assert_eq!(
        convert_sync(b.ls(), lb, Mode::Pw, flags::NOQUEUE, None).0,
        Status::Granted
    );
    // Two CR holders both converting to EX: one is told it would deadlock.
    let (x, _) = lock_sync(a.ls(), "dl", Mode::Cr, 0);
    let (y, _) = lock_sync(b.ls(), "dl", Mode::Cr, 0);
    let (ra, rb) = (a.events(), b.events());
    a.convert(x, Mode::Ex, flags::CONVERT, None).unwrap();
    b.convert(y, Mode::Ex, flags::CONVERT, None).unwrap();
    assert_eq!(ast(&rb, y).0, Status::Deadlock);
    b.unlock(y, 0, None).unwrap();
    assert_eq!(ast(&ra, x).0, Status::Granted);
}

fn run_all(h: &dyn Harness) {
    compatibility_matrix(h);
    queued_requests_are_granted_in_order(h);
    lvb_is_written_on_down_conversion_and_read_on_grant(h);
    bast_goes_exactly_to_blocking_holders(h);
    death_releases_locks_and_grants_waiters(h);
    lockspaces_are_isolated(h);
    cancel_and_deadlock(h);
}

#[test]
fn local_lock_manager_conforms() {
    run_all(&Local(LocalDlm::new()));
}

impl Member for LockdMember {
    fn kill(self: Box<Self>) {
        // The connection closes as it does when the process dies.
        drop(self)
    }
    fn ls(&self) -> &dyn LockSpace {
        self
    }
}

impl Harness for Lockd {
    fn member(&self, ls: &str) -> Box<dyn Member> {
        Box::new(LockdMember::connect(&self.socket, ls, 32).unwrap())
    }
}

#[test]
fn lockd_conforms() {
    let mut d = Lockd::start();
    run_all(&d);
    assert!(d.alive());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is private by default");
}

/// Dropping a member is leaving the lockspace: when the drop returns its locks are
/// free, as they are when a process closes the kernel DLM's device. A NOQUEUE request
/// made just after must not find the leaver still holding them.
#[test]
fn lockd_a_dropped_members_locks_are_free_when_drop_returns() {
    let d = Lockd::start();
    // Busy threads keep the CPUs contended, as a loaded host does: the daemon's
    // thread that notices a closed connection then runs late.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hogs: Vec<_> = (0..8)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let mut late = None;
    for i in 0..100 {
        let a = d.member("leave");
        let (_, st) = lock_sync(a.ls(), "r", Mode::Ex, 0);
        assert_eq!(st, Status::Granted);
        drop(a);
        let b = d.member("leave");
        let (_, st) = lock_sync(b.ls(), "r", Mode::Ex, flags::NOQUEUE);
        if st != Status::Granted {
            late = Some(i);
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    assert_eq!(
        late, None,
        "the dropped member still held the lock in that round"
    );
}

#[test]
fn lockd_releases_the_locks_of_a_client_killed_mid_conversion() {
    let d = Lockd::start();
    let m1 = d.member("kill9");
    let m2 = d.member("kill9");
    let (l1, _) = lock_sync(m1.ls(), "ack", Mode::Cr, 0);
    let mut child = common::bin()
        .args([
            "lock",
            "--lockspace",
            "kill9",
            "--convert",
            "EX",
            "--socket",
        ])
        .arg(&d.socket)
        .args(["ack", "CR"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the child holds CR and its conversion to EX is queued (m1 is told).
    let r1 = m1.events();
    let mut child_node = None;
    let mut blocked = false;
    while !(blocked && child_node.is_some()) {
        match r1.recv_timeout(WAIT).expect("child never got going") {
            Event::NodeUp(n) => child_node = Some(n),
            Event::Bast { lock, mode } if lock == l1 => {
                assert_eq!(mode, Some(Mode::Ex));
                blocked = true;
            }
            _ => {}
        }
    }
    // m2 wants EX too: it waits behind the child's CR and conversion.
    let r2 = m2.events();
    let (l2, _) = lock_sync(m2.ls(), "ack", Mode::Nl, flags::EXPEDITE);
    m2.convert(l2, Mode::Ex, flags::CONVERT, None).unwrap();
    m1.unlock(l1, 0, None).unwrap();
    quiet(&r2, "m2 waits: the child still holds CR");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(ast(&r2, l2).0, Status::Granted);
    let dead = child_node.unwrap();
    let mut told = false;
    while let Ok(e) = r1.recv_timeout(Duration::from_millis(500)) {
        told |= e == Event::NodeDown(dead);
    }
    assert!(told, "m1 is told the child's node died");
}

/// `vhost-user-md lock` (the probe the real-DLM integration test drives): --noqueue,
/// --valblk and --lvb, on lockd.
#[test]
fn lock_command_noqueue_and_lvb() {
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Stdio};
    let d = Lockd::start();
    let lock = |args: &[&str]| {
        let mut c = common::bin();
        c.args(["lock", "--lockspace", "cli", "--socket"])
            .arg(&d.socket)
            .args(args);
        c
    };
    // Reads a child's lines until `want`.
    let until = |r: &mut BufReader<std::process::ChildStdout>, want: &str| -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let mut l = String::new();
            assert!(
                r.read_line(&mut l).unwrap() > 0,
                "EOF before {want:?}: {seen:?}"
            );
            let l = l.trim_end().to_string();
            seen.push(l.clone());
            if l == want {
                return seen;
            }
        }
    };
    let lines = |c: &mut Child| BufReader::new(c.stdout.take().unwrap());
    let mut holder = lock(&["r", "PW"]).stdout(Stdio::piped()).spawn().unwrap();
    until(&mut lines(&mut holder), "Granted");
    let out = lock(&["--noqueue", "r", "PW"]).output().unwrap();
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Again\n");
    holder.kill().unwrap();
    holder.wait().unwrap();

    let mut writer = lock(&["--lvb", "hello-lvb", "--convert", "NL", "v", "PW"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The new PW request reads the (never written) LVB; PW -> NL writes it.
    let mut w = lines(&mut writer);
    assert_eq!(
        until(&mut w, "converting"),
        ["Granted", "lvb", "converting"]
    );
    assert_eq!(until(&mut w, "Granted"), ["Granted"]);
    let mut reader = lock(&["--valblk", "v", "CR"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(
        until(&mut lines(&mut reader), "lvb hello-lvb"),
        ["Granted", "lvb hello-lvb"]
    );
    for mut c in [writer, reader] {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    let long = "x".repeat(33);
    let out = lock(&["--lvb", &long, "--convert", "NL", "v", "PW"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("do not fit the 32-byte"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn lockd_survives_garbage_clients() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let mut d = Lockd::start();
    let good = d.member("garbage");
    let frame = |body: &[u8]| {
        let mut v = (body.len() as u32).to_le_bytes().to_vec();
        v.extend_from_slice(body);
        v
    };
    let hello = frame(br#"{"op":"hello","lockspace":"garbage","lvb_len":32}"#);
    let attacks: Vec<Vec<u8>> = vec![
        vec![0xff, 0xff, 0xff, 0xff],
        frame(b"not json at all"),
        frame(br#"{"op":"lock","seq":1,"name":[1],"mode":9,"flags":0}"#),
        [
            hello.clone(),
            frame(br#"{"op":"lock","seq":1,"name":[],"mode":5,"flags":0}"#),
        ]
        .concat(),
        [
            hello.clone(),
            frame(br#"{"op":"convert","seq":2,"lock":424242,"mode":5,"flags":4}"#),
        ]
        .concat(),
        [
            hello.clone(),
            frame(br#"{"op":"lock","seq":3,"name":[1],"mode":77,"flags":0}"#),
        ]
        .concat(),
        [hello.clone(), vec![0, 0, 1, 0], b"{".to_vec()].concat(),
        (0..4096u32).map(|i| (i * 7 + 3) as u8).collect(),
    ];
    let mut half_open = Vec::new();
    for a in &attacks {
        let mut c = UnixStream::connect(&d.socket).unwrap();
        let _ = c.write_all(a);
        half_open.push(c);
        // The honest member keeps working while bad clients come and go.
        let (l, st) = lock_sync(good.ls(), "r", Mode::Ex, 0);
        assert_eq!(st, Status::Granted);
        let rx = good.events();
        good.unlock(l, 0, None).unwrap();
        assert_eq!(ast(&rx, l).0, Status::Unlocked);
    }
    // A bad request on a valid connection gets an error answer, not a crash.
    let err = good
        .convert(987_654, Mode::Ex, flags::CONVERT, None)
        .unwrap_err();
    assert!(err.to_string().contains("no such lock"), "{err}");
    assert!(d.alive(), "lockd must survive garbage");
    drop(half_open);
}

/// Hundreds of `serve` processes on one host are hundreds of lockd members, two
/// open files each: lockd raises its soft limit of open files to the hard one, so a
/// low soft limit (systemd's default is 1024) turns nobody away.
#[test]
fn lockd_serves_more_members_than_its_soft_open_files_limit_allows() {
    use std::os::unix::process::CommandExt;
    const SOFT: u64 = 48;
    let d = Lockd::start_with(|cmd| {
        // SAFETY: only setrlimit between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let mut r = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                r.rlim_cur = SOFT;
                r.rlim_max = r.rlim_max.max(4 * SOFT);
                if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    // Well past SOFT / 2 members, each holding a lock of its own.
    let members: Vec<LockdMember> = (0..SOFT)
        .map(|i| {
            LockdMember::connect(&d.socket, "many", 32)
                .unwrap_or_else(|e| panic!("member {i} turned away: {e}"))
        })
        .collect();
    for (i, m) in members.iter().enumerate() {
        let (_, st) = lock_sync(m, &format!("r{i}"), Mode::Ex, 0);
        assert_eq!(st, Status::Granted, "member {i}");
    }
}

/// The real DLM through libdlm. Needs root, the dlm kernel module, corosync and
/// dlm_controld: `integration/dlm-cluster.sh` runs it inside a cluster guest with
/// `VUMD_LIBDLM=1 dlm_conformance --ignored --exact libdlm_conforms`.
struct LibDlm;

impl Member for vhost_user_md::dlm::libdlm::LibDlmMember {
    fn kill(self: Box<Self>) {
        drop(self)
    }
    fn ls(&self) -> &dyn LockSpace {
        self
    }
}

impl Harness for LibDlm {
    fn member(&self, ls: &str) -> Box<dyn Member> {
        Box::new(vhost_user_md::dlm::libdlm::LibDlmMember::join(ls).unwrap())
    }
    fn membership_events(&self) -> bool {
        false
    }
    fn bast_mode(&self) -> bool {
        false
    }
}

#[test]
#[ignore = "needs a running DLM (corosync + dlm_controld); run by integration/dlm-cluster.sh inside cluster guests"]
fn libdlm_conforms() {
    assert_eq!(
        std::env::var("VUMD_LIBDLM").as_deref(),
        Ok("1"),
        "set VUMD_LIBDLM=1 on a host with a running DLM"
    );
    run_all(&LibDlm);
}

/// A lock manager that died took every member's locks with it, but a member that
/// was alive then may still have writes on their way to the legs (it drains them
/// before it comes back). A restarted lockd admits nobody into a lockspace until
/// each member the previous daemon had there came back or is gone: the first node
/// back would otherwise take over the other's node slot and resync its chunks
/// while those writes can still land, over newer data.
#[test]
fn a_restarted_lockd_admits_nobody_until_every_previous_member_is_back_or_gone() {
    let mut d = Lockd::start();
    let sock = d.socket.clone();
    // This process is one member; a `lock` client (which exits when its daemon
    // goes) is another.
    let me = LockdMember::connect(&sock, "recov", 32).unwrap();
    let lock_client = || {
        common::bin()
            .args(["lock", "--socket"])
            .arg(&sock)
            .args(["--lockspace", "recov", "--noqueue", "r", "EX"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut other = lock_client();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(other.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "Granted");
    d.restart();
    // The `lock` client saw its daemon go and exited: gone. This process is alive
    // and has not come back: a newcomer waits.
    let st = other.wait().unwrap();
    assert!(st.success(), "the lock client ends when lockd goes: {st}");
    let mut newcomer = lock_client();
    let start = std::time::Instant::now();
    while newcomer.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(10) {
            let _ = newcomer.kill();
            let _ = newcomer.wait();
            panic!("admitted (holding the lock) while a previous member may still write");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let newcomer = newcomer.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&newcomer.stderr).to_string();
    assert!(
        !newcomer.status.success(),
        "admitted while a member may still write"
    );
    let pid = std::process::id().to_string();
    assert!(
        said.contains("recovering") && said.contains(&pid),
        "the refusal names the member waited for: {said}"
    );
    // Another lockspace is not held up.
    let elsewhere = LockdMember::connect(&sock, "another", 32);
    assert!(elsewhere.is_ok(), "{:?}", elsewhere.err());
    // The member comes back: everybody is admitted again.
    drop(me);
    let me = LockdMember::connect(&sock, "recov", 32);
    assert!(me.is_ok(), "a previous member is admitted: {:?}", me.err());
    let mut again = lock_client();
    let mut line = String::new();
    std::io::BufReader::new(again.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "Granted");
    let _ = again.kill();
    let _ = again.wait();
}
