//! Capture: what the developer did with each completion (accepted, rejected, corrected), inferred from
//! the edits that follow it, and the failure and guard cases that teaches.
//!
//! Architecture invariant: pure logic over documents and texts; no I/O, no protocol, no clock of its own
//! (callers pass `Instant`s), so every rule is testable alone.

mod outcome;
mod tracker;
mod workspace;

pub use outcome::{compare, judge, CaseKind, CaseText, Outcome, Verdict};
pub use tracker::{Edit, Resolved, Tracker};
pub use workspace::{Change, Unfollowed, Workspace};
