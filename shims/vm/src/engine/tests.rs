//! The engine against a fake VMM and a fake guest agent (`crate::testing`): the sandbox's
//! lifecycle, later containers' images, a VM that dies under its containers, what Create
//! refuses, and OOM events. No root, KVM or QEMU needed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use yard_shim_kit::{Container, Engine, ExecRequest, Publisher};

use super::VmEngine;
use crate::testing::{
    Bundles, EventsServer, FakeAgent, FakeBackends, GuestAgent, RecordingBinder, RecordingPlumber,
    spec_json,
};

const GROUP: (&str, &str) = ("io.switchyard.group", "pod");
const DEADLINE: Duration = Duration::from_secs(10);

struct World {
    dir: tempfile::TempDir,
    agent: Arc<FakeAgent>,
    backends: FakeBackends,
    engine: VmEngine,
    bundles: Bundles,
    binder: Arc<RecordingBinder>,
    plumber: Arc<RecordingPlumber>,
}

impl World {
    fn new(backends: impl FnOnce(GuestAgent) -> FakeBackends) -> World {
        let dir = tempfile::tempdir().unwrap();
        let agent = FakeAgent::new();
        let backends = backends(agent.clone());
        let binder = RecordingBinder::new();
        let plumber = RecordingPlumber::new();
        let engine = VmEngine::with_backends(Arc::new(backends.clone()), dir.path().join("state"))
            .with_binder(binder.clone())
            .with_plumber(plumber.clone());
        let bundles = Bundles::new(dir.path());
        World {
            dir,
            agent,
            backends,
            engine,
            bundles,
            binder,
            plumber,
        }
    }

    /// What the kit does before the shim exits: a VM stopping in the background is gone after.
    async fn shut_down(&self) {
        yard_shim_kit::Engine::shutdown(&self.engine).await;
    }

    async fn create(&self, id: &str, spec: &str) -> yard_shim_kit::Result<Arc<dyn Container>> {
        let req = self.bundles.request(id, spec, Publisher::none());
        self.engine.create(req).await
    }

    /// What is left under the state root: one directory per namespace, empty when no sandbox
    /// is.
    fn state_left(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path().join("state/test"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn sleep() -> String {
    spec_json(&["/bin/sleep", "600"], &[], "")
}

fn grouped_sleep() -> String {
    spec_json(&["/bin/sleep", "600"], &[GROUP], "")
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(DEADLINE, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "not within {DEADLINE:?}: {what}");
}

fn message<T>(r: yard_shim_kit::Result<T>) -> (String, String) {
    match r {
        Ok(_) => panic!("succeeded"),
        Err(e) => (format!("{e:?}"), e.to_string()),
    }
}

#[tokio::test]
async fn the_first_create_boots_the_vm_and_the_last_delete_stops_it() {
    let w = World::new(FakeBackends::sharing);
    let c = w
        .create("c1", &spec_json(&["/bin/echo", "hello", "vm"], &[], ""))
        .await
        .unwrap();
    let vms = w.backends.vms();
    assert_eq!(vms.len(), 1);
    let cfg = &vms[0].config;
    assert_eq!(cfg.root_disk, Some(w.dir.path().join("c1/image.erofs")));
    assert_eq!(cfg.id, "test-c1");
    // Not in a group: no later container can come, so the VM gets no share (no 9p device).
    assert_eq!(cfg.share_dir, None);
    assert!(cfg.state_dir.is_dir());
    let storage = w.agent.storage("c1").unwrap();
    assert_eq!(
        (storage.block_device.as_str(), storage.fstype.as_str()),
        ("/dev/vda", "erofs")
    );

    let init = c.init();
    assert!(init.start().await.unwrap() > 0);
    assert_eq!(init.wait().await.status, 0);
    assert_eq!(w.bundles.stdout("c1"), "hello vm\n");

    c.delete(false).await.unwrap();
    // A VM of its own powers off with its container: the guest is not asked to remove it
    // first (its power-off undoes all that would).
    assert!(w.agent.removed().is_empty(), "{:?}", w.agent.removed());
    // A single container's VM stops in the background; the shim's exit (the engine's
    // shutdown) waits for it.
    w.shut_down().await;
    assert!(vms[0].ended());
    assert_eq!(w.agent.shutdowns(), 1);
    assert!(!cfg.state_dir.exists());
    assert!(w.state_left().is_empty(), "{:?}", w.state_left());
}

#[tokio::test]
async fn a_groups_vm_gets_a_share_and_later_containers_come_and_go_through_it() {
    let w = World::new(FakeBackends::sharing);
    let c1 = w.create("c1", &grouped_sleep()).await.unwrap();
    let c2 = w.create("c2", &grouped_sleep()).await.unwrap();
    let vms = w.backends.vms();
    assert_eq!(vms.len(), 1, "a second VM for the group");
    let share = vms[0]
        .config
        .share_dir
        .clone()
        .expect("a share for the group");
    let storage = w.agent.storage("c2").unwrap();
    assert_eq!(storage.shared_file, "c2.erofs");
    assert_eq!(storage.block_device, "");
    let shared = share.join("c2.erofs");
    // Hard-linked, not copied: the cache and the share are on one filesystem here.
    let ino = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&shared), ino(&w.dir.path().join("c2/image.erofs")));

    c2.init().start().await.unwrap();
    c2.delete(true).await.unwrap();
    assert_eq!(
        w.agent.removed(),
        ["c2"],
        "the guest keeps running the group's VM"
    );
    assert!(!shared.exists());
    assert!(
        !vms[0].ended(),
        "the VM went with a container that was not its last"
    );
    let out = c1.exec(ExecRequest {
        exec_id: "e1".into(),
        stdio: Default::default(),
        spec: br#"{"args": ["/bin/echo", "still"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#
            .to_vec(),
    });
    let p = out.await.unwrap();
    p.start().await.unwrap();
    assert_eq!(p.wait().await.status, 0);

    c1.delete(true).await.unwrap();
    // A group's VM may get another container until its last is gone: each is removed.
    assert_eq!(w.agent.removed(), ["c2", "c1"]);
    assert!(vms[0].ended());
    assert!(!share.exists());
}

/// Issue 19: a pod's VM (switchyardd's sandbox task: no process) boots without a boot disk,
/// sized for the pod, before its containers; containers come and go through the share while the
/// VM stays; killing the task powers the VM off and its delete removes everything.
#[tokio::test]
async fn a_pods_vm_boots_before_its_containers_and_outlives_them() {
    let w = World::new(FakeBackends::sharing);
    let pod_spec = r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"},
        "annotations": {"io.kubernetes.cri.container-type": "sandbox",
                        "io.kubernetes.cri.sandbox-id": "pod",
                        "io.kubernetes.cri.sandbox-cpu-quota": "50000",
                        "io.kubernetes.cri.sandbox-cpu-period": "100000",
                        "io.kubernetes.cri.sandbox-memory": "134217728"}}"#;
    let pod = w.create("pod", pod_spec).await.unwrap();
    let vms = w.backends.vms();
    assert_eq!(vms.len(), 1);
    let cfg = &vms[0].config;
    assert_eq!(
        cfg.root_disk, None,
        "a pod's VM has no container's image to boot"
    );
    assert_eq!((cfg.vcpus, cfg.memory_mib), (2, 256 + 128));
    assert!(cfg.share_dir.is_some(), "later containers need the share");
    assert!(
        w.agent.containers().is_empty(),
        "nothing runs in the guest for the pod"
    );
    let pid = pod.init().start().await.unwrap();
    assert!(pid > 0);
    let (_, text) = message(
        pod.exec(ExecRequest {
            exec_id: "e1".into(),
            stdio: Default::default(),
            spec: br#"{"args": ["/bin/true"], "cwd": "/"}"#.to_vec(),
        })
        .await,
    );
    assert!(text.contains("runs no process"), "{text}");

    let c1 = w.create("c1", &grouped_sleep()).await.unwrap();
    assert_eq!(
        w.backends.vms().len(),
        1,
        "the container joins the pod's VM"
    );
    assert_eq!(w.agent.storage("c1").unwrap().shared_file, "c1.erofs");
    c1.init().start().await.unwrap();
    c1.delete(true).await.unwrap();
    assert!(!vms[0].ended(), "the pod's VM went with its container");

    pod.init().kill(9).await.unwrap();
    assert_eq!(pod.init().wait().await.status, 128 + 9);
    assert!(vms[0].ended());
    pod.delete(false).await.unwrap();
    assert!(w.state_left().is_empty(), "{:?}", w.state_left());
}

#[tokio::test]
async fn without_a_group_a_second_container_is_refused_clearly() {
    let w = World::new(FakeBackends::sharing);
    let _c1 = w.create("c1", &sleep()).await.unwrap();
    let (_, text) = message(w.create("c2", &sleep()).await);
    assert!(
        text.contains("booted for one container") && text.contains("io.switchyard.group"),
        "{text}"
    );
    assert_eq!(w.agent.containers(), ["c1"]);
    assert!(!w.backends.vms()[0].ended());
}

#[tokio::test]
async fn spare_disks_carry_later_containers_and_running_out_is_named() {
    let w = World::new(|a| FakeBackends::with_disks(a, 1));
    let _c1 = w.create("c1", &sleep()).await.unwrap();
    let vm = w.backends.vms()[0].clone();
    assert_eq!(vm.config.share_dir, None);
    let c2 = w.create("c2", &sleep()).await.unwrap();
    assert_eq!(w.agent.storage("c2").unwrap().block_device, "/dev/vdb");
    assert_eq!(vm.disks(), [Some(w.dir.path().join("c2/image.erofs"))]);

    let (debug, text) = message(w.create("c3", &sleep()).await);
    assert!(debug.starts_with("FailedPrecondition"), "{debug}");
    assert!(
        text.contains("fake-builtin backend") && text.contains("at most 2 containers"),
        "{text}"
    );
    c2.delete(true).await.unwrap();
    assert_eq!(vm.disks(), [None]);
    let _c3 = w.create("c3", &sleep()).await.unwrap();
    assert_eq!(w.agent.storage("c3").unwrap().block_device, "/dev/vdb");
    assert_eq!(w.backends.vms().len(), 1);
}

#[tokio::test]
async fn a_vm_that_dies_ends_its_processes_and_the_next_create_boots_a_new_one() {
    let w = World::new(FakeBackends::sharing);
    let c1 = w.create("c1", &grouped_sleep()).await.unwrap();
    let init = c1.init();
    init.start().await.unwrap();
    let vm = w.backends.vms()[0].clone();
    let crashing = vm.clone();
    tokio::task::spawn_blocking(move || crashing.crash())
        .await
        .unwrap();
    // Lost with the VM: reads as killed.
    assert_eq!(init.wait().await.status, 128 + 9);
    // The sandbox is useless now: a new container of the group gets a new VM.
    let c2 = w.create("c2", &grouped_sleep()).await.unwrap();
    assert_eq!(w.backends.vms().len(), 2);
    assert_eq!(w.agent.storage("c2").unwrap().block_device, "/dev/vda");
    // The dead VM's container deletes cleanly (its VM is gone: nothing to remove).
    c1.delete(false).await.unwrap();
    assert!(!w.backends.vms()[1].ended());
    c2.delete(true).await.unwrap();
    assert!(w.backends.vms()[1].ended());
    assert!(w.state_left().is_empty(), "{:?}", w.state_left());
}

#[tokio::test]
async fn unenforceable_security_is_refused_unless_the_options_allow_it() {
    let mut w = World::new(FakeBackends::sharing);
    let seccomp = spec_json(
        &["/bin/sleep", "600"],
        &[],
        r#""linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}}"#,
    );
    let (debug, text) = message(w.create("c1", &seccomp).await);
    assert!(debug.starts_with("InvalidArgument"), "{debug}");
    assert!(
        text.starts_with("config.json: linux.seccomp: ")
            && text.contains("allow_unenforced_security = true"),
        "{text}"
    );
    assert!(
        w.backends.vms().is_empty(),
        "a VM booted for a refused container"
    );

    w.bundles
        .options
        .push_str("allow_unenforced_security = true\n");
    let c1 = w.create("c1", &seccomp).await.unwrap();
    assert_eq!(w.agent.containers(), ["c1"]);
    // An exec with a label the guest cannot apply is refused the same way, unless allowed.
    let exec = |id: &str| ExecRequest {
        exec_id: id.into(),
        stdio: Default::default(),
        spec: br#"{"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                 "apparmorProfile": "x"}"#
            .to_vec(),
    };
    assert!(c1.exec(exec("e1")).await.is_ok());
    c1.delete(true).await.unwrap();

    w.bundles.options = Bundles::new(w.dir.path()).options;
    let c2 = w.create("c2", &sleep()).await.unwrap();
    let (_, text) = message(c2.exec(exec("e2")).await);
    assert!(
        text.starts_with("exec process: apparmorProfile: "),
        "{text}"
    );
}

/// Issue 18: a CRI pod's bind mounts: `/dev/shm` is the pod's guest tmpfs, host files and
/// directories are bound into the volume share (read-only where asked) and taken back with
/// their container; the host's network namespace is left to the guest.
#[tokio::test]
async fn issue18_host_mounts_reach_the_guest_through_the_volume_share() {
    let w = World::new(FakeBackends::sharing);
    let hosts = w.dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let data = w.dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mounts = format!(
        r#""mounts": [
            {{"destination": "/proc", "type": "proc", "source": "proc"}},
            {{"destination": "/dev/shm", "type": "bind", "source": "/run/c/shm", "options": ["rbind", "ro"]}},
            {{"destination": "/etc/hosts", "type": "bind", "source": "{}", "options": ["rbind", "rprivate", "ro"]}},
            {{"destination": "/data", "type": "bind", "source": "{}", "options": ["rbind", "rprivate", "rw"]}}],
           "linux": {{"namespaces": [{{"type": "network", "path": "/var/run/netns/cni-1"}}]}}"#,
        hosts.display(),
        data.display()
    );
    let c1 = w
        .create("c1", &spec_json(&["/pause"], &[GROUP], &mounts))
        .await
        .unwrap();
    let vm = w.backends.vms()[0].clone();
    let vol = vm.config.volume_dir.clone().expect("a volume share");
    assert!(vol.is_dir());
    let (volumes, spec) = w.agent.created("c1").unwrap();
    let v: Vec<_> = volumes
        .iter()
        .map(|v| (v.mount, v.shared.as_str(), v.pod_shm))
        .collect();
    assert_eq!(v, [(1, "", true), (2, "0", false), (3, "1", false)]);
    let namespaces = spec["linux"]["namespaces"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        namespaces.iter().all(|ns| ns["type"] != "network"),
        "the pod's host netns is the guest's own network, not sent to the guest: {namespaces:?}"
    );
    assert_eq!(
        w.binder.calls(),
        [
            format!("bind {} {} ro", hosts.display(), vol.join("0").display()),
            format!("bind {} {}", data.display(), vol.join("1").display()),
        ]
    );

    let c2 = w
        .create("c2", &spec_json(&["/bin/sleep", "1"], &[GROUP], &mounts))
        .await
        .unwrap();
    let (volumes, _) = w.agent.created("c2").unwrap();
    assert_eq!(volumes[1].shared, "2");
    c2.delete(true).await.unwrap();
    let calls = w.binder.calls();
    assert_eq!(
        &calls[calls.len() - 2..],
        [
            format!("unbind {}", vol.join("3").display()),
            format!("unbind {}", vol.join("2").display()),
        ]
    );

    // A source that does not exist fails the create, naming the mount, and leaves nothing.
    let missing = mounts.replace(&data.display().to_string(), "/does/not/exist");
    let (debug, text) = message(
        w.create("c3", &spec_json(&["/bin/true"], &[GROUP], &missing))
            .await,
    );
    assert!(debug.starts_with("InvalidArgument"), "{debug}");
    assert!(
        text.starts_with("config.json: mounts[3] (host path /does/not/exist into /data)"),
        "{text}"
    );
    let calls = w.binder.calls();
    assert_eq!(
        calls.last().unwrap(),
        &format!("unbind {}", vol.join("4").display())
    );
    assert_eq!(w.agent.containers(), ["c1"]);

    c1.delete(true).await.unwrap();
    assert!(vm.ended());
    assert!(!vol.exists());
    assert!(w.state_left().is_empty(), "{:?}", w.state_left());
}

#[tokio::test]
async fn host_mounts_the_guest_cannot_honour_are_refused_before_a_vm_boots() {
    let w = World::new(FakeBackends::sharing);
    let bidi = spec_json(
        &["/bin/true"],
        &[],
        r#""mounts": [{"destination": "/mnt", "type": "bind", "source": "/srv", "options": ["rbind", "rshared"]}]"#,
    );
    let (_, text) = message(w.create("c1", &bidi).await);
    assert!(
        text.starts_with(
            "config.json: mounts[0]: bind mount of host path /srv into /mnt: rshared propagation"
        ),
        "{text}"
    );
    let (_, text) = message(
        w.create(
            "c2",
            r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"}}"#,
        )
        .await,
    );
    assert_eq!(text, "config.json: process: missing");
    assert!(w.backends.vms().is_empty());

    // No shared filesystem on the built-in VMM yet: a host path is refused naming it, the
    // pod's shm is not.
    let w = World::new(|a| FakeBackends::with_disks(a, 1));
    let bind = spec_json(
        &["/bin/true"],
        &[GROUP],
        r#""mounts": [{"destination": "/data", "type": "bind", "source": "/etc"}]"#,
    );
    let (debug, text) = message(w.create("c1", &bind).await);
    assert!(debug.starts_with("FailedPrecondition"), "{debug}");
    assert!(
        text.starts_with("config.json: mounts[0] (host path /etc into /data): the fake-builtin backend has no shared filesystem"),
        "{text}"
    );
    assert!(w.backends.vms().is_empty());
    let shm = spec_json(
        &["/bin/true"],
        &[GROUP],
        r#""mounts": [{"destination": "/dev/shm", "type": "bind", "source": "/run/c/shm"}]"#,
    );
    let c1 = w.create("c1", &shm).await.unwrap();
    assert!(w.agent.created("c1").unwrap().0[0].pod_shm);
    let (_, text) = message(w.create("c2", &bind).await);
    assert!(text.contains("no shared filesystem"), "{text}");
    c1.delete(true).await.unwrap();
}

#[tokio::test]
async fn a_failed_boot_says_why_and_leaves_nothing() {
    let w = World::new(FakeBackends::sharing);
    w.backends
        .fail_boots(Some("Kernel panic - not syncing: fake"));
    let (debug, text) = message(w.create("c1", &grouped_sleep()).await);
    assert!(debug.starts_with("Internal"), "{debug}");
    assert!(text.contains("Kernel panic - not syncing: fake"), "{text}");
    assert!(w.state_left().is_empty(), "{:?}", w.state_left());
    assert!(
        !w.dir
            .path()
            .join("cache/share/test")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some())
    );
    // The failure did not stick: the next create boots.
    w.backends.fail_boots(None);
    let c = w.create("c1", &grouped_sleep()).await.unwrap();
    c.delete(true).await.unwrap();
}

#[tokio::test]
async fn oom_events_are_published_for_the_sandboxs_own_containers_only() {
    let w = World::new(FakeBackends::sharing);
    let events = EventsServer::start(w.dir.path()).await;
    let req = async |id: &str| {
        w.bundles
            .request(id, &grouped_sleep(), events.publisher().await)
    };
    let c1 = w.engine.create(req("c1").await).await.unwrap();
    let _c2 = w.engine.create(req("c2").await).await.unwrap();

    w.agent.oom("c1");
    eventually("the OOM of c1", || events.ooms() == ["c1"]).await;
    // Another sandbox's container, then (after the deletion) c1 again, then c2: only c2's
    // reaches containerd, and the reports are taken in order.
    w.agent.oom("other-sandbox-container");
    c1.delete(true).await.unwrap();
    w.agent.oom("c1");
    w.agent.oom("c2");
    eventually("the OOM of c2", || events.ooms().len() >= 2).await;
    assert_eq!(events.ooms(), ["c1", "c2"]);
}

/// Writes version `v` of a configmap volume at `dir` as kubelet's atomic writer does: the
/// version's directory, `..data` swapped onto it by a rename, the key a symlink through
/// `..data`, the previous version removed.
fn kubelet_writes(dir: &std::path::Path, v: &str, content: &str) {
    std::fs::create_dir_all(dir.join(v)).unwrap();
    std::fs::write(dir.join(v).join("app.conf"), content).unwrap();
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::os::unix::fs::symlink(v, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    if !dir.join("app.conf").exists() {
        std::os::unix::fs::symlink("..data/app.conf", dir.join("app.conf")).unwrap();
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

/// A pod's sandbox task under CRI (switchyardd's `vm` pods): the VM boots for it.
const POD_SPEC: &str = r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"},
    "annotations": {"io.kubernetes.cri.container-type": "sandbox",
                    "io.kubernetes.cri.sandbox-id": "pod"}}"#;

/// Bind mounts as CRI writes them: the pod's shm, then each of `binds` (source, destination,
/// read-only).
fn cri_mounts(binds: &[(&std::path::Path, &str, bool)]) -> String {
    let mut m = vec![
        r#"{"destination": "/dev/shm", "type": "bind", "source": "/run/c/shm", "options": ["rbind", "ro"]}"#.to_owned(),
    ];
    for (source, dest, ro) in binds {
        m.push(format!(
            r#"{{"destination": "{dest}", "type": "bind", "source": "{}", "options": ["rbind", "rprivate", "{}"]}}"#,
            source.display(),
            if *ro { "ro" } else { "rw" }
        ));
    }
    format!(r#""mounts": [{}]"#, m.join(","))
}

/// Issue 18, the built-in VMM (no shared filesystem), as Kata without virtio-fs: CRI's small
/// files are copied into the guest and kept current as they change on the host (in place, or
/// replaced as kubelet replaces configmap files), `ro` kept in the spec the guest binds with; an
/// emptyDir is one directory of the pod in the guest for every container naming it; a
/// container's copies leave the guest with it.
#[tokio::test]
async fn issue18_without_a_shared_filesystem_files_are_copied_and_emptydirs_live_in_the_guest() {
    let w = World::new(|a| FakeBackends::with_disks(a, 2));
    let hosts = w.dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let log = w.dir.path().join("termination-log");
    std::fs::write(&log, "").unwrap();
    let empty_dir = w
        .dir
        .path()
        .join("pods/u1/volumes/kubernetes.io~empty-dir/scratch");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let config = w
        .dir
        .path()
        .join("pods/u1/volumes/kubernetes.io~configmap/app");
    kubelet_writes(&config, "..v1", "a=1");
    let mounts = cri_mounts(&[
        (&hosts, "/etc/hosts", true),
        (&log, "/dev/termination-log", false),
        (&empty_dir, "/scratch", false),
        (&config, "/config", true),
    ]);
    let pod = w.create("pod", POD_SPEC).await.unwrap();
    let c1 = w
        .create("c1", &spec_json(&["/bin/sleep", "600"], &[GROUP], &mounts))
        .await
        .unwrap();
    assert_eq!(w.backends.vms().len(), 1);
    let (volumes, spec) = w.agent.created("c1").unwrap();
    let v: Vec<_> = volumes
        .iter()
        .map(|v| (v.mount, v.pod_shm, v.copied.as_str(), v.pod_dir.as_str()))
        .collect();
    assert_eq!(
        v,
        [
            (0, true, "", ""),
            (1, false, "0", ""),
            (2, false, "1", ""),
            (3, false, "", "2"),
            (4, false, "3", "")
        ]
    );
    let tree = |name: &str| w.agent.tree(name).unwrap();
    let cm_v1 = [
        ("..data", "-> ..v1"),
        ("..v1", "/"),
        ("..v1/app.conf", "a=1"),
        ("app.conf", "-> ..data/app.conf"),
    ];
    assert_eq!(tree("3"), cm_v1.map(|(p, w)| (p.to_owned(), w.to_owned())));
    assert_eq!(
        w.agent.file("0").unwrap(),
        (b"127.0.0.1 localhost\n".to_vec(), 0o644)
    );
    assert_eq!(
        spec["mounts"][1]["options"],
        serde_json::json!(["rbind", "rprivate", "ro"]),
        "the guest binds the copy read-only"
    );

    // A second container: copies of its own, the same emptyDir.
    let c2 = w
        .create("c2", &spec_json(&["/bin/sleep", "600"], &[GROUP], &mounts))
        .await
        .unwrap();
    let (volumes, _) = w.agent.created("c2").unwrap();
    assert_eq!(
        (volumes[1].copied.as_str(), volumes[3].pod_dir.as_str()),
        ("4", "2")
    );
    assert_eq!(w.agent.files(), ["0", "1", "3", "4", "5", "6"]);

    // Changed on the host: the refresher (every REFRESH) rewrites both containers' copies.
    let copies = {
        let slot = w.engine.sandbox.lock().await;
        slot.as_ref().unwrap().copies.clone().expect("copies")
    };
    std::fs::write(&hosts, "127.0.0.1 localhost\n10.0.0.7 db\n").unwrap();
    eventually("the changed file is copied again", || {
        ["0", "4"].iter().all(|n| {
            w.agent.file(n).map(|f| f.0) == Some(b"127.0.0.1 localhost\n10.0.0.7 db\n".to_vec())
        })
    })
    .await;
    assert_eq!(copies.refresh().await, 0, "nothing changed since");
    // Replaced as kubelet's atomic writer does (a new inode, the same size).
    let next = w.dir.path().join("hosts.next");
    std::fs::write(&next, "127.0.0.1 localhost\n10.0.0.8 db\n").unwrap();
    std::fs::rename(&next, &hosts).unwrap();
    assert_eq!(copies.refresh().await, 2);
    assert_eq!(
        w.agent.file("0").unwrap().0,
        b"127.0.0.1 localhost\n10.0.0.8 db\n"
    );
    // The configmap updated as kubelet does it: a new version directory, `..data` swapped.
    kubelet_writes(&config, "..v2", "a=2");
    assert_eq!(copies.refresh().await, 2);
    assert_eq!(
        tree("3"),
        [
            ("..data", "-> ..v2"),
            ("..v2", "/"),
            ("..v2/app.conf", "a=2"),
            ("app.conf", "-> ..data/app.conf"),
        ]
        .map(|(p, w)| (p.to_owned(), w.to_owned()))
    );
    // Grown past the cap: the guest keeps the last copy.
    let writes = w.agent.file_writes();
    std::fs::write(&hosts, vec![b'x'; super::copies::MAX_COPIED_FILE + 1]).unwrap();
    assert_eq!(copies.refresh().await, 0);
    assert_eq!(w.agent.file_writes(), writes);
    assert_eq!(
        w.agent.file("0").unwrap().0,
        b"127.0.0.1 localhost\n10.0.0.8 db\n"
    );
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();

    // The container's copies leave the guest with it; the pod's directory stays.
    c2.delete(true).await.unwrap();
    assert_eq!(w.agent.files(), ["0", "1", "3"]);
    c1.delete(true).await.unwrap();
    assert!(w.agent.files().is_empty());
    pod.init().kill(9).await.unwrap();
    pod.init().wait().await;
    pod.delete(false).await.unwrap();
    assert!(w.state_left().is_empty(), "{:?}", w.state_left());
}

/// Creates container `c1` of the group with `binds`, which must fail: its error's kind and text.
async fn refused(w: &World, binds: &[(&std::path::Path, &str, bool)]) -> (String, String) {
    let spec = spec_json(&["/bin/true"], &[GROUP], &cri_mounts(binds));
    message(w.create("c1", &spec).await)
}

/// Issue 18, the built-in VMM: what cannot be copied is refused naming the mount and the cap,
/// and leaves nothing in the guest: a host directory (not an emptyDir), a file over the
/// per-file cap, files past the sandbox's total, a missing source.
#[tokio::test]
async fn issue18_without_a_shared_filesystem_what_cannot_be_copied_is_refused() {
    use super::copies::{MAX_COPIED_BYTES, MAX_COPIED_FILE};
    let w = World::new(|a| FakeBackends::with_disks(a, 2));
    let pod = w.create("pod", POD_SPEC).await.unwrap();
    let small = w.dir.path().join("small");
    std::fs::write(&small, "a").unwrap();
    let data = w.dir.path().join("data");
    std::fs::create_dir(&data).unwrap();

    let (debug, text) = refused(&w, &[(&small, "/etc/hosts", true), (&data, "/data", false)]).await;
    assert!(debug.starts_with("FailedPrecondition"), "{debug}");
    assert!(
        text.starts_with(&format!(
            "config.json: mounts[2] (host path {} into /data): the fake-builtin backend has no \
             shared filesystem",
            data.display()
        )),
        "{text}"
    );

    let big = w.dir.path().join("big");
    std::fs::write(&big, vec![0u8; MAX_COPIED_FILE + 1]).unwrap();
    let (debug, text) = refused(&w, &[(&small, "/etc/hosts", true), (&big, "/big", true)]).await;
    assert!(debug.starts_with("InvalidArgument"), "{debug}");
    assert!(
        text.starts_with(&format!(
            "config.json: mounts[2] (host path {} into /big): copy it into the guest: 1048577 \
             bytes, more than the 1048576",
            big.display()
        )),
        "{text}"
    );

    // Files of a full MAX_COPIED_FILE each: the one past the sandbox's total is refused.
    let full = w.dir.path().join("full");
    std::fs::write(&full, vec![0u8; MAX_COPIED_FILE]).unwrap();
    let n = (MAX_COPIED_BYTES / MAX_COPIED_FILE as u64) as usize + 1;
    let dests: Vec<String> = (0..n).map(|i| format!("/f{i}")).collect();
    let binds: Vec<_> = dests
        .iter()
        .map(|d| (full.as_path(), d.as_str(), true))
        .collect();
    let (debug, text) = message(
        w.create(
            "c1",
            &spec_json(&["/bin/true"], &[GROUP], &cri_mounts(&binds)),
        )
        .await,
    );
    assert!(debug.starts_with("FailedPrecondition"), "{debug}");
    assert!(
        text.starts_with(&format!("config.json: mounts[{n}] (host path"))
            && text
                .contains("past 16777216 bytes, the most one VM on the fake-builtin backend holds"),
        "{text}"
    );

    let secret = w
        .dir
        .path()
        .join("pods/u1/volumes/kubernetes.io~secret/many");
    std::fs::create_dir_all(&secret).unwrap();
    for i in 0..=super::copies::MAX_COPIED_ENTRIES {
        std::fs::write(secret.join(format!("k{i}")), "v").unwrap();
    }
    let (debug, text) = refused(&w, &[(&secret, "/secret", true)]).await;
    assert!(debug.starts_with("InvalidArgument"), "{debug}");
    assert!(
        text.contains("into /secret): copy it into the guest: more than the 256 entries"),
        "{text}"
    );

    let missing = std::path::Path::new("/does/not/exist");
    let (debug, text) = refused(&w, &[(missing, "/x", true)]).await;
    assert!(debug.starts_with("InvalidArgument"), "{debug}");
    assert!(
        text.starts_with("config.json: mounts[1] (host path /does/not/exist into /x): copy it"),
        "{text}"
    );

    assert!(w.agent.files().is_empty(), "{:?}", w.agent.files());
    assert!(w.agent.containers().is_empty());
    // A directory is refused before a container's own VM boots, too.
    let w2 = World::new(|a| FakeBackends::with_disks(a, 1));
    let (_, text) = message(
        w2.create(
            "c1",
            &spec_json(&["/bin/true"], &[], &cri_mounts(&[(&data, "/data", false)])),
        )
        .await,
    );
    assert!(text.contains("no shared filesystem"), "{text}");
    assert!(w2.backends.vms().is_empty());
    pod.init().kill(9).await.unwrap();
    pod.init().wait().await;
    pod.delete(false).await.unwrap();
}

/// Issue 20: a sandbox whose spec names a network namespace by path gets a virtio-net device on
/// the tap the plumber made there, with `eth0`'s MAC; the guest is configured before any
/// container, and the redirects go with the VM. A namespace the plumber cannot use fails Create
/// with its error and boots nothing; one without `eth0` boots a VM without a network device.
#[tokio::test]
async fn issue20_a_pods_network_namespace_becomes_the_vms_network_device() {
    let w = World::new(FakeBackends::sharing);
    let netns = r#""hostname": "web-0", "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-7"}]}"#;
    let c1 = w
        .create("c1", &spec_json(&["/pause"], &[GROUP], netns))
        .await
        .unwrap();
    let vm = w.backends.vms()[0].clone();
    let net = vm.config.net.clone().expect("a network device");
    assert_eq!(net.mac, [0x0a, 0x58, 10, 88, 0, 7]);
    assert_eq!(
        w.agent.networks(),
        [RecordingPlumber::config(Some("web-0".into()))]
    );
    assert_eq!(w.plumber.calls(), ["attach /var/run/netns/cni-7"]);
    c1.delete(true).await.unwrap();
    assert_eq!(
        w.plumber.calls(),
        ["attach /var/run/netns/cni-7", "detach /var/run/netns/cni-7"]
    );
    assert!(vm.ended());

    // No path: no device and no call.
    let c2 = w.create("c2", &sleep()).await.unwrap();
    assert!(w.backends.vms()[1].config.net.is_none());
    assert_eq!(w.agent.networks().len(), 1);
    c2.delete(true).await.unwrap();
    w.shut_down().await;

    // A namespace the plumber refuses: its error, no VM.
    let bad = r#""linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/bad-1"}]}"#;
    let e = w
        .create("c3", &spec_json(&["/pause"], &[GROUP], bad))
        .await
        .err()
        .expect("refused");
    assert!(
        e.to_string()
            .contains("/var/run/netns/bad-1: eth0 has no IPv4 and no IPv6 address"),
        "{e}"
    );
    assert_eq!(w.backends.vms().len(), 2);
    assert!(w.state_left().is_empty(), "{:?}", w.state_left());

    // A namespace without eth0 (not a CNI pod's): a VM without a network device.
    let empty =
        r#""linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/empty-1"}]}"#;
    let c4 = w
        .create("c4", &spec_json(&["/pause"], &[GROUP], empty))
        .await
        .unwrap();
    assert!(w.backends.vms()[2].config.net.is_none());
    assert_eq!(w.agent.networks().len(), 1);
    c4.delete(true).await.unwrap();
    assert_eq!(
        w.plumber.calls().last().unwrap(),
        "attach /var/run/netns/empty-1"
    );
}
