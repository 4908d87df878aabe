//! The port-I/O and MMIO buses: a vCPU exit's address is looked up in a sorted set of
//! non-overlapping ranges, and the owning device gets the access with the offset into its range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the range the device was inserted at
/// (`base`), so one device type can sit at several addresses.
pub trait BusDevice: Send {
    /// Fill `data` (the guest's access width) for a read at `offset`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// The guest wrote `data` at `offset`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

/// One bus: port I/O or MMIO.
#[derive(Default, Clone)]
pub struct Bus {
    /// base -> (len, device)
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn new() -> Self {
        Bus::default()
    }

    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => return Err(BusError::BadRange { base, len }),
        };
        // The range starting at or before `base`, and the first one after it.
        if let Some((&other, &(olen, _))) = self.devices.range(..=base).next_back()
            && other + olen > base
        {
            return Err(BusError::Overlap { base, len, other });
        }
        if let Some((&other, _)) = self.devices.range(base..).next()
            && other < end
        {
            return Err(BusError::Overlap { base, len, other });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn resolve(&self, addr: u64) -> Option<(u64, u64, &SharedDevice)> {
        let (&base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < *len).then_some((base, offset, dev))
    }

    /// Route a read; `false` if no device is there (the caller fills the data with ones, as
    /// unclaimed hardware reads).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((base, offset, dev)) => {
                lock(dev).read(base, offset, data);
                true
            }
            None => false,
        }
    }

    /// Route a write; `false` if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((base, offset, dev)) => {
                lock(dev).write(base, offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose lock was poisoned by a panicking vCPU thread is still usable: device state is
/// plain registers, and the VM is being torn down in that case anyway.
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Vec<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
            self.last.push((base, offset, Vec::new()));
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last.push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_with_its_offset() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [2]);
        assert!(bus.write(0x3ff, &[7]));
        assert!(!bus.write(0x400, &[7]));
        assert!(!bus.read(0x3f7, &mut b));
        let last = &dev.lock().unwrap().last;
        assert_eq!(last[0], (0x3f8, 2, vec![]));
        assert_eq!(last[1], (0x3f8, 7, vec![7]));
        assert_eq!(last.len(), 2);
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default())) as SharedDevice;
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1,
                other: 0x100
            })
        );
        assert_eq!(
            bus.insert(dev(), 0xf8, 0x10),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10,
                other: 0x100
            })
        );
        assert_eq!(
            bus.insert(dev(), 0x200, 0),
            Err(BusError::BadRange {
                base: 0x200,
                len: 0
            })
        );
        assert_eq!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::BadRange {
                base: u64::MAX,
                len: 2
            })
        );
        bus.insert(dev(), 0x110, 0x10).unwrap();
        bus.insert(dev(), 0xf0, 0x10).unwrap();
    }
}
