//! containerd's filter syntax, used by `events.v1 Subscribe`, `containers.v1 List` and
//! `tasks.v1 Metrics`: each filter string is a conjunction of selectors separated by `,`
//! (`topic=="/tasks/exit",namespace==default`), and a list of strings matches when any matches.
//!
//! A selector is `fieldpath`, `fieldpath==value`, `fieldpath!=value` or `fieldpath~=regex`;
//! values may be bare, double-quoted, single-quoted or `/slash-quoted/`.

use regex::Regex;

/// Anything filters can look into.
pub trait Adaptor {
    /// The value at `path`, or `None` when the field does not exist.
    fn field(&self, path: &[String]) -> Option<String>;
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// A parsed list of filters; empty matches everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    any_of: Vec<Vec<Selector>>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid filter {filter:?}: {reason}")]
pub struct FilterError {
    pub filter: String,
    pub reason: String,
}

impl crate::error::Classify for FilterError {
    fn kind(&self) -> crate::error::Kind {
        crate::error::Kind::InvalidArgument
    }
}

impl Filter {
    pub fn parse<S: AsRef<str>>(filters: &[S]) -> Result<Filter, FilterError> {
        let mut any_of = Vec::new();
        for f in filters {
            let f = f.as_ref();
            if f.trim().is_empty() {
                continue;
            }
            any_of.push(Parser::new(f).conjunction().map_err(|reason| FilterError {
                filter: f.to_owned(),
                reason,
            })?);
        }
        Ok(Filter { any_of })
    }

    pub fn matches(&self, a: &dyn Adaptor) -> bool {
        self.any_of.is_empty()
            || self.any_of.iter().any(|all| {
                all.iter().all(|s| {
                    let v = a.field(&s.path);
                    match (&s.op, v) {
                        (Op::Present, v) => v.is_some(),
                        (Op::Equal(want), Some(v)) => *want == v,
                        (Op::NotEqual(want), Some(v)) => *want != v,
                        (Op::NotEqual(_), None) => true,
                        (Op::Matches(re), Some(v)) => re.is_match(&v),
                        (_, None) => false,
                    }
                })
            })
    }
}

struct Parser<'a> {
    s: &'a [u8],
    src: &'a str,
    i: usize,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Self {
        Self {
            s: src.as_bytes(),
            src,
            i: 0,
        }
    }

    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn conjunction(&mut self) -> Result<Vec<Selector>, String> {
        let mut out = vec![self.selector()?];
        loop {
            self.skip_ws();
            match self.peek() {
                None => return Ok(out),
                Some(b',') => {
                    self.i += 1;
                    out.push(self.selector()?);
                }
                Some(c) => return Err(format!("unexpected {:?} at {}", c as char, self.i)),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, String> {
        let mut path = vec![self.field()?];
        loop {
            self.skip_ws();
            if self.peek() == Some(b'.') {
                self.i += 1;
                path.push(self.field()?);
            } else {
                break;
            }
        }
        self.skip_ws();
        let rest = &self.s[self.i..];
        let op = if rest.starts_with(b"==") {
            2
        } else if rest.starts_with(b"!=") {
            3
        } else if rest.starts_with(b"~=") {
            4
        } else {
            return Ok(Selector {
                path,
                op: Op::Present,
            });
        };
        self.i += 2;
        // `/regex/` quoting is for `~=`; elsewhere a leading '/' is part of the value, so
        // `topic==/tasks/exit` works unquoted.
        let value = self.value(op == 4)?;
        let op = match op {
            2 => Op::Equal(value),
            3 => Op::NotEqual(value),
            _ => Op::Matches(Regex::new(&value).map_err(|e| format!("bad regex: {e}"))?),
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String, String> {
        self.skip_ws();
        if let Some(q @ (b'"' | b'\'' | b'/')) = self.peek() {
            return self.quoted(q);
        }
        let start = self.i;
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == b'_' {
                self.i += 1;
            } else {
                break;
            }
        }
        if start == self.i {
            return Err(format!("expected a field name at {start}"));
        }
        Ok(self.src[start..self.i].to_owned())
    }

    fn value(&mut self, slash_quotes: bool) -> Result<String, String> {
        self.skip_ws();
        match self.peek() {
            Some(q @ (b'"' | b'\'')) => return self.quoted(q),
            Some(b'/') if slash_quotes => return self.quoted(b'/'),
            _ => {}
        }
        let start = self.i;
        while let Some(c) = self.peek() {
            if c == b',' {
                break;
            }
            self.i += 1;
        }
        let v = self.src[start..self.i].trim();
        if v.is_empty() {
            return Err(format!("expected a value at {start}"));
        }
        Ok(v.to_owned())
    }

    fn quoted(&mut self, q: u8) -> Result<String, String> {
        let start = self.i;
        self.i += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            self.i += 1;
            if c == q {
                return String::from_utf8(out).map_err(|e| e.to_string());
            }
            if c == b'\\' {
                let Some(n) = self.peek() else { break };
                self.i += 1;
                match n {
                    b'n' => out.push(b'\n'),
                    b't' => out.push(b'\t'),
                    // In a /regex/ keep escapes other than the quote for the regex engine.
                    n if q == b'/' && n != b'/' => {
                        out.push(b'\\');
                        out.push(n);
                    }
                    n => out.push(n),
                }
            } else {
                out.push(c);
            }
        }
        Err(format!("unterminated quote at {start}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct M(HashMap<&'static str, &'static str>);
    impl Adaptor for M {
        fn field(&self, path: &[String]) -> Option<String> {
            self.0.get(path.join(".").as_str()).map(|s| s.to_string())
        }
    }

    fn m() -> M {
        M(HashMap::from([
            ("topic", "/tasks/exit"),
            ("namespace", "default"),
            ("labels.app", "web"),
        ]))
    }

    fn ok(filters: &[&str]) -> bool {
        Filter::parse(filters)
            .map_err(|e| format!("{filters:?}: {e}"))
            .unwrap()
            .matches(&m())
    }

    #[test]
    fn selectors_and_alternatives() {
        assert!(ok(&[]));
        assert!(ok(&["topic==\"/tasks/exit\""]));
        assert!(ok(&["topic==/tasks/exit,namespace==default"]));
        assert!(!ok(&["topic==/tasks/exit,namespace==other"]));
        assert!(ok(&["topic==/tasks/start", "namespace==default"]));
        assert!(ok(&["topic~=/exit$/"]));
        assert!(ok(&["topic~=/\\/tasks\\/.*/"]));
        assert!(ok(&["topic~=tasks"]));
        assert!(ok(&["topic~=\"^/tasks/\""]));
        assert!(!ok(&["topic!=/tasks/exit"]));
        assert!(ok(&["labels.app"]));
        assert!(!ok(&["labels.db"]));
        assert!(ok(&["labels.\"app\"==web"]));
        assert!(ok(&["labels.app==web , topic==/tasks/exit"]));
    }

    #[test]
    fn malformed_filters_are_refused() {
        for bad in ["==x", "topic==", "topic==\"open", "topic~=(", "a b"] {
            assert!(Filter::parse(&[bad]).is_err(), "{bad}");
        }
    }
}
