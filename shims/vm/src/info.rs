//! `containerd-shim-yard-vm-v1 info`: what the vm runtime would use on this host, for
//! `yard info` (switchyardd runs it with the runtime's options).

use crate::config::Options;
use crate::virt;

/// A flat JSON object of strings: the daemon passes it on as plugin exports.
pub fn report(options: &Options) -> serde_json::Value {
    let v = virt::detect_with(&options.qemu);
    let backend = virt::choose_backend(options.backend, options.accel, &v);
    let file = |p: &std::path::Path, how: &str| {
        if p.is_file() {
            p.display().to_string()
        } else {
            format!("{} (missing: {how})", p.display())
        }
    };
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_owned();
    serde_json::json!({
        "backend": match &backend {
            Ok(b) => b.name().to_owned(),
            Err(e) => format!("none ({e})"),
        },
        "accel": match &backend {
            Ok(b) => b.accel().to_string(),
            Err(_) => "none".to_owned(),
        },
        "hardware_virtualization": v.hardware_virtualization.clone().unwrap_or_else(|| "no".into()),
        "kvm_device": yes_no(v.kvm_device),
        "kvm_pvm": yes_no(v.kvm_pvm),
        "qemu": v.qemu.as_ref().map(|q| format!("{} {}", q.display(), crate::qemu::version(q).unwrap_or_default())).unwrap_or_else(|| "not found (apt-get install qemu-system-x86)".into()),
        "kernel": file(&options.kernel, "guest/kernel/build.sh, then scripts/guest"),
        "initrd": file(&options.initrd, "guest/agent/build-initrd.sh, then scripts/guest"),
        "vcpus": options.vcpus.to_string(),
        "memory_mib": options.memory_mib.to_string(),
    })
}
