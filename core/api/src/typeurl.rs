//! `google.protobuf.Any` helpers following containerd's `typeurl` conventions: protobuf
//! messages are named by their full protobuf name (no `type.googleapis.com/` prefix), the OCI
//! runtime spec is JSON under its registered URL.

use prost::{Message, Name};
use prost_types::Any;

/// The type URL containerd registers for the OCI runtime spec (a JSON payload).
pub const OCI_SPEC: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// The type URL containerd registers for an OCI process spec (a JSON payload, used by exec).
pub const OCI_PROCESS: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
/// The type URL of containerd's cgroup resource updates (a JSON `LinuxResources`).
pub const OCI_LINUX_RESOURCES: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

/// Wraps a protobuf message the way containerd's typeurl does.
pub fn to_any<M: Message + Name>(msg: &M) -> Any {
    Any {
        type_url: M::full_name(),
        value: msg.encode_to_vec(),
    }
}

/// Whether `any` holds an `M`; accepts both containerd's bare name and the
/// `type.googleapis.com/` form other protobuf stacks write.
pub fn is<M: Name>(any: &Any) -> bool {
    let name = M::full_name();
    any.type_url == name || any.type_url.rsplit('/').next() == Some(name.as_str())
}

/// Decodes `any` as an `M`, or `None` when it holds another type.
pub fn from_any<M: Message + Name + Default>(any: &Any) -> Option<Result<M, prost::DecodeError>> {
    is::<M>(any).then(|| M::decode(any.value.as_slice()))
}

/// Wraps a JSON payload under a registered type URL.
pub fn json_any(type_url: &str, json: Vec<u8>) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: json,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containerd::events::TaskExit;

    #[test]
    fn event_type_urls_match_containerd() {
        let any = to_any(&TaskExit {
            container_id: "c".into(),
            ..Default::default()
        });
        assert_eq!(any.type_url, "containerd.events.TaskExit");
        let back: TaskExit = from_any(&any).unwrap().unwrap();
        assert_eq!(back.container_id, "c");
        let prefixed = Any {
            type_url: "type.googleapis.com/containerd.events.TaskExit".into(),
            value: any.value.clone(),
        };
        assert!(is::<TaskExit>(&prefixed));
        assert!(from_any::<crate::containerd::events::TaskStart>(&any).is_none());
    }
}
