//! What this host offers for running VMs, and the accelerator choice made from it.
//!
//! `/dev/kvm` alone proves little: under PVM (`kvm_pvm`, a paravirtualized KVM inside a cloud
//! VM without nested virtualization) it exists and opens, but only PVM-aware guest kernels run
//! on it; a stock kernel does not boot. KVM counts as usable for our guests only with hardware
//! virtualization (`vmx`/`svm` in `/proc/cpuinfo`), a read-write `/dev/kvm`, and no PVM.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hypervisor::Accel;
use crate::qemu;

/// The host's virtualization facts (`yard info` prints them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Virtualization {
    /// `vmx` (Intel VT-x) or `svm` (AMD-V), when the CPU shows either flag.
    pub hardware_virtualization: Option<String>,
    /// `/dev/kvm` exists.
    pub kvm_device: bool,
    /// `/dev/kvm` opens read-write for this process.
    pub kvm_device_writable: bool,
    /// The PVM flavour of KVM is loaded (`/sys/module/kvm_pvm`).
    pub kvm_pvm: bool,
    /// Unmodified guest kernels can run under KVM here.
    pub kvm_usable_for_hardware_guests: bool,
    /// The QEMU binary found, if any.
    pub qemu: Option<PathBuf>,
}

/// The `accel` option.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelPreference {
    /// KVM when usable for our guests, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// Why KVM cannot run our guests here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmUnusable {
    NoHardwareVirtualization,
    NoDevice,
    DeviceNotWritable,
    Pvm,
}

impl fmt::Display for KvmUnusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvmUnusable::NoHardwareVirtualization => "the CPU shows neither vmx nor svm",
            KvmUnusable::NoDevice => "/dev/kvm does not exist",
            KvmUnusable::DeviceNotWritable => "/dev/kvm does not open read-write",
            KvmUnusable::Pvm => "/dev/kvm is PVM (kvm_pvm), which runs only PVM guest kernels",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error(
        "accel = \"kvm\", but KVM is not usable here: {reason}; set accel to \"auto\" or \"tcg\""
    )]
    KvmUnusable { reason: KvmUnusable },
}

impl Virtualization {
    /// Why KVM cannot run our guests, or `None` when it can.
    pub fn kvm_unusable(&self) -> Option<KvmUnusable> {
        if self.hardware_virtualization.is_none() {
            Some(KvmUnusable::NoHardwareVirtualization)
        } else if !self.kvm_device {
            Some(KvmUnusable::NoDevice)
        } else if !self.kvm_device_writable {
            Some(KvmUnusable::DeviceNotWritable)
        } else if self.kvm_pvm {
            Some(KvmUnusable::Pvm)
        } else {
            None
        }
    }
}

/// Look at this host, with QEMU looked up as [`qemu::DEFAULT_BINARY`].
pub fn detect() -> Virtualization {
    detect_with(Path::new(qemu::DEFAULT_BINARY))
}

/// Look at this host, with QEMU looked up as `qemu_binary` (a name on `PATH` or a path). Reads
/// a few files and runs nothing: every VM's start asks (`qemu --version`, which only `info`
/// shows, took 10 ms of it).
pub fn detect_with(qemu_binary: &Path) -> Virtualization {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let kvm = Path::new("/dev/kvm");
    let kvm_device = kvm.exists();
    let kvm_device_writable = kvm_device
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(kvm)
            .is_ok();
    let mut v = Virtualization {
        hardware_virtualization: hardware_virtualization(&cpuinfo).map(str::to_owned),
        kvm_device,
        kvm_device_writable,
        kvm_pvm: Path::new("/sys/module/kvm_pvm").exists(),
        kvm_usable_for_hardware_guests: false,
        qemu: qemu::find_binary(qemu_binary),
    };
    v.kvm_usable_for_hardware_guests = v.kvm_unusable().is_none();
    v
}

/// `vmx` or `svm` from the first `flags` line of `/proc/cpuinfo`.
fn hardware_virtualization(cpuinfo: &str) -> Option<&'static str> {
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))?
        .split_once(':')?
        .1;
    flags.split_whitespace().find_map(|f| match f {
        "vmx" => Some("vmx"),
        "svm" => Some("svm"),
        _ => None,
    })
}

/// The `backend` option.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendPreference {
    /// `builtin` where KVM is usable for our guests (and `accel` is not `tcg`), QEMU otherwise.
    #[default]
    Auto,
    Builtin,
    Qemu,
}

/// The hypervisor backend a VM gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The in-process KVM VMM ([`crate::builtin`]).
    Builtin,
    /// QEMU, with the accelerator chosen by [`choose_accel`].
    Qemu(Accel),
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Builtin => "builtin",
            Backend::Qemu(_) => "qemu",
        }
    }

    pub fn accel(self) -> Accel {
        match self {
            Backend::Builtin => Accel::Kvm,
            Backend::Qemu(a) => a,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(
        "backend = \"builtin\", but KVM is not usable here: {reason}; set backend to \"auto\" \
         or \"qemu\""
    )]
    KvmUnusable { reason: KvmUnusable },
    #[error("backend = \"builtin\" runs on KVM only: accel = \"tcg\" needs backend \"qemu\"")]
    BuiltinWithTcg,
    #[error(transparent)]
    Accel(#[from] AccelError),
    /// The detection task died (it panicked).
    #[error("detect the host's virtualization: {0}")]
    Detect(String),
}

/// The backend for `backend` and `accel` on a host like `v`: the built-in VMM needs hardware
/// virtualization; QEMU runs anywhere.
pub fn choose_backend(
    backend: BackendPreference,
    accel: AccelPreference,
    v: &Virtualization,
) -> Result<Backend, BackendError> {
    match backend {
        BackendPreference::Qemu => Ok(Backend::Qemu(choose_accel(accel, v)?)),
        BackendPreference::Builtin => match (accel, v.kvm_unusable()) {
            (AccelPreference::Tcg, _) => Err(BackendError::BuiltinWithTcg),
            (_, Some(reason)) => Err(BackendError::KvmUnusable { reason }),
            (_, None) => Ok(Backend::Builtin),
        },
        BackendPreference::Auto => match (accel, v.kvm_unusable()) {
            (AccelPreference::Auto | AccelPreference::Kvm, None) => Ok(Backend::Builtin),
            _ => Ok(Backend::Qemu(choose_accel(accel, v)?)),
        },
    }
}

/// The accelerator for `preference` on a host like `v`.
pub fn choose_accel(preference: AccelPreference, v: &Virtualization) -> Result<Accel, AccelError> {
    match (preference, v.kvm_unusable()) {
        (AccelPreference::Tcg, _) | (AccelPreference::Auto, Some(_)) => Ok(Accel::Tcg),
        (AccelPreference::Kvm | AccelPreference::Auto, None) => Ok(Accel::Kvm),
        (AccelPreference::Kvm, Some(reason)) => Err(AccelError::KvmUnusable { reason }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(hw: Option<&str>, dev: bool, pvm: bool) -> Virtualization {
        let mut v = Virtualization {
            hardware_virtualization: hw.map(str::to_owned),
            kvm_device: dev,
            kvm_device_writable: dev,
            kvm_pvm: pvm,
            kvm_usable_for_hardware_guests: false,
            qemu: None,
        };
        v.kvm_usable_for_hardware_guests = v.kvm_unusable().is_none();
        v
    }

    #[test]
    fn auto_takes_kvm_only_with_hardware_virtualization_and_no_pvm() {
        let kvm = host(Some("vmx"), true, false);
        assert!(kvm.kvm_usable_for_hardware_guests);
        assert_eq!(
            choose_accel(AccelPreference::Auto, &kvm).unwrap(),
            Accel::Kvm
        );
        assert_eq!(
            choose_accel(AccelPreference::Tcg, &kvm).unwrap(),
            Accel::Tcg
        );

        let pvm = host(None, true, true);
        assert_eq!(
            choose_accel(AccelPreference::Auto, &pvm).unwrap(),
            Accel::Tcg
        );
        let err = choose_accel(AccelPreference::Kvm, &pvm).unwrap_err();
        assert_eq!(
            err.to_string(),
            "accel = \"kvm\", but KVM is not usable here: the CPU shows neither vmx nor svm; \
             set accel to \"auto\" or \"tcg\""
        );
        let pvm_with_flag = host(Some("svm"), true, true);
        assert!(
            choose_accel(AccelPreference::Kvm, &pvm_with_flag)
                .unwrap_err()
                .to_string()
                .contains("PVM")
        );
        let no_dev = host(Some("svm"), false, false);
        assert!(matches!(
            choose_accel(AccelPreference::Kvm, &no_dev),
            Err(AccelError::KvmUnusable {
                reason: KvmUnusable::NoDevice
            })
        ));
    }

    #[test]
    fn builtin_is_chosen_only_where_kvm_has_hardware_virtualization() {
        use AccelPreference as A;
        use BackendPreference as B;
        let kvm = host(Some("svm"), true, false);
        let pvm = host(None, true, true);
        let choose = |b, a, v: &Virtualization| choose_backend(b, a, v).map_err(|e| e.to_string());
        assert_eq!(choose(B::Auto, A::Auto, &kvm), Ok(Backend::Builtin));
        assert_eq!(choose(B::Auto, A::Kvm, &kvm), Ok(Backend::Builtin));
        assert_eq!(choose(B::Auto, A::Tcg, &kvm), Ok(Backend::Qemu(Accel::Tcg)));
        assert_eq!(
            choose(B::Qemu, A::Auto, &kvm),
            Ok(Backend::Qemu(Accel::Kvm))
        );
        assert_eq!(
            choose(B::Auto, A::Auto, &pvm),
            Ok(Backend::Qemu(Accel::Tcg))
        );
        assert_eq!(
            choose(B::Qemu, A::Auto, &pvm),
            Ok(Backend::Qemu(Accel::Tcg))
        );
        let e = choose(B::Builtin, A::Auto, &pvm).unwrap_err();
        assert!(
            e.starts_with("backend = \"builtin\", but KVM is not usable here"),
            "{e}"
        );
        assert!(
            choose(B::Builtin, A::Tcg, &kvm)
                .unwrap_err()
                .contains("accel = \"tcg\"")
        );
        assert!(
            choose(B::Auto, A::Kvm, &pvm)
                .unwrap_err()
                .contains("accel = \"kvm\"")
        );
        assert_eq!(Backend::Builtin.name(), "builtin");
        assert_eq!(Backend::Qemu(Accel::Tcg).accel(), Accel::Tcg);
    }

    #[test]
    fn flags_come_from_cpuinfo() {
        let info = "processor\t: 0\nflags\t\t: fpu vme de svm lm\nbugs\t: x\n";
        assert_eq!(hardware_virtualization(info), Some("svm"));
        assert_eq!(hardware_virtualization("flags : fpu vme\n"), None);
        assert_eq!(hardware_virtualization(""), None);
    }

    #[test]
    fn serializes_for_yard_info() {
        let v = detect();
        let json = serde_json::to_value(&v).unwrap();
        assert!(json.get("kvm_usable_for_hardware_guests").is_some());
        assert_eq!(
            serde_json::to_string(&AccelPreference::Auto).unwrap(),
            "\"auto\""
        );
        assert_eq!(serde_json::to_string(&Accel::Tcg).unwrap(), "\"tcg\"");
        assert_eq!(Accel::Kvm.to_string(), "kvm");
    }
}
