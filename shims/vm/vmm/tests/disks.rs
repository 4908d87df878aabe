//! Disk slots at run time: `Vm::set_disk` on a spinning real-mode guest with a root disk and
//! spares. Needs root and /dev/kvm; skips with a printed reason otherwise.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::{SPIN, have_kvm, real_mode};
use yard_vmm::vmm::{BlockConfig, SetDiskError, Vm, VmmConfig};

fn disk(path: &Path) -> Option<BlockConfig> {
    Some(BlockConfig {
        path: path.to_owned(),
        read_only: true,
    })
}

/// set_disk reaches every slot and refuses a bad slot, a missing file and a VM that ended.
#[test]
fn set_disk_swaps_slots_and_refuses_what_it_cannot() {
    if !have_kvm() {
        return;
    }
    let root = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(root.path(), [0u8; 4096]).unwrap();
    let image = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(image.path(), [1u8; 8192]).unwrap();
    let vm = Vm::start_with(
        VmmConfig {
            kernel: "/nonexistent".into(),
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
            memory_mib: 16,
            console: Box::new(std::io::sink()),
            block: disk(root.path()),
            spare_disks: 2,
            vsock: None,
            net: None,
        },
        real_mode(SPIN),
    )
    .unwrap();
    let capacity = |slot| vm.disk_sectors(slot).unwrap();
    assert_eq!((capacity(0), capacity(1), capacity(2)), (8, 0, 0));
    assert_eq!(vm.disk_sectors(3), None);
    vm.set_disk(2, disk(image.path())).unwrap();
    assert_eq!((capacity(1), capacity(2)), (0, 16));
    vm.set_disk(0, None).unwrap();
    assert_eq!(capacity(0), 0);
    assert!(matches!(
        vm.set_disk(3, disk(image.path())),
        Err(SetDiskError::NoSlot { slot: 3, count: 3 })
    ));
    let missing = vm.set_disk(1, disk(Path::new("/nonexistent.img")));
    assert!(matches!(missing, Err(SetDiskError::Open(_))), "{missing:?}");
    assert_eq!(capacity(1), 0);
    vm.set_disk(2, None).unwrap();
    vm.stop();
    assert!(matches!(
        vm.set_disk(1, disk(image.path())),
        Err(SetDiskError::Ended)
    ));
    assert_eq!(vm.disk_sectors(0), None, "no disks once stopped");
}
