//! Event collectors: `yard events --json` and `ctr events`, read line by line by a thread so a
//! test can wait for an event while its task runs. Each returns from `watch` only once its
//! subscription is live (a probe published after subscribing has come through), so no event of
//! the test can be missed and no fixed sleep is needed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Ctr, Daemon, KillOnDrop, eventually, unique_id};

/// How long an event may take to arrive, and a subscription to become live.
pub const EVENT_DEADLINE: Duration = Duration::from_secs(10);

/// The lines a child writes to its stdout, each with the time it arrived; the child is killed
/// when this is dropped.
pub struct Lines {
    child: KillOnDrop,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Lines {
    /// Spawns `cmd` (stdin and stderr null) and collects its stdout.
    pub fn spawn(cmd: &mut Command) -> Lines {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((Instant::now(), line));
            }
        });
        Lines {
            child: KillOnDrop(child),
            lines,
        }
    }

    /// The lines so far, with their arrival times.
    pub fn timed(&self) -> Vec<(Instant, String)> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The lines so far, each ended by a newline.
    pub fn text(&self) -> String {
        self.timed().into_iter().map(|(_, l)| l + "\n").collect()
    }

    /// Stops the child; the lines collected stay.
    pub fn stop(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }
}

/// `yard events --json`, parsed.
pub struct Events {
    lines: Lines,
}

impl Events {
    /// Subscribes to every event, and returns once the subscription is live.
    pub fn watch_all(d: &Daemon) -> Events {
        Self::watch(d, &[])
    }

    /// Subscribes to the events of container `id`, and returns once the subscription is live.
    pub fn watch_container(d: &Daemon, id: &str) -> Events {
        Self::watch(d, &[&format!("event.container_id=={id}")])
    }

    /// Subscribes with containerd `filters` (any of which lets an event through; none: every
    /// event), and returns once the subscription is live: a probe event published the way a
    /// shim's -publish-binary does (a `/tasks/oom` for a container of its own) has come
    /// through.
    pub fn watch(d: &Daemon, filters: &[&str]) -> Events {
        let probe = unique_id("probe");
        let probe_filter = format!("event.container_id=={probe}");
        let mut cmd = d.yard();
        cmd.args(["events", "--json"]).args(filters);
        if !filters.is_empty() {
            cmd.arg(&probe_filter);
        }
        let ev = Events {
            lines: Lines::spawn(&mut cmd),
        };
        let deadline = Instant::now() + EVENT_DEADLINE;
        loop {
            d.publish_probe(&probe);
            if eventually(Duration::from_millis(250), || {
                ev.find(|v| v["event"]["container_id"] == probe.as_str())
                    .is_some()
            }) {
                return ev;
            }
            assert!(
                Instant::now() < deadline,
                "yard events never delivered a probe event: {}",
                ev.dump()
            );
        }
    }

    /// The events so far, with their arrival times.
    pub fn timed(&self) -> Vec<(Instant, Value)> {
        self.lines
            .timed()
            .into_iter()
            .filter_map(|(t, l)| Some((t, serde_json::from_str(&l).ok()?)))
            .collect()
    }

    /// The first event `pred` accepts.
    pub fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.timed().into_iter().map(|(_, v)| v).find(|v| pred(v))
    }

    /// Waits for the event `topic` of container `id` that `pred` accepts (`what` says which,
    /// for the failure message); returns it with its arrival time.
    pub fn wait_timed(
        &self,
        topic: &str,
        id: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> (Instant, Value) {
        let find = || {
            self.timed()
                .into_iter()
                .find(|(_, v)| v["topic"] == topic && v["event"]["container_id"] == id && pred(v))
        };
        if eventually(EVENT_DEADLINE, || find().is_some())
            && let Some(found) = find()
        {
            return found;
        }
        panic!(
            "no {topic} event for {id} with {what}; events seen:\n{}",
            self.dump()
        );
    }

    /// Waits for the event `topic` of container `id` that `pred` accepts.
    pub fn wait_for(
        &self,
        topic: &str,
        id: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_timed(topic, id, what, pred).1
    }

    /// Every event so far, one a line.
    pub fn dump(&self) -> String {
        self.lines.text()
    }

    /// Stops collecting; the events collected stay.
    pub fn stop(&mut self) {
        self.lines.stop();
    }
}

/// `ctr events` (lines `TIME NAMESPACE TOPIC PAYLOAD`), from switchyardd or containerd.
pub struct CtrEvents {
    lines: Lines,
}

impl CtrEvents {
    /// Subscribes and returns once the subscription is live: a probe published after
    /// subscribing (see [`Ctr::publish_probe`]) has come through.
    pub fn watch(daemon: &impl Ctr) -> CtrEvents {
        let ev = CtrEvents {
            lines: Lines::spawn(daemon.ctr_command().arg("events")),
        };
        let probe = unique_id("yard-probe");
        let deadline = Instant::now() + EVENT_DEADLINE;
        loop {
            daemon.publish_probe(&probe);
            if eventually(Duration::from_millis(250), || ev.text().contains(&probe)) {
                return ev;
            }
            assert!(
                Instant::now() < deadline,
                "ctr events never showed the probe: {}",
                ev.text()
            );
        }
    }

    /// Every line so far.
    pub fn text(&self) -> String {
        self.lines.text()
    }

    /// The payloads of `topic` events for container `id`.
    pub fn find(&self, topic: &str, id: &str) -> Vec<Value> {
        let marker = format!(" {topic} ");
        self.lines
            .timed()
            .iter()
            .filter_map(|(_, l)| {
                let (_, payload) = l.split_once(&marker)?;
                let v: Value = serde_json::from_str(payload).ok()?;
                (v["container_id"] == id).then_some(v)
            })
            .collect()
    }

    /// The topics of container `id`'s events so far, in the order they came.
    pub fn topics(&self, id: &str) -> Vec<String> {
        self.lines
            .timed()
            .iter()
            .filter_map(|(_, l)| {
                let topic = l.split_whitespace().find(|w| w.starts_with('/'))?;
                let (_, payload) = l.split_once(&format!(" {topic} "))?;
                let v: Value = serde_json::from_str(payload).ok()?;
                (v["container_id"] == id).then(|| topic.to_owned())
            })
            .collect()
    }

    /// Waits (up to [`EVENT_DEADLINE`]) for `topic` events for container `id`.
    pub fn wait_for(&self, topic: &str, id: &str) -> Vec<Value> {
        eventually(EVENT_DEADLINE, || !self.find(topic, id).is_empty());
        self.find(topic, id)
    }

    /// Stops collecting; the lines collected stay.
    pub fn stop(&mut self) {
        self.lines.stop();
    }
}
