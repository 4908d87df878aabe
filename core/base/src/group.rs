//! Which tasks share one shim process: containerd's runc shim groups the containers of a pod by
//! the CRI's sandbox annotation; Switchyard's shims do the same, and also group by their own
//! annotation or by a runtime's `group` option. The shim kit decides it in `start`; switchyardd
//! decides it the same way to reuse a running shim of the group without running `start`.

/// Annotations that group tasks into one shim: the CRI sandbox, or our own.
pub const GROUP_ANNOTATIONS: [&str; 2] = ["io.kubernetes.cri.sandbox-id", "io.switchyard.group"];

/// The group of a task: the first grouping annotation its spec has (`annotation` looks one up),
/// else the runtime's `group` option. An empty value names no group (one shim per task).
pub fn group_of<'a>(
    annotation: impl Fn(&str) -> Option<&'a str>,
    option: impl FnOnce() -> Option<String>,
) -> Option<String> {
    match GROUP_ANNOTATIONS.iter().find_map(|k| annotation(k)) {
        Some(annotated) => Some(annotated.to_owned()),
        None => option(),
    }
    .filter(|g| !g.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_first_then_option_and_empty_is_none() {
        let none = |_: &str| None;
        assert_eq!(group_of(none, || None), None);
        assert_eq!(
            group_of(none, || Some("fns".into())).as_deref(),
            Some("fns")
        );
        let sandbox = |k: &str| (k == GROUP_ANNOTATIONS[0]).then_some("pod1");
        assert_eq!(
            group_of(sandbox, || Some("fns".into())).as_deref(),
            Some("pod1")
        );
        let ours = |k: &str| (k == GROUP_ANNOTATIONS[1]).then_some("edge");
        assert_eq!(group_of(ours, || None).as_deref(), Some("edge"));
        let empty = |k: &str| (k == GROUP_ANNOTATIONS[1]).then_some("");
        assert_eq!(group_of(empty, || Some("fns".into())), None);
    }
}
