//! Devices (owned by the devices work).
