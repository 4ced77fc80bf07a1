//! An existing ublk device: its state, who serves it, what it serves, and
//! the hand-over from the splitter serving it to a successor.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libublk::ctrl::UblkCtrl;
use libublk::sys;

use super::UblkError;

/// The kernel's state of a ublk device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Served.
    Live,
    /// Its server is gone; I/O waits for a successor (user recovery).
    Quiesced,
    /// Stopped (not yet removed).
    Dead,
    /// Its server is gone and I/O fails.
    FailIo,
    /// A state this code does not know.
    Other(u16),
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceState::Live => f.write_str("live"),
            DeviceState::Quiesced => f.write_str("quiesced"),
            DeviceState::Dead => f.write_str("stopped (dead)"),
            DeviceState::FailIo => f.write_str("failing I/O"),
            DeviceState::Other(n) => write!(f, "in state {n}"),
        }
    }
}

impl DeviceState {
    fn from_raw(s: u16) -> DeviceState {
        match u32::from(s) {
            sys::UBLK_S_DEV_LIVE => DeviceState::Live,
            sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
            sys::UBLK_S_DEV_DEAD => DeviceState::Dead,
            sys::UBLK_S_DEV_FAIL_IO => DeviceState::FailIo,
            _ => DeviceState::Other(s),
        }
    }
}

/// A ublk device that exists, as the driver describes it.
#[derive(Debug, Clone)]
pub struct ExistingDevice {
    /// Its number (`/dev/ublkbN`).
    pub id: u32,
    /// Its state.
    pub state: DeviceState,
    /// The process that serves (or served) it.
    pub pid: i32,
    /// Hardware queues.
    pub queues: u16,
    /// Queue depth.
    pub depth: u16,
    /// Largest request.
    pub io_buf_bytes: u32,
    /// Its `UBLK_F_*` flags.
    pub flags: u64,
    /// The disk a splitter recorded for it (None: not recorded, or not a
    /// splitter's device).
    pub disk: Option<PathBuf>,
}

impl ExistingDevice {
    /// Device `id`, if it exists.
    pub fn look(id: u32) -> Result<Option<ExistingDevice>, UblkError> {
        if !Path::new(&format!("/dev/ublkc{id}")).exists()
            && !Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
        {
            return Ok(None);
        }
        let n = i32::try_from(id)
            .map_err(|_| UblkError::Invalid(format!("ublk device number {id} is too large")))?;
        let ctrl = match UblkCtrl::new_simple(n) {
            Ok(c) => c,
            Err(libublk::UblkError::OtherError(e)) if e == -libc::ENODEV => return Ok(None),
            Err(e) => return Err(super::call_err(format!("reading ublk device {id}"))(e)),
        };
        let info = ctrl.dev_info();
        let disk = ctrl.get_target_data_from_json().and_then(|v| {
            v.get("blockship")
                .and_then(|b| b.get("disk"))
                .and_then(|d| d.as_str().map(PathBuf::from))
        });
        // The device was opened only to be read: never removed by this.
        ctrl.disown();
        Ok(Some(ExistingDevice {
            id,
            state: DeviceState::from_raw(info.state),
            pid: info.ublksrv_pid,
            queues: info.nr_hw_queues,
            depth: info.queue_depth,
            io_buf_bytes: info.max_io_buf_bytes,
            flags: info.flags,
            disk,
        }))
    }

    /// Refuse to recover a device that serves another disk.
    pub fn check_disk(&self, disk: &Path) -> Result<(), UblkError> {
        let Some(had) = &self.disk else {
            log::warn!(
                "ublk device {} records no disk: it may not be a splitter's; recovering it with {}",
                self.id,
                disk.display()
            );
            return Ok(());
        };
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        if canon(had) != canon(disk) {
            return Err(UblkError::Device(format!(
                "ublk device {} serves {}, not {}: recover it with --disk {} (or pick another --ublk-id)",
                self.id,
                had.display(),
                disk.display(),
                had.display()
            )));
        }
        Ok(())
    }
}

/// What process `pid` runs (its comm), if it is alive (a zombie, exited
/// but not yet reaped by its parent, counts as gone: it holds no device,
/// disk or ring any more).
fn comm(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE ...": COMM may hold spaces and parentheses.
    let close = stat.rfind(')')?;
    if stat[close + 1..].trim_start().starts_with(['Z', 'X']) {
        return None;
    }
    let open = stat.find('(')?;
    Some(stat[open + 1..close].to_string())
}

/// Ask the splitter serving live device `dev` to hand it over (SIGUSR2)
/// and wait until it has exited and the kernel has quiesced the device.
pub(super) fn take_over(dev: ExistingDevice) -> Result<ExistingDevice, UblkError> {
    let pid = dev.pid;
    match comm(pid) {
        Some(c) if c.starts_with("splitter") => {}
        Some(c) => {
            return Err(UblkError::Device(format!(
                "ublk device {} is served by pid {pid} ({c}), not a splitter: stop it first",
                dev.id
            )))
        }
        None => {
            log::info!(
                "ublk device {} is live but its server (pid {pid}) is gone: waiting for the kernel to quiesce it",
                dev.id
            );
        }
    }
    if comm(pid).is_some() {
        log::info!(
            "asking the splitter serving /dev/ublkb{} (pid {pid}) to hand it over (SIGUSR2)",
            dev.id
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGUSR2,
        )
        .map_err(|e| {
            UblkError::Device(format!(
                "cannot signal pid {pid} serving ublk device {}: {e}",
                dev.id
            ))
        })?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = ExistingDevice::look(dev.id)?.ok_or_else(|| {
            UblkError::Device(format!(
                "ublk device {} went away during the hand-over (its splitter removed it)",
                dev.id
            ))
        })?;
        let gone = comm(pid).is_none();
        match now.state {
            DeviceState::Quiesced if gone => return Ok(now),
            DeviceState::Live | DeviceState::Quiesced => {}
            other => {
                return Err(UblkError::Device(format!(
                    "ublk device {} is {other} after its splitter (pid {pid}) stopped: it cannot be recovered",
                    dev.id
                )))
            }
        }
        if Instant::now() > deadline {
            return Err(UblkError::Device(format!(
                "ublk device {} is still {} 30 s after asking pid {pid} to hand it over{}",
                dev.id,
                now.state,
                if gone {
                    ""
                } else {
                    " (the process still runs)"
                }
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
