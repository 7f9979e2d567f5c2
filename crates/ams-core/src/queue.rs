//! The queue's decisions: FIFO pending list, bounded active set, superseding, cancel.
//! The host loop owns one [`Queue`] and applies what it decides; nothing here does IO.

use std::collections::VecDeque;

pub type BuildId = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: BuildId,
    pub project: String,
    pub branch: Option<String>,
    /// The project's only-build-latest option, read when the build was queued.
    pub only_latest: bool,
}

#[derive(Debug)]
pub struct Queue {
    pending: VecDeque<Queued>,
    active: Vec<BuildId>,
    max_active: usize,
}

impl Queue {
    pub fn new(max_active: usize) -> Self {
        Queue {
            pending: VecDeque::new(),
            active: Vec::new(),
            max_active: max_active.max(1),
        }
    }

    /// Adds a build at the back. Returns the pending builds it supersedes (to end as SKIP).
    pub fn push(&mut self, b: Queued) -> Vec<BuildId> {
        let mut skipped = Vec::new();
        if b.only_latest {
            self.pending.retain(|p| {
                let same = p.project == b.project && p.branch == b.branch;
                if same {
                    skipped.push(p.id);
                }
                !same
            });
        }
        self.pending.push_back(b);
        skipped
    }

    /// Moves the next pending build to active when a slot is free.
    pub fn start_next(&mut self) -> Option<Queued> {
        if self.active.len() >= self.max_active {
            return None;
        }
        let b = self.pending.pop_front()?;
        self.active.push(b.id);
        Some(b)
    }

    /// Undoes [`Queue::start_next`]: the build leaves its slot and is first in line again
    /// (when its start could not be recorded, say).
    pub fn put_back(&mut self, b: Queued) {
        self.active.retain(|a| *a != b.id);
        self.pending.push_front(b);
    }

    /// Removes a pending build; false when it is not pending.
    pub fn remove_pending(&mut self, id: BuildId) -> bool {
        let before = self.pending.len();
        self.pending.retain(|p| p.id != id);
        self.pending.len() != before
    }

    /// Marks an active build as finished, freeing its slot.
    pub fn finish(&mut self, id: BuildId) -> bool {
        let before = self.active.len();
        self.active.retain(|a| *a != id);
        self.active.len() != before
    }

    /// Puts a build straight into a slot (used for restart recovery bookkeeping and tests).
    pub fn is_active(&self, id: BuildId) -> bool {
        self.active.contains(&id)
    }

    pub fn is_pending(&self, id: BuildId) -> bool {
        self.pending.iter().any(|p| p.id == id)
    }

    pub fn pending(&self) -> impl Iterator<Item = &Queued> {
        self.pending.iter()
    }

    pub fn active(&self) -> &[BuildId] {
        &self.active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(id: BuildId, branch: &str, latest: bool) -> Queued {
        Queued {
            id,
            project: "p".into(),
            branch: Some(branch.into()),
            only_latest: latest,
        }
    }

    #[test]
    fn fifo_with_bounded_slots() {
        let mut queue = Queue::new(2);
        for i in 1..=4 {
            assert!(queue.push(q(i, "main", false)).is_empty());
        }
        assert_eq!(queue.start_next().unwrap().id, 1);
        assert_eq!(queue.start_next().unwrap().id, 2);
        assert!(queue.start_next().is_none(), "third slot must not open");
        assert!(queue.finish(1));
        assert!(!queue.finish(1), "a slot is freed once");
        assert_eq!(queue.start_next().unwrap().id, 3);
        assert!(queue.start_next().is_none());
    }

    #[test]
    fn newer_build_supersedes_pending_same_branch() {
        let mut queue = Queue::new(1);
        queue.push(q(1, "main", true));
        assert_eq!(queue.start_next().unwrap().id, 1);
        queue.push(q(2, "main", true));
        queue.push(q(3, "dev", true));
        assert_eq!(queue.push(q(4, "main", true)), vec![2]);
        assert!(!queue.is_pending(2));
        assert!(queue.is_active(1), "the running build is not superseded");
        let ids: Vec<_> = queue.pending().map(|p| p.id).collect();
        assert_eq!(ids, vec![3, 4]);
    }

    #[test]
    fn a_build_put_back_is_first_in_line_and_frees_its_slot() {
        let mut queue = Queue::new(1);
        queue.push(q(1, "a", false));
        queue.push(q(2, "a", false));
        let first = queue.start_next().unwrap();
        assert!(queue.start_next().is_none());
        queue.put_back(first);
        assert!(!queue.is_active(1));
        let ids: Vec<_> = queue.pending().map(|p| p.id).collect();
        assert_eq!(ids, vec![1, 2]);
        assert_eq!(queue.start_next().unwrap().id, 1);
    }

    #[test]
    fn cancel_pending_leaves_queue() {
        let mut queue = Queue::new(1);
        queue.push(q(1, "a", false));
        queue.push(q(2, "a", false));
        assert!(queue.remove_pending(2));
        assert!(!queue.remove_pending(2));
        assert_eq!(queue.start_next().unwrap().id, 1);
        assert!(queue.start_next().is_none());
    }
}
