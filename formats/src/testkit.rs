//! Deterministic image pairs for tests, vectors and examples: a base VM and
//! a launch VM that differ in every way the encoder distinguishes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::chunk::CHUNK_SIZE;
use crate::error::{IoContext, Result};
use crate::vmdir::import::{import, ImportSpec};

/// splitmix64.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Fills with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    /// Fills with compressible word-like text.
    pub fn text(&mut self, buf: &mut [u8]) {
        const WORDS: [&str; 12] = [
            "the ",
            "overlay ",
            "kernel ",
            "page ",
            "cache ",
            "virtual ",
            "machine ",
            "cloudlet ",
            "base ",
            "launch ",
            "disk ",
            "memory\n",
        ];
        let mut i = 0;
        while i < buf.len() {
            let w = WORDS[self.below(WORDS.len() as u64) as usize].as_bytes();
            let n = w.len().min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&w[..n]);
            i += n;
        }
    }
}

/// An image built page by page; pages never written stay holes.
#[derive(Debug, Clone)]
pub struct Image {
    /// Logical size.
    pub size: u64,
    /// Content of each written page, by page index.
    pub pages: std::collections::BTreeMap<u64, Vec<u8>>,
}

impl Image {
    /// An all-hole image.
    pub fn new(size: u64) -> Image {
        Image {
            size,
            pages: Default::default(),
        }
    }

    /// The bytes of page `i` (zeros when not written).
    pub fn page(&self, i: u64) -> Vec<u8> {
        let len = crate::chunk::chunk_len(self.size, i);
        self.pages.get(&i).cloned().unwrap_or_else(|| vec![0; len])
    }

    /// Sets page `i` (truncated to the page's length).
    pub fn set(&mut self, i: u64, mut bytes: Vec<u8>) {
        bytes.resize(crate::chunk::chunk_len(self.size, i), 0);
        self.pages.insert(i, bytes);
    }

    /// Writes the image as a sparse file.
    pub fn write(&self, path: &Path) -> Result<()> {
        let f = File::create(path).ctx(|| format!("creating {}", path.display()))?;
        f.set_len(self.size)
            .ctx(|| format!("sizing {}", path.display()))?;
        for (&i, p) in &self.pages {
            f.write_all_at(p, i * CHUNK_SIZE as u64)
                .ctx(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// Pages in the image.
    pub fn page_count(&self) -> u64 {
        crate::chunk::chunk_count(self.size)
    }
}

/// A base image: a mix of holes, written zero pages, random and text pages.
pub fn base_image(size: u64, rng: &mut Rng) -> Image {
    let mut img = Image::new(size);
    for i in 0..img.page_count() {
        let mut p = vec![0u8; crate::chunk::chunk_len(size, i)];
        match rng.below(10) {
            0..=3 => continue, // hole
            4 => {}            // written zeros
            5..=6 => rng.fill(&mut p),
            _ => rng.text(&mut p),
        }
        img.set(i, p);
    }
    img
}

/// A launch image derived from `base` (and `others`, pages from other base
/// components): changes `frac_percent` of the pages, a mix of zeroing,
/// copies of base pages, small edits, duplicated new pages and new data.
/// `new_size` may differ from the base's size.
pub fn launch_image(
    base: &Image,
    others: &[&Image],
    new_size: u64,
    frac_percent: u64,
    rng: &mut Rng,
) -> Image {
    let mut img = Image::new(new_size);
    for (&i, p) in &base.pages {
        if i < img.page_count() {
            img.set(i, p.clone());
        }
    }
    let mut dup: Option<Vec<u8>> = None;
    for i in 0..img.page_count() {
        if rng.below(100) >= frac_percent {
            continue;
        }
        let len = crate::chunk::chunk_len(new_size, i);
        let mut p = img.page(i);
        match rng.below(6) {
            0 => p.fill(0),
            1 => {
                let src: &Image = if !others.is_empty() && rng.below(2) == 0 {
                    others[rng.below(others.len() as u64) as usize]
                } else {
                    base
                };
                p = src.page(rng.below(src.page_count()));
                p.resize(len, 0);
            }
            2 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(len as u64) as usize;
                    p[at] = p[at].wrapping_add(1 + rng.below(200) as u8);
                }
            }
            3 => {
                let d = dup.get_or_insert_with(|| {
                    let mut v = vec![0u8; CHUNK_SIZE];
                    rng.text(&mut v);
                    v
                });
                p = d.clone();
                p.resize(len, 0);
            }
            4 => rng.text(&mut p),
            _ => rng.fill(&mut p),
        }
        img.set(i, p);
    }
    img
}

/// Paths of a generated pair.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The base VMDIR.
    pub base: PathBuf,
    /// The launch VMDIR.
    pub launch: PathBuf,
}

/// Shape of a generated pair.
#[derive(Debug, Clone)]
pub struct PairSpec {
    /// Seed.
    pub seed: u64,
    /// Base memory size.
    pub memory: u64,
    /// Base disk sizes.
    pub disks: Vec<u64>,
    /// Launch disk sizes (may be longer than `disks`: extra disks).
    pub launch_disks: Vec<u64>,
    /// Percent of pages changed.
    pub change_percent: u64,
    /// Give both VMs a state blob of this many bytes.
    pub state: Option<u64>,
}

impl Default for PairSpec {
    fn default() -> Self {
        PairSpec {
            seed: 1,
            memory: 1 << 20,
            disks: vec![2 << 20],
            launch_disks: vec![2 << 20],
            change_percent: 10,
            state: Some(3000),
        }
    }
}

/// Copies the VM directory `from` into the new directory `to`: the same
/// bytes in new files (as a rebuild or a copy elsewhere would give).
pub fn copy_vmdir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir(to).ctx(|| format!("creating {}", to.display()))?;
    for e in std::fs::read_dir(from).ctx(|| format!("reading {}", from.display()))? {
        let e = e.ctx(|| format!("reading {}", from.display()))?;
        std::fs::copy(e.path(), to.join(e.file_name()))
            .ctx(|| format!("copying {}", e.path().display()))?;
    }
    Ok(())
}

/// Writes raw images under `dir/raw-*` and imports `dir/base`, `dir/launch`.
pub fn make_pair(dir: &Path, spec: &PairSpec) -> Result<Pair> {
    let mut rng = Rng(spec.seed);
    let bmem = base_image(spec.memory, &mut rng);
    let bdisks: Vec<Image> = spec
        .disks
        .iter()
        .map(|&s| base_image(s, &mut rng))
        .collect();
    let bstate = spec.state.map(|s| base_image(s, &mut rng));
    let others: Vec<&Image> = bdisks.iter().collect();
    let lmem = launch_image(&bmem, &others, spec.memory, spec.change_percent, &mut rng);
    let empty = Image::new(0);
    let ldisks: Vec<Image> = spec
        .launch_disks
        .iter()
        .enumerate()
        .map(|(k, &s)| {
            launch_image(
                bdisks.get(k).unwrap_or(&empty),
                &[&bmem],
                s,
                spec.change_percent,
                &mut rng,
            )
        })
        .collect();
    let lstate = bstate
        .as_ref()
        .map(|b| launch_image(b, &[], b.size, 50, &mut rng));
    let write_vm =
        |name: &str, mem: &Image, disks: &[Image], state: Option<&Image>| -> Result<PathBuf> {
            let m = dir.join(format!("raw-{name}-memory"));
            mem.write(&m)?;
            let mut ds = Vec::new();
            for (k, d) in disks.iter().enumerate() {
                let p = dir.join(format!("raw-{name}-disk{k}"));
                d.write(&p)?;
                ds.push(p);
            }
            let st = match state {
                Some(s) => {
                    let p = dir.join(format!("raw-{name}-state"));
                    s.write(&p)?;
                    Some(p)
                }
                None => None,
            };
            let out = dir.join(name);
            import(
                &out,
                &ImportSpec {
                    name: name.into(),
                    vcpus: 1,
                    memory: m,
                    disks: ds,
                    state: st,
                },
            )?;
            Ok(out)
        };
    Ok(Pair {
        base: write_vm("base", &bmem, &bdisks, bstate.as_ref())?,
        launch: write_vm("launch", &lmem, &ldisks, lstate.as_ref())?,
    })
}
