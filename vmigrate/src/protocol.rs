//! The migration wire protocol's messages (docs/MIGRATION.md, "Wire
//! protocol"): every hello, frame header and message body is one type that
//! encodes and decodes itself here, with every limit checked in one place.
//! Pure: no I/O (that is `channel`).

use kimberley_formats::crypto::stream::AEAD_TAG;
use kimberley_formats::le::{LeError, Reader, Writer};

/// First bytes of a hello.
pub const MAGIC: [u8; 8] = *b"KIMBMIG\0";
/// Protocol version this build speaks (and the only one it accepts).
pub const VERSION: u16 = 3;
/// Length of a hello.
pub const HELLO_LEN: usize = 48;
/// Length of a key-confirmation tag.
pub const CONFIRM_LEN: usize = 32;
/// Frame header length.
pub const FRAME_HEADER: usize = 8;
/// Largest plaintext message body.
pub const MAX_BODY: usize = 16 << 20;
/// Largest sealed message.
pub const MAX_SEALED: usize = MAX_BODY + AEAD_TAG;
/// Most disks a migrating VM may have (the microVM's limit).
pub const MAX_DISKS: usize = 8;
/// Largest guest memory a START may announce (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;
/// Largest disk a START may announce (16 TiB).
pub const MAX_DISK_SIZE: u64 = 1 << 44;
/// Longest shared-disk path.
pub const MAX_PATH: usize = 4096;
/// Longest ERROR reason kept.
pub const MAX_REASON: usize = 4096;
/// Most vCPUs a START may announce.
pub const MAX_VCPUS: u32 = 255;
/// Chunk size (memory pages and disk blocks alike).
pub const CHUNK: u64 = 4096;
/// Largest boot file (kernel, initrd) a MACHINE may announce (1 GiB).
pub const MAX_BOOT_FILE: u64 = 1 << 30;
/// Longest machine description in MACHINE.
pub const MAX_DESCRIPTION: usize = 64 << 10;
/// Most hypervisor stream bytes one STREAM carries (decompressed).
pub const MAX_STREAM_CHUNK: usize = 1 << 20;
/// Bytes of guest memory one SUMS entry covers.
pub const SUM_BLOCK: u64 = 64 << 10;
/// Length of one SUMS entry (an XXH3-128 hash).
pub const SUM_LEN: usize = 16;
/// Most entries in one SUMS message.
pub const MAX_SUMS: usize = 1 << 16;
/// Bytes of one page a STREAM_REFS reference stands for.
pub const REF_PAGE: usize = 4096;
/// Most references in one STREAM_REFS (every page of the largest piece).
pub const MAX_REFS: usize = MAX_STREAM_CHUNK / REF_PAGE;

/// Why bytes from the peer were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The hello does not start with [`MAGIC`].
    #[error("the peer does not speak the vmigrate protocol")]
    NotVmigrate,
    /// Another protocol version.
    #[error("the peer speaks vmigrate protocol version {0}, this build speaks {VERSION}")]
    Version(u16),
    /// The hello's role byte is not the expected one.
    #[error("the peer has role {found} where {expected} was expected")]
    Role {
        /// Role byte received.
        found: u8,
        /// Role byte expected.
        expected: u8,
    },
    /// Reserved bytes that are not zero.
    #[error("reserved bytes of the {0} are not zero")]
    Reserved(&'static str),
    /// A message type that is unknown or not allowed in this direction.
    #[error("unexpected message type {0}")]
    UnexpectedType(u8),
    /// A frame header that breaks a rule.
    #[error("bad frame header for {0}")]
    BadFrame(&'static str),
    /// A sealed length out of range.
    #[error("{name} of {len} bytes")]
    BadLength {
        /// Message name.
        name: &'static str,
        /// Sealed length claimed.
        len: usize,
    },
    /// A body that is truncated, too long or has bytes left over.
    #[error("{0}")]
    Body(#[from] LeError),
    /// A body whose fields break a rule.
    #[error("{0}")]
    Invalid(String),
}

type Result<T, E = ProtocolError> = std::result::Result<T, E>;

/// Role of the side that sends a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The source, which sends the VM.
    Sender = 1,
    /// The destination.
    Receiver = 2,
}

/// A hello: the cleartext greeting each side sends first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Who sends it.
    pub role: Role,
    /// Fresh random bytes (salt of the session keys).
    pub nonce: [u8; 32],
}

impl Hello {
    /// The 48 bytes on the wire.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut w = Writer::with_capacity(HELLO_LEN);
        w.raw(&MAGIC);
        w.u16(VERSION);
        w.u8(self.role as u8);
        w.zeros(5);
        w.raw(&self.nonce);
        w.into_inner().try_into().expect("48 bytes")
    }

    /// Parses a hello that must come from `role`.
    pub fn decode(b: &[u8; HELLO_LEN], role: Role) -> Result<Hello> {
        let mut r = Reader::new(b, "hello");
        if r.array::<8>()? != MAGIC {
            return Err(ProtocolError::NotVmigrate);
        }
        let v = r.u16()?;
        if v != VERSION {
            return Err(ProtocolError::Version(v));
        }
        let found = r.u8()?;
        if found != role as u8 {
            return Err(ProtocolError::Role {
                found,
                expected: role as u8,
            });
        }
        r.zeros(5, "hello")
            .map_err(|_| ProtocolError::Reserved("hello"))?;
        let nonce = r.array::<32>()?;
        r.finish()?;
        Ok(Hello { role, nonce })
    }
}

/// Message types. 0 is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Type {
    /// Sender → receiver: VM geometry.
    Start = 1,
    /// Sender → receiver: a batch of memory pages or disk blocks.
    Chunks = 2,
    /// Sender → receiver: end of a round.
    RoundEnd = 3,
    /// Sender → receiver: the vCPU and device state blob.
    State = 4,
    /// Sender → receiver: everything was sent; commit and start the guest.
    Commit = 5,
    /// Sender → receiver (last): the source has stopped for good.
    Done = 6,
    /// Sender → receiver (last): cancelled; discard everything.
    Abort = 7,
    /// Sender → receiver (last, first and only message of a connection):
    /// how did session ID end?
    Query = 8,
    /// Sender → receiver: the machine to start (hypervisor stream only).
    Machine = 10,
    /// Sender → receiver: the next bytes of the hypervisor's own migration
    /// stream, compressed.
    Stream = 11,
    /// Sender → receiver: the boot files are on shared storage (hypervisor
    /// stream with shared disks only): their paths instead of their bytes.
    BootFiles = 12,
    /// Sender → receiver: the next bytes of the hypervisor's stream, of
    /// which some pages are references to blocks of the shared disks.
    StreamRefs = 13,
    /// Receiver → sender (last): the guest runs here.
    Running = 16,
    /// Receiver → sender (last): the receiver failed and discards.
    Error = 17,
    /// Receiver → sender: a round was received, written and hashed.
    RoundAck = 18,
    /// Receiver → sender (last): the answer to QUERY.
    Outcome = 19,
    /// Receiver → sender: hashes of the received memory (hypervisor
    /// stream only), checked by the sender before COMMIT.
    Sums = 20,
}

impl Type {
    /// The type of byte `t`, if it is one.
    pub fn from_u8(t: u8) -> Option<Type> {
        Some(match t {
            1 => Type::Start,
            2 => Type::Chunks,
            3 => Type::RoundEnd,
            4 => Type::State,
            5 => Type::Commit,
            6 => Type::Done,
            7 => Type::Abort,
            8 => Type::Query,
            10 => Type::Machine,
            11 => Type::Stream,
            12 => Type::BootFiles,
            13 => Type::StreamRefs,
            16 => Type::Running,
            17 => Type::Error,
            18 => Type::RoundAck,
            19 => Type::Outcome,
            20 => Type::Sums,
            _ => return None,
        })
    }

    /// Name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Type::Start => "START",
            Type::Chunks => "CHUNKS",
            Type::RoundEnd => "ROUND_END",
            Type::State => "STATE",
            Type::Commit => "COMMIT",
            Type::Done => "DONE",
            Type::Abort => "ABORT",
            Type::Running => "RUNNING",
            Type::Error => "ERROR",
            Type::RoundAck => "ROUND_ACK",
            Type::Query => "QUERY",
            Type::Machine => "MACHINE",
            Type::Stream => "STREAM",
            Type::BootFiles => "BOOT_FILES",
            Type::StreamRefs => "STREAM_REFS",
            Type::Sums => "SUMS",
            Type::Outcome => "OUTCOME",
        }
    }

    /// True for the last message a direction may send.
    pub fn is_last(self) -> bool {
        matches!(
            self,
            Type::Done | Type::Abort | Type::Running | Type::Error | Type::Query | Type::Outcome
        )
    }

    /// Who sends this type.
    pub fn sent_by(self) -> Role {
        if (self as u8) < 16 {
            Role::Sender
        } else {
            Role::Receiver
        }
    }
}

/// The 8-byte cleartext header of a sealed frame (also its AEAD's
/// associated data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type.
    pub ty: Type,
    /// Sealed length: body + 16.
    pub sealed_len: u32,
}

impl FrameHeader {
    /// Header of a frame carrying `body_len` plaintext bytes.
    pub fn for_body(ty: Type, body_len: usize) -> FrameHeader {
        assert!(body_len <= MAX_BODY, "message body too large");
        FrameHeader {
            ty,
            sealed_len: (body_len + AEAD_TAG) as u32,
        }
    }

    /// The 8 bytes.
    pub fn encode(&self) -> [u8; FRAME_HEADER] {
        let mut h = [0u8; FRAME_HEADER];
        h[0] = self.ty as u8;
        h[1] = u8::from(self.ty.is_last());
        h[4..8].copy_from_slice(&self.sealed_len.to_le_bytes());
        h
    }

    /// Parses a header read by the side `reader`; refuses types the peer
    /// may not send, bad flags, non-zero reserved bytes and lengths out of
    /// range before any body is read.
    pub fn decode(h: &[u8; FRAME_HEADER], reader: Role) -> Result<FrameHeader> {
        let ty = Type::from_u8(h[0])
            .filter(|t| t.sent_by() != reader)
            .ok_or(ProtocolError::UnexpectedType(h[0]))?;
        if h[1] > 1 || h[2] != 0 || h[3] != 0 || (h[1] == 1) != ty.is_last() {
            return Err(ProtocolError::BadFrame(ty.name()));
        }
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        if !(AEAD_TAG..=MAX_SEALED).contains(&(len as usize)) {
            return Err(ProtocolError::BadLength {
                name: ty.name(),
                len: len as usize,
            });
        }
        Ok(FrameHeader {
            ty,
            sealed_len: len,
        })
    }
}

/// One disk in START.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in bytes.
    pub size: u64,
    /// With a shared disk: the sender's absolute path of the file; else empty.
    pub path: String,
}

/// START: the VM's geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// Guest memory in bytes (a multiple of [`CHUNK`]).
    pub memory_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The disks live on storage both hosts share: they are not copied.
    pub shared_disk: bool,
    /// The VM travels as its hypervisor's own migration stream (MACHINE,
    /// then STREAM messages) instead of pages and a state blob.
    pub stream: bool,
    /// The disks, in device order.
    pub disks: Vec<DiskInfo>,
}

/// Receiver's costs reported with each ROUND_ACK, for the sender's
/// downtime estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoundAck {
    /// The round acknowledged.
    pub round: u32,
    /// Microseconds spent writing the round's chunks after the last arrived.
    pub apply_us: u64,
    /// 1 MiB digest blocks re-hashed for the round.
    pub blocks_hashed: u64,
    /// Microseconds spent re-hashing them.
    pub hash_us: u64,
    /// The receiver's predicted fixed cost of commit and restore, in
    /// microseconds (from its probe at START).
    pub fixed_us: u64,
}

/// RUNNING: where the receiver's part of the pause window went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Running {
    /// COMMIT received → final chunks written.
    pub apply_us: u64,
    /// Final digest blocks re-hashed.
    pub blocks_hashed: u64,
    /// … in this many microseconds.
    pub hash_us: u64,
    /// state.bin and manifest written, directory renamed into place.
    pub commit_us: u64,
    /// Committed directory → the guest's first KVM_RUN.
    pub restore_us: u64,
    /// First KVM_RUN → this message sent.
    pub delay_us: u64,
}

impl Running {
    /// Everything from COMMIT to the guest's first instruction.
    pub fn to_first_run_us(&self) -> u64 {
        self.apply_us + self.hash_us + self.commit_us + self.restore_us
    }
}

/// MACHINE: what the receiver starts the VM of a hypervisor stream on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineMsg {
    /// Kernel size in bytes (1 ..= [`MAX_BOOT_FILE`]).
    pub kernel_size: u64,
    /// Initrd size in bytes (0: none).
    pub initrd_size: u64,
    /// The machine description (the manifest's `machine` member).
    pub spec: kimberley_formats::vmdir::MachineSpec,
}

/// One page of a STREAM_REFS: the [`REF_PAGE`] bytes at `pos` of the piece
/// are block `block` of shared disk `disk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskRef {
    /// Offset in the piece (the references ascending, not overlapping).
    pub pos: u32,
    /// The disk (START's order).
    pub disk: u8,
    /// The block: bytes `block × 4096 ..` of the disk.
    pub block: u32,
    /// XXH3-64 of the page's bytes.
    pub hash: u64,
}

/// Length of one reference in a STREAM_REFS frame.
pub const REF_LEN: usize = 20;

/// STREAM_REFS: `len` bytes of the hypervisor's stream as one zstd frame
/// of `count` references followed by the bytes between them (the
/// literals); [`StreamRefs::open`] and [`StreamRefs::seal`] code it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRefs {
    /// Bytes of stream this message stands for (≤ [`MAX_STREAM_CHUNK`]).
    pub len: u32,
    /// References: 1 ..= [`MAX_REFS`], at most `len / 4096`.
    pub count: u32,
    /// The zstd frame.
    pub frame: Vec<u8>,
}

impl StreamRefs {
    /// Codes the piece `piece` whose pages at `refs` (ascending, not
    /// overlapping, inside the piece; 1 ..= [`MAX_REFS`]) are blocks of
    /// the shared disks, compressed with `z`.
    pub fn seal(
        piece: &[u8],
        refs: &[DiskRef],
        z: &mut zstd::bulk::Compressor<'_>,
    ) -> std::io::Result<StreamRefs> {
        assert!(piece.len() <= MAX_STREAM_CHUNK && !refs.is_empty() && refs.len() <= MAX_REFS);
        let mut plain = Writer::with_capacity(refs.len() * REF_LEN + piece.len());
        for r in refs {
            plain.u32(r.pos);
            plain.u8(r.disk);
            plain.zeros(3);
            plain.u32(r.block);
            plain.u64(r.hash);
        }
        let mut at = 0;
        for r in refs {
            plain.raw(&piece[at..r.pos as usize]);
            at = r.pos as usize + REF_PAGE;
        }
        plain.raw(&piece[at..]);
        Ok(StreamRefs {
            len: piece.len() as u32,
            count: refs.len() as u32,
            frame: z.compress(&plain.into_inner())?,
        })
    }

    /// Decompresses the frame into its references and literals, checking
    /// every rule: the frame decompresses to exactly `count` references
    /// and `len - count × 4096` literal bytes; references ascend, do not
    /// overlap, lie inside the piece, name a disk below [`MAX_DISKS`] and
    /// have zero reserved bytes.
    pub fn open(&self) -> Result<(Vec<DiskRef>, Vec<u8>)> {
        let n = self.count as usize;
        let want = n * REF_LEN + self.len as usize - n * REF_PAGE;
        let plain = zstd::bulk::decompress(&self.frame, want)
            .map_err(|e| ProtocolError::Invalid(format!("STREAM_REFS frame: {e}")))?;
        if plain.len() != want {
            return Err(ProtocolError::Invalid(format!(
                "STREAM_REFS frame of {} bytes where {want} were announced",
                plain.len()
            )));
        }
        let mut r = Reader::new(&plain, "STREAM_REFS");
        let mut refs = Vec::with_capacity(n);
        let mut end = 0u64;
        for _ in 0..n {
            let pos = r.u32()?;
            let disk = r.u8()?;
            r.zeros(3, "STREAM_REFS")
                .map_err(|_| ProtocolError::Reserved("STREAM_REFS reference"))?;
            let block = r.u32()?;
            let hash = r.u64()?;
            if u64::from(pos) < end
                || u64::from(pos) + REF_PAGE as u64 > u64::from(self.len)
                || usize::from(disk) >= MAX_DISKS
            {
                return Err(ProtocolError::Invalid(format!(
                    "STREAM_REFS reference at {pos} (disk {disk}) overlaps, is out of order or out of range"
                )));
            }
            end = u64::from(pos) + REF_PAGE as u64;
            refs.push(DiskRef {
                pos,
                disk,
                block,
                hash,
            });
        }
        Ok((refs, r.rest().to_vec()))
    }
}

/// Length of a session id: the two hellos' nonces.
pub const SESSION_ID_LEN: usize = 64;

/// What a receiver knows of a session (the answer to QUERY).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not a session of this receiver.
    Unknown = 0,
    /// COMMIT arrived: the guest runs (or ran) here.
    Committed = 1,
    /// No COMMIT arrived, and none will be accepted any more.
    Aborted = 2,
}

/// A message of either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Start`].
    Start(Start),
    /// A compressed chunk batch (`crate::chunks` codes its contents).
    Chunks(Vec<u8>),
    /// End of round N.
    RoundEnd(u32),
    /// The state blob (docs/VMM.md).
    State(Vec<u8>),
    /// Commit.
    Commit,
    /// The source stopped for good.
    Done,
    /// Cancelled.
    Abort,
    /// The guest runs on the receiver.
    Running(Running),
    /// The receiver failed (UTF-8 reason).
    Error(String),
    /// See [`RoundAck`].
    RoundAck(RoundAck),
    /// How did the session with this id end? (A sender in doubt asks on a
    /// new connection.)
    Query([u8; SESSION_ID_LEN]),
    /// The answer.
    Outcome(Outcome),
    /// See [`MachineMsg`].
    Machine(Box<MachineMsg>),
    /// A compressed piece of the hypervisor's stream (one zstd frame).
    Stream(Vec<u8>),
    /// The sender's absolute paths of the kernel and the initrd (empty:
    /// none), which the receiver opens beneath its shared directory.
    BootFiles {
        /// The kernel's path (absolute).
        kernel: String,
        /// The initrd's path (absolute), or empty.
        initrd: String,
    },
    /// See [`StreamRefs`].
    StreamRefs(StreamRefs),
    /// Hashes of consecutive [`SUM_BLOCK`]s of received memory, from block
    /// `first` on.
    Sums {
        /// Index of the first block.
        first: u64,
        /// One [`SUM_LEN`]-byte hash per block (1 ..= [`MAX_SUMS`]).
        sums: Vec<[u8; SUM_LEN]>,
    },
}

impl Message {
    /// The message's type.
    pub fn ty(&self) -> Type {
        match self {
            Message::Start(_) => Type::Start,
            Message::Chunks(_) => Type::Chunks,
            Message::RoundEnd(_) => Type::RoundEnd,
            Message::State(_) => Type::State,
            Message::Commit => Type::Commit,
            Message::Done => Type::Done,
            Message::Abort => Type::Abort,
            Message::Running(_) => Type::Running,
            Message::Error(_) => Type::Error,
            Message::RoundAck(_) => Type::RoundAck,
            Message::Query(_) => Type::Query,
            Message::Outcome(_) => Type::Outcome,
            Message::Machine(_) => Type::Machine,
            Message::Stream(_) => Type::Stream,
            Message::BootFiles { .. } => Type::BootFiles,
            Message::StreamRefs(_) => Type::StreamRefs,
            Message::Sums { .. } => Type::Sums,
        }
    }

    /// The plaintext body.
    pub fn encode(self) -> Vec<u8> {
        match self {
            Message::Chunks(b) | Message::State(b) | Message::Stream(b) => b,
            Message::Sums { first, sums } => {
                let mut w = Writer::with_capacity(8 + sums.len() * SUM_LEN);
                w.u64(first);
                for h in &sums {
                    w.raw(h);
                }
                w.into_inner()
            }
            Message::StreamRefs(m) => {
                let mut w = Writer::with_capacity(8 + m.frame.len());
                w.u32(m.len);
                w.u32(m.count);
                w.raw(&m.frame);
                w.into_inner()
            }
            Message::Machine(m) => {
                let json = serde_json::to_vec(&m.spec).expect("plain data serialises");
                let mut w = Writer::new();
                w.u64(m.kernel_size);
                w.u64(m.initrd_size);
                w.bytes(&json);
                w.into_inner()
            }
            Message::BootFiles { kernel, initrd } => {
                let mut w = Writer::new();
                w.bytes(kernel.as_bytes());
                w.bytes(initrd.as_bytes());
                w.into_inner()
            }
            Message::Commit | Message::Done | Message::Abort => Vec::new(),
            Message::RoundEnd(n) => n.to_le_bytes().to_vec(),
            Message::Query(id) => id.to_vec(),
            Message::Outcome(o) => vec![o as u8],
            Message::Error(s) => {
                let mut b = s.into_bytes();
                b.truncate(MAX_REASON);
                b
            }
            Message::Start(s) => {
                let mut w = Writer::new();
                w.u64(s.memory_size);
                w.u32(s.vcpus);
                w.u32(s.disks.len() as u32);
                w.u8(u8::from(s.shared_disk) | (u8::from(s.stream) << 1));
                w.zeros(3);
                for d in &s.disks {
                    w.u64(d.size);
                    w.bytes(d.path.as_bytes());
                }
                w.into_inner()
            }
            Message::RoundAck(a) => {
                let mut w = Writer::new();
                w.u32(a.round);
                w.u64(a.apply_us);
                w.u64(a.blocks_hashed);
                w.u64(a.hash_us);
                w.u64(a.fixed_us);
                w.into_inner()
            }
            Message::Running(r) => {
                let mut w = Writer::new();
                for v in [
                    r.apply_us,
                    r.blocks_hashed,
                    r.hash_us,
                    r.commit_us,
                    r.restore_us,
                    r.delay_us,
                ] {
                    w.u64(v);
                }
                w.into_inner()
            }
        }
    }

    /// Parses the body of a message of type `ty`, checking every field.
    pub fn decode(ty: Type, body: Vec<u8>) -> Result<Message> {
        let mut r = Reader::new(&body, ty.name());
        let m = match ty {
            Type::Chunks => return Ok(Message::Chunks(body)),
            Type::State => return Ok(Message::State(body)),
            Type::Stream => return Ok(Message::Stream(body)),
            Type::Machine => Message::Machine(Box::new(decode_machine(&mut r)?)),
            Type::StreamRefs => {
                let len = r.u32()?;
                let count = r.count(MAX_REFS, "STREAM_REFS count")?;
                if len as usize > MAX_STREAM_CHUNK || count == 0 || count * REF_PAGE > len as usize
                {
                    return Err(ProtocolError::Invalid(format!(
                        "STREAM_REFS of {len} bytes with {count} references"
                    )));
                }
                return Ok(Message::StreamRefs(StreamRefs {
                    len,
                    count: count as u32,
                    frame: r.rest().to_vec(),
                }));
            }
            Type::BootFiles => {
                let kernel = boot_path(&mut r, "kernel", false)?;
                let initrd = boot_path(&mut r, "initrd", true)?;
                Message::BootFiles { kernel, initrd }
            }
            Type::Sums => {
                let first = r.u64()?;
                let n = (body.len() - 8.min(body.len())) / SUM_LEN;
                if n == 0 || n > MAX_SUMS || !(body.len() - 8).is_multiple_of(SUM_LEN) {
                    return Err(ProtocolError::Invalid(format!(
                        "SUMS of {} bytes",
                        body.len()
                    )));
                }
                let mut sums = Vec::with_capacity(n);
                for _ in 0..n {
                    sums.push(r.array::<SUM_LEN>()?);
                }
                Message::Sums { first, sums }
            }
            Type::Error => {
                if body.len() > MAX_REASON {
                    return Err(ProtocolError::Invalid("ERROR reason too long".into()));
                }
                return Ok(Message::Error(String::from_utf8_lossy(&body).into_owned()));
            }
            Type::Commit => Message::Commit,
            Type::Done => Message::Done,
            Type::Abort => Message::Abort,
            Type::RoundEnd => Message::RoundEnd(r.u32()?),
            Type::RoundAck => Message::RoundAck(RoundAck {
                round: r.u32()?,
                apply_us: r.u64()?,
                blocks_hashed: r.u64()?,
                hash_us: r.u64()?,
                fixed_us: r.u64()?,
            }),
            Type::Running => Message::Running(Running {
                apply_us: r.u64()?,
                blocks_hashed: r.u64()?,
                hash_us: r.u64()?,
                commit_us: r.u64()?,
                restore_us: r.u64()?,
                delay_us: r.u64()?,
            }),
            Type::Start => Message::Start(decode_start(&mut r)?),
            Type::Query => Message::Query(r.array()?),
            Type::Outcome => Message::Outcome(match r.u8()? {
                0 => Outcome::Unknown,
                1 => Outcome::Committed,
                2 => Outcome::Aborted,
                o => return Err(ProtocolError::Invalid(format!("outcome {o}"))),
            }),
        };
        r.finish()?;
        Ok(m)
    }
}

fn decode_start(r: &mut Reader<'_>) -> Result<Start> {
    let memory_size = r.u64()?;
    let vcpus = r.u32()?;
    let ndisks = r.count(MAX_DISKS, "START disk count")?;
    let flags = r.u8()?;
    if flags > 3 {
        return Err(ProtocolError::Reserved("START flags"));
    }
    r.zeros(3, "START")
        .map_err(|_| ProtocolError::Reserved("START"))?;
    if memory_size == 0 || memory_size % CHUNK != 0 || memory_size > MAX_MEMORY {
        return Err(ProtocolError::Invalid(format!(
            "START announces {memory_size} bytes of memory"
        )));
    }
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(ProtocolError::Invalid(format!(
            "START announces {vcpus} vCPUs"
        )));
    }
    let shared_disk = flags & 1 == 1;
    let stream = flags & 2 == 2;
    let mut disks = Vec::with_capacity(ndisks);
    for i in 0..ndisks {
        let size = r.u64()?;
        if size > MAX_DISK_SIZE {
            return Err(ProtocolError::Invalid(format!(
                "START announces disk {i} of {size} bytes"
            )));
        }
        let path = r.bytes(MAX_PATH, "START disk path")?;
        let path = std::str::from_utf8(path)
            .map_err(|_| ProtocolError::Invalid(format!("disk {i}'s path is not UTF-8")))?
            .to_string();
        if shared_disk == path.is_empty() || (shared_disk && !path.starts_with('/')) {
            return Err(ProtocolError::Invalid(format!(
                "disk {i}'s path must be absolute for a shared disk and empty otherwise"
            )));
        }
        disks.push(DiskInfo { size, path });
    }
    Ok(Start {
        memory_size,
        vcpus,
        shared_disk,
        stream,
        disks,
    })
}

/// One path of BOOT_FILES: UTF-8, at most [`MAX_PATH`] bytes, absolute
/// (or empty where `may_be_empty`).
fn boot_path(r: &mut Reader<'_>, what: &str, may_be_empty: bool) -> Result<String> {
    let p = r.bytes(MAX_PATH, "BOOT_FILES path")?;
    let p = std::str::from_utf8(p).map_err(|_| {
        ProtocolError::Invalid(format!("BOOT_FILES: the {what}'s path is not UTF-8"))
    })?;
    if !(p.starts_with('/') || (may_be_empty && p.is_empty())) {
        return Err(ProtocolError::Invalid(format!(
            "BOOT_FILES: the {what}'s path must be absolute"
        )));
    }
    Ok(p.to_string())
}

fn decode_machine(r: &mut Reader<'_>) -> Result<MachineMsg> {
    let kernel_size = r.u64()?;
    let initrd_size = r.u64()?;
    if kernel_size == 0 || kernel_size > MAX_BOOT_FILE || initrd_size > MAX_BOOT_FILE {
        return Err(ProtocolError::Invalid(format!(
            "MACHINE announces a kernel of {kernel_size} bytes and an initrd of {initrd_size}"
        )));
    }
    let json = r.bytes(MAX_DESCRIPTION, "MACHINE description")?;
    let spec: kimberley_formats::vmdir::MachineSpec = serde_json::from_slice(json)
        .map_err(|e| ProtocolError::Invalid(format!("MACHINE description: {e}")))?;
    spec.validate()
        .map_err(|e| ProtocolError::Invalid(format!("MACHINE description: {e}")))?;
    Ok(MachineMsg {
        kernel_size,
        initrd_size,
        spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineMsg {
        MachineMsg {
            kernel_size: 1 << 20,
            initrd_size: 0,
            spec: kimberley_formats::vmdir::MachineSpec {
                backend: "qemu".into(),
                version: "7.2.19".into(),
                machine_type: "pc-i440fx-7.2".into(),
                accel: "tcg".into(),
                cpu: "qemu64".into(),
                cmdline: "console=ttyS0".into(),
                devices: vec!["isa-serial".into()],
            },
        }
    }

    fn all() -> Vec<Message> {
        vec![
            Message::Start(Start {
                memory_size: 64 << 20,
                vcpus: 2,
                shared_disk: true,
                stream: true,
                disks: vec![DiskInfo {
                    size: 1 << 20,
                    path: "/srv/d.raw".into(),
                }],
            }),
            Message::Start(Start {
                memory_size: 4096,
                vcpus: 1,
                shared_disk: false,
                stream: false,
                disks: vec![],
            }),
            Message::Chunks(vec![1, 2, 3]),
            Message::RoundEnd(7),
            Message::State(vec![9; 100]),
            Message::Commit,
            Message::Done,
            Message::Abort,
            Message::Running(Running {
                apply_us: 1,
                blocks_hashed: 2,
                hash_us: 3,
                commit_us: 4,
                restore_us: 5,
                delay_us: 6,
            }),
            Message::Error("no space left".into()),
            Message::RoundAck(RoundAck {
                round: 3,
                apply_us: 10,
                blocks_hashed: 4,
                hash_us: 900,
                fixed_us: 5000,
            }),
            Message::Query([5; SESSION_ID_LEN]),
            Message::Outcome(Outcome::Committed),
            Message::Outcome(Outcome::Aborted),
            Message::Outcome(Outcome::Unknown),
            Message::Machine(Box::new(machine())),
            Message::Stream(vec![4; 10]),
            Message::BootFiles {
                kernel: "/srv/vm/kernel".into(),
                initrd: "/srv/vm/initrd".into(),
            },
            Message::BootFiles {
                kernel: "/srv/vm/kernel".into(),
                initrd: String::new(),
            },
            Message::Sums {
                first: 3,
                sums: vec![[1; SUM_LEN], [2; SUM_LEN]],
            },
            Message::StreamRefs(StreamRefs {
                len: 3 * REF_PAGE as u32 + 9,
                count: 2,
                frame: vec![1, 2, 3],
            }),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all() {
            let t = m.ty();
            let h = FrameHeader::for_body(t, m.clone().encode().len());
            let reader = match t.sent_by() {
                Role::Sender => Role::Receiver,
                Role::Receiver => Role::Sender,
            };
            assert_eq!(FrameHeader::decode(&h.encode(), reader), Ok(h));
            assert_eq!(Message::decode(t, m.clone().encode()), Ok(m));
        }
    }

    #[test]
    fn refusals() {
        // A type sent in the wrong direction, an unknown type, bad flags.
        let h = FrameHeader::for_body(Type::Start, 0).encode();
        assert!(FrameHeader::decode(&h, Role::Sender).is_err());
        let mut bad = h;
        bad[0] = 9;
        assert!(FrameHeader::decode(&bad, Role::Receiver).is_err());
        let mut bad = h;
        bad[1] = 1; // START is not a last message
        assert!(FrameHeader::decode(&bad, Role::Receiver).is_err());
        let mut bad = h;
        bad[3] = 1;
        assert!(FrameHeader::decode(&bad, Role::Receiver).is_err());
        let mut bad = h;
        bad[4..8].copy_from_slice(&((MAX_SEALED + 1) as u32).to_le_bytes());
        assert!(FrameHeader::decode(&bad, Role::Receiver).is_err());
        // Trailing bytes, truncation.
        assert!(Message::decode(Type::RoundEnd, vec![0; 5]).is_err());
        assert!(Message::decode(Type::RoundEnd, vec![0; 3]).is_err());
        assert!(Message::decode(Type::Commit, vec![0]).is_err());
        assert!(Message::decode(Type::Outcome, vec![3]).is_err());
        assert!(Message::decode(Type::Query, vec![0; 63]).is_err());
        // START: a relative or unexpected path, too many disks, bad sizes.
        let start = |shared: bool, path: &str, mem: u64| {
            Message::Start(Start {
                memory_size: mem,
                vcpus: 1,
                shared_disk: shared,
                stream: false,
                disks: vec![DiskInfo {
                    size: 4096,
                    path: path.into(),
                }],
            })
            .encode()
        };
        assert!(Message::decode(Type::Start, start(true, "rel/x", 4096)).is_err());
        assert!(Message::decode(Type::Start, start(false, "/x", 4096)).is_err());
        assert!(Message::decode(Type::Start, start(true, "", 4096)).is_err());
        assert!(Message::decode(Type::Start, start(false, "", 4095)).is_err());
        assert!(Message::decode(Type::Start, start(false, "", 0)).is_err());
        let mut b = start(false, "", 4096);
        b[12..16].copy_from_slice(&9u32.to_le_bytes());
        assert!(Message::decode(Type::Start, b).is_err());
        let mut b = start(false, "", 4096);
        b[16] = 4;
        assert!(Message::decode(Type::Start, b).is_err());
        // MACHINE: no kernel, a huge initrd, an unknown or bad description.
        let m = |f: &dyn Fn(&mut MachineMsg)| {
            let mut m = machine();
            f(&mut m);
            Message::Machine(Box::new(m)).encode()
        };
        assert!(Message::decode(Type::Machine, m(&|m| m.kernel_size = 0)).is_err());
        assert!(Message::decode(Type::Machine, m(&|m| m.initrd_size = MAX_BOOT_FILE + 1)).is_err());
        assert!(Message::decode(Type::Machine, m(&|m| m.spec.cpu = String::new())).is_err());
        let mut b = m(&|_| {});
        let n = b.len();
        b[n - 1] = b'x';
        assert!(Message::decode(Type::Machine, b).is_err());
        // BOOT_FILES: a relative or missing kernel, a relative initrd,
        // bytes left over.
        let bf = |k: &str, i: &str| {
            Message::BootFiles {
                kernel: k.into(),
                initrd: i.into(),
            }
            .encode()
        };
        assert!(Message::decode(Type::BootFiles, bf("kernel", "")).is_err());
        assert!(Message::decode(Type::BootFiles, bf("", "/i")).is_err());
        assert!(Message::decode(Type::BootFiles, bf("/k", "initrd")).is_err());
        let mut b = bf("/k", "");
        b.push(0);
        assert!(Message::decode(Type::BootFiles, b).is_err());
        // SUMS: none, a partial hash, too many.
        assert!(Message::decode(Type::Sums, vec![0; 8]).is_err());
        assert!(Message::decode(Type::Sums, vec![0; 8 + SUM_LEN + 1]).is_err());
        assert!(Message::decode(Type::Sums, vec![0; 4]).is_err());
        assert!(Message::decode(Type::Sums, vec![0; 8 + (MAX_SUMS + 1) * SUM_LEN]).is_err());
        // STREAM_REFS: what seal codes opens to the same; overlapping,
        // out of the piece, a bad disk, reserved bytes, a frame of another
        // size; no references or more than the piece holds.
        let piece: Vec<u8> = (0..3 * REF_PAGE + 9).map(|i| (i * 7) as u8).collect();
        let refs = vec![
            DiskRef {
                pos: 9,
                disk: 0,
                block: 1,
                hash: 5,
            },
            DiskRef {
                pos: 9 + REF_PAGE as u32,
                disk: 7,
                block: u32::MAX,
                hash: 6,
            },
        ];
        let m =
            StreamRefs::seal(&piece, &refs, &mut zstd::bulk::Compressor::new(1).unwrap()).unwrap();
        let back = Message::decode(Type::StreamRefs, Message::StreamRefs(m.clone()).encode());
        assert_eq!(back, Ok(Message::StreamRefs(m.clone())));
        let (r2, lit) = m.open().unwrap();
        assert_eq!(r2, refs);
        let mut want = piece[..9].to_vec();
        want.extend(&piece[9 + 2 * REF_PAGE..]);
        assert_eq!(lit, want);
        let bad = |f: &dyn Fn(&mut Vec<DiskRef>)| {
            let mut r = refs.clone();
            f(&mut r);
            // Coded by hand: seal would not write these.
            let mut w = Writer::new();
            for x in &r {
                w.u32(x.pos);
                w.u8(x.disk);
                w.zeros(3);
                w.u32(x.block);
                w.u64(x.hash);
            }
            w.raw(&want);
            StreamRefs {
                len: piece.len() as u32,
                count: r.len() as u32,
                frame: zstd::bulk::compress(&w.into_inner(), 1).unwrap(),
            }
            .open()
        };
        assert!(bad(&|_| {}).is_ok());
        assert!(bad(&|r| r[1].pos -= 1).is_err());
        assert!(bad(&|r| r[1].pos = 2 * REF_PAGE as u32 + 10).is_err());
        assert!(bad(&|r| r[0].disk = 8).is_err());
        let mut m2 = m.clone();
        m2.len += 1;
        assert!(m2.open().is_err());
        let mut w = Writer::new();
        w.u32(9);
        w.u8(0);
        w.raw(&[0, 1, 0]);
        w.u32(0);
        w.u64(0);
        w.raw(&vec![0; REF_PAGE]);
        let reserved = StreamRefs {
            len: 9 + 2 * REF_PAGE as u32,
            count: 1,
            frame: zstd::bulk::compress(&w.into_inner(), 1).unwrap(),
        };
        assert!(reserved.open().is_err());
        let head = |len: u32, count: u32| {
            let mut b = len.to_le_bytes().to_vec();
            b.extend(count.to_le_bytes());
            b.extend([1, 2, 3]);
            Message::decode(Type::StreamRefs, b)
        };
        assert!(head(4096, 1).is_ok());
        assert!(head(4096, 0).is_err());
        assert!(head(4095, 1).is_err());
        assert!(head(MAX_STREAM_CHUNK as u32 + 1, 1).is_err());
        // Hellos.
        let h = Hello {
            role: Role::Sender,
            nonce: [7; 32],
        };
        let e = h.encode();
        assert_eq!(Hello::decode(&e, Role::Sender), Ok(h));
        assert!(Hello::decode(&e, Role::Receiver).is_err());
        let mut v = e;
        v[8] = 1;
        assert_eq!(
            Hello::decode(&v, Role::Sender),
            Err(ProtocolError::Version(1))
        );
        let mut r = e;
        r[12] = 1;
        assert!(Hello::decode(&r, Role::Sender).is_err());
    }
}
