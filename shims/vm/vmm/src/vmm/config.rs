//! What a VM is made from ([`VmmConfig`], [`StartOptions`]) and why starting or changing it
//! fails.

use std::io::{self, Write};
use std::path::PathBuf;

use crate::arch::x86_64 as arch;
use crate::bus::{BusError, SharedDevice};
use crate::devices::virtio::block::BlockError;
use crate::devices::virtio::net::NetError;
use crate::devices::virtio::vsock::VsockError;
use crate::kvm::GuestRamError;
use crate::kvm::vm::{CreateVcpuError, CreateVmError, IrqError};
use crate::seccomp::{Seccomp, SeccompError};

/// The smallest VM: boot structures below 1 MiB, the kernel from 2 MiB (a test program) or
/// 16 MiB (vmlinux).
pub const MIN_MEMORY_MIB: u32 = 8;

pub struct BlockConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

pub struct VsockConfig {
    pub guest_cid: u32,
    /// The host side: a Unix socket speaking firecracker's hybrid-vsock `CONNECT <port>`.
    pub uds_path: PathBuf,
}

pub struct NetConfig {
    /// `/dev/net/tun` attached to a tap with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and
    /// `TUNSETVNETHDRSZ` = 12; the VMM makes it non-blocking and sets its offloads.
    pub tap: std::os::fd::OwnedFd,
    pub mac: [u8; 6],
    /// 68 to 65535.
    pub mtu: u32,
}

pub struct VmmConfig {
    /// An ELF: vmlinux, or a static test program linked at a physical address, entered in
    /// 64-bit mode with the first 4 GiB identity mapped.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The VMM appends one `virtio_mmio.device=` per device.
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Serial output (the guest console).
    pub console: Box<dyn Write + Send>,
    /// The first virtio-blk disk (`/dev/vda` in a Linux guest).
    pub block: Option<BlockConfig>,
    /// Read-only virtio-blk devices without a backing file (capacity 0) after `block`, for
    /// [`Vm::set_disk`] to fill at run time. They are probed in MMIO order, which is
    /// command-line order: `block`, then the spares, then vsock, then net, so a Linux guest
    /// names them `vda`, `vdb`, ... in disk-slot order.
    pub spare_disks: u8,
    pub vsock: Option<VsockConfig>,
    /// A virtio-net device on a tap (`eth0` in a Linux guest).
    pub net: Option<NetConfig>,
}

/// Lower-level knobs for tests and tooling; [`Vm::start`] uses the defaults.
#[derive(Default)]
pub struct StartOptions {
    /// Run this real-mode code instead of loading `kernel` (which is then ignored): copied to
    /// `load_addr` and entered there with every segment at 0, on a VM without boot structures.
    pub real_mode: Option<RealModeImage>,
    /// Extra devices on the MMIO bus: (device, base, length). They run on the vCPU threads,
    /// under the vCPU filter.
    pub mmio_devices: Vec<(SharedDevice, u64, u64)>,
    /// Whether the VM's threads run under their seccomp filters (they do by default).
    pub seccomp: Seccomp,
}

pub struct RealModeImage {
    pub code: Vec<u8>,
    pub load_addr: u16,
}

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset: i8042 reset command, or a triple fault (`KVM_EXIT_SHUTDOWN`, which is
    /// how `reboot=t` and `panic=-1` end a guest).
    Reset,
    /// [`Vm::stop`] was called.
    Stopped,
    /// An unhandled vCPU exit or a failed ioctl.
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StartVmError {
    #[error("{0} vCPUs requested; 1 to {max} are supported", max = arch::mptable::max_cpus())]
    Vcpus(u8),
    #[error("{0} MiB of memory requested; at least {MIN_MEMORY_MIB} MiB are needed")]
    Memory(u32),
    #[error("too many virtio devices")]
    TooManyDevices,
    #[error("installing the vCPU kick signal handler")]
    KickSignal(#[source] vmm_sys_util::errno::Error),
    #[error(transparent)]
    CreateVm(#[from] CreateVmError),
    #[error(transparent)]
    GuestRam(#[from] GuestRamError),
    #[error(transparent)]
    Irq(#[from] IrqError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("creating an eventfd or epoll")]
    Fd(#[source] io::Error),
    #[error("creating the virtio-block device")]
    Block(#[source] BlockError),
    #[error("creating the virtio-vsock device")]
    Vsock(#[source] VsockError),
    #[error("creating the virtio-net device")]
    Net(#[source] NetError),
    #[error("creating the virtio-mmio transport for device {index}")]
    Transport {
        index: u32,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Boot(#[from] arch::ConfigureMemoryError),
    #[error("building the kernel command line")]
    Cmdline(#[from] arch::boot::CmdlineError),
    #[error("loading the real-mode image")]
    RealMode(#[source] vm_memory::GuestMemoryError),
    #[error(transparent)]
    CreateVcpu(#[from] CreateVcpuError),
    #[error(transparent)]
    ConfigureVcpu(#[from] arch::ConfigureVcpuError),
    #[error("spawning a VM thread")]
    Spawn(#[source] io::Error),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("a VM thread ended before it had installed its seccomp filter")]
    ThreadEnded,
}

/// Why [`Vm::set_disk`] failed; the slot keeps its old backing file.
#[derive(Debug, thiserror::Error)]
pub enum SetDiskError {
    #[error("no disk slot {slot}: the VM has {count}")]
    NoSlot { slot: usize, count: usize },
    #[error("the VM has ended")]
    Ended,
    #[error(transparent)]
    Open(#[from] BlockError),
}
