//! What the daemon does with a `Hello`, decided from the `Hello` and the
//! VM processes it runs; nothing is started or allocated to decide.

use std::collections::HashMap;

use ferry_engine::migration::admission::check_hello;
use ferry_protocol::{features, Hello, Role};

use super::child::VmProcess;

/// The daemon's answer to a `Hello`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decision {
    /// A new session: start a VM process for it.
    Start,
    /// A resume of a session a VM process here holds: send it there.
    Redirect(u16),
    /// Refused, with the reason (sent in an `Abort`).
    Refuse(String),
}

pub(super) fn decide(hello: &Hello, vms: &HashMap<u64, VmProcess>, max_vms: usize) -> Decision {
    let known = vms.get(&hello.session_id);
    if hello.features & features::RESUME != 0 {
        return match (known, hello.role) {
            (Some(vm), Role::Control) => Decision::Redirect(vm.port),
            // Not `UnknownSession`: that tells a source the VM never ran
            // here, and a daemon that restarted, or whose VM process
            // ended, cannot know that (docs/protocol.md, "Recovery
            // handshake").
            _ => Decision::Refuse(format!(
                "no VM process here holds session {:#x}; this host cannot say it never ran \
                 the VM",
                hello.session_id
            )),
        };
    }
    if hello.role != Role::Control {
        return Decision::Refuse(
            "no session is open here: a fault connection goes to the VM's own process".into(),
        );
    }
    if hello.features & features::REDIRECT == 0 {
        return Decision::Refuse(
            "this destination runs each VM in a process of its own, and the source does not \
             follow redirects (feature REDIRECT)"
                .into(),
        );
    }
    if known.is_some() {
        return Decision::Refuse("that session is already running here".into());
    }
    if vms.len() >= max_vms {
        return Decision::Refuse(format!(
            "this host already runs {} incoming VMs (--max-vms)",
            vms.len()
        ));
    }
    match check_hello(hello) {
        Ok(_) => Decision::Start,
        Err(e) => Decision::Refuse(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::{PAGE_SIZE, PROTOCOL_VERSION};

    fn hello(role: Role, features: u64, mem_size: u64) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            role,
            session_id: 7,
            features,
            mem_size,
            vcpus: 1,
            page_size: PAGE_SIZE as u32,
            options: Vec::new(),
        }
    }

    #[test]
    fn only_a_sound_new_control_hello_starts_a_process() {
        let none = HashMap::new();
        let ok = features::SUPPORTED;
        assert_eq!(
            decide(&hello(Role::Control, ok, 256 << 20), &none, 4),
            Decision::Start
        );
        let refused = |h: &Hello, max| matches!(decide(h, &none, max), Decision::Refuse(_));
        assert!(refused(&hello(Role::Fault, ok, 256 << 20), 4));
        assert!(refused(
            &hello(Role::Control, ok & !features::REDIRECT, 256 << 20),
            4
        ));
        assert!(refused(&hello(Role::Control, ok, 1 << 50), 4));
        assert!(refused(&hello(Role::Control, ok, 256 << 20), 0));
        let mut bad_timeout = hello(Role::Control, ok, 256 << 20);
        bad_timeout
            .options
            .push((ferry_protocol::OPT_PEER_TIMEOUT, vec![1]));
        assert!(refused(&bad_timeout, 4));
        assert_eq!(
            decide(
                &hello(Role::Control, ok | features::RESUME, 256 << 20),
                &none,
                4
            ),
            Decision::Refuse(
                "no VM process here holds session 0x7; this host cannot say it never ran the VM"
                    .into()
            )
        );
    }
}
