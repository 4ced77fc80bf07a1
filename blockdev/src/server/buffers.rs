//! Per-connection buffer pool: request buffers are reused by power-of-two
//! size class so the request loop does not allocate per request, and the
//! pool keeps at most a fixed number of bytes at rest.

/// Smallest class: 4 KiB.
const MIN_SHIFT: u32 = 12;
/// Number of classes: 4 KiB .. 64 MiB.
const CLASSES: usize = 15;

/// A pool of zero-initialised byte buffers, each as long as its capacity.
pub(crate) struct BufferPool {
    free: [Vec<Vec<u8>>; CLASSES],
    kept: usize,
    max_kept: usize,
}

fn class_of(len: usize) -> usize {
    let size = len.max(1 << MIN_SHIFT).next_power_of_two();
    (size.trailing_zeros() - MIN_SHIFT) as usize
}

impl BufferPool {
    pub(crate) fn new(max_kept: usize) -> BufferPool {
        BufferPool {
            free: Default::default(),
            kept: 0,
            max_kept,
        }
    }

    /// A buffer of at least `len` bytes (the caller uses `..len`). `len` is
    /// bounded by the validated maximum payload (64 MiB).
    pub(crate) fn get(&mut self, len: usize) -> Vec<u8> {
        let c = class_of(len);
        if let Some(b) = self.free.get_mut(c).and_then(Vec::pop) {
            self.kept -= b.len();
            return b;
        }
        vec![0u8; len.max(1 << MIN_SHIFT).next_power_of_two()]
    }

    /// Return a buffer; it is dropped if the pool already keeps enough.
    pub(crate) fn put(&mut self, b: Vec<u8>) {
        let c = class_of(b.len());
        if b.len().is_power_of_two() && c < CLASSES && self.kept + b.len() <= self.max_kept {
            self.kept += b.len();
            self.free[c].push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_bounds() {
        let mut p = BufferPool::new(1 << 20);
        let a = p.get(100);
        assert_eq!(a.len(), 4096);
        let ptr = a.as_ptr();
        p.put(a);
        let b = p.get(4000);
        assert_eq!(b.as_ptr(), ptr);
        p.put(b);
        let big = p.get(2 << 20);
        p.put(big);
        assert!(p.kept <= 1 << 20);
    }
}
