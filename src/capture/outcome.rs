//! What became of a completion, and the case it teaches, decided from three texts: the document before
//! the completion's position, the text the developer put there (the *region*), and what follows it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Accepted,
    Rejected,
    Corrected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Rejected => "rejected",
            Outcome::Corrected => "corrected",
        }
    }
}

impl std::str::FromStr for Outcome {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Outcome::Accepted, Outcome::Rejected, Outcome::Corrected]
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| format!("unknown outcome {s:?}"))
    }
}

/// Failure cases are what a repair fixes; guard cases (accepted completions) are what it must not break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaseKind {
    Failure,
    Guard,
}

impl CaseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CaseKind::Failure => "failure",
            CaseKind::Guard => "guard",
        }
    }
}

impl std::str::FromStr for CaseKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "failure" => Ok(CaseKind::Failure),
            "guard" => Ok(CaseKind::Guard),
            other => Err(format!("unknown case kind {other:?} (failure or guard)")),
        }
    }
}

/// A case as CONTRACT.md's cases-JSONL has it: the cursor sits between `prefix` and `target`, `target`
/// runs to the end of that line, `suffix` is everything after that line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseText {
    pub kind: CaseKind,
    pub outcome: Outcome,
    pub prefix: String,
    pub target: String,
    pub suffix: String,
    pub proposed: String,
}

/// How the region compares with the proposal, line by line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing typed yet, or only part of the proposal's first line: it may still go either way.
    Undecided,
    /// The proposal, or its first lines up to a line boundary, is what the developer has.
    Accepted,
    /// The developer's text departs from the proposal on this line of the region.
    Diverged { line: usize },
}

pub fn compare(proposed: &str, region: &str) -> Verdict {
    if region.is_empty() {
        return Verdict::Undecided;
    }
    let region_lines: Vec<&str> = region.split('\n').collect();
    for (i, want) in proposed.split('\n').enumerate() {
        let Some(have) = region_lines.get(i) else {
            return Verdict::Accepted;
        };
        let (want, have) = (want.trim_end(), have.trim_end());
        if want == have {
            continue;
        }
        let region_ends_here = i + 1 == region_lines.len();
        // The region stops inside this line (an editor's auto-indent counts as nothing typed yet).
        if region_ends_here && (have.trim().is_empty() || want.starts_with(have)) {
            return if i == 0 {
                Verdict::Undecided
            } else {
                Verdict::Accepted
            };
        }
        return Verdict::Diverged { line: i };
    }
    Verdict::Accepted
}

/// The case a finished completion teaches, or `None` when it teaches nothing (nothing typed, only part
/// of the proposal typed, or an empty proposal the developer left empty).
pub fn judge(
    before: &str,
    region: &str,
    after: &str,
    proposed: &str,
    was_accepted: bool,
) -> Option<CaseText> {
    let (kind, outcome, line) = match compare(proposed, region) {
        Verdict::Undecided => return None,
        // "The model proposed nothing and the developer wrote nothing" guards nothing.
        Verdict::Accepted if proposed.trim().is_empty() => return None,
        Verdict::Accepted => (CaseKind::Guard, Outcome::Accepted, 0),
        Verdict::Diverged { line } => {
            let outcome = if was_accepted {
                Outcome::Corrected
            } else {
                Outcome::Rejected
            };
            (CaseKind::Failure, outcome, line)
        }
    };
    // The cursor of the case: the start of the region's `line`-th line.
    let skipped: usize = region.split('\n').take(line).map(|l| l.len() + 1).sum();
    let text = format!("{before}{region}{after}");
    let cursor = before.len() + skipped;
    let line_end = text[cursor..].find('\n').map_or(text.len(), |i| cursor + i);
    let target = text[cursor..line_end].trim_end();
    if kind == CaseKind::Failure && target.is_empty() {
        return None; // the developer deleted the line: nothing to aim at
    }
    Some(CaseText {
        kind,
        outcome,
        prefix: text[..cursor].to_owned(),
        target: target.to_owned(),
        suffix: text.get(line_end + 1..).unwrap_or_default().to_owned(),
        proposed: proposed.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_line_by_line() {
        assert_eq!(compare("a + b", ""), Verdict::Undecided);
        assert_eq!(compare("a + b", "a +"), Verdict::Undecided);
        assert_eq!(compare("a + b", "a + b"), Verdict::Accepted);
        assert_eq!(compare("a + b", "a + b  \n    "), Verdict::Accepted);
        assert_eq!(compare("a + b", "a - b"), Verdict::Diverged { line: 0 });
        assert_eq!(compare("a + b", "a + bc"), Verdict::Diverged { line: 0 });
        assert_eq!(compare("", "x = 1"), Verdict::Diverged { line: 0 });
        // Multi-line: the first line accepted, Enter pressed, auto-indent only.
        assert_eq!(
            compare("x = 1\n    y = 2", "x = 1\n        "),
            Verdict::Accepted
        );
        assert_eq!(
            compare("x = 1\n    y = 2", "x = 1\n    y = 3"),
            Verdict::Diverged { line: 1 }
        );
    }

    #[test]
    fn cases_follow_the_contract() {
        // Rejected on the first line: target runs to the end of the line, past the original ")".
        let c = judge("f(", "a, c", ")\nnext\n", "a, b", false).unwrap();
        assert_eq!(c.kind, CaseKind::Failure);
        assert_eq!(c.outcome, Outcome::Rejected);
        assert_eq!((c.prefix.as_str(), c.target.as_str()), ("f(", "a, c)"));
        assert_eq!(c.suffix, "next\n");
        // Accepted: a guard case at the same place.
        let g = judge("    return ", "a + b", "\n", "a + b", true).unwrap();
        assert_eq!(
            (g.kind, g.target.as_str(), g.suffix.as_str()),
            (CaseKind::Guard, "a + b", "")
        );
        // Corrected on the second line of a block: the case's cursor is that line's start.
        let c = judge(
            "def f():\n",
            "    x = 1\n    y = 3",
            "\n",
            "    x = 1\n    y = 2",
            true,
        )
        .unwrap();
        assert_eq!(c.outcome, Outcome::Corrected);
        assert_eq!(c.prefix, "def f():\n    x = 1\n");
        assert_eq!(c.target, "    y = 3");
        // Nothing to learn from.
        assert_eq!(judge("x", "", "", "abc", false), None);
        assert_eq!(judge("x", "\n", "", "", false), None);
    }
}
