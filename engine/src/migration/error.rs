//! Why a migration failed, on either side.

use std::time::Duration;

use ferry_page_server::server::ServerError;
use ferry_protocol::ProtocolError;

use super::fault::FaultError;
use super::uffd_ram::UffdRamError;
use crate::memory::MemoryError;
use crate::state::CodecError;
use crate::vm::VmError;

/// How long the destination waits for demand answers still in flight after
/// the source finished pushing.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a migration out failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Address resolution or connection.
    #[error("cannot reach the destination {addr}: {why}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        why: String,
    },
    /// Wire protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The page server's thread could not be confined.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Page serving after the switch-over.
    #[error("page server: {0}")]
    Server(#[from] ServerError),
    /// After `Commit` the destination could not be reached within the
    /// recovery window, or it lost the VM after running it. The VM stays
    /// paused here with all its memory; it is not resumed, because the
    /// destination may run it.
    #[error("the move is stranded after the switch-over, the VM stays paused here: {why}")]
    Stranded {
        /// Why.
        why: String,
        /// The session, to try again (`ferry-ctl recover`).
        record: Option<Box<super::record::SessionRecord>>,
    },
    /// The session record could not be written or read.
    #[error(transparent)]
    Record(#[from] super::record::RecordError),
    /// A disk to migrate (`--migrate-disk`) cannot be served.
    #[error("migrated disk {path}: {why}")]
    Disk {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        why: String,
    },
    /// A `cancel` request came before the switch-over committed.
    #[error("cancelled before the switch-over (a `cancel` request)")]
    Cancelled,
    /// The destination does not hold the session being resumed.
    #[error("the destination does not hold this session")]
    Unknown,
    /// The move rolled back (the destination never ran the VM), but the
    /// VM cannot run here again (a disk another VM took meanwhile): it
    /// stays paused here, and may be resumed once that is fixed.
    #[error("the move rolled back, but the VM cannot resume here and stays paused: {0}")]
    NotResumed(String),
    /// Failed before the destination ran the VM; the VM runs here again.
    #[error("migration failed before switch-over, the VM was resumed on the source: {0}")]
    RolledBack(Box<SourceError>),
}

impl SourceError {
    /// A stranded move, without its session record (yet).
    pub fn stranded(why: impl Into<String>) -> Self {
        SourceError::Stranded {
            why: why.into(),
            record: None,
        }
    }
}

/// Why receiving a VM failed.
#[derive(Debug, thiserror::Error)]
pub enum DestError {
    /// Wire protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A thread of the move could not be confined.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The offered VM is unacceptable.
    #[error("refused the incoming VM: {0}")]
    Refused(String),
    /// A migrated disk's file failed, or its blocks were out of range.
    #[error(transparent)]
    Disk(#[from] crate::devices::migrated::MigratedError),
    /// Building or restoring the VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The state blob.
    #[error("incoming state: {0}")]
    State(#[from] CodecError),
    /// userfaultfd.
    #[error(transparent)]
    Uffd(#[from] UffdRamError),
    /// The fault handler.
    #[error("fault handler: {0}")]
    Fault(#[from] FaultError),
    /// Writing received pages.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The source did not come back within the recovery window.
    #[error("the source did not reconnect within the recovery window ({0:?})")]
    RecoveryTimeout(Duration),
    /// Pages never arrived.
    #[error("{0} pages were still missing {DRAIN_TIMEOUT:?} after the source finished pushing")]
    Incomplete(u64),
}
