//! A container's bind mounts, given sources in the guest: the host cannot name its own paths
//! here, so it lists each bind mount of the spec as a [`Volume`]: an entry of the read-write
//! volume share (a host file or directory the host bound into it, reached over 9p) or the pod's
//! `/dev/shm` (one guest tmpfs for the pod). A bind mount the host did not list is refused,
//! naming it, rather than binding whatever the guest happens to have at that path.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::Spec;
use yard_agent_protocol::{MAX_VOLUME_NAME, POD_SHM, VOLUME_MOUNT, Volume};

use crate::error::{Error, Result};

/// What the rewritten spec needs mounted in the guest first.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    pub share: bool,
    pub pod_shm: bool,
}

fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

/// Points each listed bind mount of `spec` at its source in the guest; errors name the field.
pub fn apply(spec: &mut Spec, volumes: &[Volume]) -> Result<Needs> {
    let mut needs = Needs::default();
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    let mut given = HashSet::new();
    for (i, v) in volumes.iter().enumerate() {
        let index = v.mount as usize;
        let Some(m) = mounts.get_mut(index) else {
            return Err(Error::InvalidArgument(format!(
                "volumes[{i}].mount: {index} is not a mount of the spec ({} mounts)",
                mounts.len()
            )));
        };
        if !given.insert(index) {
            return Err(Error::InvalidArgument(format!(
                "volumes[{i}].mount: mounts[{index}] is given twice"
            )));
        }
        if !is_bind(m) {
            return Err(Error::InvalidArgument(format!(
                "volumes[{i}].mount: mounts[{index}] is not a bind mount"
            )));
        }
        let source = match (v.shared.is_empty(), v.pod_shm) {
            (false, false) => {
                if !one_component(&v.shared) {
                    return Err(Error::InvalidArgument(format!(
                        "volumes[{i}].shared: {:?} is not one path component of at most \
                         {MAX_VOLUME_NAME} bytes",
                        v.shared
                            .chars()
                            .take(MAX_VOLUME_NAME + 1)
                            .collect::<String>()
                    )));
                }
                needs.share = true;
                Path::new(VOLUME_MOUNT).join(&v.shared)
            }
            (true, true) => {
                needs.pod_shm = true;
                PathBuf::from(POD_SHM)
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "volumes[{i}]: exactly one of shared and pod_shm must be set"
                )));
            }
        };
        m.set_source(Some(source));
        m.set_typ(Some("bind".into()));
    }
    for (index, m) in mounts.iter().enumerate() {
        if is_bind(m) && !given.contains(&index) {
            return Err(Error::InvalidArgument(format!(
                "mounts[{index}]: bind mount of {} into {}: the host gave the guest no source \
                 for it",
                m.source()
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                m.destination().display()
            )));
        }
    }
    spec.set_mounts(Some(mounts));
    Ok(needs)
}

fn one_component(name: &str) -> bool {
    let mut c = Path::new(name).components();
    name.len() <= MAX_VOLUME_NAME
        && !name.contains('/')
        && matches!((c.next(), c.next()), (Some(Component::Normal(_)), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        serde_json::from_str(
            r#"{"ociVersion": "1.0.2",
                "process": {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
                "mounts": [
                  {"destination": "/proc", "type": "proc", "source": "proc"},
                  {"destination": "/dev/shm", "type": "bind", "source": "/run/c/sandboxes/p/shm",
                   "options": ["rbind", "ro"]},
                  {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/c/hosts",
                   "options": ["rbind", "rprivate", "rw"]},
                  {"destination": "/data", "source": "/srv/data", "options": ["rbind"]}
                ]}"#,
        )
        .unwrap()
    }

    fn shared(mount: u32, name: &str) -> Volume {
        Volume {
            mount,
            shared: name.into(),
            ..Default::default()
        }
    }

    fn shm(mount: u32) -> Volume {
        Volume {
            mount,
            pod_shm: true,
            ..Default::default()
        }
    }

    #[test]
    fn listed_binds_get_guest_sources() {
        let mut s = spec();
        let needs = apply(&mut s, &[shm(1), shared(2, "3"), shared(3, "4")]).unwrap();
        assert_eq!(
            needs,
            Needs {
                share: true,
                pod_shm: true
            }
        );
        let m = s.mounts().as_ref().unwrap();
        let sources: Vec<_> = m.iter().map(|m| m.source().clone().unwrap()).collect();
        assert_eq!(
            sources,
            [
                PathBuf::from("proc"),
                PathBuf::from("/run/yard/shm"),
                PathBuf::from("/run/yard/vol/3"),
                PathBuf::from("/run/yard/vol/4"),
            ]
        );
        assert_eq!(m[3].typ().as_deref(), Some("bind"));
        assert_eq!(
            m[1].options().as_ref().unwrap(),
            &["rbind".to_owned(), "ro".to_owned()]
        );
    }

    #[test]
    fn bad_volumes_and_unlisted_binds_are_named() {
        let cases: Vec<(Vec<Volume>, &str)> = vec![
            (
                vec![shm(1), shared(2, "a")],
                "mounts[3]: bind mount of /srv/data",
            ),
            (vec![shared(9, "a")], "volumes[0].mount: 9 is not a mount"),
            (
                vec![shared(0, "a")],
                "volumes[0].mount: mounts[0] is not a bind",
            ),
            (
                vec![shm(1), shm(1)],
                "volumes[1].mount: mounts[1] is given twice",
            ),
            (vec![shared(2, "../x")], "volumes[0].shared: "),
            (vec![shared(2, "a/b")], "volumes[0].shared: "),
            (vec![shared(2, ".")], "volumes[0].shared: "),
            (vec![shared(2, &"x".repeat(65))], "volumes[0].shared: "),
            (vec![shared(2, "")], "volumes[0]: exactly one"),
            (
                vec![Volume {
                    mount: 2,
                    shared: "a".into(),
                    pod_shm: true,
                    ..Default::default()
                }],
                "volumes[0]: exactly one",
            ),
        ];
        for (volumes, want) in cases {
            match apply(&mut spec(), &volumes) {
                Err(Error::InvalidArgument(m)) => assert!(m.starts_with(want), "{m} vs {want}"),
                other => panic!("{volumes:?}: {other:?}"),
            }
        }
    }
}
