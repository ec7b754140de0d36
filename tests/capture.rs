//! Outcome inference: completions followed through the edits an editor sends, as the server applies them.

use star_ls::capture::{CaseKind, Change, Outcome, Resolved, Workspace};
use star_ls::completion::Document;
use std::time::{Duration, Instant};

const KEY: &str = "file:///w/a.py";

/// One open document in a workspace, edited as the server edits it (`Workspace::change`).
struct Session {
    ws: Workspace,
    version: i32,
    now: Instant,
    resolved: Vec<Resolved>,
}

impl Session {
    fn new(text: &str) -> Self {
        let mut ws = Workspace::default();
        ws.open(KEY.into(), Document::new(text, 1, "python"));
        Self {
            ws,
            version: 1,
            now: Instant::now(),
            resolved: Vec::new(),
        }
    }

    fn doc(&self) -> &Document {
        self.ws.document(KEY).unwrap()
    }

    fn offset(&self, line: u32, col: u32) -> usize {
        self.doc().char_at(line, col).unwrap()
    }

    fn show(&mut self, id: Option<&str>, line: u32, col: u32, proposed: &str) {
        let at = self.offset(line, col);
        let r = self.ws.shown(
            KEY,
            self.version,
            id.map(str::to_owned),
            at,
            proposed.into(),
            self.now,
        );
        self.resolved.extend(r.unwrap());
    }

    /// Replaces chars `start..end`, sent as the editor sends it: a range of lines and columns.
    fn replace(&mut self, start: usize, end: usize, text: &str) {
        let range = Some((self.doc().position(start), self.doc().position(end)));
        self.version += 1;
        let change = Change {
            range,
            text: text.into(),
        };
        let r = self.ws.change(KEY, self.version, [change], self.now);
        self.resolved.extend(r.unwrap());
    }

    /// Types `text` one character at a time at (line, col).
    fn type_at(&mut self, line: u32, col: u32, text: &str) {
        for (at, ch) in (self.offset(line, col)..).zip(text.chars()) {
            self.replace(at, at, &ch.to_string());
        }
    }

    /// Decides what is open after `wait` with nothing typed (`captureIdleMs` of 1 s).
    fn idle_after(&mut self, wait: Duration) -> Vec<Resolved> {
        self.ws.idle(self.now + wait, Duration::from_secs(1))
    }

    fn close(&mut self) -> Vec<Resolved> {
        let r = self.ws.close(KEY);
        self.resolved.extend(r);
        std::mem::take(&mut self.resolved)
    }
}

fn cases(resolved: &[Resolved]) -> Vec<(CaseKind, Outcome, &str, &str)> {
    resolved
        .iter()
        .filter_map(|r| r.case.as_ref())
        .map(|c| (c.kind, c.outcome, c.target.as_str(), c.proposed.as_str()))
        .collect()
}

#[test]
fn an_inserted_completion_is_accepted_and_becomes_a_guard_case() {
    let mut s = Session::new("def add(a, b):\n    return \n\nprint(add(1, 2))\n");
    s.show(Some("c1"), 1, 11, "a + b");
    let at = s.offset(1, 11);
    s.replace(at, at, "a + b");
    // The cursor moves on: an edit two lines down decides it.
    let below = s.offset(2, 0);
    s.replace(below, below, "x = 1");
    assert_eq!(
        cases(&s.resolved),
        [(CaseKind::Guard, Outcome::Accepted, "a + b", "a + b")]
    );
    let case = s.resolved[0].case.as_ref().unwrap();
    assert_eq!(case.prefix, "def add(a, b):\n    return ");
    assert_eq!(case.suffix, "x = 1\nprint(add(1, 2))\n");
    assert_eq!(s.resolved[0].completion_id.as_deref(), Some("c1"));
}

#[test]
fn typing_something_else_is_a_rejection_with_the_typed_line_as_target() {
    let mut s = Session::new("def add(a, b):\n    return \n");
    s.show(Some("c1"), 1, 11, "a + b");
    // The editor asks again after each key; those later completions on the same line add no cases.
    s.type_at(1, 11, "a");
    s.show(Some("c2"), 1, 12, " + b");
    s.type_at(1, 12, " - b");
    s.type_at(1, 16, "\n");
    let got = std::mem::take(&mut s.resolved);
    assert_eq!(
        cases(&got),
        [(CaseKind::Failure, Outcome::Rejected, "a - b", "a + b")],
        "{got:?}"
    );
    // Both completions are decided as rejected; the line yields one case.
    let outcomes: Vec<_> = got.iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, [Some(Outcome::Rejected); 2]);
    let rest = s.close();
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn a_block_proposal_typed_over_is_decided_when_enter_ends_the_line() {
    let mut s = Session::new("def add(a, b):\n    \n");
    s.show(Some("c1"), 1, 4, "total = a + b\n    return total");
    s.type_at(1, 4, "return a - b");
    assert!(s.resolved.is_empty(), "still typing: {:?}", s.resolved);
    // Enter with the editor's auto-indent: the line the developer wrote is finished.
    s.type_at(1, 16, "\n    ");
    assert_eq!(
        cases(&s.resolved),
        [(
            CaseKind::Failure,
            Outcome::Rejected,
            "return a - b",
            "total = a + b\n    return total"
        )]
    );
    // A block taken whole and then continued by hand is still open after one Enter.
    let mut s = Session::new("def add(a, b):\n    \n");
    s.show(Some("c2"), 1, 4, "total = a + b\n    return total");
    s.type_at(1, 4, "total = a + b\n    ");
    assert!(s.resolved.is_empty(), "{:?}", s.resolved);
}

#[test]
fn accepted_then_edited_is_a_correction() {
    let mut s = Session::new("xs = [1, 2]\ntotal = \n");
    s.show(Some("c1"), 1, 8, "sum(xs)");
    let at = s.offset(1, 8);
    s.replace(at, at, "sum(xs)");
    s.ws.accept("c1");
    // The developer edits inside the inserted text: sum(xs) -> sum(xs) / len(xs)
    s.type_at(1, 15, " / len(xs)");
    let r = s.close();
    assert_eq!(
        cases(&r),
        [(
            CaseKind::Failure,
            Outcome::Corrected,
            "sum(xs) / len(xs)",
            "sum(xs)"
        )]
    );
}

#[test]
fn a_completion_item_replacing_the_typed_word_counts_as_an_insertion() {
    let mut s = Session::new("import os\nos.pa\n");
    s.show(Some("c1"), 1, 5, "th.join(a, b)");
    // Editors apply list items as "replace `pa` by `path.join(a, b)`".
    let (start, end) = (s.offset(1, 3), s.offset(1, 5));
    s.replace(start, end, "path.join(a, b)");
    let r = s.close();
    assert_eq!(
        cases(&r),
        [(
            CaseKind::Guard,
            Outcome::Accepted,
            "th.join(a, b)",
            "th.join(a, b)"
        )]
    );
}

#[test]
fn changing_the_text_before_the_position_abandons_the_completion() {
    let mut s = Session::new("x = foo\n");
    s.show(Some("c1"), 0, 7, "(1)");
    let end = s.offset(0, 7);
    s.replace(end - 1, end, ""); // backspace
    s.type_at(0, 6, "bar()");
    let r = s.close();
    assert!(cases(&r).is_empty(), "{r:?}");
}

#[test]
fn a_dismissed_completion_with_nothing_typed_is_rejected_without_a_case() {
    let mut s = Session::new("def f():\n    \n");
    s.show(Some("c1"), 1, 4, "pass");
    s.ws.reject("c1");
    let r = s.close();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].outcome, Some(Outcome::Rejected));
    assert!(r[0].case.is_none());
}

#[test]
fn where_the_model_proposed_nothing_the_typed_line_is_a_failure() {
    let mut s = Session::new("def f(n):\n    \n");
    s.show(None, 1, 4, "");
    s.type_at(1, 4, "return n * 2");
    let r = s.close();
    assert_eq!(
        cases(&r),
        [(CaseKind::Failure, Outcome::Rejected, "return n * 2", "")]
    );
    assert_eq!(r[0].completion_id, None);
}

#[test]
fn edits_elsewhere_shift_completions_and_idle_ones_are_decided() {
    let mut s = Session::new("a = 1\nb = \n");
    s.show(Some("c1"), 1, 4, "2");
    s.type_at(1, 4, "3");
    // A line inserted above (a paste elsewhere): the completion keeps its place.
    s.replace(0, 0, "import sys\n");
    let r = std::mem::take(&mut s.resolved);
    // The paste counts as the cursor leaving the line: decided with the shifted text.
    assert_eq!(
        cases(&r),
        [(CaseKind::Failure, Outcome::Rejected, "3", "2")]
    );
    assert_eq!(
        r[0].case.as_ref().unwrap().prefix,
        "import sys\na = 1\nb = "
    );

    s.show(Some("c2"), 2, 5, "\nc = 4");
    s.type_at(2, 5, "\nc = 5");
    assert!(s.idle_after(Duration::from_millis(500)).is_empty());
    let r = s.idle_after(Duration::from_secs(3));
    assert_eq!(
        cases(&r),
        [(CaseKind::Failure, Outcome::Rejected, "c = 5", "\nc = 4")]
    );
}

#[test]
fn an_explicit_correction_is_decided_at_once() {
    let mut s = Session::new("name = \n");
    s.show(Some("c1"), 0, 7, "input()");
    let r = s.ws.correct("c1", "input().strip()").unwrap();
    let c = r.case.unwrap();
    assert_eq!(
        (c.kind, c.outcome, c.target.as_str()),
        (CaseKind::Failure, Outcome::Corrected, "input().strip()")
    );
    assert!(s.close().is_empty(), "decided once only");
}

#[test]
fn a_proposal_nobody_typed_at_is_not_decided_by_idleness() {
    // The developer may look at a proposal a while, and editors may send their edits late.
    let mut s = Session::new("total = \n");
    s.show(Some("c1"), 0, 8, "sum(xs)");
    assert!(s.idle_after(Duration::from_secs(60)).is_empty());
    s.now += Duration::from_secs(60);
    s.type_at(0, 8, "0");
    let r = s.idle_after(Duration::from_secs(2));
    assert_eq!(
        cases(&r),
        [(CaseKind::Failure, Outcome::Rejected, "0", "sum(xs)")]
    );
}

#[test]
fn another_files_edits_reach_the_context_once_the_developer_leaves_it() {
    let mut ws = Workspace::with_other_files();
    let now = Instant::now();
    ws.open(
        "a.py".into(),
        Document::new("def load_rows():\n    pass\n", 1, "python"),
    );
    ws.open("b.py".into(), Document::new("rows = \n", 1, "python"));
    let seen = |ws: &mut Workspace, key: &str| -> String {
        ws.other_files(key, "rows = load_rows() + parse_rows_fast(", "")
            .iter()
            .map(|c| format!("{}:{}", c.path, c.text))
            .collect()
    };
    assert!(seen(&mut ws, "b.py").contains("a.py:def load_rows"));
    let edit = Change {
        range: Some(((2, 0), (2, 0))),
        text: "def parse_rows_fast():\n    pass\n".into(),
    };
    ws.change("a.py", 2, [edit], now).unwrap();
    // Typing in a.py: its own edits are never its context, and b.py's context holds until a.py is left.
    assert!(!seen(&mut ws, "a.py").contains("a.py:"));
    let in_b = seen(&mut ws, "b.py");
    assert!(in_b.contains("parse_rows_fast"), "{in_b}");
    assert!(!seen(&mut ws, "a.py").contains("a.py:"));
}

#[test]
fn a_private_documents_text_reaches_no_other_files_context() {
    let mut ws = Workspace::with_other_files();
    let now = Instant::now();
    ws.open_private(".env".into(), Document::new("SECRET_TOKEN=abc\n", 1, ""));
    ws.open("app.py".into(), Document::new("token = \n", 1, "python"));
    let edit = Change {
        range: Some(((1, 0), (1, 0))),
        text: "OTHER_SECRET_TOKEN=def\n".into(),
    };
    ws.change(".env", 2, [edit], now).unwrap();
    let resolved = ws.close(".env");
    assert!(resolved.is_empty());
    let seen = ws.other_files("app.py", "token = SECRET_TOKEN OTHER_SECRET_TOKEN", "");
    assert!(seen.is_empty(), "{seen:?}");
}

#[test]
fn without_other_files_no_file_is_kept_for_another_files_context() {
    let mut ws = Workspace::default();
    ws.open(
        "a.py".into(),
        Document::new("def load_rows():\n    pass\n", 1, "python"),
    );
    ws.open("b.py".into(), Document::new("rows = \n", 1, "python"));
    assert!(ws.other_files("b.py", "rows = load_rows(", "").is_empty());
}
