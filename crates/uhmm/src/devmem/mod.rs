//! Device memory: pages that live where the CPU cannot address them, and
//! the engines that copy them (DESIGN.md, "Device model").
//!
//! Today this layer holds the copy engines ([`copy`]); device page pools,
//! migration and CPU fault-back build on them.

pub mod copy;
