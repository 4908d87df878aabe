//! containerd's identifier rule, for task and exec ids that end up in paths.

use crate::error::{Error, Result};

const MAX: usize = 76;

/// `^[A-Za-z0-9]+([._-][A-Za-z0-9]+)*$`, at most 76 characters.
pub fn check(field: &str, id: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::InvalidArgument(format!("{field} {id:?}: {why}")));
    if id.is_empty() {
        return bad("must not be empty");
    }
    if id.len() > MAX {
        return bad("longer than 76 characters");
    }
    let mut prev_sep = true;
    for c in id.chars() {
        let sep = matches!(c, '.' | '_' | '-');
        if !(c.is_ascii_alphanumeric() || sep) {
            return bad("only letters, digits, '.', '_' and '-' are allowed");
        }
        if sep && prev_sep {
            return bad("must start with a letter or digit, and separators must not repeat");
        }
        prev_sep = sep;
    }
    if prev_sep {
        return bad("must end with a letter or digit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn ids() {
        for ok in ["a", "t1", "abc.def_g-h", "A9"] {
            check("id", ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a..b",
            "a/b",
            "../x",
            "a b",
            &"x".repeat(77),
        ] {
            let e = check("id", bad).unwrap_err().to_string();
            assert!(e.starts_with("id "), "{e}");
        }
    }
}
