//! What happens when a confined thread makes a call its filter does not
//! allow: the filter traps (`SECCOMP_RET_TRAP`), the kernel raises SIGSYS
//! on that thread, and this handler writes one line to stderr naming the
//! thread kind, its id and the call's number, then ends the whole process
//! with [`BAD_SYSCALL_EXIT`]. A process that may have been subverted stops
//! at once; the operator sees why (`ausyscall x86_64 NUMBER` names the
//! call).

use std::cell::Cell;
use std::sync::OnceLock;

use super::Thread;

/// Exit status of a process stopped by a seccomp filter (128 + SIGSYS).
pub const BAD_SYSCALL_EXIT: i32 = 128 + libc::SIGSYS;

thread_local! {
    /// The filter of this thread, for the report (0: none).
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Installs the process-wide SIGSYS handler (once) and records `kind` as
/// the calling thread's filter.
pub(super) fn install(kind: Thread) -> Result<(), String> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    KIND.with(|k| k.set(kind as u8 + 1));
    INSTALLED
        .get_or_init(|| {
            // SAFETY: a zeroed sigaction is valid; every field we rely on is
            // set below.
            let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
            act.sa_sigaction = handler as *const () as libc::sighandler_t;
            act.sa_flags = libc::SA_SIGINFO;
            // SAFETY: `act.sa_mask` is a valid sigset to empty; `act` is a
            // valid sigaction whose handler only makes async-signal-safe
            // calls (write, _exit) and reads its arguments.
            let rc = unsafe {
                libc::sigemptyset(&mut act.sa_mask);
                libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(format!(
                    "cannot install the SIGSYS handler: {}",
                    std::io::Error::last_os_error()
                ))
            }
        })
        .clone()
}

extern "C" fn handler(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // The SIGSYS part of siginfo: `_call_addr` (a pointer) at offset 16,
    // then `_syscall` (an int) at offset 24 on x86_64.
    let syscall = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t (128 bytes) to an
        // SA_SIGINFO handler; offset 24 is `si_syscall` for SIGSYS.
        unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() }
    };
    let kind = KIND.with(Cell::get);
    let name: &[u8] = match kind {
        1 => b"vcpu",
        2 => b"uffd-fault",
        3 => b"page-server",
        4 => b"api",
        5 => b"installer",
        _ => b"unconfined",
    };
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i64;
    let (mut tid_buf, mut call_buf) = ([0u8; 24], [0u8; 24]);
    let mut buf = [0u8; 512];
    let mut len = 0;
    for part in [
        b"ferry: seccomp: the ".as_slice(),
        name,
        b" thread (tid ",
        decimal(tid, &mut tid_buf),
        b") made system call ",
        decimal(i64::from(syscall), &mut call_buf),
        b", which its filter does not allow; exiting (use --no-seccomp to debug)",
    ] {
        let n = part.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    // For a file the thread tried to open, its path: the second argument
    // of openat (RSI at the trap).
    let mut path: &[u8] = b"";
    if i64::from(syscall) == libc::SYS_openat && !ctx.is_null() {
        // SAFETY: an SA_SIGINFO handler's third argument is the interrupted
        // thread's ucontext_t.
        let rsi =
            unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RSI as usize] };
        let p = rsi as *const u8;
        if !p.is_null() {
            // SAFETY: the thread passed this pointer to openat as a path: a
            // NUL-terminated string in its memory. At most 128 bytes are read.
            let n = (0..128).take_while(|&i| unsafe { *p.add(i) } != 0).count();
            // SAFETY: the `n` bytes just read are initialised.
            path = unsafe { std::slice::from_raw_parts(p, n) };
        }
    }
    let tail: [&[u8]; 4] = if path.is_empty() {
        [b"", b"", b"", b"\n"]
    } else {
        [b" (path ", path, b")", b"\n"]
    };
    for part in tail {
        let n = part.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    // SAFETY: write and _exit are async-signal-safe; `buf[..len]` is
    // initialised. Both calls are in every filter's allow-list.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(BAD_SYSCALL_EXIT);
    }
}

/// `n` in decimal, written into the end of `out` (no allocation: this
/// runs in a signal handler).
fn decimal(n: i64, out: &mut [u8; 24]) -> &[u8] {
    let mut v = n.unsigned_abs();
    let mut at = out.len();
    loop {
        at -= 1;
        out[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        at -= 1;
        out[at] = b'-';
    }
    &out[at..]
}

#[cfg(test)]
mod tests {
    #[test]
    fn decimal_without_allocating() {
        for n in [0i64, 7, 59, 257, -1, i64::MIN, i64::MAX] {
            assert_eq!(super::decimal(n, &mut [0; 24]), n.to_string().as_bytes());
        }
    }
}
