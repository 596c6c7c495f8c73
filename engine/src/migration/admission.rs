//! Whether a new session's `Hello` can be taken at all, decided from the
//! `Hello` alone, before anything is allocated: a memory size this host
//! can hold, a vCPU count it supports, the page size, the mode, a peer
//! timeout option of the right size, and no critical option it does not
//! know. The destination runs it before it
//! prepares a VM; a `ferry-dest --daemon` runs it before it starts a
//! process for the VM.

use ferry_protocol::{Hello, MigrationMode, OPT_DISKS, OPT_MODE};

use super::error::DestError;
use crate::layout::{valid_mem_size, PAGE_SIZE};
use crate::vm::MAX_VCPUS;

/// Checks `hello` and returns the mode it asks for; the error names what
/// is wrong.
pub fn check_hello(hello: &Hello) -> Result<MigrationMode, DestError> {
    if !valid_mem_size(hello.mem_size) || hello.page_size as usize != PAGE_SIZE {
        return Err(DestError::Refused(format!(
            "memory size {} with page size {}",
            hello.mem_size, hello.page_size
        )));
    }
    if let Some(host) = host_memory() {
        if hello.mem_size > host {
            return Err(DestError::Refused(format!(
                "a {} MiB guest does not fit this host's {} MiB of RAM",
                hello.mem_size >> 20,
                host >> 20
            )));
        }
    }
    if hello.vcpus == 0 || hello.vcpus > MAX_VCPUS {
        return Err(DestError::Refused(format!("{} vCPUs", hello.vcpus)));
    }
    if let Some((tag, _)) = hello
        .options
        .iter()
        .find(|(t, _)| t & 0x8000 != 0 && *t != OPT_MODE && *t != OPT_DISKS)
    {
        return Err(DestError::Refused(format!(
            "unknown critical Hello option {tag:#06x}"
        )));
    }
    hello.peer_timeout_ms()?;
    Ok(hello.mode()?)
}

/// Physical RAM of this host, if the system says.
fn host_memory() -> Option<u64> {
    use nix::unistd::{sysconf, SysconfVar};
    let pages = sysconf(SysconfVar::_PHYS_PAGES).ok()??;
    let size = sysconf(SysconfVar::PAGE_SIZE).ok()??;
    u64::try_from(pages)
        .ok()?
        .checked_mul(u64::try_from(size).ok()?)
}
