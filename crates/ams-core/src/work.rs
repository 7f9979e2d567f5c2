//! A count of the work the parsers of untrusted text do, kept only in this crate's test build.
//!
//! Each parser adds the bytes or items it examines. Tests read the count around one call and
//! check it against the input's size, so a scan that turns quadratic fails a test at once,
//! deterministically, instead of making it slow. Outside the test build [`add`] is empty.

#[cfg(test)]
use std::cell::Cell;

#[cfg(test)]
thread_local! {
    static UNITS: Cell<u64> = const { Cell::new(0) };
}

/// Records `n` units of work (bytes or items examined).
#[inline(always)]
pub(crate) fn add(n: usize) {
    #[cfg(test)]
    UNITS.with(|u| u.set(u.get().saturating_add(n as u64)));
    #[cfg(not(test))]
    let _ = n;
}

/// Runs `f` and returns its result with the work it recorded on this thread.
#[cfg(test)]
pub(crate) fn count<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = UNITS.with(Cell::get);
    let r = f();
    (r, UNITS.with(Cell::get) - before)
}

/// The property-test settings of this crate: few cases (the suite runs on small CI machines)
/// and no regression files written into the source tree; a failure prints its minimal input,
/// which then becomes a unit test.
#[cfg(test)]
pub(crate) fn cases(cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..proptest::test_runner::Config::default()
    }
}
