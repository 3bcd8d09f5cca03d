//! Recovery after a daemon died: who was in each lockspace, kept in a file next to
//! the socket (`<socket>.members`), so that a daemon started on the same socket
//! knows which processes lost their locks with it.
//!
//! A member that was alive when its daemon died may still have writes on their
//! way to the legs (it drains them before it comes back). Until each such member
//! has come back or is gone, nobody is admitted into its lockspace: the first node
//! back would take over the other's node slot and resync its chunks while those
//! writes can still land, over newer data. The kernel's DLM waits in the same way
//! for a failed node to be fenced before its locks are recovered.

use log::{info, warn};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A process, told apart from a later one with the same pid by its start time
/// (which `exec` keeps: a node that starts over by executing itself is the same
/// member).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// Its pid.
    pub pid: i32,
    /// When it started, in clock ticks after boot (`/proc/PID/stat`, field 22).
    pub start: u64,
}

impl Process {
    /// Process `pid` as it is now, if it exists.
    pub fn of(pid: i32) -> Option<Process> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) is in parentheses and may hold spaces.
        let after = &stat[stat.rfind(')')? + 1..];
        let start = after.split_whitespace().nth(19)?.parse().ok()?;
        Some(Process { pid, start })
    }

    /// Whether this very process is still there (a zombie counts: its I/O may
    /// not be over).
    pub fn alive(&self) -> bool {
        Process::of(self.pid) == Some(*self)
    }
}

/// Members per lockspace.
type Members = BTreeMap<String, Vec<Process>>;

/// The members file and what it says.
pub struct Recovery {
    file: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The members now.
    current: Members,
    /// Members of the previous daemon that have neither come back nor gone.
    waiting: Members,
}

impl Recovery {
    /// The members file of the daemon on `socket`; what a previous daemon left in
    /// it becomes the members to wait for.
    pub fn load(socket: &Path) -> Recovery {
        let mut name = socket.as_os_str().to_owned();
        name.push(".members");
        let file = PathBuf::from(name);
        let previous: Members = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                warn!(
                    "{}: unreadable ({e}); no member to wait for",
                    file.display()
                );
                Members::new()
            }),
            Err(_) => Members::new(),
        };
        let mut waiting = Members::new();
        for (ls, procs) in previous {
            let alive: Vec<Process> = procs.into_iter().filter(Process::alive).collect();
            if !alive.is_empty() {
                let pids: Vec<i32> = alive.iter().map(|p| p.pid).collect();
                info!(
                    "lockspace {ls}: members of the previous daemon still alive ({pids:?}); nobody is admitted until they are back or gone"
                );
                waiting.insert(ls, alive);
            }
        }
        let r = Recovery {
            file,
            state: Mutex::new(State {
                current: Members::new(),
                waiting,
            }),
        };
        r.save(&r.lock());
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits `who` (`None`: a peer whose pid is unknown) into `lockspace`, or
    /// says why not yet: a member of the previous daemon there is alive and has
    /// not come back. A member coming back is no longer waited for.
    pub fn admit(&self, lockspace: &str, who: Option<Process>) -> Result<(), String> {
        let mut st = self.lock();
        let Some(waiting) = st.waiting.get_mut(lockspace) else {
            return Ok(());
        };
        waiting.retain(|p| Some(*p) != who && p.alive());
        if waiting.is_empty() {
            st.waiting.remove(lockspace);
            info!("lockspace {lockspace}: every member of the previous daemon is back or gone");
            self.save(&st);
            return Ok(());
        }
        let pids: Vec<String> = waiting.iter().map(|p| p.pid.to_string()).collect();
        Err(format!(
            "lockspace {lockspace} is recovering: the previous lockd died while pid {} was a member; it may still have writes in flight, and nobody joins until it is back or gone",
            pids.join(", pid ")
        ))
    }

    /// `who` joined `lockspace`.
    pub fn joined(&self, lockspace: &str, who: Process) {
        let mut st = self.lock();
        st.current
            .entry(lockspace.to_string())
            .or_default()
            .push(who);
        self.save(&st);
    }

    /// `who` left `lockspace`.
    pub fn left(&self, lockspace: &str, who: Process) {
        let mut st = self.lock();
        if let Some(v) = st.current.get_mut(lockspace) {
            if let Some(i) = v.iter().position(|p| *p == who) {
                v.swap_remove(i);
            }
            if v.is_empty() {
                st.current.remove(lockspace);
            }
        }
        self.save(&st);
    }

    /// Writes the members now, and those still waited for (a daemon started
    /// after this one dies waits for them too), to the file: whole, as a new
    /// file renamed over the old.
    fn save(&self, st: &State) {
        let mut members = st.current.clone();
        for (ls, procs) in &st.waiting {
            members.entry(ls.clone()).or_default().extend(procs);
        }
        let mut tmp = self.file.as_os_str().to_owned();
        tmp.push(".new");
        let tmp = PathBuf::from(tmp);
        let written = serde_json::to_vec(&members)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.file));
        if let Err(e) = written {
            warn!(
                "{}: {e}; a daemon started after this one dies will not wait for these members",
                self.file.display()
            );
        }
    }
}
