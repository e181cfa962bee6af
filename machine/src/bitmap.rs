//! A plain bitmap of pages or blocks.

/// One bit per 4 KiB page (or disk block); bit `i` set means "item `i` is dirty".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: usize,
}

impl Bitmap {
    /// An all-clear bitmap of `len` bits.
    pub fn new(len: usize) -> Bitmap {
        Bitmap {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    /// Builds a bitmap from KVM-style words (bit `i % 64` of word `i / 64`).
    pub fn from_words(mut words: Vec<u64>, len: usize) -> Bitmap {
        words.resize(len.div_ceil(64), 0);
        if len & 63 != 0 {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << (len % 64)) - 1;
            }
        }
        Bitmap { words, len }
    }

    /// Number of bits.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The underlying words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Sets bit `i` (ignored when out of range).
    pub fn set(&mut self, i: usize) {
        if i < self.len {
            self.words[i / 64] |= 1 << (i % 64);
        }
    }

    /// Sets bits `[start, end)`.
    pub fn set_range(&mut self, start: usize, end: usize) {
        for i in start..end.min(self.len) {
            self.set(i);
        }
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Number of set bits.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// ORs `other` into `self` (bits beyond `self.len()` are dropped).
    pub fn or(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        if self.len & 63 != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << (self.len % 64)) - 1;
            }
        }
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// Returns a copy and clears `self`.
    pub fn take(&mut self) -> Bitmap {
        let out = self.clone();
        self.clear();
        out
    }

    /// Indices of the set bits, ascending.
    pub fn iter_set(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + b)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Bitmap;

    #[test]
    fn basics() {
        let mut b = Bitmap::new(130);
        b.set(0);
        b.set(129);
        b.set(500);
        b.set_range(64, 66);
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![0, 64, 65, 129]);
        let mut c = Bitmap::from_words(vec![u64::MAX; 3], 130);
        assert_eq!(c.count(), 130);
        c.or(&b);
        assert_eq!(c.take().count(), 130);
        assert_eq!(c.count(), 0);
    }
}
