//! What an OCI spec's mount entry is, by the rule runc and containerd read it with.

/// Whether a spec's mount of this `type` and these `options` is a bind mount: type `bind`, or
/// a `bind` or `rbind` option with any type (runc takes `"type": "none"` with `rbind` as one).
pub fn is_bind(typ: Option<&str>, options: &[String]) -> bool {
    typ == Some("bind") || options.iter().any(|o| o == "bind" || o == "rbind")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bind_type_or_a_bind_option_makes_a_bind_mount() {
        let opts = |o: &[&str]| o.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(is_bind(Some("bind"), &[]));
        assert!(is_bind(Some("none"), &opts(&["rbind", "ro"])));
        assert!(is_bind(None, &opts(&["bind"])));
        assert!(!is_bind(Some("tmpfs"), &opts(&["nosuid", "rbinds"])));
        assert!(!is_bind(None, &[]));
    }
}
