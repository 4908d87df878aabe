//! The nested-KVM test harness (`switchyard_tests::nested`) proves itself: inside the outer
//! QEMU TCG VM (emulated AMD SVM), `/dev/kvm` is kvm_amd, the vm shim's `info` sees hardware
//! virtualization and no PVM (so it would pick `-accel kvm`), and KVM answers ioctls: API
//! version 12, and a VM can be created.
//!
//! Needs root, qemu-system-x86_64, busybox-static, and the outer kernel (`scripts/guest` builds
//! it with `guest/kernel/build.sh nested`); skips with a printed reason otherwise.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::time::Duration;

use switchyard_tests::nested::{self, NestedVm, switchyard_in_harness};
use switchyard_tests::*;

/// Set inside the nested VM to make `probe_kvm_inside_the_nested_vm` do its work.
const PROBE_ENV: &str = "SWITCHYARD_NESTED_PROBE";
const PROBE_TEST: &str = "probe_kvm_inside_the_nested_vm";

#[test]
fn nested_vm_has_hardware_kvm() {
    if !require_root_and(&["mkfs.erofs"]) || !nested::require_harness() {
        return;
    }
    let shim = bin("containerd-shim-yard-vm-v1");
    let me = std::env::current_exe().unwrap();
    let vm = NestedVm::builder()
        .binary(&shim, "/usr/bin/containerd-shim-yard-vm-v1")
        // This test binary is the KVM probe too (see the test below).
        .binary(&me, "/usr/bin/nested-probe")
        .mkfs_erofs()
        .env(PROBE_ENV, "1")
        .payload(&format!(
            "set -e\n\
             ls -l /dev/kvm\n\
             echo \"info: $(containerd-shim-yard-vm-v1 info)\"\n\
             nested-probe --exact {PROBE_TEST} --nocapture --test-threads=1\n\
             mkfs.erofs --quiet /tmp/etc.erofs /etc && test -s /tmp/etc.erofs && echo erofs ok\n"
        ))
        .payload_timeout(Duration::from_secs(60))
        .timeout(Duration::from_secs(180))
        .build()
        .unwrap();
    let (bytes, pack) = vm.initrd_stats();
    let run = vm.run().unwrap();
    println!(
        "nested VM: initramfs {} KiB packed in {pack:.2?}; outer boot to payload {:.2?} (guest \
         uptime), payload {:.2?}, whole run {:.2?} (host wall clock)",
        bytes / 1024,
        run.boot_to_payload,
        run.payload_time,
        run.wall
    );
    assert_eq!(
        run.status, 0,
        "payload failed; its output:\n{}\nconsole:\n{}",
        run.output, run.console
    );

    let info_line = run
        .output
        .lines()
        .find_map(|l| l.strip_prefix("info: "))
        .unwrap_or_else(|| panic!("no shim info in:\n{}", run.output));
    let info: serde_json::Value = serde_json::from_str(info_line).unwrap();
    assert_eq!(info["hardware_virtualization"], "svm", "{info}");
    assert_eq!(info["kvm_pvm"], "no", "{info}");
    assert_eq!(info["kvm_device"], "yes", "{info}");
    assert_eq!(info["accel"], "kvm", "{info}");
    assert!(
        run.output.contains("kvm probe: api 12, vm created"),
        "{}",
        run.output
    );
    assert!(run.output.contains("erofs ok"), "{}", run.output);
}

#[test]
fn payload_status_output_env_and_its_timeout() {
    if !require_root_and(&[]) || !nested::require_harness() {
        return;
    }
    let vm = NestedVm::builder()
        .env("GREETING", "it's $HOME")
        .text("/etc/motd", "carried\n", 0o644)
        .dir(busybox_rootfs(), "/containers/busybox")
        .symlink("/containers/busybox/etc/hello.txt", "/hello")
        .payload(
            "echo \"$GREETING\"; cat /etc/motd /hello; echo to-stderr >&2\n\
             test -L /containers/busybox/bin/sh || exit 9\n\
             exit 7",
        )
        .build()
        .unwrap();
    let run = vm.run().unwrap();
    assert_eq!(run.status, 7);
    assert_eq!(
        run.output,
        "it's $HOME\ncarried\nhello from the rootfs\nto-stderr\n"
    );

    let vm = NestedVm::builder()
        .payload("echo sleeping; sleep 600")
        .payload_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let run = vm.run().unwrap();
    assert_eq!(run.status, 124, "{}", run.output);
    assert!(
        run.output.contains("did not finish within 2s"),
        "{}",
        run.output
    );
    assert!(run.payload_time >= Duration::from_secs(2), "{run:?}");
}

#[test]
fn a_vm_that_never_reports_fails_with_the_console_and_leaves_no_qemu() {
    if !require_root_and(&[]) || !nested::require_harness() {
        return;
    }
    // No /init: the kernel panics looking for a root filesystem, and `panic=-1` ends QEMU.
    let vm = NestedVm::builder()
        .kernel_arg("rdinit=/missing")
        .build()
        .unwrap();
    let err = format!("{:#}", vm.run().unwrap_err());
    assert!(
        err.contains("without reporting the payload's status"),
        "{err}"
    );
    assert!(err.contains("Kernel panic"), "{err}");

    // The host-side timeout kills QEMU.
    let vm = NestedVm::builder()
        .payload("sleep 600")
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let err = format!("{:#}", vm.run().unwrap_err());
    assert!(
        err.contains("did not finish within 3s (QEMU killed)"),
        "{err}"
    );
    let initrd = vm.initrd_path().display().to_string();
    assert!(
        processes_matching(&[nested::QEMU, &initrd]).is_empty(),
        "QEMU still runs"
    );
}

/// The KVM probe: does its work only inside the nested VM (the test above runs this binary
/// there with `SWITCHYARD_NESTED_PROBE=1`); elsewhere it has nothing to check and passes.
#[test]
fn probe_kvm_inside_the_nested_vm() {
    if std::env::var_os(PROBE_ENV).is_none() {
        return;
    }
    let (api, vm_fd) = kvm::api_version_and_create_vm().unwrap();
    assert_eq!(api, 12, "KVM_GET_API_VERSION");
    drop(vm_fd);
    println!("kvm probe: api {api}, vm created");
}

/// The two ioctls of the probe.
mod kvm {
    use std::fs::OpenOptions;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    const KVM_GET_API_VERSION: nix::libc::c_ulong = 0xAE00; // _IO(KVMIO, 0x00)
    const KVM_CREATE_VM: nix::libc::c_ulong = 0xAE01; // _IO(KVMIO, 0x01)

    pub fn api_version_and_create_vm() -> std::io::Result<(i32, OwnedFd)> {
        let kvm = OpenOptions::new().read(true).write(true).open("/dev/kvm")?;
        // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a number; `kvm` is an
        // open /dev/kvm for the duration of the call.
        let api = unsafe { nix::libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
        if api < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: KVM_CREATE_VM takes the machine type (0: default) by value and returns a new
        // fd, which nothing else owns.
        let vm = unsafe { nix::libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
        if vm < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `vm` is a fresh fd from KVM_CREATE_VM, owned by nobody else.
        Ok((api, unsafe { OwnedFd::from_raw_fd(vm) }))
    }
}

/// Issue 7: inside the harness (a hardware-style KVM), switchyardd picks the built-in VMM for
/// the vm runtime, `yard info` says so, and `yard run --runtime vm` runs a container in a
/// microVM booted by it: the guest kernel and agent, over hybrid vsock, with the rootfs image on
/// its virtio-blk disk. The shim's log shows the boot time the VMM's boot timer measured.
#[test]
fn the_builtin_vmm_runs_a_container_inside_the_harness() {
    if !require_root_and(&["mkfs.erofs"]) || !nested::require_harness() {
        return;
    }
    let vm = switchyard_in_harness(
        "backend = \"auto\"\n",
        "echo \"info: $(yard info --json | tr -d '\\n')\"\n\
             start=$(cut -d' ' -f1 /proc/uptime)\n\
             yard run --runtime vm --rm --rootfs /containers/busybox -- \
               /bin/sh -c 'echo \"in the guest: $(uname -r) $(cat /proc/sys/kernel/hostname)\"; exit 3'\n\
             echo \"run status: $?\"\n\
             echo \"run took: $start $(cut -d' ' -f1 /proc/uptime)\"\n\
             echo \"qemu processes: $(ps | grep -c [q]emu-system)\"\n\
             kill %1 2>/dev/null; wait\n\
             echo '--- switchyardd log (vm shim lines)'\n\
             grep -e 'VM ready' -e 'boot' -e ERROR -e WARN /tmp/switchyardd.log | tail -20\n",
    )
    .build()
        .unwrap();
    let run = vm.run().unwrap();
    println!(
        "nested builtin run: outer boot to payload {:.2?}, payload {:.2?}, whole {:.2?}\n{}",
        run.boot_to_payload, run.payload_time, run.wall, run.output
    );
    assert_eq!(
        run.status, 0,
        "payload failed; output:\n{}\nconsole:\n{}",
        run.output, run.console
    );
    let info_line = run
        .output
        .lines()
        .find_map(|l| l.strip_prefix("info: "))
        .unwrap_or_else(|| panic!("no yard info in:\n{}", run.output));
    let info: serde_json::Value = serde_json::from_str(info_line)
        .unwrap_or_else(|e| panic!("yard info --json: {e}: {info_line}"));
    let vm_info = info["runtimes"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "vm"))
        .map(|r| r["vm"].clone())
        .unwrap_or_default();
    assert_eq!(vm_info["backend"], "builtin", "{info}");
    assert_eq!(vm_info["accel"], "kvm", "{info}");
    assert!(
        run.output.contains("in the guest: 6.1."),
        "the container did not run in the guest:\n{}\nconsole:\n{}",
        run.output,
        run.console
    );
    assert!(run.output.contains("run status: 3"), "{}", run.output);
    assert!(run.output.contains("qemu processes: 0"), "{}", run.output);
}

/// Runs `vm`, prints its output under `what`, and returns the output once the payload
/// succeeded (else fails with the output and the console).
/// The rest of the first line of `out` that starts with `key`, trimmed; a panic showing `out`
/// when there is none.
fn field(out: &str, key: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} in:\n{out}"))
        .trim()
        .to_owned()
}

fn run_ok(vm: &NestedVm, what: &str) -> String {
    let run = vm.run().unwrap();
    println!(
        "{what}: payload {:.2?}, whole {:.2?}\n{}",
        run.payload_time, run.wall, run.output
    );
    assert_eq!(
        run.status, 0,
        "payload failed; output:\n{}\nconsole:\n{}",
        run.output, run.console
    );
    run.output
}

/// Issue 7, SMP: the built-in VMM boots the guest with `vcpus = 2` (MP table, per-vCPU CPUID
/// and LAPICs, the second vCPU started by the guest kernel with INIT/SIPI through the in-kernel
/// irqchip), and the container sees both CPUs. The harness VM gets two CPUs too.
#[test]
fn the_builtin_vmm_boots_a_two_vcpu_guest() {
    if !require_root_and(&["mkfs.erofs"]) || !nested::require_harness() {
        return;
    }
    let vm = switchyard_in_harness(
        "backend = \"builtin\"\nvcpus = 2\n",
        "yard run --runtime vm --rm --rootfs /containers/busybox -- \
               /bin/sh -c 'echo \"guest cpus: $(nproc) $(grep -c ^processor /proc/cpuinfo)\"'\n\
             echo \"run status: $?\"\n\
             kill %1 2>/dev/null; wait\n\
             echo '--- switchyardd log (vm shim lines)'\n\
             grep -e 'VM ' -e 'boot' -e ERROR -e WARN /tmp/switchyardd.log | tail -20\n",
    )
    .vcpus(2)
    .build()
    .unwrap();
    let out = run_ok(&vm, "nested builtin 2-vCPU run");
    assert!(
        out.contains("guest cpus: 2 2"),
        "the guest did not bring up both vCPUs:\n{out}"
    );
    assert!(out.contains("run status: 0"), "{out}");
}

/// Issue 7, groups on the built-in VMM: it has no 9p share, so later containers of a sandbox get
/// their images on spare virtio-blk disks swapped in at run time (a config-change interrupt
/// tells the guest's driver the new capacity). Five containers share one VM (the root disk and
/// four spares), a sixth is refused clearly, a removed container's disk is emptied and taken by
/// the next one, and when the last container goes the shim goes with its VM.
#[test]
fn the_builtin_vmm_runs_a_group_on_spare_disks() {
    if !require_root_and(&["mkfs.erofs"]) || !nested::require_harness() {
        return;
    }
    let vm = switchyard_in_harness(
        "backend = \"builtin\"\n",
        "G='--annotation io.switchyard.group=pod'\n\
             for n in a b c d e; do\n\
               yard run --runtime vm -d --name $n $G --rootfs /containers/busybox -- /bin/sleep 600 >/dev/null\n\
               echo \"start $n: $?\"\n\
             done\n\
             echo \"sixth: $(yard run --runtime vm -d --name f $G --rootfs /containers/busybox -- /bin/true 2>&1 | tr -d '\\n')\"\n\
             for n in a b c d e; do\n\
               echo \"boot_id $n: $(yard exec $n -- /bin/cat /proc/sys/kernel/random/boot_id)\"\n\
             done\n\
             echo \"root of e: $(yard exec e -- /bin/sh -c '/bin/busybox true && echo runs')\"\n\
             yard rm --force c >/dev/null; echo \"rm c: $?\"\n\
             yard run --runtime vm --rm --name g $G --rootfs /containers/busybox -- /bin/echo g-ran-in-the-freed-slot\n\
             echo \"run g: $?\"\n\
             echo \"vm shims: $(ps | grep -c [c]ontainerd-shim-yard-vm)\"\n\
             yard rm --force a b d e >/dev/null; echo \"rm rest: $?\"\n\
             i=0; while [ $(ps | grep -c [c]ontainerd-shim-yard-vm) -gt 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
             echo \"vm shims after: $(ps | grep -c [c]ontainerd-shim-yard-vm)\"\n\
             kill %1 2>/dev/null; wait\n\
             echo '--- switchyardd log (vm shim lines)'\n\
             grep -e 'disk' -e 'VM ready' -e ERROR -e WARN /tmp/switchyardd.log | tail -30\n",
    )
    .build()
        .unwrap();
    let out = &run_ok(&vm, "nested builtin group run");
    for n in ["a", "b", "c", "d", "e"] {
        assert!(out.contains(&format!("start {n}: 0")), "{n}:\n{out}");
    }
    let sixth = out
        .lines()
        .find_map(|l| l.strip_prefix("sixth: "))
        .unwrap_or_default();
    assert!(
        sixth.contains("4 spare disks, all in use") && sixth.contains("backend = \"qemu\""),
        "the sixth container was not refused clearly: {sixth:?}\n{out}"
    );
    let boot_ids: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("boot_id "))
        .map(|l| l.split_once(": ").map_or("", |(_, id)| id.trim()))
        .collect();
    assert_eq!(boot_ids.len(), 5, "{out}");
    assert!(
        !boot_ids[0].is_empty() && boot_ids.iter().all(|id| *id == boot_ids[0]),
        "not one guest: {boot_ids:?}\n{out}"
    );
    assert!(out.contains("root of e: runs"), "{out}");
    assert!(out.contains("rm c: 0"), "{out}");
    assert!(out.contains("g-ran-in-the-freed-slot"), "{out}");
    assert!(out.contains("run g: 0"), "{out}");
    assert!(out.contains("vm shims: 1"), "{out}");
    assert!(out.contains("rm rest: 0"), "{out}");
    assert!(out.contains("vm shims after: 0"), "{out}");
}

/// Issue 18, VM pods under CRI on the built-in VMM (no shared filesystem): switchyardd's own CRI,
/// driven by `yard cri`, runs a `vm` pod (on the node's network: no CNI in the harness) with two
/// containers in one VM. An emptyDir is one directory of the pod in the guest, shared by both; a
/// configmap-style file changed on the host is read changed in the guest (bound alone, and in
/// its configmap directory), and is read-only there; the pod's `/etc/hosts` and `/etc/resolv.conf` (copies) and `/dev/shm` are there, the
/// termination log takes a write; a hostPath directory is refused naming it. Removing the pod
/// leaves no shim.
#[test]
fn issue18_a_vm_pod_under_cri_on_the_builtin_vmm() {
    if !require_root_and(&["mkfs.erofs"]) || !nested::require_harness() {
        return;
    }
    let image = switchyard_tests::cri::BUSYBOX_IMAGE;
    let vm = switchyard_in_harness(
        "backend = \"builtin\"\n",
        &format!(
            "yard -n k8s.io image import -q /images/busybox.tar >/dev/null || exit 11\n\
             E=/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/scratch\n\
             CM=/var/lib/kubelet/pods/u1/volumes/kubernetes.io~configmap/app/app.conf\n\
             TL=/var/lib/kubelet/pods/u1/containers/one/0a1b2c3d\n\
             mkdir -p $E /srv/data $(dirname $CM) $(dirname $TL); echo v1 > $CM; : > $TL\n\
             ids=$(yard cri run --pod-name vmpod --runtime vm --host-network --log-dir /var/log/pods/vmpod \
                   --name one -v $E:/scratch -v $CM:/etc/app.conf:ro -v $TL:/dev/termination-log {image} -- sleep 600) || exit 12\n\
             POD=$(echo \"$ids\" | head -1); C1=$(echo \"$ids\" | tail -1)\n\
             C2=$(yard cri create --name two -v $E:/scratch -v $(dirname $CM):/config:ro $POD {image} -- sleep 600) || exit 13\n\
             yard cri start $C2 || exit 14\n\
             x() {{ c=$1; shift; yard cri exec $c -- \"$@\" 2>&1; }}\n\
             x $C1 sh -c 'echo from-one > /scratch/msg'\n\
             echo \"two reads: $(x $C2 cat /scratch/msg)\"\n\
             echo \"boot ids: $(x $C1 cat /proc/sys/kernel/random/boot_id) $(x $C2 cat /proc/sys/kernel/random/boot_id)\"\n\
             echo \"conf before: $(x $C1 cat /etc/app.conf)\"\n\
             echo v2 > $CM\n\
             i=0; while [ \"$(x $C1 cat /etc/app.conf)\" != v2 ] && [ $i -lt 60 ]; do sleep 0.5; i=$((i+1)); done\n\
             echo \"conf after: $(x $C1 cat /etc/app.conf)\"\n\
             i=0; while [ \"$(x $C2 cat /config/app.conf)\" != v2 ] && [ $i -lt 20 ]; do sleep 0.5; i=$((i+1)); done\n\
             echo \"configmap dir after: $(x $C2 cat /config/app.conf)\"\n\
             x $C1 sh -c 'echo x > /etc/app.conf'; echo \"ro write: $?\"\n\
             echo \"hosts: $(x $C1 cat /etc/hosts | tr '\\n' ' ')\"\n\
             echo \"resolv: $(x $C2 cat /etc/resolv.conf | tr '\\n' ' ')\"\n\
             echo \"shm: $(x $C2 sh -c 'echo in-shm > /dev/shm/t && cat /dev/shm/t')\"\n\
             x $C1 sh -c 'echo done > /dev/termination-log'; echo \"termination log write: $?\"\n\
             echo \"hostPath: $(yard cri create --name three -v /srv/data:/data $POD {image} -- true 2>&1 | tr -d '\\n')\"\n\
             yard cri rmp $POD; echo \"rmp: $?\"\n\
             i=0; while [ $(ps | grep -c [c]ontainerd-shim-yard-vm) -gt 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
             echo \"vm shims after: $(ps | grep -c [c]ontainerd-shim-yard-vm)\"\n\
             echo \"VMs booted: $(grep -c 'VM ready' /tmp/switchyardd.log)\"\n\
             kill %1 2>/dev/null; wait\n\
             echo '--- switchyardd log (vm shim lines)'\n\
             grep -e 'VM ready' -e copied -e ERROR -e WARN /tmp/switchyardd.log | tail -30\n"
        ),
    )
    .file(switchyard_tests::cri::busybox_images(), "/images/busybox.tar")
    .text("/etc/hosts", "127.0.0.1 localhost\n192.0.2.7 harness-marker\n", 0o644)
    .text(
        "/etc/resolv.conf",
        "nameserver 192.0.2.53\nsearch nested.test\n",
        0o644,
    )
    .payload_timeout(Duration::from_secs(420))
    .timeout(Duration::from_secs(600))
    .build()
    .unwrap();
    let out = &run_ok(&vm, "nested builtin CRI pod");
    let line = |key: &str| field(out, key);
    assert_eq!(line("two reads: "), "from-one", "{out}");
    let boot_ids: Vec<String> = line("boot ids: ")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert!(
        boot_ids.len() == 2 && boot_ids[0] == boot_ids[1],
        "not one guest: {boot_ids:?}\n{out}"
    );
    assert_eq!(line("conf before: "), "v1", "{out}");
    assert_eq!(line("conf after: "), "v2", "{out}");
    assert_eq!(line("configmap dir after: "), "v2", "{out}");
    assert_ne!(line("ro write: "), "0", "{out}");
    assert!(
        line("hosts: ").contains("192.0.2.7 harness-marker"),
        "{out}"
    );
    assert!(line("resolv: ").contains("search nested.test"), "{out}");
    assert_eq!(line("shm: "), "in-shm", "{out}");
    assert_eq!(line("termination log write: "), "0", "{out}");
    let host_path = line("hostPath: ");
    assert!(
        host_path.contains("host path /srv/data into /data")
            && host_path.contains("builtin backend has no shared filesystem"),
        "the hostPath directory was not refused clearly: {host_path}\n{out}"
    );
    assert_eq!(line("rmp: "), "0", "{out}");
    assert_eq!(line("vm shims after: "), "0", "{out}");
    assert_eq!(line("VMs booted: "), "1", "{out}");
}

/// Issue 20: the built-in VMM's virtio-net device on the pod network, the same check as the
/// QEMU one in `cri.rs` (`vm_pod_network`) inside the harness: switchyardd's CRI puts a `vm` pod
/// on a CNI bridge (bridge + host-local, Debian's plugins; no portmap: the harness has no
/// iptables), the shim mirrors the pod's `eth0` to the tap of the VMM's virtio-net device, and
/// the pod's busybox `httpd` is reached by pod IP from the harness's own namespace (the bridge's
/// gateway, in the place of a native pod); from inside the VM, `wget` reaches a server on the
/// gateway by a name the pod's `/etc/hosts` gives it. Removing the pod leaves no shim and no tap.
#[test]
fn issue20_a_vm_pod_on_the_pod_network_on_the_builtin_vmm() {
    if !require_root_and(&["mkfs.erofs"]) || !nested::require_harness() {
        return;
    }
    if !nested::require_cni() {
        return;
    }
    let image = switchyard_tests::cri::BUSYBOX_IMAGE;
    let vm = switchyard_in_harness(
        "backend = \"builtin\"\n",
        &format!(
            "yard -n k8s.io image import -q /images/busybox.tar >/dev/null || exit 11\n\
             ids=$(yard cri run --pod-name netpod --runtime vm --log-dir /var/log/pods/netpod \
                   --name web -v /srv/hosts:/etc/hosts:ro {image} -- sh -c \
                   'mkdir -p /tmp/w && echo hello from the-vm > /tmp/w/index.html && exec httpd -f -p 8080 -h /tmp/w') || exit 12\n\
             POD=$(echo \"$ids\" | head -1); C=$(echo \"$ids\" | tail -1)\n\
             mkdir -p /tmp/hw && echo hello from the harness > /tmp/hw/index.html\n\
             httpd -p 10.77.0.1:8081 -h /tmp/hw || exit 13\n\
             i=0; while ! wget -qO- http://10.77.0.10:8080/ >/tmp/got 2>/dev/null && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done\n\
             echo \"harness to the pod: $(cat /tmp/got)\"\n\
             echo \"pod to the harness: $(yard cri exec $C -- wget -qO- http://harness-gw:8081/ 2>&1)\"\n\
             yard cri exec $C -- cat /proc/net/fib_trie | grep -q '|-- 10.77.0.10$' && echo \"guest holds the pod IP: yes\"\n\
             yard cri rmp $POD; echo \"rmp: $?\"\n\
             i=0; while [ $(ps | grep -c [c]ontainerd-shim-yard-vm) -gt 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
             echo \"vm shims after: $(ps | grep -c [c]ontainerd-shim-yard-vm)\"\n\
             echo \"taps after: $(cat /proc/net/dev | grep -c tap0_yard)\"\n\
             kill %1 2>/dev/null; wait\n\
             echo '--- switchyardd log (vm shim lines)'\n\
             grep -e 'VM ready' -e mirrored -e ERROR -e WARN /tmp/switchyardd.log | tail -30\n"
        ),
    )
    .pod_network()
    .text(
        "/srv/hosts",
        "127.0.0.1 localhost\n10.77.0.1 harness-gw\n",
        0o644,
    )
    .file(switchyard_tests::cri::busybox_images(), "/images/busybox.tar")
    .payload_timeout(Duration::from_secs(420))
    .timeout(Duration::from_secs(600))
    .build()
    .unwrap();
    let out = &run_ok(&vm, "nested builtin pod network");
    let line = |key: &str| field(out, key);
    assert_eq!(line("harness to the pod: "), "hello from the-vm", "{out}");
    assert_eq!(
        line("pod to the harness: "),
        "hello from the harness",
        "{out}"
    );
    assert_eq!(line("guest holds the pod IP: "), "yes", "{out}");
    assert_eq!(line("rmp: "), "0", "{out}");
    assert_eq!(line("vm shims after: "), "0", "{out}");
    assert_eq!(line("taps after: "), "0", "{out}");
}
