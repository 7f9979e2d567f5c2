//! Child processes started in a process group of their own (`process_group(0)`), so that a
//! stop reaches everything they started and a Ctrl-C in the host's terminal reaches only the
//! host.

use rustix::process::{kill_process_group, Pid, Signal};

/// Kills a child's whole process group when dropped, unless [`GroupKill::reaped`] said the
/// child ended normally. Made right after the spawn and dropped before the child (declare it
/// after the child): a cancel or a timeout that drops the future running the child, at any
/// await, then takes what the child started (`a | b`, `a &`, git's ssh) with it. While the
/// child is not reaped, its zombie holds its number, which is also the group's, so the kill
/// never reaches another group.
pub struct GroupKill(Option<Pid>);

impl GroupKill {
    /// For a child spawned with `process_group(0)`; `id` is its process id.
    pub fn new(id: Option<u32>) -> Self {
        GroupKill(id.and_then(|id| Pid::from_raw(i32::try_from(id).ok()?)))
    }

    /// The child was waited for: what it left running in the background stays (the number
    /// may be free now).
    pub fn reaped(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(g) = self.0.take() {
            let _ = kill_process_group(g, Signal::KILL);
        }
    }
}
