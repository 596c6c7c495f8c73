//! Disk image locks (QEMU's image locking): a VM that opens a disk takes
//! an open file description lock (`F_OFD_SETLK`) on the whole file, a
//! write lock for a writable disk and a read lock for a read-only one. So
//! two VMs (or a VM and any other process that locks the same way) never
//! both write one image, while any number of VMs may share a read-only one.
//!
//! An OFD lock belongs to the open file (not to the process, as `fcntl`'s
//! classic locks do): it goes when the file is closed, a second open of the
//! same file in the same process conflicts with it, and a change of its
//! kind on the same file (exclusive to shared, or to none) is atomic. A
//! migration's source hands its locks over at the switch-over (see
//! [`super::MmioBus::hand_over`]).

use std::fs::File;
use std::io;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};

/// What a VM holds on a disk file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageLock {
    /// A read lock: other readers may hold one too, no writer.
    Shared,
    /// A write lock: nobody else holds anything.
    Exclusive,
}

impl ImageLock {
    /// The lock a disk needs: shared when read-only, else exclusive.
    pub fn for_disk(readonly: bool) -> Self {
        if readonly {
            Self::Shared
        } else {
            Self::Exclusive
        }
    }
}

/// Why a lock could not be set.
#[derive(Debug)]
pub enum LockError {
    /// Someone else holds a conflicting lock on the file.
    InUse,
    /// The file system refused locks altogether (e.g. `ENOLCK`).
    Unsupported(io::Error),
}

/// The `fcntl` lock type for `kind` (`None`: unlock).
fn lock_type(kind: Option<ImageLock>) -> libc::c_short {
    (match kind {
        Some(ImageLock::Shared) => libc::F_RDLCK,
        Some(ImageLock::Exclusive) => libc::F_WRLCK,
        None => libc::F_UNLCK,
    }) as libc::c_short
}

/// A lock of type `kind` on the whole file.
fn whole_file(kind: Option<ImageLock>) -> libc::flock {
    libc::flock {
        l_type: lock_type(kind),
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        // 0: to the end of the file, however it grows.
        l_len: 0,
        // Must be 0 for OFD locks.
        l_pid: 0,
    }
}

/// Sets `file`'s lock to `kind` (`None`: releases it) without waiting.
/// Changing the kind of a lock this file already holds is one atomic step.
pub fn set(file: &File, kind: Option<ImageLock>) -> Result<(), LockError> {
    let fl = whole_file(kind);
    match fcntl(file, FcntlArg::F_OFD_SETLK(&fl)) {
        Ok(_) => Ok(()),
        Err(Errno::EAGAIN | Errno::EACCES) => Err(LockError::InUse),
        Err(e) => Err(LockError::Unsupported(io::Error::from(e))),
    }
}

/// Whether someone other than `file` holds a lock that would keep `file`
/// from taking `kind` (`F_OFD_GETLK`: nothing is set).
pub fn would_conflict(file: &File, kind: ImageLock) -> io::Result<bool> {
    let mut fl = whole_file(Some(kind));
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl)).map_err(io::Error::from)?;
    Ok(fl.l_type != lock_type(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn exclusive_and_shared_locks_conflict_as_images_must() {
        let dir = std::env::temp_dir().join(format!("ferry-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.img");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        // Two opens in one process are two open file descriptions: their
        // OFD locks conflict as two processes' would.
        let (a, b, c) = (open(&path), open(&path), open(&path));

        set(&a, Some(ImageLock::Exclusive)).unwrap();
        set(&a, Some(ImageLock::Exclusive)).unwrap(); // again: no error
        assert!(matches!(
            set(&b, Some(ImageLock::Exclusive)),
            Err(LockError::InUse)
        ));
        assert!(matches!(
            set(&b, Some(ImageLock::Shared)),
            Err(LockError::InUse)
        ));
        assert!(would_conflict(&b, ImageLock::Shared).unwrap());
        assert!(
            !would_conflict(&a, ImageLock::Exclusive).unwrap(),
            "its own"
        );

        // Downgraded (a migrated disk's source while it serves blocks):
        // readers may join, writers may not.
        set(&a, Some(ImageLock::Shared)).unwrap();
        set(&b, Some(ImageLock::Shared)).unwrap();
        assert!(matches!(
            set(&c, Some(ImageLock::Exclusive)),
            Err(LockError::InUse)
        ));
        // Upgrading while another reader holds it fails, and keeps the
        // shared lock.
        assert!(matches!(
            set(&a, Some(ImageLock::Exclusive)),
            Err(LockError::InUse)
        ));
        assert!(would_conflict(&c, ImageLock::Exclusive).unwrap());

        // Released, or closed: the lock goes with the open file.
        set(&a, None).unwrap();
        drop(b);
        assert!(!would_conflict(&c, ImageLock::Exclusive).unwrap());
        set(&c, Some(ImageLock::Exclusive)).unwrap();
        drop(c);
        let d = open(&path);
        set(&d, Some(ImageLock::Exclusive)).unwrap();
        drop((a, d));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
