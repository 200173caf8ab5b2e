//! The C ABI of uhmm: `libuhmm.so` and `libuhmm.a`, declared by
//! `include/uhmm.h` (generated from this crate by cbindgen; see the
//! crate's `cbindgen.toml` and `tests/header.rs`).
//!
//! It wraps uhmm's public Rust API for device stacks written in C or C++:
//! an address space (`uhmm_mm`), managed regions, interval notifiers with
//! C callbacks, `range_fault`, device pagemaps with C ops, migrations,
//! device pages, exclusive access and eviction.
//!
//! Conventions, for every function:
//!
//! - A function that can fail returns 0 on success or a negative `errno`
//!   value, and leaves a message for [`uhmm_last_error`] on the calling
//!   thread. Every call clears the message first.
//! - Handles are opaque pointers. A handle is looked up in a table before
//!   use, never dereferenced: a NULL, destroyed or wrong-kind handle gives
//!   `-EINVAL`. A NULL passed to a `*_destroy`/`*_free` function does
//!   nothing. (A destroyed handle's address may be reused by a later
//!   handle; do not use handles after destroying them.)
//! - No Rust panic crosses the boundary: a panic inside uhmm is caught and
//!   returned as `-EIO` with its message.
//! - Callbacks (notifier invalidations, pagemap ops) are called on uhmm's
//!   threads, the fault service included; they must not unwind (in C++,
//!   make them `noexcept`), and the context pointer given with them must
//!   be usable from any thread. A handle must not be destroyed from inside
//!   a callback (`-EDEADLK`), nor while another thread uses it.

// A C ABI takes and hands out raw pointers, exports unmangled symbols and
// calls C function pointers: this crate is one of the workspace's named
// places for `unsafe`. Every unsafe block says why it is sound; handles are
// never dereferenced (they are keys into a table), so what is unsafe is
// reading and writing the caller's buffers and calling its callbacks.
#![allow(unsafe_code)]
// The C names (`uhmm_mm`, `uhmm_range`, ...) are the API.
#![allow(non_camel_case_types)]

mod devmem;
mod error;
mod handle;
mod mm;
mod notifier;

pub use devmem::*;
pub use error::uhmm_last_error;
pub use mm::*;
pub use notifier::*;
