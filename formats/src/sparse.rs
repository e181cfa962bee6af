//! Data extents of sparse files (SEEK_DATA / SEEK_HOLE).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// A half-open byte range `[start, end)`.
pub type Range = (u64, u64);

/// The data extents of `file` (of `size` bytes), in order. Ranges outside
/// are holes. On filesystems without SEEK_DATA the whole file is one extent.
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<Range>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let data = match seek(fd, pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && pos == 0 => {
                return Ok(vec![(0, size)]);
            }
            Err(e) => return Err(e),
        };
        if data >= size {
            break;
        }
        let hole = seek(fd, data, libc::SEEK_HOLE)?.min(size);
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
}

fn seek(fd: i32, pos: u64, whence: i32) -> io::Result<u64> {
    let off = i64::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a valid descriptor owned by the caller's File has no
    // memory-safety requirements.
    let r = unsafe { libc::lseek(fd, off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// A cursor answering "is `[a, b)` entirely a hole?" for increasing queries.
#[derive(Debug, Clone)]
pub struct ExtentMap {
    extents: Vec<Range>,
}

impl ExtentMap {
    /// Wraps a sorted, non-overlapping extent list.
    pub fn new(extents: Vec<Range>) -> Self {
        ExtentMap { extents }
    }

    /// The extents.
    pub fn extents(&self) -> &[Range] {
        &self.extents
    }

    /// Bytes of data.
    pub fn data_bytes(&self) -> u64 {
        self.extents.iter().map(|(a, b)| b - a).sum()
    }

    /// True when no data extent intersects `[a, b)`.
    pub fn is_hole(&self, a: u64, b: u64) -> bool {
        let i = self.extents.partition_point(|&(_, e)| e <= a);
        match self.extents.get(i) {
            Some(&(s, _)) => s >= b,
            None => true,
        }
    }

    /// The sub-ranges of `[a, b)` that are data.
    pub fn data_in(&self, a: u64, b: u64) -> impl Iterator<Item = Range> + '_ {
        let i = self.extents.partition_point(|&(_, e)| e <= a);
        self.extents[i..]
            .iter()
            .take_while(move |&&(s, _)| s < b)
            .map(move |&(s, e)| (s.max(a), e.min(b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_extents_and_holes() {
        let f = tempfile::tempfile().unwrap();
        let size = 16 << 20;
        f.set_len(size).unwrap();
        f.write_all_at(&[1u8; 4096], 4 << 20).unwrap();
        f.write_all_at(&[0u8; 4096], 8 << 20).unwrap(); // written zeros are data
        let ext = data_extents(&f, size).unwrap();
        let map = ExtentMap::new(ext);
        assert!(map.is_hole(0, 4 << 20));
        assert!(!map.is_hole(0, (4 << 20) + 1));
        assert!(!map.is_hole(8 << 20, (8 << 20) + 4096));
        assert!(map.is_hole(12 << 20, size));
        assert_eq!(map.data_in(0, size).count(), map.extents().len());
    }
}
