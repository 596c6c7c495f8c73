//! How a migration out is run: mode, tuning and progress reporting.

use std::sync::Arc;
use std::time::Duration;

use ferry_page_server::server::{ServerConfig, SpareBuffers};
use ferry_protocol::{features, MigrationMode};

use super::cancel::CancelGate;
use super::error::SourceError;
use super::progress::{Progress, Stage};

/// Options for a migration out.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// How the memory moves.
    pub mode: MigrationMode,
    /// Page server tuning (post-copy and hybrid).
    pub server: ServerConfig,
    /// Features to ask for.
    pub features: u64,
    /// Pre-copy: most rounds after the first full pass.
    pub max_rounds: u32,
    /// Pre-copy: stop iterating once the rest is estimated to take this long.
    pub downtime_target: Duration,
    /// Hybrid: pre-copy rounds after the full pass before switching.
    pub hybrid_rounds: u32,
    /// Where to publish progress (for a progress bar), if anywhere.
    pub progress: Option<Arc<Progress>>,
    /// After `Commit`, how long to keep reconnecting to a lost destination
    /// before the move is declared stranded (the VM stays paused here,
    /// with its memory). The peer timeout is `server.peer_timeout`.
    pub recovery_window: Duration,
    /// Where to write the session record before `Commit`, so that the move
    /// can be finished after this process dies (with guest RAM in a file).
    pub session_record: Option<std::path::PathBuf>,
    /// Use this session id instead of a fresh random one: the destination
    /// was told to expect it (an in-process lazy restore).
    pub session_id: Option<u64>,
    /// Pages the destination loads itself before any vCPU runs, from the
    /// same page source in its own process (a lazy restore's recorded
    /// working set, see [`super::preload`]): never sent, and never pushed.
    pub preloaded: Option<Arc<ferry_protocol::PageBitmap>>,
    /// Mutual TLS on both connections (None: plain TCP). Every
    /// reconnection after a lost link runs the handshake again.
    pub tls: Option<ferry_transport::ClientTls>,
    /// Move the VM's disks with its memory (`--migrate-disk`): their
    /// blocks follow RAM in the page space, and the destination writes
    /// them into its own files.
    pub migrate_disks: bool,
    /// TCP congestion control for the connections to the destination
    /// (`ferry_transport::congestion`); `None` keeps the system's.
    pub tcp_congestion: Option<String>,
    /// Post-copy: for this long before the pause, KVM's dirty log records
    /// which pages the guest writes; the push sends those (the hot set)
    /// first, then the rest. Zero: no dirty logging, plain page order.
    pub hot_window: Duration,
    /// The page server's buffers, made ahead (see [`SpareBuffers`]); a
    /// lazy move takes them, or makes its own when there are none.
    pub spare_buffers: SpareBuffers,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            mode: MigrationMode::Postcopy,
            server: ServerConfig::default(),
            features: features::SUPPORTED,
            max_rounds: 30,
            downtime_target: Duration::from_millis(50),
            hybrid_rounds: 2,
            progress: None,
            recovery_window: Duration::from_secs(60),
            session_record: None,
            session_id: None,
            preloaded: None,
            tls: None,
            migrate_disks: false,
            tcp_congestion: None,
            hot_window: Duration::ZERO,
            spare_buffers: SpareBuffers::default(),
        }
    }
}

impl SourceOptions {
    pub(super) fn phase(&self, name: impl Into<String>, total: u64) {
        if let Some(p) = &self.progress {
            p.phase(name, total);
        }
    }

    pub(super) fn stage(&self, stage: Stage) {
        if let Some(p) = &self.progress {
            p.stage(stage);
        }
    }

    pub(super) fn fail(&self, why: impl Into<String>) {
        if let Some(p) = &self.progress {
            p.fail(why);
        }
    }

    pub(super) fn vm_here(&self, here: super::progress::VmHere) {
        if let Some(p) = &self.progress {
            p.vm_here(here);
        }
    }

    pub(super) fn bytes_counter(&self) -> Option<&std::sync::atomic::AtomicU64> {
        self.progress.as_deref().map(|p| &p.bytes)
    }

    /// The move's cancel gate, when it has a progress to carry one.
    pub(super) fn cancel_gate(&self) -> Option<&CancelGate> {
        self.progress.as_deref().map(|p| &p.cancel)
    }

    /// Fails with [`SourceError::Cancelled`] once a cancel was accepted.
    pub(super) fn check_cancel(&self) -> Result<(), SourceError> {
        check_cancel(self.cancel_gate())
    }

    /// The commit point: from here on no cancel is accepted; fails when
    /// one came first.
    pub(super) fn commit(&self) -> Result<(), SourceError> {
        match self.cancel_gate() {
            Some(g) if !g.commit() => Err(SourceError::Cancelled),
            _ => Ok(()),
        }
    }

    pub(super) fn sent_counter(&self) -> Option<&std::sync::atomic::AtomicU64> {
        self.progress.as_deref().map(|p| &p.done)
    }
}

/// Fails with [`SourceError::Cancelled`] once `gate` accepted a cancel.
pub(super) fn check_cancel(gate: Option<&CancelGate>) -> Result<(), SourceError> {
    match gate {
        Some(g) if g.is_cancelled() => Err(SourceError::Cancelled),
        _ => Ok(()),
    }
}
