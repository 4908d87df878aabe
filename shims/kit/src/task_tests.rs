//! The task state machine against a stub engine whose processes the test drives: every state
//! transition, the error for every wrong state or unknown id, and the events with their fields
//! in order. No root, no containerd.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, mpsc, oneshot};

use super::*;
use crate::engine::Rootfs;
use crate::events;
use containerd_shim_protos::ttrpc as ttrpc_code;

/// Every wait in these tests is for something that happens at once; this only bounds a bug.
const DEADLINE: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not within {DEADLINE:?}"),
    }
}

// ------------------------------------------------------------------------------------------
// The stub engine

/// A process the test ends (`exit`) and whose start it can hold (`hold_start`).
struct StubProcess {
    pid: AtomicU32,
    /// The pid `start` gives an exec (an init has its pid from create).
    start_pid: u32,
    exit: watch::Sender<Option<Exit>>,
    /// Counts returns from `wait`: the kit records an exit in the same poll.
    waited: watch::Sender<u32>,
    start_gate: Mutex<Option<oneshot::Receiver<()>>>,
    start_entered: Notify,
    fail_start: AtomicBool,
    kills: Mutex<Vec<u32>>,
    stdin_closed: AtomicBool,
    resized: Mutex<Option<(u32, u32)>>,
}

impl StubProcess {
    fn new(pid: u32, start_pid: u32) -> Arc<StubProcess> {
        Arc::new(StubProcess {
            pid: AtomicU32::new(pid),
            start_pid,
            exit: watch::channel(None).0,
            waited: watch::channel(0).0,
            start_gate: Mutex::new(None),
            start_entered: Notify::new(),
            fail_start: AtomicBool::new(false),
            kills: Mutex::default(),
            stdin_closed: AtomicBool::new(false),
            resized: Mutex::default(),
        })
    }

    /// The process ends with `status`.
    fn end(&self, status: u32) -> Exit {
        let exit = Exit::now(status);
        self.exit.send_replace(Some(exit));
        exit
    }

    /// Make `start` wait until the returned sender fires (or is dropped).
    fn hold_start(&self) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        *self.start_gate.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
        tx
    }

    /// Wait until the kit has seen the process end.
    async fn seen_by_kit(&self) {
        let mut rx = self.waited.subscribe();
        within("the kit to see the exit", rx.wait_for(|n| *n > 0))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn kills(&self) -> Vec<u32> {
        self.kills.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[async_trait]
impl Process for StubProcess {
    fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    async fn start(&self) -> Result<u32> {
        self.start_entered.notify_one();
        let gate = self
            .start_gate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(gate) = gate {
            let _ = gate.await;
        }
        if self.fail_start.load(Ordering::SeqCst) {
            return Err(Error::Internal("stub: start failed".into()));
        }
        if self.pid() == 0 {
            self.pid.store(self.start_pid, Ordering::SeqCst);
        }
        Ok(self.pid())
    }

    async fn wait(&self) -> Exit {
        let mut rx = self.exit.subscribe();
        let exit = match rx.wait_for(Option::is_some).await {
            Ok(e) => e.unwrap_or_else(|| Exit::now(255)),
            Err(_) => Exit::now(255),
        };
        self.waited.send_modify(|n| *n += 1);
        exit
    }

    async fn kill(&self, signal: u32) -> Result<()> {
        self.kills
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(signal);
        if signal == 9 {
            self.end(137);
        }
        Ok(())
    }

    async fn resize_pty(&self, width: u32, height: u32) -> Result<()> {
        *self.resized.lock().unwrap_or_else(|p| p.into_inner()) = Some((width, height));
        Ok(())
    }

    async fn close_stdin(&self) -> Result<()> {
        self.stdin_closed.store(true, Ordering::SeqCst);
        Ok(())
    }
}

struct StubContainer {
    init: Arc<StubProcess>,
    execs: Mutex<HashMap<String, Arc<StubProcess>>>,
    next_exec_pid: AtomicU32,
    /// What the container was asked to do, in order (`pause`, `kill_all 15`, `delete force`).
    calls: Mutex<Vec<String>>,
    fail_delete: AtomicBool,
}

impl StubContainer {
    fn call(&self, what: impl Into<String>) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what.into());
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn exec_process(&self, exec_id: &str) -> Arc<StubProcess> {
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
            .unwrap_or_else(|| panic!("no exec {exec_id}"))
    }
}

#[async_trait]
impl Container for StubContainer {
    fn init(&self) -> Arc<dyn Process> {
        self.init.clone()
    }

    async fn exec(&self, req: ExecRequest) -> Result<Arc<dyn Process>> {
        if req.spec == b"bad" {
            return Err(Error::InvalidArgument("exec process spec: bad".into()));
        }
        let p = StubProcess::new(0, self.next_exec_pid.fetch_add(1, Ordering::SeqCst));
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.exec_id, p.clone());
        Ok(p)
    }

    async fn kill_all(&self, signal: u32) -> Result<()> {
        self.call(format!("kill_all {signal}"));
        Ok(())
    }

    async fn pids(&self) -> Result<Vec<ProcessInfo>> {
        Ok(vec![ProcessInfo {
            pid: self.init.pid(),
        }])
    }

    async fn pause(&self) -> Result<()> {
        self.call("pause");
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        self.call("resume");
        Ok(())
    }

    async fn update(&self, resources: &Any) -> Result<()> {
        self.call(format!("update {}", resources.type_url));
        Ok(())
    }

    async fn stats(&self) -> Result<Any> {
        Ok(Any {
            type_url: "stub.Metrics".into(),
            ..Default::default()
        })
    }

    async fn delete(&self, force: bool) -> Result<()> {
        if self.fail_delete.load(Ordering::SeqCst) {
            return Err(Error::Internal("stub: delete failed".into()));
        }
        self.call(if force { "delete force" } else { "delete" });
        if force {
            self.init.end(137);
        }
        Ok(())
    }
}

#[derive(Default)]
struct StubEngine {
    created: Mutex<Vec<CreateRequest>>,
    containers: Mutex<HashMap<String, Arc<StubContainer>>>,
    next_pid: AtomicU32,
    fail_create: AtomicBool,
    /// Take rootfs mounts of type `erofs` as they are, as the vm engine does.
    hand_over_erofs: bool,
}

impl StubEngine {
    fn container(&self, id: &str) -> Arc<StubContainer> {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .unwrap_or_else(|| panic!("no container {id}"))
    }

    fn created(&self) -> Vec<CreateRequest> {
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[async_trait]
impl Engine for StubEngine {
    fn name(&self) -> &'static str {
        "stub"
    }

    async fn create(&self, req: CreateRequest) -> Result<Arc<dyn Container>> {
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(req.clone());
        if self.fail_create.load(Ordering::SeqCst) {
            return Err(Error::InvalidArgument("stub: create refused".into()));
        }
        let n = self.next_pid.fetch_add(1, Ordering::SeqCst);
        let c = Arc::new(StubContainer {
            init: StubProcess::new(1000 + n * 100, 0),
            execs: Mutex::default(),
            next_exec_pid: AtomicU32::new(1001 + n * 100),
            calls: Mutex::default(),
            fail_delete: AtomicBool::new(false),
        });
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.id, c.clone());
        Ok(c)
    }

    fn hands_over_rootfs(&self, mounts: &[Mount]) -> bool {
        self.hand_over_erofs && matches!(mounts, [m] if m.type_ == "erofs")
    }

    async fn cleanup(&self, _: &str, _: &str, _: &std::path::Path) -> Result<()> {
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// Harness

struct Harness {
    svc: TaskService<StubEngine>,
    engine: Arc<StubEngine>,
    events: mpsc::UnboundedReceiver<Event>,
    dir: tempfile::TempDir,
}

const CONFIG: &str = r#"{
    "ociVersion": "1.1.0",
    "root": {"path": "rootfs"},
    "process": {"args": ["/bin/app", "--flag"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
    "annotations": {"org.example": "yes"}
}"#;

impl Harness {
    fn new() -> Harness {
        Harness::with(StubEngine::default())
    }

    fn with(engine: StubEngine) -> Harness {
        Harness::build(engine, None)
    }

    /// A server that lingers for `linger` after its last task (a group's warm shim).
    fn lingering(linger: Duration) -> Harness {
        Harness::build(StubEngine::default(), Some(linger))
    }

    fn build(engine: StubEngine, linger: Option<Duration>) -> Harness {
        let engine = Arc::new(engine);
        let (publisher, events) = events::channel();
        let svc = TaskService::new(engine.clone(), "ns1", publisher);
        Harness {
            svc: match linger {
                Some(l) => svc.with_idle_exit(l),
                None => svc,
            },
            engine,
            events,
            dir: tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")),
        }
    }

    /// A bundle for `id` with `config` as its `config.json` and an empty `rootfs/`.
    fn bundle(&self, id: &str, config: &str) -> PathBuf {
        let b = self.dir.path().join(id);
        std::fs::create_dir_all(b.join("rootfs")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(b.join("config.json"), config).unwrap_or_else(|e| panic!("{e}"));
        b
    }

    fn request(&self, id: &str) -> CreateTask {
        CreateTask {
            id: id.into(),
            bundle: self.bundle(id, CONFIG),
            stdio: StdioSpec {
                stdin: String::new(),
                stdout: "/run/fifo/out".into(),
                stderr: "/run/fifo/err".into(),
                terminal: false,
            },
            checkpoint: String::new(),
            ..Default::default()
        }
    }

    async fn create(&self, id: &str) -> u32 {
        self.svc
            .create(self.request(id))
            .await
            .unwrap_or_else(|e| panic!("create {id}: {e}"))
    }

    /// Create and start `id`; returns its init pid.
    async fn running(&mut self, id: &str) -> u32 {
        let pid = self.create(id).await;
        let started = self
            .svc
            .start(id, "")
            .await
            .unwrap_or_else(|e| panic!("start {id}: {e}"));
        assert_eq!(started, pid);
        self.drain();
        pid
    }

    /// The error of a Create that must fail.
    async fn refused(&self, req: CreateTask) -> Error {
        let id = req.id.clone();
        match self.svc.create(req).await {
            Ok(pid) => panic!("create {id}: accepted (pid {pid})"),
            Err(e) => e,
        }
    }

    /// The events published so far.
    fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            out.push(e);
        }
        out
    }

    async fn next_event(&mut self) -> Event {
        within("an event", self.events.recv())
            .await
            .unwrap_or_else(|| panic!("event channel closed"))
    }

    fn status(&self, id: &str, exec_id: &str) -> Status {
        self.svc
            .state(id, exec_id)
            .unwrap_or_else(|e| panic!("state {id}/{exec_id}: {e}"))
            .status
    }
}

fn topics(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(Event::topic).collect()
}

fn code(e: &Error) -> ttrpc_code::Code {
    e.code()
}

#[track_caller]
fn assert_code<T: std::fmt::Debug>(r: Result<T>, want: ttrpc_code::Code, what: &str) {
    match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected {want:?}"),
        Err(e) => assert_eq!(code(&e), want, "{what}: {e}"),
    }
}

// ------------------------------------------------------------------------------------------
// Create

#[tokio::test]
async fn create_parses_the_spec_once_and_hands_over_the_rootfs_dir() {
    let mut h = Harness::new();
    let pid = h.create("t1").await;
    assert_eq!(pid, 1000);
    let created = h.engine.created();
    assert_eq!(created.len(), 1);
    let req = &created[0];
    assert_eq!(req.namespace, "ns1");
    assert_eq!(req.id, "t1");
    let args = req.spec.process().as_ref().and_then(|p| p.args().clone());
    assert_eq!(args, Some(vec!["/bin/app".to_owned(), "--flag".to_owned()]));
    assert_eq!(req.config, CONFIG.as_bytes());
    assert_eq!(req.rootfs, Rootfs::Dir(req.bundle.join("rootfs")));
    assert_eq!(req.stdio.stdout, "/run/fifo/out");
    assert_eq!(h.status("t1", ""), Status::Created);

    let events = h.drain();
    assert_eq!(topics(&events), ["/tasks/create"]);
    let Event::Create(ev) = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!(ev.container_id, "t1");
    assert_eq!(ev.pid, 1000);
    assert_eq!(ev.bundle, req.bundle.display().to_string());
    assert_eq!(ev.io.stdout, "/run/fifo/out");
    assert_eq!(ev.io.stderr, "/run/fifo/err");
}

#[tokio::test]
async fn create_refuses_a_bad_spec_naming_the_field_before_the_engine_runs() {
    let h = Harness::new();
    let mut req = h.request("bad");
    req.bundle = h.bundle(
        "bad",
        r#"{"ociVersion": "1.1.0", "root": {"path": "rootfs"}, "process": {"args": "notalist", "cwd": "/"}}"#,
    );
    let e = h.refused(req).await;
    assert_eq!(code(&e), ttrpc_code::Code::INVALID_ARGUMENT, "{e}");
    assert!(
        e.to_string().starts_with("config.json: process.args"),
        "{e}"
    );

    let req = h.request("noconf");
    std::fs::remove_file(req.bundle.join("config.json")).unwrap_or_else(|e| panic!("{e}"));
    let e = h.refused(req).await;
    assert!(e.to_string().contains("config.json: cannot read"), "{e}");

    let req = h.request("noroot");
    std::fs::remove_dir(req.bundle.join("rootfs")).unwrap_or_else(|e| panic!("{e}"));
    let e = h.refused(req).await;
    assert!(e.to_string().contains("root.path"), "{e}");

    assert!(h.engine.created().is_empty(), "the engine ran");
    assert_code(h.svc.state("bad", ""), ttrpc_code::Code::NOT_FOUND, "state");
}

#[tokio::test]
async fn create_hands_over_the_mounts_an_engine_takes() {
    let h = Harness::with(StubEngine {
        hand_over_erofs: true,
        ..Default::default()
    });
    let mut req = h.request("vm1");
    // Not mounted on the host (that would need root): given to the engine as it is.
    let mount = Mount {
        type_: "erofs".into(),
        source: "/images/abc.erofs".into(),
        options: vec!["ro".into()],
        ..Default::default()
    };
    req.rootfs = vec![mount.clone()];
    // The engine that takes the mounts needs no rootfs directory.
    std::fs::remove_dir(req.bundle.join("rootfs")).unwrap_or_else(|e| panic!("{e}"));
    h.svc
        .create(req)
        .await
        .unwrap_or_else(|e| panic!("create: {e}"));
    assert_eq!(h.engine.created()[0].rootfs, Rootfs::Mounts(vec![mount]));
}

#[tokio::test]
async fn create_refuses_bad_and_duplicate_ids_and_leaves_nothing_when_the_engine_fails() {
    let mut h = Harness::new();
    let mut req = h.request("ok");
    req.id = "../escape".into();
    assert_code(
        h.svc.create(req).await,
        ttrpc_code::Code::INVALID_ARGUMENT,
        "bad id",
    );
    h.create("dup").await;
    assert_code(
        h.svc.create(h.request("dup")).await,
        ttrpc_code::Code::ALREADY_EXISTS,
        "duplicate",
    );

    h.engine.fail_create.store(true, Ordering::SeqCst);
    assert_code(
        h.svc.create(h.request("failing")).await,
        ttrpc_code::Code::INVALID_ARGUMENT,
        "engine refused",
    );
    assert_code(
        h.svc.state("failing", ""),
        ttrpc_code::Code::NOT_FOUND,
        "state",
    );
    // The id is free again, and only one task (dup) holds off Shutdown.
    h.engine.fail_create.store(false, Ordering::SeqCst);
    h.create("failing").await;
    let events = h.drain();
    assert_eq!(topics(&events), ["/tasks/create", "/tasks/create"]);
}

// ------------------------------------------------------------------------------------------
// Start, exit, Wait, Delete

#[tokio::test]
async fn a_task_runs_exits_and_is_deleted_with_events_in_order() {
    let mut h = Harness::new();
    let pid = h.create("t").await;
    assert_eq!(h.svc.start("t", "").await.ok(), Some(pid));
    assert_eq!(h.status("t", ""), Status::Running);
    assert_eq!(h.svc.connect("t").task_pid, pid);

    let waiter = {
        let svc = &h.svc;
        svc.wait("t", "")
    };
    let exit = h.engine.container("t").init.end(3);
    let got = within("wait", waiter)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got, exit);
    let state = h.svc.state("t", "").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(state.status, Status::Stopped);
    assert_eq!(state.exit, Some(exit));
    assert_eq!(state.pid, pid);

    let deleted = h
        .svc
        .delete("t", "")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(deleted, Deleted { pid, exit });
    assert_eq!(h.engine.container("t").calls(), ["delete"]);

    let events = h.drain();
    assert_eq!(
        topics(&events),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    let (Event::Start(start), Event::Exit(ex), Event::Delete(del)) =
        (&events[1], &events[2], &events[3])
    else {
        panic!("{events:?}")
    };
    assert_eq!((start.container_id.as_str(), start.pid), ("t", pid));
    assert_eq!(
        (
            ex.container_id.as_str(),
            ex.id.as_str(),
            ex.pid,
            ex.exit_status
        ),
        ("t", "t", pid, 3)
    );
    assert_eq!(ex.exited_at.as_ref(), Some(&timestamp(exit.at)));
    assert_eq!(
        (
            del.container_id.as_str(),
            del.id.as_str(),
            del.pid,
            del.exit_status
        ),
        ("t", "t", pid, 3)
    );
    assert_eq!(del.exited_at.as_ref(), Some(&timestamp(exit.at)));

    // Gone: a second delete, and every other call, says NotFound.
    assert_code(
        h.svc.delete("t", "").await,
        ttrpc_code::Code::NOT_FOUND,
        "double delete",
    );
    assert_code(h.svc.state("t", ""), ttrpc_code::Code::NOT_FOUND, "state");
    assert_eq!(h.svc.connect("t").task_pid, 0);
}

#[tokio::test]
async fn an_exit_before_wait_is_kept_for_wait_and_delete_right_after_it_works() {
    let mut h = Harness::new();
    let pid = h.running("t").await;
    let init = h.engine.container("t").init.clone();
    init.end(0);
    // The exit event is out: Delete must find the task stopped (it is recorded first).
    let ev = h.next_event().await;
    assert!(matches!(&ev, Event::Exit(e) if e.pid == pid), "{ev:?}");
    let deleted = h.svc.delete("t", "").await;
    assert!(deleted.is_ok(), "delete after /tasks/exit: {deleted:?}");
    // Wait after the exit (and even after nothing is left to wait for) is answered.
    let h2 = Harness::new();
    h2.create("late").await;
    h2.svc
        .start("late", "")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    h2.engine.container("late").init.end(42);
    h2.engine.container("late").init.seen_by_kit().await;
    let exit = within("wait", h2.svc.wait("late", ""))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(exit.status, 42);
}

#[tokio::test]
async fn an_exit_before_start_returns_is_published_after_start() {
    let mut h = Harness::new();
    let pid = h.create("fast").await;
    h.drain();
    let init = h.engine.container("fast").init.clone();
    let gate = init.hold_start();
    let started = {
        let svc = &h.svc;
        let start = svc.start("fast", "");
        tokio::pin!(start);
        // Drive Start into the engine, then let the process end while it is still there.
        tokio::select! {
            r = &mut start => panic!("start returned early: {r:?}"),
            () = init.start_entered.notified() => {}
        }
        init.end(0);
        tokio::select! {
            r = &mut start => panic!("start returned early: {r:?}"),
            () = init.seen_by_kit() => {}
        }
        // Held: nothing is published while Start is in flight, and the task is not stopped.
        assert!(
            h.events.try_recv().is_err(),
            "an event while Start is in flight"
        );
        assert_eq!(
            svc.state("fast", "").map(|s| s.status).ok(),
            Some(Status::Created)
        );
        let _ = gate.send(());
        within("start", start).await
    };
    assert_eq!(started.ok(), Some(pid));
    assert_eq!(h.status("fast", ""), Status::Stopped);
    let events = h.drain();
    assert_eq!(topics(&events), ["/tasks/start", "/tasks/exit"]);
    let exit = within("wait", h.svc.wait("fast", ""))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(exit.status, 0);
}

#[tokio::test]
async fn a_failed_start_leaves_the_task_created() {
    let mut h = Harness::new();
    h.create("t").await;
    h.drain();
    let init = h.engine.container("t").init.clone();
    init.fail_start.store(true, Ordering::SeqCst);
    assert_code(
        h.svc.start("t", "").await,
        ttrpc_code::Code::INTERNAL,
        "start",
    );
    assert_eq!(h.status("t", ""), Status::Created);
    assert!(h.drain().is_empty());
    init.fail_start.store(false, Ordering::SeqCst);
    assert!(h.svc.start("t", "").await.is_ok());
    assert_eq!(h.status("t", ""), Status::Running);
}

#[tokio::test]
async fn start_twice_and_delete_while_running_are_refused() {
    let mut h = Harness::new();
    h.running("t").await;
    assert_code(
        h.svc.start("t", "").await,
        ttrpc_code::Code::FAILED_PRECONDITION,
        "second start",
    );
    assert_code(
        h.svc.delete("t", "").await,
        ttrpc_code::Code::FAILED_PRECONDITION,
        "delete running",
    );
    assert!(h.engine.container("t").calls().is_empty());
    assert_eq!(h.status("t", ""), Status::Running);
    assert!(h.drain().is_empty());
}

#[tokio::test]
async fn deleting_a_never_started_task_kills_its_init() {
    let mut h = Harness::new();
    let pid = h.create("t").await;
    let deleted = h
        .svc
        .delete("t", "")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(deleted.pid, pid);
    assert_eq!(deleted.exit.status, 137);
    assert_eq!(h.engine.container("t").calls(), ["delete force"]);
    assert_eq!(
        topics(&h.drain()),
        ["/tasks/create", "/tasks/exit", "/tasks/delete"]
    );
    assert_code(
        h.svc.start("t", "").await,
        ttrpc_code::Code::NOT_FOUND,
        "start",
    );
}

#[tokio::test]
async fn a_failed_delete_keeps_the_task() {
    let mut h = Harness::new();
    h.running("t").await;
    h.engine.container("t").init.end(0);
    h.engine.container("t").init.seen_by_kit().await;
    h.drain();
    h.engine
        .container("t")
        .fail_delete
        .store(true, Ordering::SeqCst);
    assert_code(
        h.svc.delete("t", "").await,
        ttrpc_code::Code::INTERNAL,
        "delete",
    );
    assert_eq!(h.status("t", ""), Status::Stopped);
    assert!(h.drain().is_empty(), "an event for a failed delete");
    h.engine
        .container("t")
        .fail_delete
        .store(false, Ordering::SeqCst);
    assert!(h.svc.delete("t", "").await.is_ok());
    assert_eq!(topics(&h.drain()), ["/tasks/delete"]);
}

// ------------------------------------------------------------------------------------------
// Kill

#[tokio::test]
async fn kill_signals_the_process_or_all_and_refuses_finished_ones() {
    let mut h = Harness::new();
    h.running("t").await;
    let c = h.engine.container("t");
    h.svc
        .kill("t", "", 15, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.init.kills(), [15]);
    h.svc
        .kill("t", "", 9, true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.calls(), ["kill_all 9"]);
    h.svc
        .kill("t", "", 9, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let exit = within("wait", h.svc.wait("t", ""))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(exit.status, 137);
    assert_code(
        h.svc.kill("t", "", 15, false).await,
        ttrpc_code::Code::NOT_FOUND,
        "kill after exit",
    );
    assert_eq!(topics(&h.drain()), ["/tasks/exit"]);
}

// ------------------------------------------------------------------------------------------
// Exec

#[tokio::test]
async fn an_exec_runs_exits_and_is_deleted_with_its_events() {
    let mut h = Harness::new();
    let init_pid = h.running("t").await;
    let exec = |id: &str| ExecProcess {
        id: "t".into(),
        exec_id: id.into(),
        stdio: StdioSpec {
            stdout: "/run/fifo/e1".into(),
            ..Default::default()
        },
        spec: Some(br#"{"args":["sh"]}"#.to_vec()),
    };
    h.svc
        .exec(exec("e1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(h.status("t", "e1"), Status::Created);
    assert_code(
        h.svc.exec(exec("e1")).await,
        ttrpc_code::Code::ALREADY_EXISTS,
        "same exec id",
    );
    assert_code(
        h.svc.kill("t", "e1", 15, false).await,
        ttrpc_code::Code::FAILED_PRECONDITION,
        "kill before start",
    );
    let pid = h
        .svc
        .start("t", "e1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pid, init_pid + 1);
    let state = h.svc.state("t", "e1").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (state.id.as_str(), state.exec_id.as_str(), state.pid),
        ("e1", "e1", pid)
    );
    assert_eq!(state.status, Status::Running);
    assert_eq!(state.stdio.stdout, "/run/fifo/e1");
    assert_code(
        h.svc.delete("t", "e1").await,
        ttrpc_code::Code::FAILED_PRECONDITION,
        "delete running exec",
    );
    let p = h.engine.container("t").exec_process("e1");
    p.end(5);
    let exit = within("wait exec", h.svc.wait("t", "e1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(exit.status, 5);
    // The init is untouched.
    assert_eq!(h.status("t", ""), Status::Running);
    let deleted = h
        .svc
        .delete("t", "e1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((deleted.pid, deleted.exit.status), (pid, 5));
    assert_code(
        h.svc.state("t", "e1"),
        ttrpc_code::Code::NOT_FOUND,
        "deleted exec",
    );

    let events = h.drain();
    assert_eq!(
        topics(&events),
        ["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"]
    );
    let (Event::ExecAdded(added), Event::ExecStarted(started), Event::Exit(ex)) =
        (&events[0], &events[1], &events[2])
    else {
        panic!("{events:?}")
    };
    assert_eq!(
        (added.container_id.as_str(), added.exec_id.as_str()),
        ("t", "e1")
    );
    assert_eq!(
        (
            started.container_id.as_str(),
            started.exec_id.as_str(),
            started.pid
        ),
        ("t", "e1", pid)
    );
    assert_eq!(
        (
            ex.container_id.as_str(),
            ex.id.as_str(),
            ex.pid,
            ex.exit_status
        ),
        ("t", "e1", pid, 5)
    );
}

#[tokio::test]
async fn exec_is_refused_without_a_spec_with_a_bad_id_or_after_the_task_exited() {
    let mut h = Harness::new();
    h.running("t").await;
    let req = |exec_id: &str, spec: Option<&[u8]>| ExecProcess {
        id: "t".into(),
        exec_id: exec_id.into(),
        spec: spec.map(<[u8]>::to_vec),
        ..Default::default()
    };
    assert_code(
        h.svc.exec(req("e", None)).await,
        ttrpc_code::Code::INVALID_ARGUMENT,
        "no spec",
    );
    assert_code(
        h.svc.exec(req("a/b", Some(b"{}"))).await,
        ttrpc_code::Code::INVALID_ARGUMENT,
        "bad exec id",
    );
    assert_code(
        h.svc.exec(req("e", Some(b"bad"))).await,
        ttrpc_code::Code::INVALID_ARGUMENT,
        "engine refused",
    );
    // A refused exec id is free again.
    h.svc
        .exec(req("e", Some(b"{}")))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    h.engine.container("t").init.end(0);
    h.engine.container("t").init.seen_by_kit().await;
    assert_code(
        h.svc.exec(req("e2", Some(b"{}"))).await,
        ttrpc_code::Code::FAILED_PRECONDITION,
        "exec after exit",
    );
}

#[tokio::test]
async fn an_exec_that_exits_before_its_start_returns_is_in_order() {
    let mut h = Harness::new();
    h.running("t").await;
    h.svc
        .exec(ExecProcess {
            id: "t".into(),
            exec_id: "quick".into(),
            spec: Some(b"{}".to_vec()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let p = h.engine.container("t").exec_process("quick");
    // Ended before the kit could watch it (the engine still reports the exit).
    p.end(1);
    h.svc
        .start("t", "quick")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let exit = within("wait", h.svc.wait("t", "quick"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(exit.status, 1);
    assert_eq!(
        topics(&h.drain()),
        ["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"]
    );
}

// ------------------------------------------------------------------------------------------
// Pause, resume, and the container-wide calls

#[tokio::test]
async fn pause_and_resume_change_the_status_and_publish() {
    let mut h = Harness::new();
    h.create("t").await;
    h.drain();
    assert_code(
        h.svc.pause("t").await,
        ttrpc_code::Code::FAILED_PRECONDITION,
        "pause created",
    );
    h.svc.start("t", "").await.unwrap_or_else(|e| panic!("{e}"));
    h.svc.pause("t").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(h.status("t", ""), Status::Paused);
    h.svc.resume("t").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(h.status("t", ""), Status::Running);
    assert_eq!(h.engine.container("t").calls(), ["pause", "resume"]);
    let events = h.drain();
    assert_eq!(
        topics(&events),
        ["/tasks/start", "/tasks/paused", "/tasks/resumed"]
    );
    assert!(events.iter().all(|e| e.container_id() == "t"));
    h.engine.container("t").init.end(0);
    h.engine.container("t").init.seen_by_kit().await;
    assert_code(
        h.svc.resume("t").await,
        ttrpc_code::Code::FAILED_PRECONDITION,
        "resume stopped",
    );
}

#[tokio::test]
async fn container_calls_reach_the_engine() {
    let h = Harness::new();
    h.create("t").await;
    let pids = h.svc.pids("t").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pids, [ProcessInfo { pid: 1000 }]);
    let stats = h.svc.stats("t").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stats.type_url, "stub.Metrics");
    let res = Any {
        type_url: "LinuxResources".into(),
        ..Default::default()
    };
    h.svc
        .update("t", Some(&res))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_code(
        h.svc.update("t", None).await,
        ttrpc_code::Code::INVALID_ARGUMENT,
        "update without resources",
    );
    assert_eq!(h.engine.container("t").calls(), ["update LinuxResources"]);
    h.svc
        .resize_pty("t", "", 80, 24)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    h.svc
        .close_io("t", "", true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let init = h.engine.container("t").init.clone();
    assert_eq!(
        *init.resized.lock().unwrap_or_else(|p| p.into_inner()),
        Some((80, 24))
    );
    assert!(init.stdin_closed.load(Ordering::SeqCst));
}

// ------------------------------------------------------------------------------------------
// Unknown ids, Connect, Shutdown

#[tokio::test]
async fn unknown_task_and_exec_ids_are_not_found() {
    let h = Harness::new();
    h.create("t").await;
    let nf = ttrpc_code::Code::NOT_FOUND;
    for (id, exec_id) in [("nope", ""), ("t", "nope"), ("nope", "nope")] {
        let what = format!("{id}/{exec_id}");
        assert_code(h.svc.start(id, exec_id).await, nf, &format!("start {what}"));
        assert_code(
            h.svc.delete(id, exec_id).await,
            nf,
            &format!("delete {what}"),
        );
        assert_code(h.svc.state(id, exec_id), nf, &format!("state {what}"));
        assert_code(h.svc.wait(id, exec_id).await, nf, &format!("wait {what}"));
        assert_code(
            h.svc.kill(id, exec_id, 9, false).await,
            nf,
            &format!("kill {what}"),
        );
        assert_code(
            h.svc.resize_pty(id, exec_id, 1, 1).await,
            nf,
            &format!("resize {what}"),
        );
        assert_code(
            h.svc.close_io(id, exec_id, true).await,
            nf,
            &format!("close_io {what}"),
        );
    }
    assert_code(h.svc.pause("nope").await, nf, "pause");
    assert_code(h.svc.resume("nope").await, nf, "resume");
    assert_code(h.svc.pids("nope").await, nf, "pids");
    assert_code(h.svc.stats("nope").await, nf, "stats");
    assert_code(h.svc.update("nope", None).await, nf, "update");
    assert_code(
        h.svc
            .exec(ExecProcess {
                id: "nope".into(),
                exec_id: "e".into(),
                spec: Some(b"{}".to_vec()),
                ..Default::default()
            })
            .await,
        nf,
        "exec",
    );
}

#[tokio::test]
async fn connect_answers_for_unknown_ids_with_no_task_pid() {
    let h = Harness::new();
    let c = h.svc.connect("nope");
    assert_eq!(c.shim_pid, std::process::id());
    assert_eq!(c.task_pid, 0);
    h.create("t").await;
    assert_eq!(h.svc.connect("t").task_pid, 1000);
}

#[tokio::test]
async fn shutdown_waits_for_the_last_task_unless_now() {
    let h = Harness::new();
    h.create("t").await;
    assert!(!h.svc.shutdown(false), "stopped with a task left");
    assert!(!h.svc.stopping());
    h.svc
        .delete("t", "")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(h.svc.shutdown(false));
    within("stopped", h.svc.stopped()).await;

    let h = Harness::new();
    h.create("t").await;
    assert!(h.svc.shutdown(true));
    assert!(h.svc.stopping());
}

#[tokio::test(start_paused = true)]
async fn a_server_with_an_idle_exit_stays_warm_after_its_last_task_then_stops_by_itself() {
    const LINGER: Duration = Duration::from_secs(3);
    let h = Harness::lingering(LINGER);
    h.create("a").await;
    assert!(!h.svc.shutdown(false), "stopped with a task left");
    h.svc
        .delete("a", "")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(h.svc.shutdown(false));
    assert!(!h.svc.stopping(), "stopped at once instead of staying warm");
    let idle = h.svc.idle_exit();
    tokio::pin!(idle);
    // Still up a while later: the group's next task joins it, which ends the linger.
    assert!(
        tokio::time::timeout(LINGER / 3, &mut idle).await.is_err(),
        "stopped before the idle time passed"
    );
    h.create("b").await;
    assert!(
        tokio::time::timeout(LINGER * 2, &mut idle).await.is_err(),
        "stopped with a task"
    );
    assert!(!h.svc.stopping());
    // After the last task again, the idle time passes without a Create: it stops, and a
    // Create that comes now is refused as Unavailable (the caller starts another shim) rather
    // than taken by a server on its way out.
    h.svc
        .delete("b", "")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(h.svc.shutdown(false));
    within("the idle exit", &mut idle).await;
    assert!(h.svc.stopping());
    within("stopped", h.svc.stopped()).await;
    let e = h.refused(h.request("c")).await;
    assert_eq!(code(&e), ttrpc_code::Code::UNAVAILABLE, "{e}");

    // Shutdown with `now` does not linger; nor does a server without an idle exit.
    let h = Harness::lingering(LINGER);
    assert!(h.svc.shutdown(true));
    assert!(h.svc.stopping());
    let h = Harness::new();
    assert!(h.svc.shutdown(false));
    assert!(h.svc.stopping());
    assert!(
        tokio::time::timeout(LINGER * 10, h.svc.idle_exit())
            .await
            .is_err(),
        "a server without an idle exit has no idle timer"
    );
}

#[tokio::test]
async fn a_server_no_create_reached_is_unclaimed_and_one_a_create_reached_is_not() {
    let h = Harness::new();
    within("unclaimed", h.svc.unclaimed_for(Duration::from_millis(10))).await;

    // Any Create counts, even one that fails: its caller knows the server and shuts it down.
    let h = Harness::new();
    let mut req = h.request("bad");
    req.bundle = h.bundle("bad", "not json");
    h.refused(req).await;
    let waited = tokio::time::timeout(
        Duration::from_millis(200),
        h.svc.unclaimed_for(Duration::ZERO),
    )
    .await;
    assert!(waited.is_err(), "a claimed server was called unclaimed");
}

#[tokio::test]
async fn two_tasks_of_one_group_are_independent() {
    let mut h = Harness::new();
    let a = h.running("a").await;
    let b = h.running("b").await;
    assert_ne!(a, b);
    h.engine.container("a").init.end(1);
    let ev = h.next_event().await;
    assert!(
        matches!(&ev, Event::Exit(e) if e.container_id == "a"),
        "{ev:?}"
    );
    assert_eq!(h.status("b", ""), Status::Running);
    h.svc
        .delete("a", "")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!h.svc.shutdown(false), "b is still there");
    assert_eq!(h.svc.connect("b").task_pid, b);
}
