//! Whether a new session's `Hello` can be taken at all, decided from the
//! `Hello` alone, before anything is allocated: a memory size this host
//! can hold, a vCPU count it supports, the page size, the mode, a peer
//! timeout option of the right size, and no critical option it does not
//! know. The destination runs it before it
//! prepares a VM; a `ferry-dest --daemon` runs it before it starts a
//! process for the VM.

use ferry_protocol::{Hello, MigrationMode, OPT_DISKS, OPT_MODE};

use super::error::DestError;
use crate::layout::{valid_mem_size, valid_vcpus, MAX_VCPUS, PAGE_SIZE};

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
    if !valid_vcpus(hello.vcpus) {
        return Err(DestError::Refused(format!(
            "{} vCPUs (a Ferry VM has 1 to {MAX_VCPUS})",
            hello.vcpus
        )));
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::{Role, PROTOCOL_VERSION};

    fn hello(vcpus: u32) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            role: Role::Control,
            session_id: 7,
            features: 0,
            mem_size: 64 << 20,
            vcpus,
            page_size: PAGE_SIZE as u32,
            options: Vec::new(),
        }
    }

    /// A `Hello` for more vCPUs than a VM here may have is refused before
    /// anything is allocated, naming the count and the limit (the state
    /// codec and the VM builder apply the same one).
    #[test]
    fn a_hello_for_more_vcpus_than_a_vm_can_have_is_refused() {
        assert!(check_hello(&hello(1)).is_ok());
        assert!(check_hello(&hello(MAX_VCPUS)).is_ok());
        for n in [0, MAX_VCPUS + 1, 64, u32::MAX] {
            let e = check_hello(&hello(n)).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{n} vCPUs (a Ferry VM has 1 to {MAX_VCPUS})")),
                "{n}: {e}"
            );
        }
    }
}
