//! The seccomp filters stop a confined thread that tries what none of them
//! allows (create a socket, execute a program, map executable memory,
//! start a thread): each attempt runs in a child process (this test binary
//! again, running `confined_child`), which the filter ends with a message
//! naming the thread and the call. Opening a file fails with `EACCES`
//! instead (see `ferry_engine::seccomp`). Every migration test of the workspace
//! runs with the filters on, which shows they allow what the threads need.

use std::process::Command;

use ferry_engine::seccomp::{self, Thread, BAD_SYSCALL_EXIT};

const CHILD_ENV: &str = "FERRY_SECCOMP_CHILD";

/// What a confined child tries: (name, thread filter, syscall number).
const ATTEMPTS: &[(&str, Thread, i64)] = &[
    ("execve", Thread::Vcpu, libc::SYS_execve),
    ("socket", Thread::Vcpu, libc::SYS_socket),
    ("execve", Thread::Fault, libc::SYS_execve),
    ("socket", Thread::Fault, libc::SYS_socket),
    ("execve", Thread::PageServer, libc::SYS_execve),
    ("connect-socket", Thread::PageServer, libc::SYS_socket),
    ("exec-mapping", Thread::PageServer, libc::SYS_mmap),
];

fn kind_of(name: &str) -> Thread {
    match name {
        "Vcpu" => Thread::Vcpu,
        "Fault" => Thread::Fault,
        "Api" => Thread::Api,
        _ => Thread::PageServer,
    }
}

/// Runs `confined_child` in a new process of this test binary, told by
/// `spec` ("KIND:CALL") which thread to confine and what it then tries;
/// returns how that process ended and its stderr.
fn probe(spec: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "confined_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, spec)
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The probe tried `what`, and its filter ended the process: by SIGSYS
/// from the kernel, or by the filter's own exit after its report.
fn assert_stopped_by_the_filter(status: std::process::ExitStatus, err: &str, what: &str) {
    use std::os::unix::process::ExitStatusExt;
    assert!(err.contains(&format!("about to try {what}")), "{err}");
    assert!(!err.contains("SURVIVED"), "{err}");
    let by_filter =
        status.signal() == Some(libc::SIGSYS) || status.code() == Some(BAD_SYSCALL_EXIT);
    assert!(by_filter, "{status:?}: {err}");
}

/// Runs in the child only: confines a thread, shows that allowed calls
/// still work, then makes the forbidden one.
#[test]
fn confined_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (kind, what) = spec.split_once(':').unwrap();
    let kind = kind_of(kind);
    let what = what.to_string();
    std::thread::spawn(move || {
        seccomp::apply(kind).expect("installing the filter");
        // Allowed: allocation, a write, time, randomness.
        let v = vec![7u8; 1 << 20];
        eprintln!("confined; {} bytes allocated", v.len());
        let _ = std::time::Instant::now();
        let mut r = [0u8; 8];
        // SAFETY: `r` is a valid 8-byte buffer.
        assert_eq!(unsafe { libc::getrandom(r.as_mut_ptr().cast(), 8, 0) }, 8);
        eprintln!("about to try {what}");
        match what.as_str() {
            "openat" => match std::fs::File::open("/proc/self/status") {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    eprintln!("OPEN REFUSED: {e}");
                    return;
                }
                other => eprintln!("open gave {other:?}"),
            },
            "execve" => {
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                // SAFETY: NUL-terminated path and NULL-terminated arrays.
                unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            }
            "socket" | "connect-socket" => drop(std::net::TcpStream::connect("127.0.0.1:9")),
            "exec-mapping" => {
                // SAFETY: an anonymous mapping touches no existing memory.
                unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
            }
            "thread" => std::thread::spawn(|| ()).join().unwrap(),
            "fork" => {
                // SAFETY: the child exits at once, touching nothing.
                if unsafe { libc::fork() } == 0 {
                    // SAFETY: _exit is async-signal-safe.
                    unsafe { libc::_exit(0) };
                }
            }
            other => panic!("unknown attempt {other}"),
        }
        eprintln!("SURVIVED {what}");
    })
    .join()
    .unwrap();
}

#[test]
fn a_confined_thread_that_makes_a_forbidden_call_stops_its_process() {
    for &(what, kind, nr) in ATTEMPTS {
        let (status, err) = probe(&format!("{kind:?}:{what}"));
        let case = format!("{kind:?} thread, {what}");
        assert!(
            err.contains("confined;"),
            "{case}: never got confined: {err}"
        );
        assert!(
            !err.contains("SURVIVED"),
            "{case}: the call went through: {err}"
        );
        assert_eq!(status.code(), Some(BAD_SYSCALL_EXIT), "{case}: {err}");
        let report = format!("ferry: seccomp: the {} thread (tid ", kind.name());
        assert!(err.contains(&report), "{case}: {err}");
        assert!(
            err.contains(&format!(
                ") made system call {nr}, which its filter does not allow"
            )),
            "{case}: {err}"
        );
    }
}

/// No confined thread can open a file: `openat` fails with `EACCES`, and
/// the thread (and its process) goes on.
#[test]
fn a_confined_thread_cannot_open_a_file() {
    for kind in ["Vcpu", "Fault", "PageServer"] {
        let (status, err) = probe(&format!("{kind}:openat"));
        assert!(err.contains("about to try openat"), "{kind}: {err}");
        assert!(err.contains("OPEN REFUSED"), "{kind}: {err}");
        assert!(!err.contains("SURVIVED"), "{kind}: {err}");
        assert!(status.success(), "{kind}: {status:?}: {err}");
    }
}

/// Creating a thread is refused too. glibc blocks every signal around
/// `clone3`, so the kernel cannot deliver the trap to the handler and kills
/// the process with SIGSYS itself (no report line, same end).
#[test]
fn a_confined_thread_cannot_start_a_thread() {
    let (status, err) = probe("Fault:thread");
    assert_stopped_by_the_filter(status, &err, "thread");
}

/// The API thread starts a thread per connection (which inherits its
/// filter), so its filter allows a thread, but never a new process.
#[test]
fn the_api_filter_allows_a_thread_but_not_a_process() {
    let (status, err) = probe("Api:thread");
    assert!(err.contains("SURVIVED thread"), "{err}");
    assert!(status.success(), "{status:?}: {err}");
    let (status, err) = probe("Api:fork");
    assert_stopped_by_the_filter(status, &err, "fork");
}

#[test]
fn with_filters_off_the_same_call_goes_through() {
    seccomp::set_enabled(false);
    std::thread::spawn(|| {
        seccomp::apply(Thread::Vcpu).unwrap();
        std::fs::File::open("/proc/self/status").expect("opening with filters off");
    })
    .join()
    .unwrap();
}
