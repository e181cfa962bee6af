//! Which pages of a private file mapping were copied on write: `/proc/self/pagemap`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Bit 63 of a pagemap entry: the page is present in RAM.
pub const PRESENT: u64 = 1 << 63;
/// Bit 62: the page is swapped out.
pub const SWAPPED: u64 = 1 << 62;
/// Bit 61: the page is a file page or shared anonymous memory.
pub const FILE_OR_SHARED: u64 = 1 << 61;

/// Whether a page of a MAP_PRIVATE file mapping whose pagemap entry is
/// `entry` may differ from the file: it is an anonymous (copied on write)
/// page, present or swapped out. A page never touched, or only read, is
/// absent or the file's own page-cache page, and equals the file.
pub fn differs_from_file(entry: u64) -> bool {
    (entry & PRESENT != 0 && entry & FILE_OR_SHARED == 0) || entry & SWAPPED != 0
}

/// Reads the pagemap entries of this process for the `pages` pages of
/// `page_size` bytes starting at address `addr` (page-aligned).
pub fn entries(addr: usize, pages: usize, page_size: usize) -> io::Result<Vec<u64>> {
    if page_size == 0 || !addr.is_multiple_of(page_size) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let f = File::open("/proc/self/pagemap")?;
    let mut raw = vec![0u8; pages * 8];
    let start = (addr / page_size) as u64 * 8;
    // Bounded reads: the kernel walks page tables per read.
    let mut done = 0usize;
    while done < raw.len() {
        let end = (done + (1 << 20)).min(raw.len());
        let n = f.read_at(&mut raw[done..end], start + done as u64)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "pagemap ended early",
            ));
        }
        done += n;
    }
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_entries() {
        assert!(!differs_from_file(0));
        assert!(!differs_from_file(PRESENT | FILE_OR_SHARED | 1234));
        assert!(differs_from_file(PRESENT | 1234));
        assert!(differs_from_file(SWAPPED | 5));
    }

    #[test]
    fn copied_pages_of_a_private_file_mapping_are_seen() {
        use std::os::fd::AsRawFd;
        let page = 4096usize;
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &vec![7u8; 4 * page]).unwrap();
        // SAFETY: a fresh private mapping of 4 pages of a file we own; it
        // is unmapped below and no reference outlives it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let b = p as *mut u8;
        // SAFETY: offsets inside the 4-page mapping above.
        unsafe {
            let _ = std::ptr::read_volatile(b); // page 0 read
            std::ptr::write_volatile(b.add(2 * page), 1); // page 2 written
        }
        let e = entries(p as usize, 4, page).unwrap();
        let d: Vec<bool> = e.iter().map(|&x| differs_from_file(x)).collect();
        assert_eq!(d, [false, false, true, false]);
        // SAFETY: the mapping made above, unmapped once.
        unsafe { libc::munmap(p, 4 * page) };
    }
}
