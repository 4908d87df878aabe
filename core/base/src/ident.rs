//! containerd's identifier rule, for namespaces, container, task, exec and lease ids and runtime
//! names — everything that ends up in a path, a cgroup or a socket name: letters and digits joined
//! by single `.`, `_` or `-`, at most 76 bytes (`^[A-Za-z0-9]+([._-][A-Za-z0-9]+)*$`).

use std::fmt;

/// Longest identifier containerd accepts.
pub const MAX_LEN: usize = 76;

/// Why an identifier is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    Empty,
    TooLong,
    BadCharacter,
    /// Starts or ends with a separator, or has two in a row.
    BadSeparator,
}

impl Problem {
    fn describe(self) -> &'static str {
        match self {
            Problem::Empty => "must not be empty",
            Problem::TooLong => "is longer than 76 bytes",
            Problem::BadCharacter => "may hold only letters, digits, '.', '_' and '-'",
            Problem::BadSeparator => {
                "must start and end with a letter or digit, with single '.', '_' or '-' between"
            }
        }
    }
}

/// The problem with `s` as an identifier, if any.
pub fn problem(s: &str) -> Option<Problem> {
    if s.is_empty() {
        return Some(Problem::Empty);
    }
    if s.len() > MAX_LEN {
        return Some(Problem::TooLong);
    }
    let mut prev_sep = true; // no separator first
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            prev_sep = false;
        } else if matches!(c, '.' | '_' | '-') {
            if prev_sep {
                return Some(Problem::BadSeparator);
            }
            prev_sep = true;
        } else {
            return Some(Problem::BadCharacter);
        }
    }
    prev_sep.then_some(Problem::BadSeparator)
}

/// Whether `s` is a valid identifier.
pub fn is_valid(s: &str) -> bool {
    problem(s).is_none()
}

/// An identifier that was refused: names the field and the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidIdent {
    pub what: &'static str,
    pub value: String,
    pub problem: Problem,
}

impl fmt::Display for InvalidIdent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} {:?}: {}",
            self.what,
            self.value,
            self.problem.describe()
        )
    }
}

impl std::error::Error for InvalidIdent {}

/// Checks `value` as the identifier called `what` in errors.
pub fn check(what: &'static str, value: &str) -> Result<(), InvalidIdent> {
    match problem(value) {
        None => Ok(()),
        Some(problem) => Err(InvalidIdent {
            what,
            value: value.to_owned(),
            problem,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_follow_containerd() {
        for ok in [
            "default",
            "k8s.io",
            "a",
            "t1",
            "A9",
            "my_ctr-2.x",
            &"a".repeat(MAX_LEN),
            &"0123456789abcdef".repeat(4), // a CRI id: 64 hex characters
        ] {
            assert!(is_valid(ok), "{ok}");
        }
        for (bad, why) in [
            ("", Problem::Empty),
            ("-a", Problem::BadSeparator),
            ("a-", Problem::BadSeparator),
            ("a..b", Problem::BadSeparator),
            ("a/b", Problem::BadCharacter),
            ("../x", Problem::BadSeparator),
            ("a b", Problem::BadCharacter),
            ("ä", Problem::BadCharacter),
            ("a:b", Problem::BadCharacter),
            (&"a".repeat(MAX_LEN + 1), Problem::TooLong),
        ] {
            assert_eq!(problem(bad), Some(why), "{bad:?}");
        }
    }

    #[test]
    fn the_error_names_the_field_and_value() {
        let e = check("exec id", "a/b").unwrap_err().to_string();
        assert!(e.starts_with("invalid exec id \"a/b\": "), "{e}");
    }
}
