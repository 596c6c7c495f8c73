//! A connection's TCP congestion control (`TCP_CONGESTION`), chosen per
//! socket: the sender's algorithm paces what it sends. On loopback here,
//! 1.5 GiB between huge pages moved at 4.1-5.7 GB/s with the system's
//! `bbr` and 6.9-7.3 GB/s with `reno`.

use std::ffi::OsString;
use std::io;
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};

/// Longest algorithm name the kernel takes (`TCP_CA_NAME_MAX` less its
/// terminating zero).
pub const NAME_MAX: usize = 15;

/// Checks that `name` can name an algorithm: 1 to [`NAME_MAX`] lowercase
/// letters, digits or `_`. Whether this kernel has it and lets this
/// process use it is known only once a socket tries.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a TCP congestion control name (1-{NAME_MAX} of a-z, 0-9, _; \
             e.g. reno, cubic, bbr)"
        ))
    }
}

/// [`check_name`] as a command-line value parser: the name, if it can be
/// one.
pub fn parse_name(name: &str) -> Result<String, String> {
    check_name(name).map(|()| name.to_string())
}

/// Makes `sock` use algorithm `name`. The kernel refuses one it does not
/// have (`ENOENT`) or one this process may not choose (`EPERM`: see
/// `net.ipv4.tcp_allowed_congestion_control`); the error says which.
pub fn set(sock: &impl AsFd, name: &str) -> io::Result<()> {
    check_name(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    setsockopt(sock, sockopt::TcpCongestion, &OsString::from(name)).map_err(|e| {
        let why = match e {
            nix::errno::Errno::ENOENT => "this kernel has no such algorithm \
                 (net.ipv4.tcp_available_congestion_control)"
                .to_string(),
            nix::errno::Errno::EPERM => "this process may not choose it \
                 (net.ipv4.tcp_allowed_congestion_control)"
                .to_string(),
            other => other.to_string(),
        };
        io::Error::other(format!("TCP congestion control {name:?}: {why}"))
    })
}

/// The algorithm `sock` uses.
pub fn get(sock: &impl AsFd) -> io::Result<String> {
    let name = getsockopt(sock, sockopt::TcpCongestion)?;
    Ok(name.to_string_lossy().trim_end_matches('\0').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn names_are_checked_before_any_socket_sees_them() {
        for good in ["reno", "bbr", "cubic", "h_tcp2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Reno", "re no", "reno\0", "sixteen_letters_"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_socket_takes_reno_and_refuses_what_the_kernel_lacks() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        // `reno` is built into every kernel and always allowed.
        set(&s, "reno").unwrap();
        assert_eq!(get(&s).unwrap(), "reno");
        let e = set(&s, "nosuchalgo").unwrap_err().to_string();
        assert!(
            e.contains("nosuchalgo") && e.contains("no such algorithm"),
            "{e}"
        );
        assert_eq!(get(&s).unwrap(), "reno");
    }
}
