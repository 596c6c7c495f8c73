//! The source after `Commit`: the move belongs to the destination now, and
//! this side's job is to finish it, through any number of lost links.
//!
//! ```text
//!  AfterCommit ──Resumed──► Serve (lazy: page server until Complete)
//!       │                   AwaitComplete (other modes)
//!       └──── link lost ───► Reconnect ──resume Hello──► status from the destination:
//!                               Prepared   → Commit again → AfterCommit
//!                               Running    → RecvBitmap → Serve (skips what it has)
//!                               Completed  → AwaitComplete
//!                               Unknown    → the destination will never run it
//! ```
//!
//! A lost link is anything that ends a connection: a close, a reset, a
//! timeout, or a peer silent for the peer timeout. Reconnection retries
//! with backoff for the recovery window; after that the move is stranded
//! and the VM stays paused here with its memory.

use std::time::{Duration, Instant};

use ferry_page_server::server::{self, Resume, ServerConfig};
use ferry_page_server::source::{Frozen, PageSource};
use ferry_protocol::{from_json, Hello, MsgType, PageBitmap, ProtocolError, ResumeStatus};
use tracing::{info, warn};

use super::dial::Dial;
use super::error::SourceError;
use super::link::{is_link_failure, Link};
use super::options::SourceOptions;
use super::progress::Stage;
use super::session::resume_session;
use super::stats::Recovery;
use crate::seccomp::{self, Thread};

/// First wait between reconnection attempts; it doubles up to the cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How a committed move ended.
pub(super) enum End {
    /// Every page is at the destination: its `Complete` statistics and the
    /// page server's own (of the last connection).
    Complete {
        complete: serde_json::Value,
        server: serde_json::Value,
    },
    /// The destination does not hold the session: it never ran the VM, or
    /// it lost it. `resumed_seen` says whether it had confirmed running it.
    Unknown { resumed_seen: bool },
}

/// Where the committed move stands.
enum Step {
    /// `Commit` went out; `Resumed` is awaited.
    AfterCommit(Link, Link),
    /// Lazy modes: the page server runs until `Complete`.
    Serve(Link, Link, Option<PageBitmap>),
    /// Other modes: the destination has every page; `Complete` is awaited.
    AwaitComplete(Link),
    /// The link was lost.
    Reconnect,
}

/// A committed move on the source.
pub(super) struct Committed<'a> {
    pub(super) dial: &'a Dial,
    pub(super) hello: Hello,
    pub(super) opts: &'a SourceOptions,
    pub(super) cfg: ServerConfig,
    pub(super) pages: &'a dyn PageSource,
    pub(super) lazy: bool,
    pub(super) recovery: Recovery,
    /// Pages the push sends first (the hot set), on every connection.
    pub(super) hot: Option<PageBitmap>,
    /// The page server's read buffers, made before the pause (the first
    /// serve takes them).
    pub(super) buffers: Option<server::Buffers>,
    resumed_seen: bool,
}

impl<'a> Committed<'a> {
    pub(super) fn new(
        dial: &'a Dial,
        hello: Hello,
        opts: &'a SourceOptions,
        cfg: ServerConfig,
        pages: &'a dyn PageSource,
        lazy: bool,
    ) -> Self {
        Self {
            dial,
            hello,
            opts,
            cfg,
            pages,
            lazy,
            recovery: Recovery::default(),
            hot: None,
            buffers: None,
            resumed_seen: false,
        }
    }

    /// Drives the move to its end. `commit_sent` says whether `Commit` was
    /// written on `conns` (if not, or if `conns` is None, the outcome is
    /// settled by reconnecting). `have` is what the destination holds from
    /// before the switch-over (hybrid).
    pub(super) fn run(
        &mut self,
        conns: Option<(Link, Link)>,
        commit_sent: bool,
        mut have: Option<PageBitmap>,
    ) -> Result<End, SourceError> {
        let mut step = match conns {
            Some((c, f)) if commit_sent => Step::AfterCommit(c, f),
            _ => Step::Reconnect,
        };
        loop {
            step = match step {
                Step::AfterCommit(mut c, f) => match c.expect(MsgType::Resumed, "Resumed") {
                    Ok(p) => {
                        let resumed: ferry_protocol::Resumed = from_json("Resumed", p)?;
                        self.resumed_seen = true;
                        info!(downtime_us = resumed.downtime_us, "destination runs the VM");
                        if self.lazy {
                            self.opts.stage(Stage::Postcopy);
                            Step::Serve(c, f, have.take())
                        } else {
                            Step::AwaitComplete(c)
                        }
                    }
                    Err(e) => self.lost(e)?,
                },
                Step::Serve(c, f, have) => {
                    let have_n = have.as_ref().map_or(0, PageBitmap::count);
                    self.opts
                        .phase("post-copy", self.pages.pages().saturating_sub(have_n));
                    let (control, control_buffered) = c.into_parts();
                    let (fault, fault_buffered) = f.into_parts();
                    let resume = Resume {
                        have: have.as_ref(),
                        hot: self.hot.as_ref(),
                        sent: self.opts.sent_counter(),
                        sent_bytes: self.opts.bytes_counter(),
                        control_buffered,
                        fault_buffered,
                        buffers: self.buffers.take().unwrap_or_default(),
                    };
                    // SAFETY: the destination runs the VM (it said
                    // `Resumed`, or a resumed session says `Running`): this
                    // side never runs it again, and its vCPUs and devices
                    // are stopped, so nothing writes its RAM while the page
                    // server, which lends pages from it, serves.
                    let frozen = unsafe { Frozen::new(self.pages) };
                    // On a thread of its own, confined to what serving needs.
                    let served = seccomp::run_confined(Thread::PageServer, "page-server", || {
                        server::serve_rest(control, fault, &frozen, &self.cfg, resume)
                    })?;
                    match served {
                        Ok((s, complete)) => {
                            return Ok(End::Complete {
                                complete,
                                server: serde_json::to_value(s).unwrap_or_default(),
                            })
                        }
                        Err(e) if e.is_link_failure() => {
                            warn!("post-copy link lost: {e}");
                            Step::Reconnect
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Step::AwaitComplete(mut c) => match c.expect(MsgType::Complete, "Complete") {
                    Ok(p) => {
                        let complete = from_json("Complete", p)?;
                        return Ok(End::Complete {
                            complete,
                            server: serde_json::Value::Null,
                        });
                    }
                    Err(e) => self.lost(e)?,
                },
                Step::Reconnect => match self.reconnect()? {
                    Some(next) => next,
                    None => {
                        return Ok(End::Unknown {
                            resumed_seen: self.resumed_seen,
                        })
                    }
                },
            };
        }
    }

    /// A protocol error on a committed link: a lost link means reconnect,
    /// anything else ends the move.
    fn lost(&self, e: ProtocolError) -> Result<Step, SourceError> {
        if is_link_failure(&e) {
            warn!("link to the destination lost: {e}");
            Ok(Step::Reconnect)
        } else {
            Err(e.into())
        }
    }

    /// Reconnects with backoff until the recovery window ends; returns the
    /// next step, or None when the destination does not hold the session.
    fn reconnect(&mut self) -> Result<Option<Step>, SourceError> {
        self.opts.stage(Stage::Recovering);
        let t = Instant::now();
        let deadline = t + self.opts.recovery_window;
        let mut wait = BACKOFF_FIRST;
        let mut last_error = String::from("no attempt");
        while Instant::now() < deadline {
            match resume_session(
                self.dial,
                &self.hello,
                self.cfg.peer_timeout,
                self.opts.tls.as_ref(),
            ) {
                Ok((None, _)) => {
                    warn!("the destination does not hold the session");
                    return Ok(None);
                }
                Ok((Some(s), status)) => {
                    let next = self.resumed(s.control, s.fault, status);
                    match next {
                        Ok(step) => {
                            self.recovery.record(t, self.opts.progress.as_deref());
                            info!(
                                ?status,
                                ms = t.elapsed().as_millis() as u64,
                                "reconnected to the destination"
                            );
                            return Ok(Some(step));
                        }
                        Err(e) => last_error = e.to_string(),
                    }
                }
                Err(e) => last_error = e.to_string(),
            }
            std::thread::sleep(wait.min(deadline.saturating_duration_since(Instant::now())));
            wait = (wait * 2).min(BACKOFF_MAX);
        }
        Err(SourceError::stranded(format!(
            "no way back to the destination within {:?} (last: {last_error})",
            self.opts.recovery_window
        )))
    }

    /// What follows a resume handshake, by the destination's status.
    fn resumed(
        &mut self,
        mut control: Link,
        fault: Link,
        status: ResumeStatus,
    ) -> Result<Step, SourceError> {
        Ok(match status {
            ResumeStatus::Prepared => {
                control.send(MsgType::Commit, 0, &[])?;
                self.opts.stage(Stage::Switching);
                Step::AfterCommit(control, fault)
            }
            ResumeStatus::Running if self.lazy => {
                let p = control.expect(MsgType::RecvBitmap, "RecvBitmap")?;
                let have = PageBitmap::from_le_bytes(self.pages.pages(), p).ok_or_else(|| {
                    ProtocolError::BadPages(format!(
                        "RecvBitmap of {} bytes for {} pages",
                        p.len(),
                        self.pages.pages()
                    ))
                })?;
                self.resumed_seen = true;
                self.opts.stage(Stage::Postcopy);
                Step::Serve(control, fault, Some(have))
            }
            ResumeStatus::Running | ResumeStatus::Completed => {
                self.resumed_seen = true;
                Step::AwaitComplete(control)
            }
            ResumeStatus::Accepted | ResumeStatus::UnknownSession => {
                return Err(ProtocolError::Handshake(format!(
                    "unexpected resume status {status:?}"
                ))
                .into())
            }
        })
    }
}
