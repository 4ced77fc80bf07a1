//! The map file of a durable [`crate::Overlay`]: which blocks the overlay
//! holds, kept on disk so that the overlay (a failed-over disk's writes)
//! survives a crash or a power cut. Specified for people in
//! `docs/overlay-format.md`; this module is the one place the code knows
//! the layout.
//!
//! The overlay's data file holds each present block at the block's own
//! offset (a sparse file as large as the disk); this file holds two
//! bitmaps after a one-page header. Bits only ever go from 0 to 1 while an
//! overlay lives, so a torn page write leaves every bit either as it was
//! or as it was to become: both are correct, because a bit is written only
//! after the data file was synced with the block it points at.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Magic at the start of the map file.
pub const MAP_MAGIC: [u8; 8] = *b"BSHPOVMP";
/// Map file format version.
pub const MAP_VERSION: u32 = 1;
/// Bytes of the header, and the unit the bitmaps are written in.
pub const MAP_PAGE: u64 = 4096;
/// [`MAP_PAGE`] as a buffer length.
const PAGE_LEN: usize = 4096;
const _: () = assert!(PAGE_LEN as u64 == MAP_PAGE);
/// Bitmap words per page.
pub const WORDS_PER_PAGE: usize = 512;

// Format: durable overlay map file (little endian)
//   off   size  field
//   0     8     magic "BSHPOVMP"
//   8     4     version (1)
//   12    4     block size in bytes (4096)
//   16    8     disk size in bytes
//   24    8     W: u64 words in each bitmap (ceil(blocks / 64))
//   32    4     crc32c of bytes 0..32
//   36    4060  reserved (0)
//   4096  P     present bitmap: bit b%64 of word b/64 set = block b is read
//               from the overlay's data file (P = W*8 rounded up to 4096)
//   4096+P P    data bitmap: block b holds written data (counted against the cap)
const HEADER_CRC: usize = 32;

/// The map file's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapLayout {
    /// Overlay block size.
    pub block: u32,
    /// Disk size.
    pub size: u64,
    /// Words per bitmap.
    pub words: u64,
}

impl MapLayout {
    /// The layout for a disk of `size` bytes in blocks of `block`.
    pub fn new(size: u64, block: u32) -> MapLayout {
        MapLayout {
            block,
            size,
            words: size.div_ceil(u64::from(block)).div_ceil(64),
        }
    }

    /// Bytes of one bitmap region (whole pages).
    pub fn region(&self) -> u64 {
        (self.words * 8).div_ceil(MAP_PAGE) * MAP_PAGE
    }

    /// File offset of the present bitmap.
    pub fn present_off(&self) -> u64 {
        MAP_PAGE
    }

    /// File offset of the data bitmap.
    pub fn data_off(&self) -> u64 {
        MAP_PAGE + self.region()
    }

    /// The whole file's length.
    pub fn file_len(&self) -> u64 {
        MAP_PAGE + 2 * self.region()
    }

    /// The header page.
    pub fn encode(&self) -> [u8; PAGE_LEN] {
        let mut b = [0u8; PAGE_LEN];
        b[0..8].copy_from_slice(&MAP_MAGIC);
        b[8..12].copy_from_slice(&MAP_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.block.to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..32].copy_from_slice(&self.words.to_le_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_CRC]);
        b[HEADER_CRC..HEADER_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode a header page: why it is not one, if it is not.
    pub fn decode(b: &[u8]) -> Result<MapLayout, String> {
        if b.len() < HEADER_CRC + 4 || b[0..8] != MAP_MAGIC {
            return Err("not an overlay map (bad magic)".into());
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        if u32_at(HEADER_CRC) != crc32c::crc32c(&b[..HEADER_CRC]) {
            return Err("overlay map header checksum mismatch".into());
        }
        if u32_at(8) != MAP_VERSION {
            return Err(format!(
                "overlay map version {} (this build reads {MAP_VERSION})",
                u32_at(8)
            ));
        }
        let l = MapLayout::new(u64_at(16), u32_at(12));
        if l.block == 0 || l.words != u64_at(24) {
            return Err("overlay map header is inconsistent".into());
        }
        Ok(l)
    }
}

/// Read the header and both bitmaps of `f`.
pub fn read(f: &File) -> io::Result<(MapLayout, Vec<u64>, Vec<u64>)> {
    let mut h = [0u8; PAGE_LEN];
    f.read_exact_at(&mut h, 0)?;
    let l = MapLayout::decode(&h).map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m))?;
    let words = usize::try_from(l.words)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "overlay map too large"))?;
    let bits = |off: u64| -> io::Result<Vec<u64>> {
        let mut raw = vec![0u8; words * 8];
        f.read_exact_at(&mut raw, off)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_le_bytes(a)
            })
            .collect())
    };
    let present = bits(l.present_off())?;
    let data = bits(l.data_off())?;
    Ok((l, present, data))
}

/// Write bitmap page `page` of the region at `off` from `words` (the
/// page's words, at most [`WORDS_PER_PAGE`]).
pub fn write_page(f: &File, off: u64, page: usize, words: &[u64]) -> io::Result<()> {
    let mut raw = [0u8; PAGE_LEN];
    for (i, w) in words.iter().take(WORDS_PER_PAGE).enumerate() {
        raw[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    f.write_all_at(
        &raw[..words.len().min(WORDS_PER_PAGE) * 8],
        off + page as u64 * MAP_PAGE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_header() {
        let l = MapLayout::new(1 << 20, 4096);
        let b = l.encode();
        let hex: String = b[..36].iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(
            hex,
            concat!(
                "425348504f564d50",
                "01000000",
                "00100000",
                "0000100000000000",
                "0400000000000000",
                "06fc0049"
            )
        );
        assert_eq!(MapLayout::decode(&b), Ok(l));
        assert_eq!(l.region(), 4096);
        assert_eq!(l.file_len(), 3 * 4096);
    }

    #[test]
    fn any_flipped_header_bit_is_refused() {
        let b = MapLayout::new(10 << 30, 4096).encode();
        for byte in 0..36 {
            for bit in 0..8 {
                let mut c = b;
                c[byte] ^= 1 << bit;
                assert!(MapLayout::decode(&c).is_err(), "byte {byte} bit {bit}");
            }
        }
    }
}
