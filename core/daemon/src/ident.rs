//! containerd's identifier rule, used for namespaces, container ids, lease ids and runtime names:
//! alphanumeric components joined by single `.`, `_` or `-`, at most 76 bytes.

/// Longest identifier containerd accepts.
pub const MAX_LEN: usize = 76;

/// Whether `s` is a valid identifier.
pub fn is_valid(s: &str) -> bool {
    if s.is_empty() || s.len() > MAX_LEN {
        return false;
    }
    let mut prev_sep = true; // no separator first
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            prev_sep = false;
        } else if matches!(c, '.' | '_' | '-') {
            if prev_sep {
                return false;
            }
            prev_sep = true;
        } else {
            return false;
        }
    }
    !prev_sep
}

/// Why an identifier was refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid {what} {value:?}: expected letters and digits joined by single '.', '_' or '-', at most {MAX_LEN} bytes"
)]
pub struct InvalidIdent {
    pub what: &'static str,
    pub value: String,
}

/// Checks `value` as the identifier called `what` in errors.
pub fn check(what: &'static str, value: &str) -> Result<(), InvalidIdent> {
    if is_valid(value) {
        Ok(())
    } else {
        Err(InvalidIdent {
            what,
            value: value.to_owned(),
        })
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
            "my_ctr-2.x",
            &"a".repeat(76),
        ] {
            assert!(is_valid(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a..b",
            "a/b",
            "../x",
            "a b",
            "ä",
            &"a".repeat(77),
        ] {
            assert!(!is_valid(bad), "{bad}");
        }
    }
}
