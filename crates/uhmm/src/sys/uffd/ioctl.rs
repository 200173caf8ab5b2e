//! userfaultfd ioctl opcodes, computed from their definitions in
//! `include/uapi/linux/userfaultfd.h`, and the typed ioctl calls built on
//! them.
//!
//! The opcodes are never typed by hand (a wrong direction bit made every
//! `UFFDIO_WAKE` fail with EINVAL in a well-known VMM): each is computed with
//! `rustix::ioctl::opcode` from the group, the number and the argument type,
//! and the tests compare them with the constants `linux-raw-sys` has. The ones
//! it lacks (`UFFDIO_MOVE`, `UFFDIO_POISON`, `USERFAULTFD_IOC_NEW`) are proven
//! by a round trip on the running kernel in the integration tests.

use linux_raw_sys::general as uapi;
use rustix::ioctl::{Ioctl, IoctlOutput, Opcode, opcode};
use std::ffi::c_void;

const UFFDIO: u8 = uapi::UFFDIO as u8;

/// `_IOWR(UFFDIO, _UFFDIO_API, struct uffdio_api)`
pub const UFFDIO_API: Opcode =
    opcode::read_write::<uapi::uffdio_api>(UFFDIO, uapi::_UFFDIO_API as u8);
/// `_IOWR(UFFDIO, _UFFDIO_REGISTER, struct uffdio_register)`
pub const UFFDIO_REGISTER: Opcode =
    opcode::read_write::<uapi::uffdio_register>(UFFDIO, uapi::_UFFDIO_REGISTER as u8);
/// `_IOR(UFFDIO, _UFFDIO_UNREGISTER, struct uffdio_range)`
pub const UFFDIO_UNREGISTER: Opcode =
    opcode::read::<uapi::uffdio_range>(UFFDIO, uapi::_UFFDIO_UNREGISTER as u8);
/// `_IOR(UFFDIO, _UFFDIO_WAKE, struct uffdio_range)`
pub const UFFDIO_WAKE: Opcode =
    opcode::read::<uapi::uffdio_range>(UFFDIO, uapi::_UFFDIO_WAKE as u8);
/// `_IOWR(UFFDIO, _UFFDIO_COPY, struct uffdio_copy)`
pub const UFFDIO_COPY: Opcode =
    opcode::read_write::<uapi::uffdio_copy>(UFFDIO, uapi::_UFFDIO_COPY as u8);
/// `_IOWR(UFFDIO, _UFFDIO_ZEROPAGE, struct uffdio_zeropage)`
pub const UFFDIO_ZEROPAGE: Opcode =
    opcode::read_write::<uapi::uffdio_zeropage>(UFFDIO, uapi::_UFFDIO_ZEROPAGE as u8);
/// `_IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)`
pub const UFFDIO_MOVE: Opcode =
    opcode::read_write::<uapi::uffdio_move>(UFFDIO, uapi::_UFFDIO_MOVE as u8);
/// `_IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, struct uffdio_writeprotect)`
pub const UFFDIO_WRITEPROTECT: Opcode =
    opcode::read_write::<uapi::uffdio_writeprotect>(UFFDIO, uapi::_UFFDIO_WRITEPROTECT as u8);
/// `_IOWR(UFFDIO, _UFFDIO_CONTINUE, struct uffdio_continue)`
pub const UFFDIO_CONTINUE: Opcode =
    opcode::read_write::<uapi::uffdio_continue>(UFFDIO, uapi::_UFFDIO_CONTINUE as u8);
/// `_IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)`
pub const UFFDIO_POISON: Opcode =
    opcode::read_write::<uapi::uffdio_poison>(UFFDIO, uapi::_UFFDIO_POISON as u8);
/// `_IO(USERFAULTFD_IOC, 0x00)`, on `/dev/userfaultfd`: returns a new uffd.
pub const USERFAULTFD_IOC_NEW: Opcode = opcode::none(UFFDIO, 0x00);

pub(crate) use crate::sys::ioctl_update as update;

/// `USERFAULTFD_IOC_NEW` with its flag argument; the output is the new fd.
pub(crate) struct NewUffd {
    pub(crate) flags: usize,
}

// SAFETY: USERFAULTFD_IOC_NEW takes its flags as an integer argument (no
// pointer is dereferenced, so it does not mutate userspace data) and
// returns a new file descriptor as the ioctl's return value.
unsafe impl Ioctl for NewUffd {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = false;

    fn opcode(&self) -> Opcode {
        USERFAULTFD_IOC_NEW
    }

    fn as_ptr(&mut self) -> *mut c_void {
        self.flags as *mut c_void
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_raw_sys::ioctl as known;

    #[test]
    fn opcodes_match_linux_raw_sys() {
        assert_eq!(UFFDIO_API, known::UFFDIO_API as Opcode);
        assert_eq!(UFFDIO_REGISTER, known::UFFDIO_REGISTER as Opcode);
        assert_eq!(UFFDIO_UNREGISTER, known::UFFDIO_UNREGISTER as Opcode);
        assert_eq!(UFFDIO_WAKE, known::UFFDIO_WAKE as Opcode);
        assert_eq!(UFFDIO_COPY, known::UFFDIO_COPY as Opcode);
        assert_eq!(UFFDIO_ZEROPAGE, known::UFFDIO_ZEROPAGE as Opcode);
        assert_eq!(UFFDIO_WRITEPROTECT, known::UFFDIO_WRITEPROTECT as Opcode);
        assert_eq!(UFFDIO_CONTINUE, known::UFFDIO_CONTINUE as Opcode);
    }

    #[test]
    fn opcodes_have_the_direction_the_header_gives() {
        // _IOR: direction bits 0b10 at bit 30. A wrong direction on WAKE or
        // UNREGISTER is the classic hand-typed-constant bug.
        assert_eq!(UFFDIO_WAKE >> 30, 0b10);
        assert_eq!(UFFDIO_UNREGISTER >> 30, 0b10);
        // _IOWR for the resolve ioctls that report progress.
        for op in [
            UFFDIO_COPY,
            UFFDIO_ZEROPAGE,
            UFFDIO_MOVE,
            UFFDIO_CONTINUE,
            UFFDIO_POISON,
        ] {
            assert_eq!(op >> 30, 0b11, "{op:#x}");
        }
        // The values the kernel headers of 6.8+ define (sizes 40 and 32).
        assert_eq!(UFFDIO_MOVE, 0xc028_aa05);
        assert_eq!(UFFDIO_POISON, 0xc020_aa08);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }
}
