//! `kimberlize import`: wrap images into a VM directory, reading each
//! once (copying and hashing in the same pass) and keeping holes; disk
//! images in another format are converted with `qemu-img`, never taken as raw.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::dir::{digest_file, VmDirWriter};
use super::manifest::{Component, Kind, Manifest};
use crate::digest::SparseHasher;
use crate::error::{Error, IoContext, Result};
use crate::fs::{self, FsError, ReadAt};
use crate::fsutil::copy_sparse;
use crate::image::{detect, detect_footer, ImageFormat, FOOTER_LEN, HEAD_LEN};
use crate::progress::Progress;
use crate::sparse::data_extents;
use crate::sys::clone;
use crate::sys::punch::punch_hole;

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportSpec {
    /// VM name.
    pub name: String,
    /// vCPU count.
    pub vcpus: u32,
    /// Raw guest memory.
    pub memory: PathBuf,
    /// Disk images (raw, or a format `qemu-img` converts), in order.
    pub disks: Vec<PathBuf>,
    /// Opaque state blob.
    pub state: Option<PathBuf>,
}

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Copy raw images with `FICLONE`, then `copy_file_range`, then a
    /// sparse copy, whichever works first (the digest is computed from the
    /// copy afterwards).
    pub reflink: bool,
    /// The `qemu-img` that converts non-raw disk images.
    pub qemu_img: PathBuf,
    /// Make the free blocks of the disks' ext4 file systems holes after
    /// copying them (the digest is of the trimmed disk); a disk whose file
    /// system is not understood is left as it is, with a note.
    pub trim: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            reflink: false,
            qemu_img: PathBuf::from("qemu-img"),
            trim: false,
        }
    }
}

/// How one component got into the VM directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyMethod {
    /// Extents shared with the source (`FICLONE`).
    Reflink,
    /// Copied in the kernel, data extents only (`copy_file_range`).
    CopyFileRange,
    /// Data extents read and written.
    SparseCopy,
    /// Converted from another image format with `qemu-img convert`.
    Converted(#[serde(skip)] ImageFormat),
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The new VM directory's manifest.
    pub manifest: Manifest,
    /// Per component, how it was copied.
    pub methods: Vec<CopyMethod>,
    /// Bytes of the sources read or shared (their sizes).
    pub source_bytes: u64,
    /// Per component, what trimming did (`None`: not asked or not a disk).
    pub trims: Vec<Option<Trimmed>>,
}

/// What `--trim` did to one disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// File systems whose free blocks were made holes.
    pub file_systems: u32,
    /// Bytes made holes (free blocks, some perhaps holes already).
    pub bytes: u64,
    /// What was left as it is, one line each.
    pub notes: Vec<String>,
}

/// Imports into a new VMDIR at `out` with the default options; returns
/// its manifest.
pub fn import(out: &Path, spec: &ImportSpec) -> Result<Manifest> {
    Ok(import_with(out, spec, &ImportOptions::default(), &Progress::default())?.manifest)
}

/// Imports into a new VMDIR at `out`. `progress` counts the sources' bytes
/// (its total planned from their sizes before anything is copied).
pub fn import_with(
    out: &Path,
    spec: &ImportSpec,
    opts: &ImportOptions,
    progress: &Progress,
) -> Result<Imported> {
    let mut sources: Vec<(Kind, &Path)> = vec![(Kind::Memory, &spec.memory)];
    sources.extend(spec.disks.iter().map(|d| (Kind::Disk, d.as_path())));
    if let Some(s) = &spec.state {
        sources.push((Kind::State, s));
    }
    // Every source is opened and its format checked before anything is
    // written.
    let mut opened = Vec::new();
    for (kind, src) in sources {
        let f = File::open(src).ctx(|| format!("opening {}", src.display()))?;
        let size = f
            .metadata()
            .ctx(|| format!("stat {}", src.display()))?
            .len();
        let format = match kind {
            // An opaque blob: no format to detect.
            Kind::State => ImageFormat::Raw,
            _ => image_format(&f, size).ctx(|| format!("reading {}", src.display()))?,
        };
        if format != ImageFormat::Raw && kind != Kind::Disk {
            return Err(Error::Invalid(format!(
                "{} is a {} image: guest memory must be a raw file",
                src.display(),
                format.name()
            )));
        }
        opened.push((kind, src, f, size, format));
    }
    progress.plan(opened.iter().map(|o| o.3).sum());
    let w = VmDirWriter::create(out)?;
    let mut manifest = Manifest {
        name: spec.name.clone(),
        vcpus: spec.vcpus,
        components: Vec::new(),
        machine: None,
    };
    let mut methods = Vec::new();
    let mut trims = Vec::new();
    let mut source_bytes = 0;
    for (kind, src, f, size, format) in opened {
        let i = manifest.components.len();
        manifest.components.push(Component {
            kind,
            size,
            digest: [0; 32],
            trimmed: false,
        });
        let trim = opts.trim && kind == Kind::Disk;
        let fname = manifest.file_name(i);
        let dst = w.create_file(&fname)?;
        let wrap = prefixed(format!("importing {}", src.display()));
        progress.stage(&format!("importing {}", src.display()));
        // The digest, unless it is computed after trimming.
        let (method, digest, len) = if format != ImageFormat::Raw {
            let dpath = w.path().join(&fname);
            let len = convert(&opts.qemu_img, src, format, &dst, &dpath)?;
            progress.advance(size);
            (CopyMethod::Converted(format), None, len)
        } else if opts.reflink {
            let m = copy_reflink(&f, size, &dst).map_err(wrap)?;
            progress.advance(size);
            (m, None, size)
        } else {
            let mut h = (!trim).then(|| SparseHasher::new(size));
            let mut copied = 0;
            copy_sparse(&f, size, &dst, |off, data| {
                if let Some(h) = h.as_mut() {
                    h.feed(off, data);
                }
                progress.advance(data.len() as u64);
                copied += data.len() as u64;
                Ok(())
            })
            .map_err(wrap)?;
            progress.advance(size - copied);
            (CopyMethod::SparseCopy, h.map(SparseHasher::finish), size)
        };
        let trimmed = if trim {
            progress.stage(&format!("trimming {fname}"));
            let t = trim_disk(&dst, len).map_err(prefixed(format!("trimming {fname}")))?;
            manifest.components[i].trimmed = t.file_systems > 0;
            Some(t)
        } else {
            None
        };
        let digest = match digest {
            Some(d) => d,
            None => digest_file(&dst, len).ctx(|| format!("hashing {fname}"))?,
        };
        manifest.components[i].size = len;
        manifest.components[i].digest = digest;
        methods.push(method);
        trims.push(trimmed);
        source_bytes += size;
    }
    w.commit(&manifest)?;
    Ok(Imported {
        manifest,
        methods,
        source_bytes,
        trims,
    })
}

/// Puts `what` before the context of an I/O error (other errors say
/// what they are already).
fn prefixed(what: String) -> impl Fn(Error) -> Error {
    move |e| match e {
        Error::Io { context, source } => Error::Io {
            context: format!("{what}: {context}"),
            source,
        },
        other => other,
    }
}

/// A disk image file as the [`fs`] readers' byte source.
struct DiskFile<'a> {
    file: &'a File,
    len: u64,
}

impl ReadAt for DiskFile<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self.file, buf, offset)
    }

    fn len(&self) -> u64 {
        self.len
    }
}

/// Makes the free blocks of the ext4 file systems on the disk image `f`
/// (`len` bytes) holes; what it does not understand it leaves as it is,
/// with a note.
pub fn trim_disk(f: &File, len: u64) -> Result<Trimmed> {
    let space = fs::free_space(&DiskFile { file: f, len }).map_err(|e| match e {
        FsError::Read { what, source } => Error::io(format!("reading {what}"), source),
        other => Error::Invalid(other.to_string()),
    })?;
    let mut t = Trimmed {
        file_systems: space.file_systems,
        bytes: 0,
        notes: space.notes,
    };
    for (n, &(start, end)) in space.ranges.iter().enumerate() {
        match punch_hole(f, start, end - start) {
            Ok(()) => t.bytes += end - start,
            // Nothing changed yet: the disk stays as it is.
            Err(e) if n == 0 && unsupported(&e) => {
                t.notes.push(format!(
                    "cannot punch holes in the VM directory's file system ({e}); left as it is"
                ));
                t.file_systems = 0;
                return Ok(t);
            }
            Err(e) => return Err(Error::io(format!("punching a hole at {start}"), e)),
        }
    }
    Ok(t)
}

/// Reads the start and the end of `f` (`size` bytes) and tells its format.
pub fn image_format(f: &File, size: u64) -> io::Result<ImageFormat> {
    let mut head = vec![0u8; HEAD_LEN.min(size as usize)];
    f.read_exact_at(&mut head, 0)?;
    let found = detect(&head);
    if found != ImageFormat::Raw || size < FOOTER_LEN as u64 {
        return Ok(found);
    }
    let mut tail = [0u8; FOOTER_LEN];
    f.read_exact_at(&mut tail, size - FOOTER_LEN as u64)?;
    Ok(if detect_footer(&tail) {
        ImageFormat::Vhd
    } else {
        ImageFormat::Raw
    })
}

/// The error for an image `qemu-img` cannot convert here.
fn refuse(src: &Path, format: ImageFormat, why: &str) -> Error {
    Error::Invalid(format!(
        "{} is a {} image, not raw, and {why}; convert it first: qemu-img convert -f {} -O raw {} disk.raw",
        src.display(),
        format.name(),
        format.qemu_img_format(),
        src.display()
    ))
}

/// Converts `src` (in `format`) to raw into `dst` (at `dpath`, created
/// empty and private), keeping zeros as holes; returns the disk's size.
/// Images that name other files (a backing file, an external data file,
/// VMDK extents) are refused: converting one would copy whatever files it
/// names into the VM directory.
pub fn convert(
    qemu_img: &Path,
    src: &Path,
    format: ImageFormat,
    dst: &File,
    dpath: &Path,
) -> Result<u64> {
    let run = |args: &[&std::ffi::OsStr]| -> Result<Vec<u8>> {
        let o = Command::new(qemu_img)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    refuse(
                        src,
                        format,
                        &format!("{} is not installed", qemu_img.display()),
                    )
                } else {
                    Error::io(format!("starting {}", qemu_img.display()), e)
                }
            })?;
        if !o.status.success() {
            return Err(refuse(
                src,
                format,
                &format!(
                    "qemu-img failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            ));
        }
        Ok(o.stdout)
    };
    let fmt = format.qemu_img_format();
    let info = run(&[
        "info".as_ref(),
        "--output=json".as_ref(),
        "-f".as_ref(),
        fmt.as_ref(),
        src.as_os_str(),
    ])?;
    let info: serde_json::Value = serde_json::from_slice(&info)
        .map_err(|e| Error::Invalid(format!("qemu-img info {}: {e}", src.display())))?;
    let others = other_files(&info, src);
    if !others.is_empty() {
        return Err(Error::Invalid(format!(
            "{} is a {} image that names other files ({}): converting it would copy them into the VM directory; flatten it yourself after checking what it names (qemu-img convert -O raw {} disk.raw)",
            src.display(),
            format.name(),
            others.join(", "),
            src.display()
        )));
    }
    let size = info["virtual-size"].as_u64().ok_or_else(|| {
        Error::Invalid(format!("qemu-img info {}: no virtual size", src.display()))
    })?;
    dst.set_len(size)
        .ctx(|| format!("sizing {}", dpath.display()))?;
    run(&[
        "convert".as_ref(),
        "-n".as_ref(),
        "--target-is-zero".as_ref(),
        "-f".as_ref(),
        fmt.as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        src.as_os_str(),
        dpath.as_os_str(),
    ])?;
    Ok(size)
}

/// The files other than `src` that `qemu-img info`'s answer `info` says
/// the image reads: a backing file, an external data file, VMDK extents.
/// Relative names are relative to `src`'s directory; a name that does not
/// resolve counts as another file.
fn other_files(info: &serde_json::Value, src: &Path) -> Vec<String> {
    fn walk(v: &serde_json::Value, found: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        (
                            "filename" | "backing-filename" | "full-backing-filename" | "data-file",
                            serde_json::Value::String(s),
                        ) => found.push(s.clone()),
                        _ => walk(v, found),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    let mut names = Vec::new();
    // The top level's "filename" is the image itself, as given.
    if let serde_json::Value::Object(m) = info {
        let mut rest = m.clone();
        rest.remove("filename");
        walk(&serde_json::Value::Object(rest), &mut names);
    }
    let dir = crate::fsutil::parent_of(src);
    let me = std::fs::canonicalize(src).ok();
    // qemu-img gives names as written in the image (relative to it) or as
    // it opened them (relative to the working directory).
    let is_me = |n: &str| {
        me.is_some()
            && [PathBuf::from(n), dir.join(n)]
                .iter()
                .any(|p| std::fs::canonicalize(p).ok() == me)
    };
    let mut others: Vec<String> = names.into_iter().filter(|n| !is_me(n)).collect();
    others.sort();
    others.dedup();
    others
}

/// The ways [`copy_reflink`] tries, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Clone,
    Kernel,
    Sparse,
}

/// True for the errors that mean "this way does not work between these
/// two files", not "the copy failed".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::ENOTTY)
    )
}

/// Copies `src` (`size` bytes) into the empty `dst`: shares its extents if
/// the file system can, else copies its data extents in the kernel, else
/// reads and writes them. Holes stay holes in the last two.
pub fn copy_reflink(src: &File, size: u64, dst: &File) -> Result<CopyMethod> {
    for way in [Way::Clone, Way::Kernel] {
        match copy_via(way, src, size, dst) {
            Ok(m) => return Ok(m),
            Err(e) if unsupported(&e) => continue,
            Err(e) => return Err(Error::io("copying an image", e)),
        }
    }
    copy_via(Way::Sparse, src, size, dst).map_err(|e| Error::io("copying an image", e))
}

/// One way of [`copy_reflink`]; an `unsupported` error leaves `dst` empty.
fn copy_via(way: Way, src: &File, size: u64, dst: &File) -> io::Result<CopyMethod> {
    match way {
        Way::Clone => {
            clone::ficlone(dst, src)?;
            Ok(CopyMethod::Reflink)
        }
        Way::Kernel => {
            dst.set_len(size)?;
            let mut first = true;
            for (start, end) in data_extents(src, size)? {
                let mut pos = start;
                while pos < end {
                    let len = ((end - pos) as usize).min(1 << 30);
                    let n = match clone::copy_file_range(src, pos, dst, pos, len) {
                        Ok(0) => {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the source image shrank while it was copied",
                            ))
                        }
                        Ok(n) => n,
                        Err(e) if first && unsupported(&e) => {
                            dst.set_len(0)?;
                            return Err(e);
                        }
                        Err(e) => return Err(e),
                    };
                    first = false;
                    pos += n as u64;
                }
            }
            Ok(CopyMethod::CopyFileRange)
        }
        Way::Sparse => {
            copy_sparse(src, size, dst, |_, _| Ok(())).map_err(|e| match e {
                Error::Io { source, .. } => source,
                other => io::Error::other(other.to_string()),
            })?;
            Ok(CopyMethod::SparseCopy)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse::data_extents;

    /// A new empty file, read and written.
    fn fresh(p: &Path) -> File {
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(p)
            .unwrap()
    }

    /// A 1 MiB source with data at 64 KiB and 512 KiB, holes elsewhere.
    fn source(dir: &Path) -> (File, Vec<u8>) {
        let p = dir.join("src.raw");
        let f = fresh(&p);
        f.set_len(1 << 20).unwrap();
        let mut want = vec![0u8; 1 << 20];
        for (off, byte) in [(64 << 10, 0xa5u8), (512 << 10, 0x5a)] {
            let data = vec![byte; 8192];
            f.write_all_at(&data, off).unwrap();
            want[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        f.sync_all().unwrap();
        (f, want)
    }

    fn content(f: &File) -> Vec<u8> {
        let mut v = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn every_way_copies_the_content_and_the_fallbacks_keep_holes() {
        let t = tempfile::tempdir().unwrap();
        let (src, want) = source(t.path());
        for way in [Way::Clone, Way::Kernel, Way::Sparse] {
            let dst = fresh(&t.path().join(format!("{way:?}")));
            match copy_via(way, &src, 1 << 20, &dst) {
                Ok(_) => {
                    assert_eq!(content(&dst), want, "{way:?}");
                    if way != Way::Clone {
                        let data: u64 = data_extents(&dst, 1 << 20)
                            .unwrap()
                            .iter()
                            .map(|(a, b)| b - a)
                            .sum();
                        assert!(
                            data < 1 << 19,
                            "{way:?} filled the holes ({data} bytes of data)"
                        );
                    }
                }
                // Only sharing extents may be missing (ext4, tmpfs), and
                // then nothing was written.
                Err(e) => {
                    assert_eq!(way, Way::Clone, "{e}");
                    assert!(unsupported(&e), "{e}");
                    assert_eq!(dst.metadata().unwrap().len(), 0);
                }
            }
        }
        // The chain as import uses it: whatever works here, the content.
        let dst = fresh(&t.path().join("chain"));
        copy_reflink(&src, 1 << 20, &dst).unwrap();
        assert_eq!(content(&dst), want);
    }

    #[test]
    fn a_fixed_vhd_is_told_by_its_footer() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("fixed.vhd");
        let f = fresh(&p);
        f.set_len(4096 + 512).unwrap();
        assert_eq!(image_format(&f, 4608).unwrap(), ImageFormat::Raw);
        f.write_all_at(b"conectix", 4096).unwrap();
        assert_eq!(image_format(&f, 4608).unwrap(), ImageFormat::Vhd);
        // Shorter than a footer: raw.
        f.set_len(100).unwrap();
        assert_eq!(image_format(&f, 100).unwrap(), ImageFormat::Raw);
    }
}

#[cfg(test)]
mod trim_tests {
    use super::*;
    use std::process::Command;

    fn run(prog: &str, args: &[&str]) {
        let o = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{prog} (Debian: e2fsprogs) is needed: {e}"));
        assert!(
            o.status.success(),
            "{prog} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// An ext4 file system in partition 1 of a GPT disk: its free blocks
    /// become holes, the rest of the disk (the GPT, the gap before the
    /// partition) is untouched and the file system still checks clean.
    #[test]
    fn an_ext4_partition_of_a_gpt_disk_is_trimmed() {
        let t = tempfile::tempdir().unwrap();
        let fs = t.path().join("fs.img");
        let fs_s = fs.to_str().unwrap();
        File::create(&fs).unwrap().set_len(16 << 20).unwrap();
        run(
            "mkfs.ext4",
            &["-q", "-F", "-b", "4096", "-E", "nodiscard", fs_s],
        );
        let src = t.path().join("gone");
        std::fs::write(&src, vec![0x5Au8; 2 << 20]).unwrap();
        let req = format!("write {} gone", src.display());
        run("debugfs", &["-w", "-R", &req, fs_s]);
        run("debugfs", &["-w", "-R", "rm gone", fs_s]);
        let fs_bytes = std::fs::read(&fs).unwrap();
        // LBA 2048 on, 16 MiB; 34 sectors after it for the usable range.
        let sectors = 2048 + (16 << 20) / 512 + 34;
        let mut disk = crate::fs::part::tests::gpt(sectors, &[(2048, 2048 + (16 << 20) / 512 - 1)]);
        disk[1 << 20..(1 << 20) + fs_bytes.len()].copy_from_slice(&fs_bytes);
        // Something in the gap before the partition, as boot loaders put.
        disk[64 << 10..(64 << 10) + 4096].fill(0xB0);
        let p = t.path().join("disk.raw");
        std::fs::write(&p, &disk).unwrap();
        let f = File::options().read(true).write(true).open(&p).unwrap();
        let trimmed = trim_disk(&f, disk.len() as u64).unwrap();
        assert_eq!(trimmed.file_systems, 1, "{:?}", trimmed.notes);
        assert!(trimmed.bytes >= 2 << 20, "{trimmed:?}");
        let after = std::fs::read(&p).unwrap();
        assert_eq!(after[..1 << 20], disk[..1 << 20]);
        assert!(!after.windows(4096).any(|w| w == [0x5Au8; 4096]));
        let data: u64 = data_extents(&f, disk.len() as u64)
            .unwrap()
            .iter()
            .map(|(a, b)| b - a)
            .sum();
        assert!(data < (16 << 20) - (2 << 20), "{data} bytes of data");
        let part = t.path().join("part.img");
        std::fs::write(&part, &after[1 << 20..(1 << 20) + (16 << 20)]).unwrap();
        run("e2fsck", &["-fn", part.to_str().unwrap()]);
    }
}
