//! Named memory regions carved from the heap with a bump allocator.
//!
//! Re-filling an existing name reuses its memory when the new size fits the
//! region's capacity; a region that is the last one allocated grows in place;
//! otherwise the region moves to fresh heap memory and its old space is not
//! reused (the test guest never frees).

pub const MAX_REGIONS: usize = 64;
pub const MAX_NAME: usize = 32;
const PAGE: u64 = 4096;

#[derive(Clone, Copy)]
pub struct Region {
    pub name: [u8; MAX_NAME],
    pub name_len: usize,
    pub addr: u64,
    pub size: u64,
    pub cap: u64,
}

impl Region {
    const EMPTY: Region = Region { name: [0; MAX_NAME], name_len: 0, addr: 0, size: 0, cap: 0 };

    pub fn name(&self) -> &[u8] {
        &self.name[..self.name_len]
    }

    /// The region's bytes.
    pub fn bytes(&self) -> &'static mut [u8] {
        // SAFETY: [addr, addr+size) lies in the heap (identity-mapped guest RAM
        // handed out by `Heap::get_or_alloc`), and only one reference is live at a time.
        unsafe { core::slice::from_raw_parts_mut(self.addr as *mut u8, self.size as usize) }
    }
}

pub struct Heap {
    pub next: u64,
    pub end: u64,
    pub regions: [Region; MAX_REGIONS],
    pub count: usize,
}

pub enum AllocError {
    NameTooLong,
    TooManyRegions,
    OutOfMemory,
}

impl Heap {
    pub fn new(start: u64, end: u64) -> Self {
        Heap { next: start, end, regions: [Region::EMPTY; MAX_REGIONS], count: 0 }
    }

    pub fn find(&self, name: &[u8]) -> Option<usize> {
        self.regions[..self.count].iter().position(|r| r.name() == name)
    }

    fn take(&mut self, bytes: u64) -> Result<u64, AllocError> {
        let need = bytes.div_ceil(PAGE) * PAGE;
        let free = self.end.saturating_sub(self.next);
        if need > free {
            return Err(AllocError::OutOfMemory);
        }
        let a = self.next;
        self.next += need;
        Ok(a)
    }

    /// Returns the index of region `name`, sized `size`, allocating or
    /// resizing it as described in the module comment.
    pub fn get_or_alloc(&mut self, name: &[u8], size: u64) -> Result<usize, AllocError> {
        if name.len() > MAX_NAME {
            return Err(AllocError::NameTooLong);
        }
        if let Some(i) = self.find(name) {
            let r = self.regions[i];
            if size <= r.cap {
                self.regions[i].size = size;
                return Ok(i);
            }
            let need = size.div_ceil(PAGE) * PAGE;
            if r.addr + r.cap == self.next && r.addr + need <= self.end {
                self.next = r.addr + need;
                self.regions[i].cap = need;
                self.regions[i].size = size;
                return Ok(i);
            }
            let a = self.take(size)?;
            self.regions[i].addr = a;
            self.regions[i].cap = size.div_ceil(PAGE) * PAGE;
            self.regions[i].size = size;
            return Ok(i);
        }
        if self.count == MAX_REGIONS {
            return Err(AllocError::TooManyRegions);
        }
        let a = self.take(size)?;
        let mut r = Region::EMPTY;
        r.name[..name.len()].copy_from_slice(name);
        r.name_len = name.len();
        r.addr = a;
        r.size = size;
        r.cap = size.div_ceil(PAGE) * PAGE;
        self.regions[self.count] = r;
        self.count += 1;
        Ok(self.count - 1)
    }
}
