//! Before a suspend whose VM is diffed: what the guest gives back (freed
//! file-system blocks trimmed, clean page cache dropped), asked of every
//! backend through [`GuestAgent::reclaim`](crate::GuestAgent::reclaim).

/// What to ask of the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reclaim {
    /// `sync`, then discard the free blocks of the guest's mounted file
    /// systems (`fstrim`): they become holes in the disk images, which
    /// diff as zero.
    pub trim: bool,
    /// `sync`, then drop the guest's clean page cache and reclaimable
    /// slab: fewer pages hold data (the overlay shrinks where freed pages
    /// are zeroed, e.g. `init_on_free=1`), at the cost of page faults
    /// after resume.
    pub drop_caches: bool,
}

impl Reclaim {
    /// True if anything is asked.
    pub fn any(&self) -> bool {
        self.trim || self.drop_caches
    }
}

/// One file system the guest trimmed, or tried to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trimmed {
    /// Its mount point, as the guest names it (printable text).
    pub mount: String,
    /// Bytes the guest reported trimmed, if it said.
    pub bytes: Option<u64>,
    /// Why it was not trimmed (one line), if it was not.
    pub error: Option<String>,
}

/// What the guest did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reclaimed {
    /// This backend's guest has nothing to give back this way (why).
    NotApplicable(String),
    /// Done, as far as the guest could.
    Done {
        /// The file systems trimmed (empty if no trim was asked).
        trimmed: Vec<Trimmed>,
        /// The page cache was dropped.
        caches_dropped: bool,
        /// One-line notes on what could not be done (no `fstrim`, a file
        /// system refusing it, ...): not failures.
        notes: Vec<String>,
    },
}

impl Reclaimed {
    /// The bytes reported trimmed, summed (saturating); `None` if no file
    /// system reported a number.
    pub fn trimmed_bytes(&self) -> Option<u64> {
        match self {
            Reclaimed::NotApplicable(_) => None,
            Reclaimed::Done { trimmed, .. } => trimmed
                .iter()
                .filter_map(|t| t.bytes)
                .reduce(u64::saturating_add),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimmed_bytes_sum_what_was_reported() {
        let t = |bytes| Trimmed {
            mount: "/".into(),
            bytes,
            error: None,
        };
        let done = |trimmed| Reclaimed::Done {
            trimmed,
            caches_dropped: false,
            notes: vec![],
        };
        assert_eq!(done(vec![]).trimmed_bytes(), None);
        assert_eq!(done(vec![t(None)]).trimmed_bytes(), None);
        assert_eq!(
            done(vec![t(Some(5)), t(None), t(Some(7))]).trimmed_bytes(),
            Some(12)
        );
        assert_eq!(
            done(vec![t(Some(u64::MAX)), t(Some(1))]).trimmed_bytes(),
            Some(u64::MAX)
        );
        assert_eq!(Reclaimed::NotApplicable("x".into()).trimmed_bytes(), None);
        assert!(!Reclaim::default().any());
        assert!(Reclaim {
            trim: true,
            drop_caches: false
        }
        .any());
    }
}
