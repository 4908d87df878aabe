//! Issue 16, item 3: a guest cannot grow the shim's memory, spin it, or spoof events.
//!
//! The shim's real engine, sandbox, agent client and framing run against deliberately hostile
//! guest agents: ttrpc servers written here, served over a socketpair from a thread and runtime
//! of their own as a VM's agent would be (the engine's fake VMM, `testing::FakeBackends`). The
//! engine runs on the test's thread (a current-thread runtime), so that thread's CPU time and
//! allocations are the shim's: both are measured. A well-behaved `FakeAgent` answers whatever
//! the hostile one does not override.
//!
//! No root, KVM or QEMU needed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use containerd_shim_yard_vm_v1::engine::VmEngine;
use containerd_shim_yard_vm_v1::testing::{
    Bundles, EventsServer, FakeAgent, FakeBackends, FakeVmState, spec_json,
};
use yard_agent_protocol::ttrpc::{self, r#async::TtrpcContext};
use yard_agent_protocol::{self as proto, Agent as _};
use yard_shim_kit::{Container, Engine};

// ---- the shim's allocations: counted per thread --------------------------------------------

struct Counting;

thread_local! {
    /// Bytes allocated minus bytes freed on this thread, and the highest that reached since
    /// the last reset.
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn track(delta: i64) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + delta;
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: defers to the system allocator; the bookkeeping allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as i64);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as i64));
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size as i64 - layout.size() as i64);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Live bytes of this thread now; the peak restarts from here.
fn reset_peak() -> i64 {
    let live = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(live));
    live
}

fn peak() -> i64 {
    PEAK.with(Cell::get)
}

fn live() -> i64 {
    LIVE.with(Cell::get)
}

/// CPU time this thread has run (the scheduler's count, in ns).
fn thread_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    Duration::from_nanos(s.split_whitespace().next().unwrap().parse().unwrap())
}

// ---- hostile agents ------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Misbehaviour {
    /// Reads answer at once with no data and no end of file, forever.
    EmptyReads,
    /// Reads answer with 3 MiB (ttrpc itself would take up to 4 MiB).
    HugeFrames,
    /// Reads answer with more than was asked for.
    LongReads,
    /// WaitOom answers at once, forever: a huge id of no container of the sandbox, then the
    /// first container's, in turn; Stats answers for any id, one more OOM kill each time.
    OomFlood,
}

struct Hostile {
    fake: Arc<FakeAgent>,
    how: Misbehaviour,
    reads: AtomicU64,
    ooms: AtomicU64,
    kills: AtomicU64,
    /// The container the OOM flood names besides the foreign ids.
    own: Mutex<String>,
}

type R<T> = ttrpc::Result<T>;

impl Hostile {
    async fn read(
        &self,
        ctx: &TtrpcContext,
        req: proto::ReadRequest,
        err: bool,
    ) -> R<proto::ReadResponse> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let data = match self.how {
            Misbehaviour::EmptyReads => Vec::new(),
            Misbehaviour::HugeFrames => vec![b'x'; 3 << 20],
            Misbehaviour::LongReads => vec![b'x'; req.len as usize + 1],
            Misbehaviour::OomFlood if err => return self.fake.read_stderr(ctx, req).await,
            Misbehaviour::OomFlood => return self.fake.read_stdout(ctx, req).await,
        };
        Ok(proto::ReadResponse {
            data,
            eof: false,
            ..Default::default()
        })
    }
}

#[async_trait]
impl proto::Agent for Hostile {
    async fn hello(&self, c: &TtrpcContext, r: proto::HelloRequest) -> R<proto::HelloResponse> {
        self.fake.hello(c, r).await
    }

    async fn create_container(
        &self,
        c: &TtrpcContext,
        r: proto::CreateContainerRequest,
    ) -> R<proto::Empty> {
        self.fake.create_container(c, r).await
    }

    async fn start_process(
        &self,
        c: &TtrpcContext,
        r: proto::ProcessRequest,
    ) -> R<proto::StartProcessResponse> {
        self.fake.start_process(c, r).await
    }

    async fn signal_process(&self, c: &TtrpcContext, r: proto::SignalRequest) -> R<proto::Empty> {
        self.fake.signal_process(c, r).await
    }

    async fn wait_process(
        &self,
        c: &TtrpcContext,
        r: proto::ProcessRequest,
    ) -> R<proto::WaitResponse> {
        self.fake.wait_process(c, r).await
    }

    async fn read_stdout(&self, c: &TtrpcContext, r: proto::ReadRequest) -> R<proto::ReadResponse> {
        self.read(c, r, false).await
    }

    async fn read_stderr(&self, c: &TtrpcContext, r: proto::ReadRequest) -> R<proto::ReadResponse> {
        self.read(c, r, true).await
    }

    async fn list_pids(
        &self,
        c: &TtrpcContext,
        r: proto::ContainerRequest,
    ) -> R<proto::PidsResponse> {
        self.fake.list_pids(c, r).await
    }

    async fn stats(&self, c: &TtrpcContext, r: proto::ContainerRequest) -> R<proto::StatsResponse> {
        if self.how != Misbehaviour::OomFlood {
            return self.fake.stats(c, r).await;
        }
        // For any id, with one more kill each time.
        Ok(proto::StatsResponse {
            oom_kills: self.kills.fetch_add(1, Ordering::SeqCst) + 1,
            ..Default::default()
        })
    }

    async fn remove_container(
        &self,
        c: &TtrpcContext,
        r: proto::ContainerRequest,
    ) -> R<proto::Empty> {
        self.fake.remove_container(c, r).await
    }

    async fn wait_oom(&self, c: &TtrpcContext, r: proto::Empty) -> R<proto::OomEvent> {
        if self.how != Misbehaviour::OomFlood {
            return self.fake.wait_oom(c, r).await;
        }
        let n = self.ooms.fetch_add(1, Ordering::SeqCst);
        let container_id = if n.is_multiple_of(2) {
            // Within the frame cap, so it reaches the shim: 512 KiB of another sandbox's id.
            format!("foreign-{n}-{}", "f".repeat(512 << 10))
        } else {
            self.own.lock().unwrap().clone()
        };
        Ok(proto::OomEvent {
            container_id,
            ..Default::default()
        })
    }

    async fn close_stdin(&self, c: &TtrpcContext, r: proto::ProcessRequest) -> R<proto::Empty> {
        self.fake.close_stdin(c, r).await
    }

    async fn shutdown(&self, c: &TtrpcContext, r: proto::Empty) -> R<proto::Empty> {
        self.fake.shutdown(c, r).await
    }
}

// ---- the harness ---------------------------------------------------------------------------

/// One test at a time: the measurements are the test thread's, but a quiet machine keeps the
/// timing checks honest.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const DEADLINE: Duration = Duration::from_secs(20);

struct World {
    _dir: tempfile::TempDir,
    hostile: Arc<Hostile>,
    backends: FakeBackends,
    engine: VmEngine,
    bundles: Bundles,
    events: EventsServer,
}

impl World {
    async fn new(how: Misbehaviour) -> World {
        let dir = tempfile::tempdir().unwrap();
        let hostile = Arc::new(Hostile {
            fake: FakeAgent::new(),
            how,
            reads: AtomicU64::new(0),
            ooms: AtomicU64::new(0),
            kills: AtomicU64::new(0),
            own: Mutex::new("c1".into()),
        });
        let backends = FakeBackends::sharing(hostile.clone());
        let engine = VmEngine::with_backends(Arc::new(backends.clone()), dir.path().join("state"));
        let bundles = Bundles::new(dir.path());
        let events = EventsServer::start(dir.path()).await;
        World {
            _dir: dir,
            hostile,
            backends,
            engine,
            bundles,
            events,
        }
    }

    async fn sleeper(&self, id: &str) -> Arc<dyn Container> {
        let spec = spec_json(&["/bin/sleep", "600"], &[("io.switchyard.group", "g")], "");
        let req = self
            .bundles
            .request(id, &spec, self.events.publisher().await);
        self.engine.create(req).await.unwrap()
    }

    fn vm(&self) -> Arc<FakeVmState> {
        self.backends.vms()[0].clone()
    }
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, f).await {
        Ok(v) => v,
        Err(_) => panic!("not within {DEADLINE:?}: {what}"),
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    within(what, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// The sandbox is torn down: its VM ended, the container's init reads as killed, calls fail
/// naming the violation, and delete still cleans up.
async fn assert_torn_down(w: &World, c: &Arc<dyn Container>, violation: &str) {
    let vm = w.vm();
    within("the VM torn down", vm.wait_ended()).await;
    assert_eq!(within("the init's exit", c.init().wait()).await.status, 137);
    let e = c
        .pids()
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("the guest agent broke the protocol (") && e.contains(violation),
        "{e}"
    );
    c.delete(false).await.unwrap();
    assert!(!vm.config.state_dir.exists());
}

// ---- the tests -----------------------------------------------------------------------------

#[tokio::test]
async fn issue16_empty_reads_do_not_spin_the_shim_and_tear_the_sandbox_down() {
    let _serial = SERIAL.lock().await;
    let w = World::new(Misbehaviour::EmptyReads).await;
    let c = w.sleeper("c1").await;
    let cpu = thread_cpu();
    c.init().start().await.unwrap();
    assert_torn_down(&w, &c, "replies in a row with neither data nor end of file").await;
    let used = thread_cpu() - cpu;
    let reads = w.hostile.reads.load(Ordering::SeqCst);
    println!("empty reads served: {reads}; shim CPU until teardown: {used:?}");
    // Two pumps (stdout, stderr) give up after MAX_EMPTY_READS each.
    assert!(reads <= 2 * 8 + 2, "{reads} reads: the pump spun");
    assert!(used < Duration::from_millis(300), "{used:?}");
}

#[tokio::test]
async fn issue16_oversized_frames_are_refused_before_the_shim_allocates_them() {
    let _serial = SERIAL.lock().await;
    let w = World::new(Misbehaviour::HugeFrames).await;
    let c = w.sleeper("c1").await;
    let base = reset_peak();
    c.init().start().await.unwrap();
    within("the VM torn down", w.vm().wait_ended()).await;
    let grew = peak() - base;
    println!("peak allocation of the shim's thread above its start: {grew} bytes");
    // The 3 MiB body is never read: no buffer near its size was allocated.
    assert!(grew < 1 << 20, "{grew} bytes");
    assert_torn_down(&w, &c, "a frame of 3145").await;
}

#[tokio::test]
async fn issue16_reads_longer_than_asked_tear_the_sandbox_down() {
    let _serial = SERIAL.lock().await;
    let w = World::new(Misbehaviour::LongReads).await;
    let c = w.sleeper("c1").await;
    c.init().start().await.unwrap();
    assert_torn_down(&w, &c, "65537 bytes for a read of at most 65536").await;
    assert_eq!(w.bundles.stdout("c1"), "", "a longer read was delivered");
}

#[tokio::test]
async fn issue16_oom_reports_are_checked_paced_and_forgotten_on_delete() {
    let _serial = SERIAL.lock().await;
    let w = World::new(Misbehaviour::OomFlood).await;
    let c1 = w.sleeper("c1").await;
    let c2 = w.sleeper("c2").await;
    let (started, cpu) = (Instant::now(), thread_cpu());
    let base = live();
    let served = || w.hostile.ooms.load(Ordering::SeqCst);
    until("20 OOM reports served", || served() >= 20).await;
    let (elapsed, used, grew) = (started.elapsed(), thread_cpu() - cpu, live() - base);
    let short = |ids: Vec<String>| -> Vec<String> {
        ids.into_iter()
            .map(|id| id.chars().take(24).collect())
            .collect()
    };
    println!(
        "20 OOM reports in {elapsed:?}, shim CPU {used:?}, live bytes grew by {grew}; \
         events: {:?}",
        short(w.events.ooms())
    );
    // Paced: one report per 100 ms at most (the agent's flood waits meanwhile). The 20th
    // report is asked for 18 intervals after the first two (1.8 s); unpaced, they all come
    // within about 0.1 s.
    assert!(elapsed >= Duration::from_millis(1500), "{elapsed:?}");
    assert!(used < Duration::from_millis(500), "{used:?}");
    // Ten foreign ids of 512 KiB each were reported: none was kept.
    assert!(grew < 1 << 20, "{grew} bytes kept");
    until("OOM events of c1", || !w.events.ooms().is_empty()).await;
    assert!(
        w.events.ooms().iter().all(|id| id == "c1"),
        "an event about a container that is not the sandbox's: {:?}",
        short(w.events.ooms())
    );

    // c1 deleted: reports naming it are foreign now. c2 keeps the VM.
    c1.delete(true).await.unwrap();
    let published = w.events.ooms().len();
    let after = served();
    until("10 more OOM reports", || served() >= after + 10).await;
    assert_eq!(
        w.events.ooms().len(),
        published,
        "an event for a deleted container"
    );
    assert!(!w.vm().ended());
    *w.hostile.own.lock().unwrap() = "c2".into();
    until("an OOM event of c2", || {
        w.events.ooms().iter().any(|id| id == "c2")
    })
    .await;
    c2.delete(true).await.unwrap();
    assert!(w.vm().ended());
}
