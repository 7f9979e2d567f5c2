//! The queue's decisions: FIFO pending list, the engines' slots and placement by labels,
//! superseding, cancel. The host loop owns one [`Queue`] and applies what it decides; nothing
//! here does IO.

use std::collections::VecDeque;

pub type BuildId = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: BuildId,
    pub project: String,
    pub branch: Option<String>,
    /// The project's only-build-latest option, read when the build was queued.
    pub only_latest: bool,
    /// The engine labels the build needs (pipeline.json `docker.labels`), sorted, no repeats.
    pub labels: Vec<String>,
}

/// One engine as the queue sees it: what it offers and how busy it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSlots {
    pub name: String,
    pub slots: usize,
    pub labels: Vec<String>,
    /// Builds running on it.
    pub in_use: usize,
    /// Whether it answered its last ping; an engine that did not takes no new builds.
    pub healthy: bool,
}

impl EngineSlots {
    pub fn new(name: &str, slots: usize, labels: &[String]) -> Self {
        EngineSlots {
            name: name.to_string(),
            slots: slots.max(1),
            labels: labels.to_vec(),
            in_use: 0,
            healthy: true,
        }
    }

    fn offers(&self, labels: &[String]) -> bool {
        labels.iter().all(|l| self.labels.contains(l))
    }
}

/// What the queue says to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Start the build on the engine of this index (its slot is taken).
    Start(Queued, usize),
    /// No engine of the pool has the build's labels: it can never run, end it with the reason.
    Impossible(Queued, String),
}

#[derive(Debug)]
pub struct Queue {
    pending: VecDeque<Queued>,
    /// Active builds and the index of the engine each runs on.
    active: Vec<(BuildId, usize)>,
    engines: Vec<EngineSlots>,
}

/// Sorts and dedups a label list, the form [`Queued::labels`] holds.
pub fn label_set(labels: &[String]) -> Vec<String> {
    let mut v = labels.to_vec();
    v.sort();
    v.dedup();
    v
}

impl Queue {
    /// One engine without labels and `max_active` slots.
    pub fn new(max_active: usize) -> Self {
        Self::with_engines(vec![EngineSlots::new("local", max_active, &[])])
    }

    pub fn with_engines(engines: Vec<EngineSlots>) -> Self {
        Queue {
            pending: VecDeque::new(),
            active: Vec::new(),
            engines,
        }
    }

    /// Adds a build at the back. Returns the pending builds it supersedes (to end as SKIP).
    pub fn push(&mut self, mut b: Queued) -> Vec<BuildId> {
        b.labels = label_set(&b.labels);
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

    /// Whether some engine of the pool, healthy or not, has every one of `labels`.
    pub fn can_place(&self, labels: &[String]) -> bool {
        self.engines.iter().any(|e| e.offers(labels))
    }

    /// Why no engine can take builds with `labels`.
    fn impossible_reason(&self, labels: &[String]) -> String {
        let offered: Vec<String> = self
            .engines
            .iter()
            .map(|e| format!("{} [{}]", e.name, e.labels.join(", ")))
            .collect();
        format!(
            "no engine has every label pipeline.json's docker.labels asks for ({}); the engines \
             offer: {}; change docker.labels or add the labels to an engine in web_conf.json",
            labels.join(", "),
            offered.join("; ")
        )
    }

    /// The engine for a build with `labels` now: healthy, with every label and a free slot,
    /// the least loaded (fewest builds per slot), the first listed among equals.
    fn place(&self, labels: &[String]) -> Option<usize> {
        self.engines
            .iter()
            .enumerate()
            .filter(|(_, e)| e.healthy && e.in_use < e.slots && e.offers(labels))
            .min_by(|(i, a), (j, b)| {
                (a.in_use * b.slots)
                    .cmp(&(b.in_use * a.slots))
                    .then(i.cmp(j))
            })
            .map(|(i, _)| i)
    }

    /// What to do next, if anything: a build no engine can ever take, or the first pending
    /// build that has an engine now. Builds asking for the same labels start in the order they
    /// were queued; one waiting for its engines does not hold back builds of other labels.
    pub fn decide(&mut self) -> Option<Next> {
        if let Some(i) = self.pending.iter().position(|b| !self.can_place(&b.labels)) {
            let b = self.pending.remove(i)?;
            let why = self.impossible_reason(&b.labels);
            return Some(Next::Impossible(b, why));
        }
        let mut blocked: Vec<&[String]> = Vec::new();
        let mut chosen = None;
        for (i, b) in self.pending.iter().enumerate() {
            if blocked.contains(&b.labels.as_slice()) {
                continue;
            }
            match self.place(&b.labels) {
                Some(e) => {
                    chosen = Some((i, e));
                    break;
                }
                None => blocked.push(&b.labels),
            }
        }
        let (i, e) = chosen?;
        let b = self.pending.remove(i)?;
        self.active.push((b.id, e));
        self.engines[e].in_use += 1;
        Some(Next::Start(b, e))
    }

    /// Undoes a start: the build leaves its slot and is first in line again (when its start
    /// could not be recorded, say).
    pub fn put_back(&mut self, b: Queued) {
        self.finish(b.id);
        self.pending.push_front(b);
    }

    /// Removes a pending build; false when it is not pending.
    pub fn remove_pending(&mut self, id: BuildId) -> bool {
        let before = self.pending.len();
        self.pending.retain(|p| p.id != id);
        self.pending.len() != before
    }

    /// Marks an active build as finished, freeing its engine's slot.
    pub fn finish(&mut self, id: BuildId) -> bool {
        match self.active.iter().position(|(a, _)| *a == id) {
            Some(i) => {
                let (_, e) = self.active.remove(i);
                if let Some(engine) = self.engines.get_mut(e) {
                    engine.in_use = engine.in_use.saturating_sub(1);
                }
                true
            }
            None => false,
        }
    }

    /// Records whether engine `i` answers; an engine that does not takes no new builds.
    pub fn set_healthy(&mut self, i: usize, healthy: bool) {
        if let Some(e) = self.engines.get_mut(i) {
            e.healthy = healthy;
        }
    }

    /// The engine an active build runs on.
    pub fn engine_of(&self, id: BuildId) -> Option<usize> {
        self.active.iter().find(|(a, _)| *a == id).map(|(_, e)| *e)
    }

    pub fn engines(&self) -> &[EngineSlots] {
        &self.engines
    }

    pub fn is_active(&self, id: BuildId) -> bool {
        self.active.iter().any(|(a, _)| *a == id)
    }

    pub fn is_pending(&self, id: BuildId) -> bool {
        self.pending.iter().any(|p| p.id == id)
    }

    pub fn pending(&self) -> impl Iterator<Item = &Queued> {
        self.pending.iter()
    }

    /// The active builds, in the order they started.
    pub fn active(&self) -> impl Iterator<Item = BuildId> + '_ {
        self.active.iter().map(|(a, _)| *a)
    }

    pub fn active_count(&self) -> usize {
        self.active.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(id: BuildId, branch: &str, latest: bool) -> Queued {
        ql(id, branch, latest, &[])
    }

    fn ql(id: BuildId, branch: &str, latest: bool, labels: &[&str]) -> Queued {
        Queued {
            id,
            project: "p".into(),
            branch: Some(branch.into()),
            only_latest: latest,
            labels: labels.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn started(queue: &mut Queue) -> Option<(BuildId, usize)> {
        match queue.decide()? {
            Next::Start(b, e) => Some((b.id, e)),
            Next::Impossible(b, why) => panic!("build {} impossible: {why}", b.id),
        }
    }

    fn engine(name: &str, slots: usize, labels: &[&str]) -> EngineSlots {
        let labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        EngineSlots::new(name, slots, &labels)
    }

    #[test]
    fn fifo_with_bounded_slots() {
        let mut queue = Queue::new(2);
        for i in 1..=4 {
            assert!(queue.push(q(i, "main", false)).is_empty());
        }
        assert_eq!(started(&mut queue), Some((1, 0)));
        assert_eq!(started(&mut queue), Some((2, 0)));
        assert!(queue.decide().is_none(), "third slot must not open");
        assert!(queue.finish(1));
        assert!(!queue.finish(1), "a slot is freed once");
        assert_eq!(started(&mut queue), Some((3, 0)));
        assert!(queue.decide().is_none());
    }

    #[test]
    fn newer_build_supersedes_pending_same_branch() {
        let mut queue = Queue::new(1);
        queue.push(q(1, "main", true));
        assert_eq!(started(&mut queue).unwrap().0, 1);
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
        let Some(Next::Start(first, _)) = queue.decide() else {
            panic!("nothing started")
        };
        assert!(queue.decide().is_none());
        queue.put_back(first);
        assert!(!queue.is_active(1));
        assert_eq!(queue.engines()[0].in_use, 0);
        let ids: Vec<_> = queue.pending().map(|p| p.id).collect();
        assert_eq!(ids, vec![1, 2]);
        assert_eq!(started(&mut queue).unwrap().0, 1);
    }

    #[test]
    fn cancel_pending_leaves_queue() {
        let mut queue = Queue::new(1);
        queue.push(q(1, "a", false));
        queue.push(q(2, "a", false));
        assert!(queue.remove_pending(2));
        assert!(!queue.remove_pending(2));
        assert_eq!(started(&mut queue).unwrap().0, 1);
        assert!(queue.decide().is_none());
    }

    #[test]
    fn builds_go_to_an_engine_with_every_label_least_loaded_first() {
        let mut queue = Queue::with_engines(vec![
            engine("a", 2, &["linux"]),
            engine("b", 4, &["linux", "big"]),
        ]);
        for i in 1..=3 {
            queue.push(q(i, "m", false));
        }
        // Empty engines tie: the first listed; then b (0/4) is less loaded than a (1/2); then
        // a (1/2) and b (1/4): b.
        assert_eq!(started(&mut queue), Some((1, 0)));
        assert_eq!(started(&mut queue), Some((2, 1)));
        assert_eq!(started(&mut queue), Some((3, 1)));
        queue.push(ql(4, "m", false, &["big", "linux", "big"]));
        assert_eq!(queue.pending().next().unwrap().labels, ["big", "linux"]);
        assert_eq!(started(&mut queue), Some((4, 1)));
        assert_eq!(queue.engines()[1].in_use, 3);
        assert_eq!(queue.engine_of(4), Some(1));
        assert!(queue.finish(2));
        assert_eq!(queue.engines()[1].in_use, 2);
    }

    #[test]
    fn a_build_no_engine_can_take_is_impossible_at_once() {
        let mut queue = Queue::with_engines(vec![engine("a", 1, &["linux"])]);
        queue.push(q(1, "m", false));
        queue.push(ql(2, "m", false, &["gpu"]));
        match queue.decide() {
            Some(Next::Impossible(b, why)) => {
                assert_eq!(b.id, 2);
                assert!(why.contains("gpu") && why.contains("a [linux]"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!queue.is_pending(2));
        assert_eq!(started(&mut queue).unwrap().0, 1);
    }

    #[test]
    fn fifo_per_label_set_and_a_blocked_set_holds_back_no_other() {
        let mut queue = Queue::with_engines(vec![engine("a", 1, &[]), engine("b", 1, &["big"])]);
        queue.push(ql(1, "m", false, &["big"]));
        queue.push(ql(2, "m", false, &["big"]));
        queue.push(q(3, "m", false));
        queue.push(q(4, "m", false));
        assert_eq!(started(&mut queue), Some((1, 1)));
        // 2 waits for b; 3 may run on a meanwhile, and 4 waits behind 3.
        assert_eq!(started(&mut queue), Some((3, 0)));
        assert!(queue.decide().is_none());
        // b frees: 2 goes before 4 (4 could run on b too, but 2 was first).
        queue.finish(1);
        assert_eq!(started(&mut queue), Some((2, 1)));
        assert!(queue.decide().is_none());
        queue.finish(3);
        assert_eq!(started(&mut queue), Some((4, 0)));
    }

    #[test]
    fn an_unhealthy_engine_takes_no_new_builds_until_it_answers() {
        let mut queue = Queue::with_engines(vec![engine("a", 2, &[]), engine("b", 2, &[])]);
        queue.set_healthy(0, false);
        queue.push(q(1, "m", false));
        queue.push(q(2, "m", false));
        queue.push(q(3, "m", false));
        assert_eq!(started(&mut queue), Some((1, 1)));
        assert_eq!(started(&mut queue), Some((2, 1)));
        assert!(queue.decide().is_none(), "a is down and b is full");
        queue.set_healthy(0, true);
        assert_eq!(started(&mut queue), Some((3, 0)));
        // A down engine still counts as able to take the labels: waiting, not impossible.
        let mut queue = Queue::with_engines(vec![engine("a", 1, &["x"])]);
        queue.set_healthy(0, false);
        queue.push(ql(1, "m", false, &["x"]));
        assert!(queue.decide().is_none());
    }
}
