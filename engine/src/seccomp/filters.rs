//! The allow-lists, one per [`Thread`], built from what those threads call
//! (found with `strace -f` on migrations and lazy restores, and by reading
//! the code), plus what the TLS handshake on a reconnection will need
//! (`getrandom`, `poll`/`ppoll`, socket reads and writes, allocation).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::Thread;

/// `ioctl` request types (bits 8..15 of the request number).
const KVM_IOCTL_TYPE: u64 = 0xAE;
const UFFD_IOCTL_TYPE: u64 = 0xAA;
const IOCTL_TYPE_MASK: u64 = 0xFF00;

/// Calls every confined thread may make, without conditions.
const COMMON: &[i64] = &[
    // Memory (mmap and mprotect are in `no_exec`).
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    // Synchronisation, time, scheduling.
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    // Plain I/O on descriptors the thread already holds (logs, eventfds,
    // sockets, the userfaultfd).
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    // Signals: the vCPU kick, and the return from any handler.
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    // Thread exit (and the process exit of a fatal error).
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Socket I/O on connections the thread was handed.
const SOCKET_IO: &[i64] = &[
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// The BPF programs for `kind`, installed together (the kernel applies
/// the strictest answer of all of a thread's filters):
///
/// 1. `openat` fails with `EACCES`. glibc's allocator opens
///    `/proc/sys/vm/overcommit_memory` (when a thread's heap first shrinks)
///    and `/sys/devices/system/cpu/online` (when a thread needs a new
///    arena) lazily, from whichever thread gets there first; a failed open
///    makes it fall back safely, where a trap would end the process.
///    Either way no confined thread ever opens a file.
/// 2. the allow-list: allow what the thread needs, trap on the rest. It
///    goes last: installing a filter takes `prctl`, which it forbids.
pub(super) fn compile(kind: Thread) -> Result<Vec<BpfProgram>, String> {
    let mut allow = rules(kind).map_err(|e| e.to_string())?;
    allow.insert(libc::SYS_openat, Vec::new());
    let deny_open: Rules = [(libc::SYS_openat, Vec::new())].into();
    let mut programs = vec![
        (
            deny_open,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
        ),
        (allow, SeccompAction::Trap, SeccompAction::Allow),
    ];
    if kind == Thread::Api {
        // clone3 passes its flags in memory, where a filter cannot see
        // them: ENOSYS makes glibc fall back to clone, whose flags the
        // allow-list checks (a thread, never a process).
        let no_clone3: Rules = [(libc::SYS_clone3, Vec::new())].into();
        programs.insert(
            1,
            (
                no_clone3,
                SeccompAction::Allow,
                SeccompAction::Errno(libc::ENOSYS as u32),
            ),
        );
    }
    programs
        .into_iter()
        .map(|(rules, mismatch, matched)| {
            let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
                .map_err(|e| e.to_string())?;
            BpfProgram::try_from(filter).map_err(|e| e.to_string())
        })
        .collect()
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn rules(kind: Thread) -> Result<Rules, seccompiler::BackendError> {
    let mut r: Rules = COMMON.iter().map(|&s| (s, Vec::new())).collect();
    // Never executable memory: no new code can be mapped in.
    for call in [libc::SYS_mmap, libc::SYS_mprotect] {
        r.insert(call, vec![masked(2, libc::PROT_EXEC as u64, 0)?]);
    }
    match kind {
        Thread::Vcpu => {
            // KVM_RUN, the state save ioctls, KVMCLOCK_CTRL: KVM's only.
            r.insert(
                libc::SYS_ioctl,
                vec![masked(1, IOCTL_TYPE_MASK, KVM_IOCTL_TYPE << 8)?],
            );
        }
        Thread::Fault | Thread::Installer => {
            r.extend(SOCKET_IO.iter().map(|&s| (s, Vec::new())));
            // Migrated disks: blocks written into the destination's file,
            // zero runs punched out (`fallocate`).
            r.extend(
                [libc::SYS_pwrite64, libc::SYS_pwritev, libc::SYS_fallocate]
                    .iter()
                    .map(|&s| (s, Vec::new())),
            );
            // UFFDIO_COPY/ZEROPAGE/CONTINUE/WAKE, FIONBIO on a new
            // connection, and FIONREAD before an answer is read in place.
            r.insert(
                libc::SYS_ioctl,
                vec![
                    masked(1, IOCTL_TYPE_MASK, UFFD_IOCTL_TYPE << 8)?,
                    equal(1, libc::FIONBIO)?,
                    equal(1, libc::FIONREAD)?,
                ],
            );
        }
        Thread::PageServer => {
            r.extend(SOCKET_IO.iter().map(|&s| (s, Vec::new())));
            r.extend(
                [
                    libc::SYS_epoll_create1,
                    libc::SYS_epoll_ctl,
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_pread64,
                    libc::SYS_preadv,
                    libc::SYS_lseek,
                    // Holes in huge-page RAM (`ram_pages`).
                    libc::SYS_mincore,
                    libc::SYS_fcntl,
                ]
                .map(|s| (s, Vec::new())),
            );
            r.insert(libc::SYS_ioctl, vec![equal(1, libc::FIONBIO)?]);
        }
        Thread::Api => {
            r.extend(SOCKET_IO.iter().map(|&s| (s, Vec::new())));
            r.extend(
                [
                    libc::SYS_accept4,
                    libc::SYS_accept,
                    libc::SYS_fcntl,
                    // What a new thread does before it runs its code.
                    libc::SYS_set_robust_list,
                    libc::SYS_rseq,
                    libc::SYS_sched_getaffinity,
                ]
                .map(|s| (s, Vec::new())),
            );
            // clone3 fails with ENOSYS (the filter before this one says so;
            // listed here only so that this list does not trap it first).
            r.insert(libc::SYS_clone3, Vec::new());
            // Threads only: a process (no CLONE_THREAD) traps.
            r.insert(
                libc::SYS_clone,
                vec![masked(
                    0,
                    libc::CLONE_THREAD as u64,
                    libc::CLONE_THREAD as u64,
                )?],
            );
            // Naming the new thread, nothing else.
            r.insert(libc::SYS_prctl, vec![equal(0, libc::PR_SET_NAME as u64)?]);
        }
    }
    Ok(r)
}

/// A rule: `(arg & mask) == value` for argument `arg`.
fn masked(arg: u8, mask: u64, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )?])
}

/// A rule: argument `arg` equals `value`.
fn equal(arg: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles() {
        for kind in [Thread::Vcpu, Thread::Fault, Thread::PageServer, Thread::Api] {
            let p = compile(kind).unwrap();
            assert!(p.len() >= 2 && p.iter().all(|p| !p.is_empty()), "{kind:?}");
        }
    }

    #[test]
    fn no_filter_allows_opening_exec_or_sockets() {
        for kind in [Thread::Vcpu, Thread::Fault, Thread::PageServer, Thread::Api] {
            let r = rules(kind).unwrap();
            let clone3_ok = kind == Thread::Api; // answered ENOSYS by compile()
            for call in [
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_bind,
                libc::SYS_fork,
                libc::SYS_ptrace,
            ] {
                assert!(!r.contains_key(&call), "{kind:?} allows syscall {call}");
            }
            assert_eq!(r.contains_key(&libc::SYS_clone3), clone3_ok, "{kind:?}");
        }
    }
}
