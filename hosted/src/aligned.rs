//! Page-aligned I/O buffers: the kernel copies a buffer that starts on a page boundary to and from the page
//! cache markedly faster than one at malloc's 16-byte alignment (qemu-img aligns its buffers the same way).

use std::ops::{Deref, DerefMut};

/// A byte buffer that starts on a 4 KiB boundary.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    const ALIGN: usize = 4096;

    /// `len` bytes of `fill`.
    pub fn new(len: usize, fill: u8) -> AlignedBuf {
        let storage = vec![fill; len + Self::ALIGN];
        let start = storage.as_ptr().align_offset(Self::ALIGN).min(Self::ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// Makes the buffer `len` bytes long: what it held stays where it fits, new bytes are zeros (storage is
    /// reallocated only to grow).
    pub fn set_len(&mut self, len: usize) {
        if self.start + len > self.storage.len() {
            let mut grown = AlignedBuf::new(len, 0);
            let keep = self.len.min(len);
            grown[..keep].copy_from_slice(&self[..keep]);
            *self = grown;
        } else {
            if len > self.len {
                self.storage[self.start + self.len..self.start + len].fill(0);
            }
            self.len = len;
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_on_a_page_and_keeps_its_bytes() {
        let mut b = AlignedBuf::new(100, 7);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert!(b.iter().all(|&x| x == 7));
        b.set_len(50);
        assert_eq!(b.len(), 50);
        b.set_len(80);
        assert!(b[..50].iter().all(|&x| x == 7) && b[50..].iter().all(|&x| x == 0));
        b.set_len(10_000);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert!(b[..50].iter().all(|&x| x == 7) && b[50..].iter().all(|&x| x == 0));
        assert_eq!(AlignedBuf::default().len(), 0);
    }
}
