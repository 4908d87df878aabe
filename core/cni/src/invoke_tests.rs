//! ADD/DEL/CHECK against a recording invoker: what each plugin gets (env, stdin), in which
//! order, what is cached, and what happens when one fails. No root, no real plugin.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::sync::Mutex;

use serde_json::json;
use switchyard_base::chain;

use super::*;
use crate::config::ConfKind;

#[derive(Debug, Clone)]
struct Call {
    plugin: String,
    command: String,
    env: BTreeMap<String, String>,
    stdin: Value,
}

/// Answers ADD with a result naming the plugin, DEL and CHECK with nothing, unless told
/// otherwise for a plugin and command.
#[derive(Debug, Default)]
struct Fake {
    calls: Mutex<Vec<Call>>,
    answers: Mutex<HashMap<(String, String), PluginOutput>>,
}

impl Fake {
    fn answer(&self, plugin: &str, command: &str, exit: Exit, stdout: &str, stderr: &str) {
        self.answers.lock().unwrap().insert(
            (plugin.into(), command.into()),
            PluginOutput {
                exit,
                stdout: stdout.into(),
                stderr: stderr.into(),
            },
        );
    }

    fn calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

fn result_of(plugin: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/run/netns/p"}],
        "ips": [{"interface": 0, "address": "10.88.0.2/24"}],
        "dns": {"domain": plugin},
    })
}

impl Invoker for Fake {
    fn invoke(&self, call: &PluginCall<'_>) -> Result<PluginOutput, ExecError> {
        let plugin = call
            .binary
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let env: BTreeMap<String, String> = call
            .env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string_lossy().into_owned()))
            .collect();
        let command = env["CNI_COMMAND"].clone();
        self.calls.lock().unwrap().push(Call {
            plugin: plugin.clone(),
            command: command.clone(),
            env,
            stdin: serde_json::from_slice(call.stdin).unwrap(),
        });
        if let Some(out) = self
            .answers
            .lock()
            .unwrap()
            .get(&(plugin.clone(), command.clone()))
        {
            return Ok(out.clone());
        }
        let stdout = if command == "ADD" {
            result_of(&plugin).to_string().into_bytes()
        } else {
            Vec::new()
        };
        Ok(PluginOutput {
            exit: Exit::Code(0),
            stdout,
            stderr: Vec::new(),
        })
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    cni: Cni,
    fake: Arc<Fake>,
    bin: PathBuf,
}

fn setup(plugins: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for p in plugins {
        let path = bin.join(p);
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let fake = Arc::new(Fake::default());
    let cni = Cni::new(
        vec![dir.path().join("other-bin"), bin.clone()],
        dir.path().join("cache"),
    )
    .unwrap()
    .with_invoker(fake.clone());
    Setup {
        _dir: dir,
        cni,
        fake,
        bin,
    }
}

fn list(version: &str, plugins: Value) -> NetworkList {
    let body = json!({"cniVersion": version, "name": "yardnet", "plugins": plugins});
    NetworkList::parse(
        body.to_string().as_bytes(),
        ConfKind::List,
        Path::new("t.conflist"),
    )
    .unwrap()
}

fn three(version: &str) -> NetworkList {
    list(
        version,
        json!([
            {"type": "loopback"},
            {"type": "bridge", "bridge": "yard0", "ipam": {"type": "host-local"}},
            {"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": true}},
        ]),
    )
}

fn attachment() -> Attachment {
    Attachment::new("c0ffee", Path::new("/run/yard/netns/pod"), "eth0")
        .with_pod("default", "web", Some("uid-1"))
        .with_port_mappings(vec![
            PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Tcp,
                host_ip: Some("10.88.0.1".parse().unwrap()),
            },
            PortMapping {
                host_port: 0,
                container_port: 9090,
                protocol: Protocol::Tcp,
                host_ip: None,
            },
            PortMapping {
                host_port: 5353,
                container_port: 53,
                protocol: Protocol::Udp,
                host_ip: None,
            },
        ])
}

fn order(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .map(|c| format!("{} {}", c.command, c.plugin))
        .collect()
}

#[test]
fn add_chains_prev_result_and_sends_runtime_config() {
    let s = setup(&["loopback", "bridge", "portmap"]);
    let net = three("1.0.0");
    let res = s.cni.add(&net, &attachment()).unwrap();
    // The last plugin's result is the list's.
    assert_eq!(res.dns.domain.as_deref(), Some("portmap"));

    let calls = s.fake.calls();
    assert_eq!(order(&calls), ["ADD loopback", "ADD bridge", "ADD portmap"]);
    let env = &calls[1].env;
    assert_eq!(env["CNI_COMMAND"], "ADD");
    assert_eq!(env["CNI_CONTAINERID"], "c0ffee");
    assert_eq!(env["CNI_NETNS"], "/run/yard/netns/pod");
    assert_eq!(env["CNI_IFNAME"], "eth0");
    assert_eq!(
        env["CNI_ARGS"],
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;\
         K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=uid-1"
    );
    assert_eq!(
        env["CNI_PATH"],
        format!(
            "{}:{}",
            s.bin.parent().unwrap().join("other-bin").display(),
            s.bin.display()
        )
    );

    // Each plugin's own config, with the list's name and version.
    for c in &calls {
        assert_eq!(c.stdin["name"], "yardnet");
        assert_eq!(c.stdin["cniVersion"], "1.0.0");
        assert_eq!(c.stdin["type"], c.plugin.as_str());
    }
    assert_eq!(calls[1].stdin["bridge"], "yard0");
    assert_eq!(calls[1].stdin["ipam"]["type"], "host-local");
    // prevResult: none for the first, then the previous plugin's result.
    assert!(calls[0].stdin.get("prevResult").is_none());
    assert_eq!(calls[1].stdin["prevResult"], result_of("loopback"));
    assert_eq!(calls[2].stdin["prevResult"], result_of("bridge"));
    // runtimeConfig only where a capability asks, portMappings as portmap reads them (the
    // hostPort 0 one left out); bandwidth has no value here, so it is not sent.
    assert!(calls[1].stdin.get("runtimeConfig").is_none());
    assert_eq!(
        calls[2].stdin["runtimeConfig"],
        json!({"portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "10.88.0.1"},
            {"hostPort": 5353, "containerPort": 53, "protocol": "udp"},
        ]})
    );

    // The result is cached for DEL.
    let cached = s.cni.cache().read("c0ffee", "eth0").unwrap().unwrap();
    assert_eq!(cached.result, result_of("portmap"));
    assert_eq!(cached.network_name, "yardnet");
    assert_eq!(s.cni.cached_result("c0ffee", "eth0").unwrap(), Some(res));
}

#[test]
fn other_capabilities_pass_through_as_given() {
    let s = setup(&["bandwidth"]);
    let net = list(
        "1.0.0",
        json!([{"type": "bandwidth", "capabilities": {"bandwidth": true}}]),
    );
    let mut att = attachment();
    att.runtime.other.insert(
        "bandwidth".into(),
        json!({"ingressRate": 1000, "ingressBurst": 10}),
    );
    s.cni.add(&net, &att).unwrap();
    let calls = s.fake.calls();
    assert_eq!(
        calls[0].stdin["runtimeConfig"],
        json!({"bandwidth": {"ingressRate": 1000, "ingressBurst": 10}})
    );
}

#[test]
fn del_runs_in_reverse_with_the_cached_result_and_removes_it() {
    let s = setup(&["loopback", "bridge", "portmap"]);
    let net = three("1.0.0");
    s.cni.add(&net, &attachment()).unwrap();
    s.fake.calls();
    s.cni.del(&net, &attachment()).unwrap();
    let calls = s.fake.calls();
    assert_eq!(order(&calls), ["DEL portmap", "DEL bridge", "DEL loopback"]);
    for c in &calls {
        assert_eq!(c.env["CNI_COMMAND"], "DEL");
        assert_eq!(c.stdin["prevResult"], result_of("portmap"));
    }
    assert!(!s.cni.cache().path("c0ffee", "eth0").unwrap().exists());

    // Again, with nothing cached: still every plugin, without prevResult.
    s.cni.del(&net, &attachment()).unwrap();
    let calls = s.fake.calls();
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|c| c.stdin.get("prevResult").is_none()));
}

#[test]
fn del_of_a_031_list_sends_no_prev_result() {
    let s = setup(&["loopback", "bridge", "portmap"]);
    let net = three("0.3.1");
    s.cni.add(&net, &attachment()).unwrap();
    s.fake.calls();
    s.cni.del(&net, &attachment()).unwrap();
    assert!(
        s.fake
            .calls()
            .iter()
            .all(|c| c.stdin.get("prevResult").is_none())
    );
}

#[test]
fn a_failed_del_runs_the_rest_and_keeps_the_cache() {
    let s = setup(&["loopback", "bridge", "portmap"]);
    let net = three("1.0.0");
    s.cni.add(&net, &attachment()).unwrap();
    s.fake.calls();
    s.fake.answer(
        "portmap",
        "DEL",
        Exit::Code(1),
        r#"{"code": 999, "msg": "iptables is locked"}"#,
        "",
    );
    let e = s.cni.del(&net, &attachment()).unwrap_err();
    assert_eq!(
        chain(&e),
        "DEL of network yardnet: plugin portmap: iptables is locked (code 999)"
    );
    assert_eq!(
        order(&s.fake.calls()),
        ["DEL portmap", "DEL bridge", "DEL loopback"]
    );
    assert!(s.cni.cache().path("c0ffee", "eth0").unwrap().exists());
}

#[test]
fn a_failed_add_is_rolled_back_and_not_cached() {
    let s = setup(&["loopback", "bridge", "portmap"]);
    let net = three("1.0.0");
    s.fake.answer(
        "portmap",
        "ADD",
        Exit::Code(1),
        r#"{"cniVersion": "1.0.0", "code": 7, "msg": "invalid port", "details": "hostPort 8080"}"#,
        "",
    );
    let e = s.cni.add(&net, &attachment()).unwrap_err();
    assert_eq!(
        chain(&e),
        "ADD of network yardnet: plugin portmap: invalid port: hostPort 8080 (code 7)"
    );
    let CniError::Plugin {
        plugin,
        source: PluginError::Failed { code, msg, .. },
        ..
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(
        (plugin.as_str(), *code, msg.as_str()),
        ("portmap", 7, "invalid port")
    );

    let calls = s.fake.calls();
    assert_eq!(
        order(&calls),
        [
            "ADD loopback",
            "ADD bridge",
            "ADD portmap",
            "DEL portmap",
            "DEL bridge",
            "DEL loopback"
        ]
    );
    // The cleanup hands on the last good result.
    for c in &calls[3..] {
        assert_eq!(c.stdin["prevResult"], result_of("bridge"));
    }
    assert!(!s.cni.cache().path("c0ffee", "eth0").unwrap().exists());
}

#[test]
fn a_failed_first_plugin_is_deleted_alone() {
    let s = setup(&["loopback", "bridge", "portmap"]);
    let net = three("1.0.0");
    s.fake.answer("loopback", "ADD", Exit::Signal(9), "", "");
    let e = s.cni.add(&net, &attachment()).unwrap_err();
    assert_eq!(
        chain(&e),
        "ADD of network yardnet: plugin loopback: signal 9 without an error result"
    );
    let calls = s.fake.calls();
    assert_eq!(order(&calls), ["ADD loopback", "DEL loopback"]);
    assert!(calls[1].stdin.get("prevResult").is_none());
}

#[test]
fn a_missing_plugin_fails_before_any_call() {
    let s = setup(&["loopback", "bridge"]);
    let e = s.cni.add(&three("1.0.0"), &attachment()).unwrap_err();
    assert!(
        matches!(&e, CniError::PluginNotFound { plugin, .. } if plugin == "portmap"),
        "{e:?}"
    );
    assert!(chain(&e).starts_with("ADD of network yardnet: plugin \"portmap\" is not in "));
    assert!(s.fake.calls().is_empty());
}

#[test]
fn a_plugin_file_that_is_not_executable_is_not_found() {
    let s = setup(&["loopback", "bridge", "portmap"]);
    std::fs::set_permissions(s.bin.join("bridge"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = s.cni.add(&three("1.0.0"), &attachment()).unwrap_err();
    assert!(matches!(&e, CniError::PluginNotFound { plugin, .. } if plugin == "bridge"));
}

#[test]
fn failures_without_an_error_result_and_bad_results() {
    let s = setup(&["bridge"]);
    let net = list("1.0.0", json!([{"type": "bridge"}]));
    let cases = [
        (
            Exit::Code(2),
            "not json",
            "panic: oops\n",
            "exit code 2 without an error result, stderr: panic: oops",
        ),
        (Exit::Code(0), "", "", "ADD printed no result"),
        (
            Exit::Code(0),
            "{",
            "",
            "ADD printed an invalid result: not a CNI result",
        ),
        (
            Exit::Code(0),
            r#"{"cniVersion": "0.1.0"}"#,
            "",
            "ADD printed an invalid result: cniVersion \"0.1.0\" is not one this crate reads",
        ),
    ];
    for (exit, stdout, stderr, want) in cases {
        s.fake.answer("bridge", "ADD", exit, stdout, stderr);
        let e = s.cni.add(&net, &attachment()).unwrap_err();
        let got = chain(&e);
        assert!(
            got.starts_with(&format!("ADD of network yardnet: plugin bridge: {want}")),
            "{got}"
        );
        assert_eq!(order(&s.fake.calls()), ["ADD bridge", "DEL bridge"]);
    }
}

#[test]
fn check_uses_the_cached_result() {
    let s = setup(&["loopback", "bridge", "portmap"]);
    let net = three("1.0.0");
    let e = s.cni.check(&net, &attachment()).unwrap_err();
    assert!(matches!(e, CniError::NoCachedResult { .. }), "{e:?}");
    assert!(s.fake.calls().is_empty());

    s.cni.add(&net, &attachment()).unwrap();
    s.fake.calls();
    s.cni.check(&net, &attachment()).unwrap();
    let calls = s.fake.calls();
    assert_eq!(
        order(&calls),
        ["CHECK loopback", "CHECK bridge", "CHECK portmap"]
    );
    assert!(
        calls
            .iter()
            .all(|c| c.stdin["prevResult"] == result_of("portmap"))
    );

    s.fake.answer(
        "bridge",
        "CHECK",
        Exit::Code(1),
        r#"{"code": 11, "msg": "veth gone"}"#,
        "",
    );
    let e = s.cni.check(&net, &attachment()).unwrap_err();
    assert_eq!(
        chain(&e),
        "CHECK of network yardnet: plugin bridge: veth gone (code 11)"
    );
}

#[test]
fn check_needs_040_and_honours_disable_check() {
    let s = setup(&["loopback", "bridge", "portmap"]);
    let e = s.cni.check(&three("0.3.1"), &attachment()).unwrap_err();
    assert!(matches!(e, CniError::CheckUnsupported { .. }));
    let net = NetworkList {
        disable_check: true,
        ..three("1.0.0")
    };
    s.cni.check(&net, &attachment()).unwrap();
    assert!(s.fake.calls().is_empty());
}

#[test]
fn bad_attachments_are_refused_before_any_call() {
    let s = setup(&["loopback", "bridge", "portmap"]);
    let net = three("1.0.0");
    let base = attachment();
    let mut cases = Vec::new();
    for id in ["", "../x", "a/b", "-a", "a:b"] {
        cases.push(Attachment {
            container_id: id.into(),
            ..base.clone()
        });
    }
    for ifname in ["", ".", "..", "a/b", "eth:0", "eth 0", "sixteen-chars-xx"] {
        cases.push(Attachment {
            if_name: ifname.into(),
            ..base.clone()
        });
    }
    cases.push(Attachment {
        netns: "relative/ns".into(),
        ..base.clone()
    });
    for (k, v) in [
        ("", "x"),
        ("a=b", "x"),
        ("a;b", "x"),
        ("K", "v;IgnoreUnknown=0"),
    ] {
        let mut a = base.clone();
        a.args.push((k.into(), v.into()));
        cases.push(a);
    }
    for a in cases {
        for r in [
            s.cni.add(&net, &a).map(|_| ()),
            s.cni.del(&net, &a),
            s.cni.check(&net, &a),
        ] {
            assert!(
                matches!(r, Err(CniError::InvalidArgument { .. })),
                "{a:?}: {r:?}"
            );
        }
    }
    assert!(s.fake.calls().is_empty());
}

#[test]
fn cni_new_refuses_relative_or_colon_paths() {
    assert!(Cni::new(vec!["bin".into()], "/c".into()).is_err());
    assert!(Cni::new(vec!["/a:b".into()], "/c".into()).is_err());
    assert!(Cni::new(vec!["/usr/lib/cni".into()], "cache".into()).is_err());
}

#[test]
fn stdin_replaces_a_prev_result_or_runtime_config_written_in_the_file() {
    let net = list(
        "1.0.0",
        json!([{"type": "portmap", "prevResult": {"x": 1}, "runtimeConfig": {"portMappings": "file"},
                "capabilities": {"portMappings": true}}]),
    );
    let rt = RuntimeConfig::default();
    let stdin: Value =
        serde_json::from_str(&plugin_stdin(&net, &net.plugins[0], None, &rt)).unwrap();
    assert!(stdin.get("prevResult").is_none());
    assert_eq!(stdin["runtimeConfig"], json!({"portMappings": []}));
}

#[test]
fn versions_order() {
    assert_eq!(version_cmp("0.3.1", "0.4.0"), Ordering::Less);
    assert_eq!(version_cmp("1.0.0", "0.4.0"), Ordering::Greater);
    assert_eq!(version_cmp("0.4.0", "0.4.0"), Ordering::Equal);
}

#[test]
fn del_leaves_another_networks_entry_and_takes_an_unreadable_one() {
    let s = setup(&["loopback", "bridge", "portmap"]);
    let net = three("1.0.0");
    s.cni.add(&net, &attachment()).unwrap();
    let path = s.cni.cache().path("c0ffee", "eth0").unwrap();

    // A DEL of another network on the same interface neither uses nor removes the entry.
    let other = NetworkList {
        name: "othernet".into(),
        ..three("1.0.0")
    };
    s.fake.calls();
    s.cni.del(&other, &attachment()).unwrap();
    assert!(
        s.fake
            .calls()
            .iter()
            .all(|c| c.stdin.get("prevResult").is_none())
    );
    assert!(path.exists());

    // An entry that cannot be read does not stop the DEL, and goes with it.
    std::fs::write(&path, "{").unwrap();
    s.cni.del(&net, &attachment()).unwrap();
    assert_eq!(s.fake.calls().len(), 3);
    assert!(!path.exists());
    // And CHECK says what is wrong with it.
    std::fs::write(&path, "{").unwrap();
    let e = s.cni.check(&net, &attachment()).unwrap_err();
    assert!(matches!(e, CniError::Cache { .. }), "{e:?}");
}

#[test]
fn a_hand_built_list_gets_the_parsers_checks() {
    let s = setup(&["loopback", "bridge", "portmap"]);
    let mut net = three("1.0.0");
    net.plugins[1].plugin_type = "../../bin/sh".into();
    let e = s.cni.add(&net, &attachment()).unwrap_err();
    assert!(
        matches!(
            e,
            CniError::InvalidArgument {
                what: "plugin type",
                ..
            }
        ),
        "{e:?}"
    );
    let empty = NetworkList {
        plugins: Vec::new(),
        ..three("1.0.0")
    };
    assert!(matches!(
        s.cni.del(&empty, &attachment()),
        Err(CniError::InvalidArgument { .. })
    ));
    let old = NetworkList {
        cni_version: "0.2.0".into(),
        ..three("1.0.0")
    };
    assert!(matches!(
        s.cni.check(&old, &attachment()),
        Err(CniError::InvalidArgument { .. })
    ));
    assert!(s.fake.calls().is_empty());
}

#[test]
fn an_add_whose_result_cannot_be_cached_is_undone() {
    let s = setup(&["loopback", "bridge", "portmap"]);
    // A cache directory that cannot be made: a path under a regular file.
    let file = s.bin.join("loopback");
    let cni = Cni::new(vec![s.bin.clone()], file.join("cache"))
        .unwrap()
        .with_invoker(s.fake.clone());
    let e = cni.add(&three("1.0.0"), &attachment()).unwrap_err();
    assert!(
        matches!(
            e,
            CniError::Cache {
                command: Command::Add,
                ..
            }
        ),
        "{e:?}"
    );
    let calls = s.fake.calls();
    assert_eq!(
        order(&calls),
        [
            "ADD loopback",
            "ADD bridge",
            "ADD portmap",
            "DEL portmap",
            "DEL bridge",
            "DEL loopback"
        ]
    );
    assert!(
        calls[3..]
            .iter()
            .all(|c| c.stdin["prevResult"] == result_of("portmap"))
    );
}
