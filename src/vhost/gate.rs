//! Whether this node may write the array: the device asks a gate it does not own.
//!
//! In a cluster the gate is the writer role (a lock other nodes see); alone, it is
//! [`LocalGate`]. The backend takes the gate when a front-end starts the first queue
//! and gives it back once every queue stopped and no request is in flight.

use std::sync::Mutex;

/// The writer gate the device uses.
pub trait WriterGate: Send + Sync {
    /// Takes the gate unless it is held or was refused since the last give-back;
    /// may wait (retrying) while another node holds it.
    fn take(&self);
    /// Gives the gate back, or forgets a refusal: the next take tries again.
    fn give_back(&self);
    /// As [`WriterGate::give_back`], but the caller need not wait for other nodes
    /// to learn it (the next take waits for it instead).
    fn give_back_soon(&self) {
        self.give_back();
    }
    /// Whether the gate is held: guest writes may go to the legs.
    fn held(&self) -> bool;
    /// Whether the gate is neither held nor refused (or is being given back).
    fn idle(&self) -> bool;
    /// The state as `status` shows it: `idle`, `held` or `refused`.
    fn state_name(&self) -> &'static str;
    /// Whether other nodes may hold it at the same time (shared writes).
    fn shared(&self) -> bool;
}

/// The gate of the only node of an array: granted whenever taken.
#[derive(Debug, Default)]
pub struct LocalGate {
    held: Mutex<bool>,
}

impl WriterGate for LocalGate {
    fn take(&self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    fn give_back(&self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = false;
    }

    fn held(&self) -> bool {
        *self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn idle(&self) -> bool {
        !self.held()
    }

    fn state_name(&self) -> &'static str {
        if self.held() {
            "held"
        } else {
            "idle"
        }
    }

    fn shared(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_gate_is_held_from_take_to_give_back() {
        let g = LocalGate::default();
        assert!(g.idle() && !g.held());
        assert_eq!(g.state_name(), "idle");
        g.take();
        assert!(g.held() && !g.idle());
        assert_eq!(g.state_name(), "held");
        g.give_back();
        assert!(g.idle());
    }
}
