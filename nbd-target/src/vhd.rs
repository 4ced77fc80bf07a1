//! The footer of a *fixed* VHD (Microsoft Virtual Hard Disk Image Format
//! Specification, "Hard Disk Footer Format"): a fixed VHD is the disk's
//! bytes as they are, followed by this 512-byte footer. It is what
//! `export-image --format vhd` writes natively, and the format Azure boots
//! (whose virtual size must be a whole number of MiB: [`MIB`]).
//!
//! The byte table is also in `docs/vhd-format.md`.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

// Format: the hard disk footer, 512 bytes, every integer big-endian.
//
// | offset | size | field                | value written                                        |
// |-------:|-----:|----------------------|------------------------------------------------------|
// |      0 |    8 | cookie               | "conectix"                                           |
// |      8 |    4 | features             | 0x00000002 (the "reserved" bit, always set)          |
// |     12 |    4 | file format version  | 0x00010000                                           |
// |     16 |    8 | data offset          | 0xFFFFFFFFFFFFFFFF (fixed: no dynamic header)        |
// |     24 |    4 | timestamp            | seconds since 2000-01-01T00:00:00Z                   |
// |     28 |    4 | creator application  | "win " (see CREATOR_APP)                             |
// |     32 |    4 | creator version      | blockship's major << 16 | minor                      |
// |     36 |    4 | creator host OS      | "Wi2k" (0x5769326B)                                  |
// |     40 |    8 | original size        | the virtual size in bytes                            |
// |     48 |    8 | current size         | the virtual size in bytes                            |
// |     56 |    2 | cylinders            | CHS geometry from the size (`geometry`)              |
// |     58 |    1 | heads                |                                                      |
// |     59 |    1 | sectors per track    |                                                      |
// |     60 |    4 | disk type            | 2 = fixed (3 dynamic, 4 differencing: not written)   |
// |     64 |    4 | checksum             | one's complement of the sum of all 512 bytes, this   |
// |        |      |                      | field taken as zero                                  |
// |     68 |   16 | unique id            | random (an RFC 4122 version 4 UUID)                  |
// |     84 |    1 | saved state          | 0                                                    |
// |     85 |  427 | reserved             | zeroes                                               |

/// Length of the footer.
pub const FOOTER_LEN: usize = 512;
/// The footer's first 8 bytes.
pub const COOKIE: [u8; 8] = *b"conectix";
/// The features field: only the reserved bit, which the spec says is always set.
pub const FEATURES: u32 = 0x0000_0002;
/// File format version 1.0.
pub const FORMAT_VERSION: u32 = 0x0001_0000;
/// The data offset of a fixed disk (there is no dynamic disk header).
pub const FIXED_DATA_OFFSET: u64 = u64::MAX;
/// Disk type: fixed.
pub const DISK_TYPE_FIXED: u32 = 2;
/// Disk type: dynamic (recognised by [`Footer::decode`], never written).
pub const DISK_TYPE_DYNAMIC: u32 = 3;
/// Disk type: differencing (recognised by [`Footer::decode`], never written).
pub const DISK_TYPE_DIFFERENCING: u32 = 4;
/// The creator application written.
///
/// Readers take a VHD's virtual size either from the CHS geometry (which
/// rounds most sizes down: 64 MiB reads back as 130968 sectors, 52 KiB
/// short) or from the current size field, and they choose by this field:
/// QEMU's `vpc` driver, for one, uses the geometry for creators it does
/// not know in its older releases (and for "vpc " and "qemu" in all).
/// "win " (Hyper-V's) is read by the current size everywhere, as Azure
/// reads every VHD, so no reader cuts off the image's last bytes (where a
/// GPT keeps its backup header).
pub const CREATOR_APP: [u8; 4] = *b"win ";
/// The creator host OS written: "Wi2k" (Windows), as Hyper-V and QEMU write.
pub const CREATOR_HOST_OS: [u8; 4] = *b"Wi2k";
/// Azure requires a VHD's virtual size to be a whole number of these.
pub const MIB: u64 = 1 << 20;
/// The VHD epoch (2000-01-01T00:00:00Z) in seconds since the Unix epoch.
pub const VHD_EPOCH_UNIX: u64 = 946_684_800;
/// The largest geometry (65535 cylinders, 16 heads, 255 sectors per
/// track), in sectors: bigger disks are given this geometry.
pub const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;

/// A disk geometry: cylinders, heads, sectors per track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chs {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

impl Chs {
    /// The sectors the geometry addresses.
    pub fn sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }
}

/// The geometry of a disk of `size` bytes, by the algorithm of the VHD
/// specification's appendix "CHS Calculation" (the same as QEMU's and
/// Hyper-V's).
pub fn geometry(size: u64) -> Chs {
    let total = (size / 512).min(MAX_GEOMETRY_SECTORS);
    let (spt, heads, cth): (u64, u64, u64) = if total >= 65535 * 16 * 63 {
        (255, 16, total / 255)
    } else {
        let mut spt = 17;
        let mut cth = total / spt;
        let mut heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = total / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = total / spt;
        }
        (spt, heads, cth)
    };
    // Invariant: heads <= 16 and spt <= 255 on every branch, and
    // total <= 65535 * 16 * 255 keeps cth / heads <= 65535 (for spt 255:
    // total / 255 / 16 <= 65535; for the smaller ones total is below
    // 65535 * 16 * 63 and cth < heads * 1024 or spt = 63).
    Chs {
        cylinders: u16::try_from(cth / heads).unwrap_or(u16::MAX),
        heads: u8::try_from(heads).unwrap_or(u8::MAX),
        sectors_per_track: u8::try_from(spt).unwrap_or(u8::MAX),
    }
}

/// A VHD footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Features (always [`FEATURES`] when written).
    pub features: u32,
    /// File format version.
    pub version: u32,
    /// Offset of the dynamic disk header ([`FIXED_DATA_OFFSET`] for a fixed disk).
    pub data_offset: u64,
    /// Seconds since 2000-01-01T00:00:00Z.
    pub timestamp: u32,
    /// Who made it.
    pub creator_app: [u8; 4],
    /// The creator's version (major << 16 | minor).
    pub creator_version: u32,
    /// The creator's OS.
    pub creator_host_os: [u8; 4],
    /// Size when made, bytes.
    pub original_size: u64,
    /// Virtual size, bytes.
    pub current_size: u64,
    /// Geometry.
    pub geometry: Chs,
    /// Fixed, dynamic or differencing.
    pub disk_type: u32,
    /// The checksum as stored (`encode` computes it; `decode` checks it).
    pub checksum: u32,
    /// Unique id.
    pub uuid: [u8; 16],
    /// Saved state (1: the disk is in a saved state).
    pub saved_state: u8,
}

/// blockship's version as a VHD creator version (major << 16 | minor).
pub fn creator_version() -> u32 {
    let major: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0);
    let minor: u32 = env!("CARGO_PKG_VERSION_MINOR").parse().unwrap_or(0);
    (major.min(0xFFFF) << 16) | minor.min(0xFFFF)
}

/// A VHD timestamp: seconds from 2000-01-01T00:00:00Z to `t` (0 before
/// it, saturating in 2136).
pub fn timestamp(t: SystemTime) -> u32 {
    let unix = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    u32::try_from(unix.saturating_sub(VHD_EPOCH_UNIX)).unwrap_or(u32::MAX)
}

/// A random unique id: 16 bytes from the kernel, marked as an RFC 4122
/// version 4 UUID.
pub fn random_uuid() -> std::io::Result<[u8; 16]> {
    use std::io::Read as _;
    let mut u = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut u)?;
    u[6] = (u[6] & 0x0F) | 0x40;
    u[8] = (u[8] & 0x3F) | 0x80;
    Ok(u)
}

/// The checksum of a footer: the one's complement of the sum of its
/// bytes, the checksum field (bytes 64..68) taken as zero.
pub fn checksum(b: &[u8; FOOTER_LEN]) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)));
    !sum
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn bytes4(b: &[u8], at: usize) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    a
}

impl Footer {
    /// The footer of a fixed disk of `size` bytes (the geometry computed
    /// from it), made at `timestamp` with id `uuid`.
    pub fn fixed(size: u64, timestamp: u32, uuid: [u8; 16]) -> Footer {
        Footer {
            features: FEATURES,
            version: FORMAT_VERSION,
            data_offset: FIXED_DATA_OFFSET,
            timestamp,
            creator_app: CREATOR_APP,
            creator_version: creator_version(),
            creator_host_os: CREATOR_HOST_OS,
            original_size: size,
            current_size: size,
            geometry: geometry(size),
            disk_type: DISK_TYPE_FIXED,
            checksum: 0,
            uuid,
            saved_state: 0,
        }
    }

    /// The 512 bytes, with the checksum computed (the `checksum` field is
    /// ignored).
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[0..8].copy_from_slice(&COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_host_os);
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        b[58] = self.geometry.heads;
        b[59] = self.geometry.sectors_per_track;
        b[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        b[68..84].copy_from_slice(&self.uuid);
        b[84] = self.saved_state;
        let c = checksum(&b);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b
    }

    /// Read a footer: the cookie, the checksum, the version and the disk
    /// type are checked, and for a fixed disk its data offset.
    pub fn decode(b: &[u8]) -> Result<Footer> {
        let bad = |why: String| Error::Invalid(format!("not a VHD footer: {why}"));
        let b: &[u8; FOOTER_LEN] = b
            .try_into()
            .map_err(|_| bad(format!("{} bytes, not {FOOTER_LEN}", b.len())))?;
        if b[0..8] != COOKIE {
            return Err(bad(format!(
                "cookie {:?}, not \"conectix\"",
                String::from_utf8_lossy(&b[0..8])
            )));
        }
        let f = Footer {
            features: be_u32(b, 8),
            version: be_u32(b, 12),
            data_offset: be_u64(b, 16),
            timestamp: be_u32(b, 24),
            creator_app: bytes4(b, 28),
            creator_version: be_u32(b, 32),
            creator_host_os: bytes4(b, 36),
            original_size: be_u64(b, 40),
            current_size: be_u64(b, 48),
            geometry: Chs {
                cylinders: u16::from_be_bytes([b[56], b[57]]),
                heads: b[58],
                sectors_per_track: b[59],
            },
            disk_type: be_u32(b, 60),
            checksum: be_u32(b, 64),
            uuid: {
                let mut u = [0u8; 16];
                u.copy_from_slice(&b[68..84]);
                u
            },
            saved_state: b[84],
        };
        let want = checksum(b);
        if f.checksum != want {
            return Err(bad(format!(
                "checksum {:#010x}, the bytes sum to {want:#010x}",
                f.checksum
            )));
        }
        if f.version >> 16 != 1 {
            return Err(bad(format!("file format version {:#010x}", f.version)));
        }
        match f.disk_type {
            DISK_TYPE_FIXED if f.data_offset != FIXED_DATA_OFFSET => {
                return Err(bad(format!(
                    "a fixed disk with data offset {:#x}",
                    f.data_offset
                )))
            }
            DISK_TYPE_FIXED | DISK_TYPE_DYNAMIC | DISK_TYPE_DIFFERENCING => {}
            t => return Err(bad(format!("disk type {t}"))),
        }
        Ok(f)
    }
}

/// The virtual size of a VHD made of a disk of `size` bytes: rounded up to
/// a whole MiB (Azure's rule; the spec only needs whole sectors).
pub fn virtual_size(size: u64) -> u64 {
    size.div_ceil(MIB).saturating_mul(MIB)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A 64 MiB fixed disk, every field fixed; the bytes worked out by
    /// hand from the table above (and checked with an independent
    /// implementation of the spec).
    fn golden() -> (Footer, Vec<u8>) {
        let f = Footer {
            creator_version: 0x0000_0001,
            ..Footer::fixed(64 * MIB, 0x2E5F_0A00, {
                let mut u = [0u8; 16];
                for (i, x) in u.iter_mut().enumerate() {
                    *x = 0x10 + u8::try_from(i).unwrap();
                }
                u
            })
        };
        let mut want = hex("
            636f6e65637469780000000200010000
            ffffffffffffffff2e5f0a0077696e20
            000000015769326b0000000004000000
            000000000400000003c3081100000002
            ffffeee3101112131415161718191a1b
            1c1d1e1f000000000000000000000000");
        want.resize(FOOTER_LEN, 0);
        (f, want)
    }

    #[test]
    fn vhd_footer_golden_vector() {
        let (f, want) = golden();
        let b = f.encode();
        assert_eq!(&b[..], &want[..]);
        let back = Footer::decode(&b).unwrap();
        assert_eq!(back.checksum, 0xFFFF_EEE3);
        assert_eq!(
            Footer {
                checksum: 0,
                ..back
            },
            f
        );
    }

    #[test]
    fn vhd_checksum_is_verified() {
        let (f, _) = golden();
        let b = f.encode();
        // The checksum: !(sum of the bytes other than 64..68).
        let sum: u32 = b
            .iter()
            .enumerate()
            .filter(|(i, _)| !(64..68).contains(i))
            .map(|(_, &x)| u32::from(x))
            .sum();
        assert_eq!(be_u32(&b, 64), !sum);
        // Any byte changed (the checksum's own too) is caught.
        for i in [0usize, 9, 30, 47, 56, 64, 67, 70, 84, 300, 511] {
            let mut c = b;
            c[i] ^= 0x01;
            let e = Footer::decode(&c).unwrap_err().to_string();
            assert!(e.contains("not a VHD footer"), "{i}: {e}");
        }
        assert!(Footer::decode(&b[..511]).is_err());
        // A dynamic disk's footer decodes (the type is recognised) ...
        let mut d = Footer {
            disk_type: DISK_TYPE_DYNAMIC,
            data_offset: 512,
            ..f.clone()
        }
        .encode();
        assert_eq!(Footer::decode(&d).unwrap().disk_type, DISK_TYPE_DYNAMIC);
        // ... a fixed one must have no data offset, an unknown type is refused.
        d = Footer {
            data_offset: 512,
            ..f.clone()
        }
        .encode();
        assert!(Footer::decode(&d).is_err());
        d = Footer { disk_type: 7, ..f }.encode();
        assert!(Footer::decode(&d).is_err());
    }

    #[test]
    fn vhd_chs_by_the_spec_algorithm() {
        // (MiB, cylinders, heads, sectors per track), from the spec's
        // pseudo-code run on its own (every branch: 17, 31, 63 and 255
        // sectors per track, heads raised to 4, the cap).
        let cases: [(u64, u16, u8, u8); 16] = [
            (1, 30, 4, 17),
            (3, 90, 4, 17),
            (10, 301, 4, 17),
            (64, 963, 8, 17),
            (127, 1019, 15, 17),
            (128, 963, 16, 17),
            (136, 561, 16, 31),
            (200, 825, 16, 31),
            (250, 507, 16, 63),
            (256, 520, 16, 63),
            (512, 1040, 16, 63),
            (1024, 2080, 16, 63),
            (4096, 8322, 16, 63),
            (40960, 20560, 16, 255),
            (130048, 65278, 16, 255),
            (1 << 20, 65535, 16, 255),
        ];
        for (mib, c, h, s) in cases {
            let g = geometry(mib * MIB);
            assert_eq!(
                g,
                Chs {
                    cylinders: c,
                    heads: h,
                    sectors_per_track: s
                },
                "{mib} MiB"
            );
            assert!(g.sectors() <= mib * MIB / 512, "{mib} MiB");
        }
        // Either side of the switch to 255 sectors per track.
        let edge = 65535 * 16 * 63;
        assert_eq!(
            geometry((edge - 1) * 512),
            Chs {
                cylinders: 65534,
                heads: 16,
                sectors_per_track: 63
            }
        );
        assert_eq!(
            geometry(edge * 512),
            Chs {
                cylinders: 16191,
                heads: 16,
                sectors_per_track: 255
            }
        );
        assert_eq!(geometry(0).cylinders, 0);
    }

    #[test]
    fn vhd_sizes_and_times() {
        assert_eq!(virtual_size(64 * MIB), 64 * MIB);
        assert_eq!(virtual_size(64 * MIB + 512), 65 * MIB);
        assert_eq!(virtual_size(1), MIB);
        assert_eq!(virtual_size(0), 0);
        let t = UNIX_EPOCH + std::time::Duration::from_secs(VHD_EPOCH_UNIX + 86_400);
        assert_eq!(timestamp(t), 86_400);
        assert_eq!(timestamp(UNIX_EPOCH), 0);
        let u = random_uuid().unwrap();
        assert_eq!(u[6] >> 4, 4);
        assert_eq!(u[8] >> 6, 2);
        assert_ne!(random_uuid().unwrap(), u);
        assert_eq!(
            (creator_version() >> 16).to_string(),
            env!("CARGO_PKG_VERSION_MAJOR")
        );
    }
}
