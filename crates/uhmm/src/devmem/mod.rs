//! Device memory: pages that live where the CPU cannot address them, the
//! engines that copy them, and migration between system and device memory
//! (DESIGN.md, "Device model").
//!
//! - [`DevicePagemap`]: the device memory of one owner, with the device's
//!   [`DevicePagemapOps`] (`page_free`, `migrate_to_ram`).
//! - [`MigrateVma`]: the kernel's setup / pages / finalize migration.
//! - [`copy`]: copy engines.
//! - `Mm::make_device_exclusive`: exclusive access for device atomics.
//!
//! A CPU access to a device-resident page is a userfaultfd fault: the fault
//! service calls the owner's `migrate_to_ram`, which brings the page (and
//! the neighbourhood `Mm::set_fault_block` chooses) back.

pub mod copy;
pub(crate) mod exclusive;
pub mod migrate;
pub mod pagemap;
pub(crate) mod staging;

pub use migrate::{MigrateDst, MigrateError, MigrateSrc, MigrateVma, PageOutcome, Select};
pub use pagemap::{
    DeviceFault, DevicePagemap, DevicePagemapOps, DevmemError, FaultError, PagemapConfig,
    PagemapStats,
};
pub use staging::StagingError;
