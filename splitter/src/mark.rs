//! `splitter mark`: named points in a ring's stream (recovery points).
//!
//! A mark is a MARK record appended to the ring: every change recorded
//! before it has a lower sequence number, so the replica at the mark's
//! sequence is the disk as it was at that point. A plain mark is
//! **crash-consistent** (the disk as a power cut there would have left it).
//! With `--freeze MOUNTPOINT` (the file system frozen with `fsfreeze` while
//! the mark is appended) and/or `--pre`/`--post` hooks (an application
//! quiesced around it), it is **application-consistent**: bit 0 of the
//! record's offset field ([`ring::format::MARK_APP`]).
//!
//! Who appends: the `splitter serve` that owns the ring, asked over its
//! control socket ([`crate::control`]); or, when no process owns the ring
//! (its producer lock is free), this process opens the ring as its
//! producer, appends, syncs and closes it. Either way the mark is durable
//! before its sequence number is reported.
//!
//! The freeze is bounded and always undone: the thaw runs when the mark
//! fails, when the command is interrupted (SIGINT/SIGTERM only set a flag
//! while a file system is frozen), and at the latest when
//! `--freeze-timeout` has passed. A mark is appended only before a
//! deadline the thaw comes after, so a late mark never claims a freeze it
//! was not taken under.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ring::{Appended, Change, FullPolicy, Producer};

use crate::control::{self, ClientError};

/// Longest mark name, in bytes (the ring's limit).
pub const MAX_NAME: usize = 4096;
/// How long a mark without `--freeze` may take (connect, append, sync, reply).
pub const MARK_TIMEOUT: Duration = Duration::from_secs(30);
/// A request to the serving splitter may be appended at most this long
/// after it was sent (the serving splitter refuses it later): on SIGINT or
/// SIGTERM, `splitter mark` waits at most this long (plus [`SETTLE`]) before
/// it thaws, knowing no late mark can follow.
pub const APPEND_WINDOW: Duration = Duration::from_secs(2);
/// Slack after the append window, for the time between the serving
/// splitter's deadline check and its append.
const SETTLE: Duration = Duration::from_millis(100);
/// How long `splitter mark` keeps asking a ring whose producer lock is held
/// but whose control socket does not answer yet (a `splitter serve` that is
/// starting).
const BUSY_RETRY: Duration = Duration::from_secs(2);

/// Check a mark name: 1 to [`MAX_NAME`] bytes of UTF-8, no control
/// characters (names end up in one-line requests, logs and status output).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a mark name must not be empty".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "a mark name is at most {MAX_NAME} bytes; this one has {}",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "a mark name must not contain control characters (found {c:?})"
        ));
    }
    Ok(())
}

/// A mark in the ring: its sequence number and capture time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkPoint {
    /// The MARK record's sequence number.
    pub seq: u64,
    /// Its capture time, ns since the Unix epoch.
    pub time_ns: u64,
}

/// What to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkRequest {
    /// The mark's name ([`check_name`]).
    pub name: String,
    /// Application-consistent (else crash-consistent).
    pub app: bool,
    /// Append only before this wall-clock time (ns since the Unix epoch);
    /// after it the request is refused and nothing is recorded. The
    /// requester gives up (and thaws) only after it.
    pub append_by_ns: Option<u64>,
}

/// Decides, between a thread that appends a mark in this process and the
/// one waiting for it (which thaws when it gives up), whether the mark may
/// still be appended: once the waiter has given up, it never is.
#[derive(Debug, Default)]
pub struct Gate(AtomicU8);

const PENDING: u8 = 0;
const APPENDING: u8 = 1;
const APPENDED: u8 = 2;
const ABANDONED: u8 = 3;

impl Gate {
    /// A gate that lets the mark through until [`Gate::abandon`].
    pub fn new() -> Gate {
        Gate::default()
    }

    /// The appender is about to append: false when the waiter gave up.
    fn enter(&self) -> bool {
        self.0
            .compare_exchange(PENDING, APPENDING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The appender's append returned (recorded or not).
    fn leave(&self) {
        self.0.store(APPENDED, Ordering::Release);
    }

    /// The waiter gives up: true when no append will happen; false when
    /// one is under way or done ([`Gate::appended`] tells which).
    pub fn abandon(&self) -> bool {
        match self
            .0
            .compare_exchange(PENDING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) | Err(ABANDONED) => true,
            Err(_) => false,
        }
    }

    /// The append returned.
    pub fn appended(&self) -> bool {
        self.0.load(Ordering::Acquire) == APPENDED
    }
}

/// Append `req` to the ring of `producer` and make it durable (the records
/// before it too): the producer's sync, as for an acknowledged FLUSH. With
/// `gate`, only while its waiter has not given up. The error is a message
/// for the requester; it says whether anything was recorded.
pub fn append_durable(
    producer: &Producer,
    req: &MarkRequest,
    gate: Option<&Gate>,
) -> Result<MarkPoint, String> {
    check_name(&req.name)?;
    if let Some(by) = req.append_by_ns {
        if ring::wall_clock_ns() >= by {
            return Err(
                "the request's deadline passed before the mark could be appended; nothing was recorded"
                    .into(),
            );
        }
    }
    if gate.is_some_and(|g| !g.enter()) {
        return Err(
            "the requester gave up before the mark could be appended; nothing was recorded".into(),
        );
    }
    let change = Change::Mark {
        name: &req.name,
        app: req.app,
    };
    let appended = producer.append_timed(change);
    if let Some(g) = gate {
        g.leave();
    }
    match appended {
        Ok((Appended::Record(seq), time_ns)) => {
            producer.sync().map_err(|e| {
                format!("the mark was appended at seq {seq} but could not be made durable: {e}")
            })?;
            Ok(MarkPoint { seq, time_ns })
        }
        Ok((Appended::Overflowed, _)) => Err(
            "the ring is full (changes overflow into its dirty bitmap): no mark can be recorded until the shipper has caught up; nothing was recorded"
                .into(),
        ),
        Err(e) => Err(format!("appending the mark failed: {e}; nothing was recorded")),
    }
}

/// The marks of a running `splitter serve`: its producer, and a gate that
/// closes before the producer does (no mark after the ring's clean close).
#[derive(Debug)]
pub struct Marker {
    producer: Arc<Producer>,
    open: Mutex<bool>,
}

impl Marker {
    /// Marks appended to `producer`.
    pub fn new(producer: Arc<Producer>) -> Marker {
        Marker {
            producer,
            open: Mutex::new(true),
        }
    }

    /// Append a mark and make it durable ([`append_durable`]), unless
    /// [`Marker::close`] was called.
    pub fn mark(&self, req: &MarkRequest) -> Result<MarkPoint, String> {
        let open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !*open {
            return Err("the splitter is shutting down; nothing was recorded".into());
        }
        append_durable(&self.producer, req, None)
    }

    /// Refuse marks from now on; waits for a mark being appended.
    pub fn close(&self) {
        *self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = false;
    }
}

/// Who appended a mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The `splitter serve` that owns the ring, over its control socket.
    Serve,
    /// This process, as the ring's producer (no splitter owned it).
    Direct,
}

/// Why a mark was not taken (or not confirmed).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MarkError {
    /// A bad name or option.
    #[error("{0}")]
    Invalid(String),
    /// The ring could not take the mark.
    #[error("cannot mark ring {ring}: {reason}")]
    Ring {
        /// The ring file.
        ring: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// The mark did not complete in time.
    #[error("the mark on ring {ring} did not complete within {ms} ms: {what}")]
    Timeout {
        /// The ring file.
        ring: PathBuf,
        /// The time allowed.
        ms: u128,
        /// What that means for the mark.
        what: &'static str,
    },
    /// A hook failed.
    #[error("the {which} hook `{cmd}` failed ({status}){then}")]
    Hook {
        /// `--pre` or `--post`.
        which: &'static str,
        /// The command.
        cmd: String,
        /// Its exit status, or why it could not run.
        status: String,
        /// What that means for the mark.
        then: &'static str,
    },
    /// The file system could not be frozen.
    #[error("cannot freeze {mount}: {reason}; no mark was taken")]
    Freeze {
        /// The mount point.
        mount: PathBuf,
        /// Why.
        reason: String,
    },
    /// The file system could not be thawed.
    #[error("THE FILE SYSTEM {mount} MAY STILL BE FROZEN: thawing it failed: {reason}; run `fsfreeze -u {mount}` now", mount = .mount.display())]
    Thaw {
        /// The mount point.
        mount: PathBuf,
        /// Why.
        reason: String,
    },
    /// SIGINT or SIGTERM arrived.
    #[error("interrupted (SIGINT/SIGTERM) {when}")]
    Interrupted {
        /// When, and what it means for the mark.
        when: &'static str,
    },
}

/// A mark appended, and by whom; or why not.
pub type Marked = Result<(MarkPoint, Via), MarkError>;

/// Append a mark to the ring at `ring`: through the control socket of the
/// `splitter serve` that owns it, or, when no process owns it, as its
/// producer here (only while `gate` lets it: the request's `append_by_ns`
/// is for the serving splitter, which has no other way to know that the
/// requester gave up). `timeout` bounds the control-socket exchange.
pub fn mark_ring(ring: &Path, req: &MarkRequest, timeout: Duration, gate: &Gate) -> Marked {
    let socket = control::socket_path(ring);
    let ring_err = |reason: String| MarkError::Ring {
        ring: ring.to_path_buf(),
        reason,
    };
    let started = Instant::now();
    loop {
        match control::request(&socket, req, timeout) {
            Ok(p) => return Ok((p, Via::Serve)),
            Err(ClientError::Refused(why)) => {
                return Err(ring_err(format!(
                    "the splitter serving it refused the mark: {why}"
                )))
            }
            Err(ClientError::Io(e)) => {
                return Err(ring_err(format!(
                    "the exchange with the splitter serving it over {} failed: {e}; the mark was not confirmed (if it was recorded, `splitter ring dump` shows it)",
                    socket.display()
                )))
            }
            Err(ClientError::NoServer(why)) => {
                match Producer::open_existing(ring, FullPolicy::Bitmap) {
                    Ok((p, _)) => return direct(ring, &p, req, gate),
                    Err(ring::Error::Busy { .. }) if started.elapsed() < BUSY_RETRY => {
                        // A splitter that is starting holds the lock before
                        // its control socket exists.
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(ring::Error::Busy { .. }) => {
                        let pid = ring::status(ring).map_or(0, |s| s.producer_pid);
                        return Err(ring_err(format!(
                            "another process owns the ring (its producer lock is held; pid {pid} per its header) but its control socket {} does not answer ({why}): if it is a `splitter serve`, it is older than marks or its socket was removed; restart it, or stop the process that holds the ring and try again",
                            socket.display()
                        )));
                    }
                    Err(e) => {
                        return Err(ring_err(format!(
                            "no splitter serves it ({} does not answer: {why}) and it cannot be opened as its producer: {e}",
                            socket.display()
                        )))
                    }
                }
            }
        }
    }
}

/// The mark appended by this process as the ring's producer; the ring is
/// closed cleanly afterwards.
fn direct(ring: &Path, p: &Producer, req: &MarkRequest, gate: &Gate) -> Marked {
    // The gate decides here: opening (recovering) the ring may take longer
    // than a request's append window.
    let req = MarkRequest {
        append_by_ns: None,
        ..req.clone()
    };
    let r = append_durable(p, &req, Some(gate));
    if let Err(e) = p.close() {
        log::warn!(
            "ring {}: closing it after the mark failed: {e}",
            ring.display()
        );
    }
    r.map(|point| (point, Via::Direct))
        .map_err(|reason| MarkError::Ring {
            ring: ring.to_path_buf(),
            reason,
        })
}

/// What `splitter mark` was asked to do.
#[derive(Debug, Clone)]
pub struct MarkOptions {
    /// The ring.
    pub ring: PathBuf,
    /// The mark's name.
    pub name: String,
    /// Freeze this mount point while marking.
    pub freeze: Option<PathBuf>,
    /// Longest the file system may stay frozen.
    pub freeze_timeout: Duration,
    /// Run before (and before freezing), with `sh -c`.
    pub pre: Option<String>,
    /// Run after (and after thawing), with `sh -c`.
    pub post: Option<String>,
}

impl MarkOptions {
    /// The mark is application-consistent: a freeze or hooks.
    pub fn app(&self) -> bool {
        self.freeze.is_some() || self.pre.is_some() || self.post.is_some()
    }
}

/// A mark that was recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkReport {
    /// Its name.
    pub name: String,
    /// Where it is.
    pub point: MarkPoint,
    /// Application-consistent.
    pub app: bool,
    /// How long the file system was frozen (with `--freeze`).
    pub frozen_ms: Option<u64>,
    /// Who appended it.
    pub via: Via,
}

impl MarkReport {
    /// "crash" or "app".
    pub fn kind(&self) -> &'static str {
        if self.app {
            "app"
        } else {
            "crash"
        }
    }

    /// The one-line report: `mark "NAME" at seq N (crash-consistent)`.
    pub fn text(&self) -> String {
        let how = match (self.app, self.frozen_ms) {
            (false, _) => "crash-consistent".to_string(),
            (true, None) => "application-consistent".to_string(),
            (true, Some(ms)) => {
                format!("application-consistent; file system frozen for {ms} ms")
            }
        };
        format!("mark {:?} at seq {} ({how})", self.name, self.point.seq)
    }

    /// `{"name":..,"seq":..,"kind":"crash"|"app","time_ns":..,"frozen_ms":..}`
    /// (`frozen_ms` is null without `--freeze`).
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "seq": self.point.seq,
            "kind": self.kind(),
            "time_ns": self.point.time_ns,
            "frozen_ms": self.frozen_ms,
        })
    }
}

/// `splitter mark` failed; `recorded` is the mark when it was recorded
/// all the same (a `--post` hook or the thaw failed afterwards).
#[derive(Debug)]
pub struct MarkFailure {
    /// The mark, when it was recorded.
    pub recorded: Option<MarkReport>,
    /// The first thing that went wrong.
    pub error: MarkError,
    /// What else went wrong.
    pub also: Vec<MarkError>,
}

impl std::fmt::Display for MarkFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        for e in &self.also {
            write!(f, "; also: {e}")?;
        }
        if let Some(r) = &self.recorded {
            write!(f, " (the mark was recorded: {})", r.text())?;
        }
        Ok(())
    }
}

impl std::error::Error for MarkFailure {}

impl From<MarkError> for MarkFailure {
    fn from(error: MarkError) -> MarkFailure {
        MarkFailure {
            recorded: None,
            error,
            also: Vec::new(),
        }
    }
}

/// Take a mark as `splitter mark` does: `--pre`, freeze, mark, thaw,
/// `--post`. `stop` is set by the SIGINT/SIGTERM handlers (which must only
/// set it): a hook still running is stopped, a freeze is undone before
/// returning, a mark being appended is waited for (within its deadline).
pub fn take(opts: &MarkOptions, stop: &AtomicBool) -> Result<MarkReport, Box<MarkFailure>> {
    let fail = |e: MarkError| Box::new(MarkFailure::from(e));
    check_name(&opts.name).map_err(|e| fail(MarkError::Invalid(e)))?;
    let app = opts.app();
    // Before any hook runs or anything is frozen: a ring that is not there
    // cannot take the mark.
    if let Err(e) = std::fs::metadata(&opts.ring) {
        return Err(fail(MarkError::Ring {
            ring: opts.ring.clone(),
            reason: format!("{e}: give the --ring of the `splitter serve` that protects the disk"),
        }));
    }
    if let Some(m) = &opts.freeze {
        check_freezable(m, &opts.ring, opts.freeze_timeout).map_err(fail)?;
    }
    let env = |result: Option<&Marked>| {
        let mut v = vec![
            ("BLOCKSHIP_MARK_NAME", opts.name.clone()),
            ("BLOCKSHIP_MARK_RING", opts.ring.display().to_string()),
        ];
        match result {
            Some(Ok((p, _))) => {
                v.push(("BLOCKSHIP_MARK_RESULT", "ok".into()));
                v.push(("BLOCKSHIP_MARK_SEQ", p.seq.to_string()));
            }
            Some(Err(_)) => v.push(("BLOCKSHIP_MARK_RESULT", "failed".into())),
            None => {}
        }
        v
    };
    if let Some(cmd) = &opts.pre {
        if let Err(status) = run_hook(cmd, &env(None), Some(stop)) {
            return Err(Box::new(
                MarkError::Hook {
                    which: "--pre",
                    cmd: cmd.clone(),
                    status,
                    then: ": nothing was frozen and no mark was taken",
                }
                .into(),
            ));
        }
    }
    let (result, frozen_ms, thaw_failed) = if stop.load(Ordering::Acquire) {
        let e = MarkError::Interrupted {
            when: "before the mark: nothing was frozen and no mark was taken",
        };
        (Err(e), None, None)
    } else {
        let req = MarkRequest {
            name: opts.name.clone(),
            app,
            append_by_ns: None,
        };
        match &opts.freeze {
            Some(m) => freeze_and_mark(m, &opts.ring, &req, opts.freeze_timeout, stop),
            None => {
                let r = mark_bounded(&opts.ring, &req, Instant::now() + MARK_TIMEOUT, stop);
                (r, None, None)
            }
        }
    };
    let mut post_failed = None;
    if let Some(cmd) = &opts.post {
        // The post hook runs to its end: it undoes what --pre did.
        if let Err(status) = run_hook(cmd, &env(Some(&result)), None) {
            post_failed = Some(MarkError::Hook {
                which: "--post",
                cmd: cmd.clone(),
                status,
                then: "",
            });
        }
    }
    let (recorded, mark_failed) = match result {
        Ok((point, via)) => {
            let r = MarkReport {
                name: opts.name.clone(),
                point,
                app,
                frozen_ms,
                via,
            };
            (Some(r), None)
        }
        Err(e) => (None, Some(e)),
    };
    let interrupted =
        (recorded.is_some() && stop.load(Ordering::Acquire)).then_some(MarkError::Interrupted {
            when: "while marking; the mark was recorded and the file system (if any) thawed",
        });
    // A failed thaw comes first: it is the one thing that needs a hand now.
    let mut all = [thaw_failed, mark_failed, post_failed, interrupted]
        .into_iter()
        .flatten();
    match (all.next(), recorded) {
        (None, Some(r)) => Ok(r),
        (first, recorded) => Err(Box::new(MarkFailure {
            recorded,
            error: first.unwrap_or(MarkError::Invalid("the mark was not recorded".into())),
            also: all.collect(),
        })),
    }
}

/// Refuse a freeze that would deadlock or make no sense: a mount point that
/// is not a directory, the ring (or its control socket) on the file system
/// to freeze (the mark could not be written while it is frozen), a timeout
/// of zero.
fn check_freezable(mount: &Path, ring: &Path, timeout: Duration) -> Result<(), MarkError> {
    let freeze_err = |reason: String| MarkError::Freeze {
        mount: mount.to_path_buf(),
        reason,
    };
    if timeout.is_zero() {
        return Err(MarkError::Invalid(
            "--freeze-timeout must be more than 0".into(),
        ));
    }
    let m = std::fs::metadata(mount).map_err(|e| freeze_err(e.to_string()))?;
    if !m.is_dir() {
        return Err(freeze_err("not a directory (give the mount point)".into()));
    }
    if let Ok(r) = std::fs::metadata(ring) {
        if r.dev() == m.dev() {
            return Err(freeze_err(format!(
                "the ring {} is on that file system: it could not be written while the file system is frozen; keep the ring on another file system",
                ring.display()
            )));
        }
    }
    Ok(())
}

/// Run the mark in a thread and wait for it until `deadline`. The mark
/// can only be appended within a window that ends before `deadline` (at
/// most [`APPEND_WINDOW`] after the request): once this returns an error,
/// no mark of this request appears later, and a mark that was recorded
/// was appended before this returned (so before any thaw that follows).
/// On `stop` (SIGINT/SIGTERM) it waits only until that window has closed.
fn mark_bounded(ring: &Path, req: &MarkRequest, deadline: Instant, stop: &AtomicBool) -> Marked {
    let start = Instant::now();
    let budget = deadline.saturating_duration_since(start);
    let margin = (budget / 5).min(Duration::from_millis(500));
    let window = (budget - margin).min(APPEND_WINDOW);
    let window_closed = start + window + SETTLE;
    let mut req = req.clone();
    let window_ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
    req.append_by_ns = Some(ring::wall_clock_ns().saturating_add(window_ns));
    let (tx, rx) = mpsc::channel();
    let ring_path = ring.to_path_buf();
    let gate = Arc::new(Gate::new());
    let spawned = {
        let gate = gate.clone();
        std::thread::Builder::new()
            .name("mark".into())
            .spawn(move || {
                // The exchange may run a little past `deadline`, so that the
                // deadline below (not a socket timeout racing it) decides a
                // timeout; the append window is enforced by the splitter.
                let _ = tx.send(mark_ring(&ring_path, &req, budget + SETTLE * 2, &gate));
            })
    };
    if let Err(e) = spawned {
        return Err(MarkError::Ring {
            ring: ring.to_path_buf(),
            reason: format!("cannot start a thread: {e}"),
        });
    }
    loop {
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(r) => return r,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(MarkError::Ring {
                    ring: ring.to_path_buf(),
                    reason: "the mark's thread failed".into(),
                })
            }
        }
        let now = Instant::now();
        let interrupted = stop.load(Ordering::Acquire) && now >= window_closed;
        if now < deadline && !interrupted {
            continue;
        }
        if !gate.abandon() && !gate.appended() {
            // This process is appending it right now: a matter of
            // microseconds; its outcome decides.
            continue;
        }
        let what = if gate.appended() {
            "appended but not confirmed durable: `splitter ring dump` shows it"
        } else {
            "not recorded (a mark is refused once its append window has closed)"
        };
        return Err(if interrupted {
            MarkError::Interrupted {
                when: if gate.appended() {
                    "while marking: the mark was appended but not confirmed durable (`splitter ring dump` shows it)"
                } else {
                    "while marking: the mark was not confirmed; if it was recorded, it was appended before the thaw (`splitter ring dump` shows it)"
                },
            }
        } else {
            MarkError::Timeout {
                ring: ring.to_path_buf(),
                ms: budget.as_millis(),
                what,
            }
        });
    }
}

/// Freeze `mount`, mark, thaw (always, also on failure or interruption),
/// within `timeout` of frozen time. Returns the mark, how long the file
/// system was frozen (ms), and a thaw failure.
fn freeze_and_mark(
    mount: &Path,
    ring: &Path,
    req: &MarkRequest,
    timeout: Duration,
    stop: &AtomicBool,
) -> (Marked, Option<u64>, Option<MarkError>) {
    let started = Instant::now();
    let deadline = started + timeout;
    let frozen_ms = || Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
    let freeze = match fsfreeze("-f", mount) {
        Ok(child) => wait_freeze(child, deadline),
        Err(e) => Err(e),
    };
    let frozen = match freeze {
        Ok(f) => f,
        Err(FreezeFailed {
            reason,
            maybe_frozen,
        }) => {
            let thaw = maybe_frozen.then(|| thaw(mount)).and_then(Result::err);
            let e = MarkError::Freeze {
                mount: mount.to_path_buf(),
                reason,
            };
            return (Err(e), None, thaw);
        }
    };
    let mut guard = FrozenGuard {
        mount,
        thawed: false,
    };
    log::info!("froze {}", mount.display());
    let result = if !frozen {
        Err(MarkError::Timeout {
            ring: ring.to_path_buf(),
            ms: timeout.as_millis(),
            what:
                "`fsfreeze -f` took longer than --freeze-timeout; thawed at once, no mark was taken",
        })
    } else if stop.load(Ordering::Acquire) {
        Err(MarkError::Interrupted {
            when: "while freezing: thawed, no mark was taken",
        })
    } else {
        mark_bounded(ring, req, deadline, stop)
    };
    let thawed = guard.thaw();
    let ms = frozen_ms();
    match &thawed {
        Ok(()) => log::info!(
            "thawed {} (frozen for {} ms)",
            mount.display(),
            ms.unwrap_or(0)
        ),
        Err(e) => log::error!("{e}"),
    }
    (result, ms, thawed.err())
}

/// Undoes a freeze when dropped without [`FrozenGuard::thaw`] (a panic).
struct FrozenGuard<'a> {
    mount: &'a Path,
    thawed: bool,
}

impl FrozenGuard<'_> {
    fn thaw(&mut self) -> Result<(), MarkError> {
        self.thawed = true;
        thaw(self.mount)
    }
}

impl Drop for FrozenGuard<'_> {
    fn drop(&mut self) {
        if !self.thawed {
            if let Err(e) = thaw(self.mount) {
                log::error!("{e}");
            }
        }
    }
}

struct FreezeFailed {
    reason: String,
    /// `fsfreeze -f` did not say whether it froze (it was killed).
    maybe_frozen: bool,
}

/// Start `fsfreeze FLAG MOUNT` in a process group of its own, so that a
/// Ctrl-C at the terminal reaches this process (which thaws) and not it.
fn fsfreeze(flag: &str, mount: &Path) -> Result<Child, FreezeFailed> {
    Command::new("fsfreeze")
        .arg(flag)
        .arg(mount)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| FreezeFailed {
            reason: if e.kind() == io::ErrorKind::NotFound {
                "fsfreeze is not installed (it is in util-linux)".into()
            } else {
                format!("cannot run fsfreeze: {e}")
            },
            maybe_frozen: false,
        })
}

/// Wait for `fsfreeze -f`: Ok(true) frozen within the deadline, Ok(false)
/// frozen after it (thaw at once). It cannot be cut short (the kernel
/// flushes the file system first), so this waits for it either way.
fn wait_freeze(child: Child, deadline: Instant) -> Result<bool, FreezeFailed> {
    let out = child.wait_with_output().map_err(|e| FreezeFailed {
        reason: format!("waiting for fsfreeze -f: {e}"),
        maybe_frozen: true,
    })?;
    if out.status.success() {
        return Ok(Instant::now() <= deadline);
    }
    Err(FreezeFailed {
        reason: format!(
            "fsfreeze -f failed ({}): {}",
            describe(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        // Killed by a signal: it may have frozen before.
        maybe_frozen: out.status.code().is_none(),
    })
}

/// `fsfreeze -u MOUNT`, retried a few times.
fn thaw(mount: &Path) -> Result<(), MarkError> {
    let mut last = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        match fsfreeze("-u", mount) {
            Ok(child) => match child.wait_with_output() {
                Ok(out) if out.status.success() => return Ok(()),
                Ok(out) => {
                    last = format!(
                        "fsfreeze -u failed ({}): {}",
                        describe(out.status),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                Err(e) => last = format!("waiting for fsfreeze -u: {e}"),
            },
            Err(e) => last = e.reason,
        }
    }
    Err(MarkError::Thaw {
        mount: mount.to_path_buf(),
        reason: last,
    })
}

/// "exit status 1", "killed by signal 9".
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// Run a hook with `sh -c CMD` (its stdout goes to stderr, so that `--json`
/// output stays clean). With `stop`, the hook is killed when it is set.
/// Err: its status, or why it could not run.
fn run_hook(cmd: &str, env: &[(&str, String)], stop: Option<&AtomicBool>) -> Result<(), String> {
    let stdout = match io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => Stdio::from(fd),
        Err(_) => Stdio::null(),
    };
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout)
        .spawn()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(describe(st)),
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for it: {e}")),
        }
        if stop.is_some_and(|s| s.load(Ordering::Acquire)) {
            let _ = child.kill();
            let _ = child.wait();
            return Err("interrupted by SIGINT/SIGTERM: killed".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Parse a duration: `10s`, `500ms`, `2m`, or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s, 500ms or 2m"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
        other => return Err(format!("unknown duration unit {other:?} (use ms, s or m)")),
    };
    if d.is_zero() || d > Duration::from_secs(600) {
        return Err(format!(
            "{s}: give a duration above 0 and at most 10m (a file system stays frozen at most this long)"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on any error
    use super::*;

    fn ring(dir: &Path) -> (PathBuf, Arc<Producer>) {
        crate::control::tests::producer(dir)
    }

    fn req(name: &str, app: bool) -> MarkRequest {
        MarkRequest {
            name: name.into(),
            app,
            append_by_ns: None,
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("nightly 2026-05-01").is_ok());
        assert!(check_name("é".repeat(2048).as_str()).is_ok());
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(4097)).is_err());
        assert!(check_name("a\nb").is_err());
        assert!(check_name("a\0b").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        for bad in ["", "0s", "11m", "1h", "s", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_mark_is_durable_and_carries_its_kind() {
        let dir = tempfile::tempdir().unwrap();
        let (path, p) = ring(dir.path());
        let a = append_durable(&p, &req("one", false), None).unwrap();
        let b = append_durable(&p, &req("two", true), None).unwrap();
        assert_eq!((a.seq, b.seq), (1, 2));
        assert!(a.time_ns > 0 && b.time_ns >= a.time_ns);
        // Durable: the synced head covers both records.
        assert_eq!(
            p.sync_plan().ranges.len(),
            2,
            "only in-flight table and header left"
        );
        let (e, _) = ring::dump(&path, None, 10).unwrap();
        let got: Vec<_> = e
            .iter()
            .map(|e| (e.mark.clone().unwrap(), e.offset))
            .collect();
        assert_eq!(
            got,
            [("one".into(), 0), ("two".into(), ring::format::MARK_APP)]
        );
    }

    #[test]
    fn a_late_request_records_nothing_and_a_closed_marker_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let (path, p) = ring(dir.path());
        let mut late = req("late", true);
        late.append_by_ns = Some(ring::wall_clock_ns() - 1);
        assert!(append_durable(&p, &late, None)
            .unwrap_err()
            .contains("nothing was recorded"));
        let m = Marker::new(p);
        assert_eq!(m.mark(&req("ok", false)).unwrap().seq, 1);
        m.close();
        assert!(m
            .mark(&req("after", false))
            .unwrap_err()
            .contains("shutting down"));
        assert_eq!(ring::dump(&path, None, 10).unwrap().0.len(), 1);
    }

    #[test]
    fn a_ring_nobody_owns_is_marked_directly_and_closed_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let (path, p) = ring(dir.path());
        p.close().unwrap();
        drop(p);
        let (point, via) =
            mark_ring(&path, &req("direct", false), MARK_TIMEOUT, &Gate::new()).unwrap();
        assert_eq!((point.seq, via), (1, Via::Direct));
        let st = ring::status(&path).unwrap();
        assert!(st.clean);
        // Owned by a producer without a control socket: a clear error.
        let (_p, _) = Producer::open_existing(&path, FullPolicy::Bitmap).unwrap();
        let e = mark_ring(&path, &req("busy", false), MARK_TIMEOUT, &Gate::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("another process owns the ring"), "{e}");
        assert!(e.contains(".ctl"), "{e}");
    }

    #[test]
    fn an_abandoned_gate_lets_no_mark_through() {
        let dir = tempfile::tempdir().unwrap();
        let (path, p) = ring(dir.path());
        p.close().unwrap();
        drop(p);
        let g = Gate::new();
        assert!(g.abandon() && g.abandon() && !g.appended());
        let e = mark_ring(&path, &req("late", true), MARK_TIMEOUT, &g)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gave up"), "{e}");
        assert!(ring::dump(&path, None, 10).unwrap().0.is_empty());
        // A gate whose append went through cannot be abandoned.
        let g = Gate::new();
        mark_ring(&path, &req("through", true), MARK_TIMEOUT, &g).unwrap();
        assert!(!g.abandon() && g.appended());
        // The ring was closed cleanly both times.
        assert!(ring::status(&path).unwrap().clean);
    }

    #[test]
    fn a_missing_ring_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = mark_ring(
            &dir.path().join("nope.ring"),
            &req("x", false),
            MARK_TIMEOUT,
            &Gate::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("nope.ring") && e.contains("no splitter serves it"),
            "{e}"
        );
    }

    #[test]
    fn a_failing_pre_hook_takes_no_mark_and_post_runs_after_a_failed_mark() {
        let dir = tempfile::tempdir().unwrap();
        let (path, p) = ring(dir.path());
        p.close().unwrap();
        drop(p);
        let log = dir.path().join("hooks.log");
        let stop = AtomicBool::new(false);
        let mut o = MarkOptions {
            ring: path.clone(),
            name: "hooked".into(),
            freeze: None,
            freeze_timeout: Duration::from_secs(10),
            pre: Some("false".into()),
            post: Some(format!("echo post >> {}", log.display())),
        };
        let f = take(&o, &stop).unwrap_err();
        assert!(f.recorded.is_none());
        assert!(f.to_string().contains("--pre hook `false` failed"), "{f}");
        assert!(!log.exists(), "post must not run when pre failed");
        assert!(ring::dump(&path, None, 10).unwrap().0.is_empty());

        // A ring that does not exist: refused before any hook runs.
        o.pre = Some(format!("echo pre >> {}", log.display()));
        o.ring = dir.path().join("missing.ring");
        let f = take(&o, &stop).unwrap_err();
        assert!(f.to_string().contains("missing.ring"), "{f}");
        assert!(!log.exists(), "no hook runs for a missing ring");

        // Pre succeeds, the mark fails (a file that is not a ring): post
        // runs, told so.
        std::fs::write(&o.ring, b"not a ring").unwrap();
        o.post = Some(format!(
            "echo post $BLOCKSHIP_MARK_RESULT >> {}",
            log.display()
        ));
        let f = take(&o, &stop).unwrap_err();
        assert!(f.recorded.is_none());
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre\npost failed\n");

        // Both succeed: an application-consistent mark, post sees its seq.
        std::fs::remove_file(&log).unwrap();
        o.ring = path.clone();
        o.post = Some(format!(
            "echo post $BLOCKSHIP_MARK_RESULT $BLOCKSHIP_MARK_SEQ >> {}",
            log.display()
        ));
        let r = take(&o, &stop).unwrap();
        assert_eq!((r.point.seq, r.app, r.frozen_ms), (1, true, None));
        assert_eq!(
            r.text(),
            "mark \"hooked\" at seq 1 (application-consistent)"
        );
        assert_eq!(r.json()["kind"], "app");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre\npost ok 1\n");

        // A failing post hook: the mark stands, the command fails.
        o.post = Some("exit 3".into());
        let f = take(&o, &stop).unwrap_err();
        assert_eq!(f.recorded.as_ref().map(|r| r.point.seq), Some(2));
        assert!(
            f.to_string()
                .contains("--post hook `exit 3` failed (exit status 3)"),
            "{f}"
        );
    }

    #[test]
    fn a_freeze_of_the_rings_own_file_system_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _p) = ring(dir.path());
        let e = check_freezable(dir.path(), &path, Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is on that file system"), "{e}");
        assert!(check_freezable(&path, &path, Duration::from_secs(1)).is_err());
    }
}
