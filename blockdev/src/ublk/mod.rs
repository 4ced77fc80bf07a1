//! The ublk front end: a disk served as the kernel block device
//! `/dev/ublkbN`, through the same write-capture engine as NBD.
//!
//! - [`prepare`] decides, before the disk and the ring are opened, whether
//!   to create a device or recover an existing one (user recovery), and
//!   hands a live device over from the splitter that serves it (an upgrade).
//! - [`serve`] creates (or re-attaches to) the device with libublk and runs
//!   one thread per hardware queue ([`queue`]): each tag's request is
//!   begin → disk → capture → answer, exactly as a request of one NBD
//!   connection, with FLUSH and FUA making the disk and the ring durable.
//! - [`Features`] is what the kernel's ublk driver offers, probed at start
//!   and logged with what is used.
//!
//! Devices are created with `UBLK_F_USER_RECOVERY` and, where the driver
//! has it, `UBLK_F_USER_RECOVERY_REISSUE`: when the splitter dies, the
//! device stays, I/O queues in the kernel, and requests the dead process
//! had taken are issued again to its successor. A write can so reach the
//! disk and the ring twice; that is harmless (see `docs/ARCHITECTURE.md`,
//! "ublk"): the same bytes at the same offset, and no overlapping write can
//! be ordered between the two copies, because the client has not been told
//! the first one completed.
//!
//! This module is *not* the capture (it calls [`crate::WriteCapture`]) and
//! not a device manager: one process serves one device.

mod device;
mod queue;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};

use crate::server::Claims;
use crate::{Backend, WriteCapture, MAX_TAGS};

pub use device::{DeviceState, ExistingDevice};

/// The largest request the splitter asks the kernel to send (bytes).
pub const DEFAULT_IO_BUF_BYTES: u32 = 512 << 10;
/// The default queue depth (requests in flight per queue).
pub const DEFAULT_DEPTH: u16 = 64;

/// Device numbers are below this (the kernel's limit).
const MAX_DEV_ID: u32 = 1 << 20;

/// A device number as libublk takes it (checked below [`MAX_DEV_ID`]).
fn dev_num(id: u32) -> i32 {
    i32::try_from(id).unwrap_or(i32::MAX)
}

/// What can go wrong setting up or serving a ublk device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UblkError {
    /// The kernel has no ublk driver (or it is not loaded).
    #[error("no ublk driver: /dev/ublk-control is missing. Load it with `modprobe ublk_drv` (Linux 6.0 or later, CONFIG_BLK_DEV_UBLK), or serve the disk over NBD instead")]
    NoDriver,
    /// A parameter is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The device asked for is in a state that does not allow it.
    #[error("{0}")]
    Device(String),
    /// A libublk or kernel call failed.
    #[error("{what}: {err}")]
    Call {
        /// What was being done.
        what: String,
        /// libublk's error.
        err: String,
    },
}

fn call_err(what: impl Into<String>) -> impl FnOnce(libublk::UblkError) -> UblkError {
    let what = what.into();
    move |e| UblkError::Call {
        what,
        err: match e {
            libublk::UblkError::OtherError(n) | libublk::UblkError::UringIOError(n) => {
                format!("{} (errno {})", std::io::Error::from_raw_os_error(-n), -n)
            }
            e => e.to_string(),
        },
    }
}

/// What the kernel's ublk driver offers (its feature bits), probed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// The raw `UBLK_F_*` bits.
    pub bits: u64,
}

impl Features {
    /// Ask the driver. Drivers before Linux 6.5 cannot list their
    /// features; they have user recovery with reissue (since 6.0), so that
    /// is assumed, and said.
    pub fn probe() -> Result<Features, UblkError> {
        let ctl = Path::new("/dev/ublk-control");
        if !ctl.exists() {
            return Err(UblkError::NoDriver);
        }
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(ctl) {
            return Err(UblkError::Device(format!(
                "cannot open /dev/ublk-control: {e} (creating ublk devices needs root, or CAP_SYS_ADMIN)"
            )));
        }
        Ok(match UblkCtrl::get_features() {
            Some(bits) => Features { bits },
            None => {
                log::info!("the ublk driver cannot list its features (Linux before 6.5): assuming user recovery with reissue (Linux 6.0 and later)");
                Features {
                    bits: u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE),
                }
            }
        })
    }
    fn has(&self, f: u32) -> bool {
        self.bits & u64::from(f) != 0
    }
    /// `UBLK_F_USER_RECOVERY`: the device survives the splitter.
    pub fn user_recovery(&self) -> bool {
        self.has(sys::UBLK_F_USER_RECOVERY)
    }
    /// `UBLK_F_USER_RECOVERY_REISSUE`: requests the dead splitter had are
    /// issued again (else they fail).
    pub fn reissue(&self) -> bool {
        self.has(sys::UBLK_F_USER_RECOVERY_REISSUE)
    }
    /// One line for the log: each optional feature, and whether it is used.
    pub fn describe(&self) -> String {
        let yn = |f: u32| if self.has(f) { "yes" } else { "no" };
        format!(
            "user recovery {} (used), reissue {} (used), quiesce {} (not used: a hand-over stops the old splitter itself), \
             zero copy {}, automatic buffer registration {} (neither used: the capture reads each write from the splitter's buffer, copy mode), \
             per-I/O daemon {} (not used: one thread per queue), user copy {} (not used)",
            yn(sys::UBLK_F_USER_RECOVERY),
            yn(sys::UBLK_F_USER_RECOVERY_REISSUE),
            yn(sys::UBLK_F_QUIESCE),
            yn(sys::UBLK_F_SUPPORT_ZERO_COPY),
            yn(sys::UBLK_F_AUTO_BUF_REG),
            yn(sys::UBLK_F_PER_IO_DAEMON),
            yn(sys::UBLK_F_USER_COPY),
        )
    }
}

/// How to serve: `splitter serve --ublk [--ublk-id N] [--recover N]
/// [--queues Q] [--depth DEPTH]`.
#[derive(Debug, Clone)]
pub struct UblkOptions {
    /// The device number to create (`/dev/ublkbN`); None: the kernel picks.
    pub id: Option<u32>,
    /// Re-attach to this existing device (user recovery); a live one is
    /// first handed over by the splitter serving it.
    pub recover: Option<u32>,
    /// Hardware queues (one thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// The largest request, bytes.
    pub io_buf_bytes: u32,
    /// The disk served (recorded with the device, checked on recovery).
    pub disk_path: PathBuf,
    /// The ring captured into, if any (recorded with the device).
    pub ring_path: Option<PathBuf>,
}

impl UblkOptions {
    fn check(&self) -> Result<(), UblkError> {
        // Each queue owns one in-flight lane of the ring.
        let max_queues =
            sys::UBLK_MAX_NR_QUEUES.min(u32::try_from(ring::format::LANES).unwrap_or(u32::MAX));
        if self.queues == 0 || u32::from(self.queues) > max_queues {
            return Err(UblkError::Invalid(format!(
                "--queues {} is out of range: 1 to {max_queues} (each queue owns one in-flight lane of the ring)",
                self.queues
            )));
        }
        if self.depth == 0 || usize::from(self.depth) > MAX_TAGS {
            return Err(UblkError::Invalid(format!(
                "--depth {} is out of range: 1 to {MAX_TAGS} (each request in flight owns one entry of its queue's in-flight lane in the ring)",
                self.depth
            )));
        }
        if self.io_buf_bytes < 4096 || !self.io_buf_bytes.is_power_of_two() {
            return Err(UblkError::Invalid(format!(
                "the ublk request size {} must be a power of two of at least 4096",
                self.io_buf_bytes
            )));
        }
        for n in [self.id, self.recover].into_iter().flatten() {
            if n >= MAX_DEV_ID {
                return Err(UblkError::Invalid(format!(
                    "ublk device number {n} is out of range: 0 to {}",
                    MAX_DEV_ID - 1
                )));
            }
        }
        if let (Some(a), Some(b)) = (self.id, self.recover) {
            if a != b {
                return Err(UblkError::Invalid(format!(
                    "--ublk-id {a} and --recover {b} name different devices"
                )));
            }
        }
        Ok(())
    }
}

/// What [`prepare`] decided.
#[derive(Debug)]
pub struct Plan {
    opts: UblkOptions,
    features: Features,
    recover: Option<ExistingDevice>,
}

impl Plan {
    /// The device is recovered (not created).
    pub fn recovering(&self) -> Option<u32> {
        self.recover.as_ref().map(|d| d.id)
    }
    /// The driver's features.
    pub fn features(&self) -> Features {
        self.features
    }
}

/// Decide how to serve, before the disk and the ring are opened: create a
/// device, or recover one (`--recover N`, or `--ublk-id N` naming a device
/// that exists and is quiesced). A live device is recovered only when
/// `--recover` asks: the splitter serving it is told to hand it over
/// (SIGUSR2: it answers what it has, makes the ring durable and exits
/// without removing the device) and this waits until it has gone, so that
/// the disk and the ring are free.
pub fn prepare(opts: UblkOptions) -> Result<Plan, UblkError> {
    opts.check()?;
    let features = Features::probe()?;
    log::info!("ublk driver: {}", features.describe());
    let want = opts.recover.or(opts.id);
    let existing = match want {
        Some(id) => ExistingDevice::look(id)?,
        None => None,
    };
    let recover = match (existing, opts.recover) {
        (None, Some(id)) => {
            return Err(UblkError::Device(format!(
                "--recover {id}: there is no ublk device {id} (/dev/ublkc{id}) to recover; start without --recover to create one"
            )))
        }
        (None, None) => None,
        (Some(dev), asked) => {
            dev.check_disk(&opts.disk_path)?;
            match dev.state {
                DeviceState::Quiesced => {
                    log::info!(
                        "ublk device {} is quiesced (its splitter, pid {}, is gone): recovering it",
                        dev.id,
                        dev.pid
                    );
                    Some(dev)
                }
                DeviceState::Live if asked.is_some() => {
                    let need = u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
                    if dev.flags & need != need {
                        return Err(UblkError::Device(format!(
                            "ublk device {} was made without user recovery with reissue (flags {:#x}): a hand-over would remove it or fail the requests in flight. Stop its splitter (unmount first) and start this one without --recover",
                            dev.id, dev.flags
                        )));
                    }
                    Some(device::take_over(dev)?)
                }
                DeviceState::Live => {
                    return Err(UblkError::Device(format!(
                        "ublk device {} is live, served by pid {}: to upgrade or restart that splitter without the device going away, start this one with --recover {}",
                        dev.id, dev.pid, dev.id
                    )))
                }
                other => {
                    return Err(UblkError::Device(format!(
                        "ublk device {} exists but is {other}: it cannot be recovered. Remove it (it holds no data: the disk is {}) and start again",
                        dev.id,
                        opts.disk_path.display()
                    )))
                }
            }
        }
    };
    if recover.is_none() && !features.user_recovery() {
        log::warn!("this kernel's ublk driver has no user recovery: if the splitter stops uncleanly, /dev/ublkbN goes away with it");
    }
    Ok(Plan {
        opts,
        features,
        recover,
    })
}

/// State shared by the queue threads and the signal thread.
pub(crate) struct Shared {
    pub(crate) disk: Arc<dyn Backend>,
    pub(crate) capture: Arc<dyn WriteCapture>,
    pub(crate) claims: Claims,
    /// A hand-over started: take no new request (the successor gets it).
    pub(crate) handing_over: AtomicBool,
    /// Requests being worked on (between fetch and answer).
    pub(crate) busy: AtomicUsize,
    pub(crate) io_buf_bytes: usize,
    /// Requests answered with an error (for the log).
    pub(crate) failures: std::sync::atomic::AtomicU64,
    /// The disk opened with O_DIRECT for reads and writes, when it takes
    /// 512-byte aligned direct I/O: /dev/ublkbN has a page cache of its
    /// own, so a second one under it (the disk file's) only costs a copy.
    pub(crate) direct: Option<OwnedFd>,
}

/// The disk opened again with O_DIRECT, if a 512-byte aligned direct read
/// of its first sector works (else buffered I/O, and why).
fn open_direct(path: &Path, read_only: bool) -> Result<OwnedFd, String> {
    crate::direct::open(path, read_only).map(OwnedFd::from)
}

/// Serve `disk` as a ublk device until SIGINT/SIGTERM (the device is then
/// removed: in-flight requests finish, the capture is closed) or SIGUSR2
/// (a hand-over to a successor started with `--recover`: the process exits
/// with status 0 from the signal thread, leaving the device quiesced).
/// `ready` is called with the block device's path once it serves.
pub fn serve(
    plan: Plan,
    disk: Arc<dyn Backend>,
    capture: Arc<dyn WriteCapture>,
    ready: impl FnOnce(&Path) + Send + Sync + 'static,
) -> Result<(), UblkError> {
    let opts = &plan.opts;
    let size = disk.size();
    // Read-only is the disk's: opened read-only, it refuses every change.
    let read_only = disk.caps().read_only;
    if !size.is_multiple_of(512) {
        return Err(UblkError::Invalid(format!(
            "ublk serves whole 512-byte sectors: the disk is {size} bytes; grow it to a multiple of 512 (truncate -s)"
        )));
    }
    let shared = Arc::new(Shared {
        disk,
        capture,
        claims: Claims::default(),
        handing_over: AtomicBool::new(false),
        busy: AtomicUsize::new(0),
        io_buf_bytes: opts.io_buf_bytes as usize,
        failures: std::sync::atomic::AtomicU64::new(0),
        direct: match open_direct(&opts.disk_path, read_only) {
            Ok(fd) => {
                log::info!("disk I/O: O_DIRECT through io_uring (/dev/ublkbN's page cache is the only one)");
                Some(fd)
            }
            Err(why) => {
                log::info!("disk I/O: buffered ({why})");
                None
            }
        },
    });
    let ctrl = match &plan.recover {
        Some(dev) => {
            let c = UblkCtrl::new_simple(dev_num(dev.id))
                .map_err(call_err(format!("opening ublk device {}", dev.id)))?;
            let mut p = sys::ublk_params::default();
            c.get_params(&mut p)
                .map_err(call_err(format!("GET_PARAMS of ublk device {}", dev.id)))?;
            if p.basic.dev_sectors != size >> 9 {
                return Err(UblkError::Device(format!(
                    "ublk device {} is {} bytes, the disk {size}: not the device of this disk",
                    dev.id,
                    p.basic.dev_sectors << 9
                )));
            }
            if (p.basic.attrs & sys::UBLK_ATTR_READ_ONLY != 0) != read_only {
                return Err(UblkError::Device(format!(
                    "ublk device {} is {}: recover it {} --read-only",
                    dev.id,
                    if read_only { "writable" } else { "read-only" },
                    if read_only { "without" } else { "with" }
                )));
            }
            c.start_user_recover().map_err(call_err(format!(
                "START_USER_RECOVERY of ublk device {}",
                dev.id
            )))?;
            drop(c);
            UblkCtrlBuilder::default()
                .name("blockship")
                .id(dev_num(dev.id))
                .nr_queues(dev.queues)
                .depth(dev.depth)
                .io_buf_bytes(dev.io_buf_bytes)
                .ctrl_flags(dev.flags)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(call_err(format!("re-attaching to ublk device {}", dev.id)))?
        }
        None => {
            let mut flags = 0u64;
            if plan.features.user_recovery() {
                flags |= u64::from(sys::UBLK_F_USER_RECOVERY);
                if plan.features.reissue() {
                    flags |= u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE);
                }
            }
            let id = opts.id.map_or(-1, dev_num);
            UblkCtrlBuilder::default()
                .name("blockship")
                .id(id)
                .nr_queues(opts.queues)
                .depth(opts.depth)
                .io_buf_bytes(opts.io_buf_bytes)
                .ctrl_flags(flags)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                .build()
                .map_err(call_err(match opts.id {
                    Some(n) => format!(
                        "creating ublk device {n} (is the number taken? --ublk-id picks another)"
                    ),
                    None => "creating a ublk device".to_string(),
                }))?
        }
    };
    let info = ctrl.dev_info();
    let id = info.dev_id;
    let bdev = PathBuf::from(ctrl.get_bdev_path());
    let depth = info.queue_depth;
    if usize::from(depth) > MAX_TAGS {
        return Err(UblkError::Device(format!(
            "ublk device {id} has queue depth {depth}, above {MAX_TAGS}: it was not made by this splitter"
        )));
    }
    signals(id, shared.clone())?;

    let json = serde_json::json!({
        "disk": opts.disk_path,
        "ring": opts.ring_path,
    });
    let max_sectors = info.max_io_buf_bytes >> 9;
    let caps = shared.disk.caps();
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_target_json(serde_json::json!({ "blockship": json }));
        let tgt = &mut dev.tgt;
        tgt.dev_size = size;
        let mut attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
        if read_only {
            attrs |= sys::UBLK_ATTR_READ_ONLY;
        }
        let mut types = sys::UBLK_PARAM_TYPE_BASIC;
        let mut discard = sys::ublk_param_discard::default();
        if !read_only {
            types |= sys::UBLK_PARAM_TYPE_DISCARD;
            discard = sys::ublk_param_discard {
                discard_alignment: 0,
                discard_granularity: 4096,
                // Zeroes can always be written; discard only where the
                // backend deallocates (else it is accepted and ignored,
                // as over NBD).
                max_discard_sectors: if caps.trim { max_sectors } else { 0 },
                max_write_zeroes_sectors: max_sectors,
                max_discard_segments: 1,
                reserved0: 0,
            };
        }
        tgt.params = sys::ublk_params {
            types,
            basic: sys::ublk_param_basic {
                attrs,
                logical_bs_shift: 9,
                physical_bs_shift: 12,
                io_opt_shift: 12,
                io_min_shift: 9,
                max_sectors,
                dev_sectors: size >> 9,
                ..Default::default()
            },
            discard,
            ..Default::default()
        };
        Ok(())
    };
    let q_shared = shared.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| queue::run(qid, dev, &q_shared);
    let recovering = plan.recover.is_some();
    let started = Instant::now();
    let bdev_ready = bdev.clone();
    let dev_fn = move |_: &UblkCtrl| {
        log::info!(
            "ublk device {} {} ({} queue(s), depth {depth}, requests up to {} KiB{}){}",
            bdev_ready.display(),
            if recovering {
                "recovered: queued I/O resumes"
            } else {
                "ready"
            },
            info.nr_hw_queues,
            info.max_io_buf_bytes >> 10,
            if info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) != 0 {
                if info.flags & u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE) != 0 {
                    ", user recovery with reissue"
                } else {
                    ", user recovery"
                }
            } else {
                ""
            },
            if recovering {
                format!(" in {} ms", started.elapsed().as_millis())
            } else {
                String::new()
            }
        );
        ready(&bdev_ready);
    };
    ctrl.run_target(tgt_init, q_fn, dev_fn)
        .map_err(call_err(format!("serving ublk device {id}")))?;
    // Every queue has stopped (STOP_DEV from the signal thread): nothing
    // is in flight.
    let closed = shared.capture.close();
    match ctrl.del_dev() {
        Ok(_) => log::info!("removed {}", bdev.display()),
        Err(e) => log::warn!("removing ublk device {id}: {e}"),
    }
    closed.map_err(|e| UblkError::Call {
        what: "closing the capture (the ring's clean stop)".into(),
        err: e.to_string(),
    })
}

/// SIGINT/SIGTERM: stop and remove the device. SIGUSR2: hand it over.
fn signals(id: u32, shared: Arc<Shared>) -> Result<(), UblkError> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR2};
    let mut sigs =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR2]).map_err(|e| {
            UblkError::Call {
                what: "installing the SIGINT/SIGTERM/SIGUSR2 handlers".into(),
                err: e.to_string(),
            }
        })?;
    std::thread::Builder::new()
        .name("ublk-signals".into())
        .spawn(move || {
            for sig in sigs.forever() {
                if sig == SIGUSR2 {
                    hand_over(id, &shared);
                }
                log::info!("signal {sig}: stopping /dev/ublkb{id} (in-flight requests finish, then it is removed)");
                shared.capture.interrupt();
                // The control ring is per thread: this one opens its own.
                match UblkCtrl::new_simple(dev_num(id)).and_then(|c| c.kill_dev()) {
                    Ok(_) => {}
                    Err(e) => log::error!("STOP_DEV of ublk device {id} failed: {e}"),
                }
            }
        })
        .map(|_| ())
        .map_err(|e| UblkError::Call {
            what: "starting the signal thread".into(),
            err: e.to_string(),
        })
}

/// The hand-over to a successor (SIGUSR2, sent by `splitter serve --ublk
/// --recover N`): take no new request, let the ones being worked on
/// finish, make the capture durable and record a clean stop, and exit
/// without stopping the device. The kernel then quiesces it and issues
/// the requests this process had not answered to the successor.
fn hand_over(id: u32, shared: &Shared) -> ! {
    log::info!("SIGUSR2: handing /dev/ublkb{id} over to a successor");
    shared.handing_over.store(true, Ordering::SeqCst);
    // A writer waiting for room in a full ring (--ring-full block) must not
    // hold the hand-over up: it goes to the dirty bitmap instead.
    shared.capture.interrupt();
    let deadline = Instant::now() + Duration::from_secs(10);
    while shared.busy.load(Ordering::SeqCst) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let busy = shared.busy.load(Ordering::SeqCst);
    let code = if busy != 0 {
        // Closing the ring cleanly now would tell the successor nothing was
        // in flight; leaving it open makes it recover the ring as after a
        // crash (the in-flight marks of these requests become dirty).
        log::error!("{busy} request(s) still being worked on after 10 s: exiting without closing the ring, so the successor recovers it as after a crash");
        1
    } else {
        match shared.capture.close() {
            Ok(()) => {
                log::info!("handed over: the ring is durable and closed; the device stays, its queued I/O goes to the successor");
                0
            }
            Err(e) => {
                log::error!("closing the capture for the hand-over failed: {e} (the successor recovers the ring as after a crash)");
                1
            }
        }
    };
    // The process ends here, from this thread: unwinding the queue threads
    // would need STOP_DEV, which removes the device the successor needs.
    let _ = std::io::Write::flush(&mut std::io::stderr());
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on any error
    use super::*;

    fn opts() -> UblkOptions {
        UblkOptions {
            id: None,
            recover: None,
            queues: 1,
            depth: DEFAULT_DEPTH,
            io_buf_bytes: DEFAULT_IO_BUF_BYTES,
            disk_path: "/d".into(),
            ring_path: None,
        }
    }

    #[test]
    fn options_are_checked() {
        assert!(opts().check().is_ok());
        let mut o = opts();
        o.depth = u16::try_from(MAX_TAGS).unwrap();
        assert!(o.check().is_ok(), "the ring's lane size is allowed");
        o.depth += 1;
        assert!(o
            .check()
            .unwrap_err()
            .to_string()
            .contains("in-flight lane"));
        let mut o = opts();
        o.io_buf_bytes = 3000;
        assert!(o.check().is_err());
        let mut o = opts();
        o.id = Some(MAX_DEV_ID);
        assert!(o.check().is_err());
        let mut o = opts();
        (o.id, o.recover) = (Some(3), Some(3));
        assert!(o.check().is_ok());
    }

    #[test]
    fn features_say_what_is_used() {
        let f = Features {
            bits: u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_SUPPORT_ZERO_COPY),
        };
        assert!(f.user_recovery() && !f.reissue());
        let d = f.describe();
        assert!(d.contains("user recovery yes (used)"), "{d}");
        assert!(d.contains("reissue no"), "{d}");
        assert!(d.contains("zero copy yes"), "{d}");
        assert!(d.contains("copy mode"), "{d}");
    }
}
