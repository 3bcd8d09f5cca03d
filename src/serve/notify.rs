//! Telling systemd (a `Type=notify` unit) how `serve` is doing: READY once the
//! vhost-user socket serves, STOPPING at shutdown, a STATUS line for
//! `systemctl status`, and the watchdog's keep-alive.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call does nothing. The keep-alive
//! is sent only after the array's status was gathered, which takes the locks a
//! guest request and a resync take: a node stuck on them stops answering the
//! watchdog, and systemd restarts it (`WatchdogSec=` in the unit).

use super::Service;
use log::{debug, warn};
use sd_notify::NotifyState;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often the STATUS line is refreshed when no watchdog asks for more.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

fn send(what: &str, states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        warn!("cannot tell systemd {what}: {e}");
    }
}

/// How long a restart that rejoins the cluster may go without feeding the
/// watchdog: a join waits up to 5 minutes for a recovering lock manager.
const RESTART_WATCHDOG: Duration = Duration::from_secs(330);

/// The watchdog's timeout in the unit, if it has one.
fn watchdog_usec() -> Option<u32> {
    sd_notify::watchdog_enabled().map(|w| u32::try_from(w.as_micros()).unwrap_or(u32::MAX))
}

/// The vhost-user socket serves: units ordered after this one may start (and the
/// watchdog's timeout is the unit's again, after a restart that stretched it).
pub fn ready(status: &str) {
    let status = one_line(status);
    match watchdog_usec() {
        Some(usec) => send(
            "we are ready",
            &[
                NotifyState::Ready,
                NotifyState::Status(&status),
                NotifyState::WatchdogUsec(usec),
            ],
        ),
        None => send(
            "we are ready",
            &[NotifyState::Ready, NotifyState::Status(&status)],
        ),
    }
}

/// This process executes itself anew to rejoin the cluster: the watchdog waits
/// [`RESTART_WATCHDOG`] for the new process to serve.
pub fn watchdog_for_restart() {
    if watchdog_usec().is_some() {
        let usec = u32::try_from(RESTART_WATCHDOG.as_micros()).unwrap_or(u32::MAX);
        send("the restart", &[NotifyState::WatchdogUsec(usec)]);
    }
}

/// A STATUS value is one line of the notification.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Shutdown has begun; `status` says what it does.
pub fn stopping(status: &str) {
    send(
        "we stop",
        &[NotifyState::Stopping, NotifyState::Status(status)],
    );
}

/// One line on the array for `systemctl status`.
pub fn status_line(s: &super::control::Status) -> String {
    let in_sync = s.legs.iter().filter(|l| l.state == "in-sync").count();
    let mut line = format!(
        "array {}: {}/{} legs in sync{}, {} dirty chunks",
        s.uuid,
        in_sync,
        s.raid_disks,
        if s.degraded { " (DEGRADED)" } else { "" },
        s.bitmap_dirty
    );
    if s.resync.active {
        line.push_str(&format!(
            ", {} {}/{} chunks",
            s.resync.kind,
            s.resync.done_chunks,
            s.resync.done_chunks + s.resync.remaining_chunks
        ));
    }
    if let Some(why) = &s.fenced {
        line.push_str(&format!(", FENCED: {why}"));
    }
    one_line(&line)
}

/// Starts the thread that refreshes the STATUS line and, when the unit has a
/// watchdog, keeps it fed while the array answers; nothing under systemd-less runs.
pub fn spawn_keepalive(service: Arc<Service>) -> std::io::Result<()> {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Ok(());
    }
    let watchdog = sd_notify::watchdog_enabled();
    let every = watchdog.map_or(STATUS_INTERVAL, |w| (w / 2).min(STATUS_INTERVAL));
    debug!("systemd keep-alive every {every:?} (watchdog {watchdog:?})");
    std::thread::Builder::new()
        .name("sd-notify".into())
        .spawn(move || loop {
            // Also while the node stops (a drain may take long): the watchdog is
            // fed as long as the array answers; the STATUS line then says "stopping".
            let line = status_line(&super::control::status(&service));
            let stopping = service.stopping.load(Ordering::SeqCst);
            match (watchdog.is_some(), stopping) {
                (true, false) => send(
                    "we are alive",
                    &[NotifyState::Watchdog, NotifyState::Status(&line)],
                ),
                (true, true) => send("we are alive", &[NotifyState::Watchdog]),
                (false, false) => send("our status", &[NotifyState::Status(&line)]),
                (false, true) => return,
            }
            std::thread::sleep(every);
        })
        .map(drop)
}
