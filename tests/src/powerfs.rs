//! A FUSE filesystem that can lose power, for testing what survives a power cut (like
//! Jepsen's lazyfs).
//!
//! Everything lives in memory. Each file has two contents: what its writers see (the
//! page cache, in effect) and what has reached the "disk" — the contents as of its last
//! `fsync`/`fdatasync`. [`PowerFs::power_cut`] throws away everything not fsynced: every
//! file goes back to its contents at its last fsync (empty if it never had one), as after
//! a power loss of a machine whose disk honours flushes.
//!
//! A write through a file opened with `O_SYNC` or `O_DSYNC` is durable when it returns,
//! as the flags promise (nats-server writes its stream metadata that way).
//!
//! Simplifications, each on the side of losing less than a real machine could: directory
//! operations (create, rename, unlink, mkdir) are durable at once (a real filesystem may
//! lose those too until the directory is fsynced); a file keeps its fsynced bytes whole
//! (no torn sectors). So a loss this filesystem shows is a loss a real power cut causes;
//! the converse need not hold.
//!
//! Files are served with `direct_io`, so the kernel keeps no page cache of its own that
//! would survive the cut, and attributes are never cached.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

const NO_CACHE: Duration = Duration::ZERO;

enum Content {
    File {
        /// What readers see.
        live: Vec<u8>,
        /// What survives a power cut: `live` as of the last fsync.
        durable: Vec<u8>,
    },
    Dir {
        children: BTreeMap<OsString, u64>,
    },
}

struct Node {
    content: Content,
    perm: u16,
    mtime: SystemTime,
}

struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    fsyncs: u64,
    cuts: u64,
}

/// A handle on a mounted [`PowerFs`]: cut the power, count fsyncs. Unmounts on drop.
pub struct PowerFs {
    state: Arc<Mutex<State>>,
    _session: fuser::BackgroundSession,
}

impl PowerFs {
    /// Mounts an empty filesystem on `mountpoint` (an existing, empty directory).
    ///
    /// # Panics
    /// When FUSE is not available (no `/dev/fuse`, or not allowed to mount).
    pub fn mount(mountpoint: &Path) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            INodeNo::ROOT.0,
            Node {
                content: Content::Dir {
                    children: BTreeMap::new(),
                },
                perm: 0o755,
                mtime: SystemTime::now(),
            },
        );
        let state = Arc::new(Mutex::new(State {
            nodes,
            next_ino: 2,
            fsyncs: 0,
            cuts: 0,
        }));
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("callcap-powerfs".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        let session = fuser::spawn_mount(
            Fs {
                state: state.clone(),
            },
            mountpoint,
            &config,
        )
        .unwrap_or_else(|e| {
            panic!(
                "mounting the power-loss filesystem on {} failed: {e} (needs /dev/fuse and \
                 permission to mount, e.g. root)",
                mountpoint.display()
            )
        });
        PowerFs {
            state,
            _session: session,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("powerfs state lock")
    }

    /// Drops every write not fsynced. Stop (kill -9) the programs using the filesystem
    /// first: like a machine losing power, nothing they do afterwards on old handles
    /// is meaningful.
    pub fn power_cut(&self) {
        let mut s = self.lock();
        s.cuts += 1;
        for node in s.nodes.values_mut() {
            if let Content::File { live, durable } = &mut node.content {
                live.clone_from(durable);
            }
        }
    }

    /// How many fsync/fdatasync calls reached the filesystem.
    pub fn fsyncs(&self) -> u64 {
        self.lock().fsyncs
    }

    /// Bytes written but not fsynced (what a power cut now would lose).
    pub fn unsynced_bytes(&self) -> u64 {
        self.lock()
            .nodes
            .values()
            .map(|n| match &n.content {
                Content::File { live, durable } if live != durable => {
                    live.len().max(durable.len()) as u64
                }
                _ => 0,
            })
            .sum()
    }
}

struct Fs {
    state: Arc<Mutex<State>>,
}

impl Fs {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("powerfs state lock")
    }
}

fn attr(ino: u64, node: &Node) -> FileAttr {
    let (kind, size, nlink) = match &node.content {
        Content::File { live, .. } => (FileType::RegularFile, live.len() as u64, 1),
        Content::Dir { .. } => (FileType::Directory, 4096, 2),
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: node.mtime,
        mtime: node.mtime,
        ctime: node.mtime,
        crtime: node.mtime,
        kind,
        perm: node.perm,
        nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl State {
    fn child(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        match self.nodes.get(&parent).map(|n| &n.content) {
            Some(Content::Dir { children }) => children.get(name).copied().ok_or(Errno::ENOENT),
            Some(Content::File { .. }) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn children_mut(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.nodes.get_mut(&dir).map(|n| &mut n.content) {
            Some(Content::Dir { children }) => Ok(children),
            Some(Content::File { .. }) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn add(
        &mut self,
        parent: u64,
        name: &OsStr,
        content: Content,
        mode: u32,
    ) -> Result<u64, Errno> {
        if self.child(parent, name).is_ok() {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.children_mut(parent)?.insert(name.to_owned(), ino);
        self.nodes.insert(
            ino,
            Node {
                content,
                perm: (mode & 0o7777) as u16,
                mtime: SystemTime::now(),
            },
        );
        Ok(ino)
    }

    fn file_mut(
        &mut self,
        ino: u64,
    ) -> Result<(&mut Vec<u8>, &mut Vec<u8>, &mut SystemTime), Errno> {
        match self.nodes.get_mut(&ino) {
            Some(Node {
                content: Content::File { live, durable },
                mtime,
                ..
            }) => Ok((live, durable, mtime)),
            Some(_) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = self.lock();
        match s.child(parent.0, name) {
            Ok(ino) => reply.entry(&NO_CACHE, &attr(ino, &s.nodes[&ino]), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let s = self.lock();
        match s.nodes.get(&ino.0) {
            Some(node) => reply.attr(&NO_CACHE, &attr(ino.0, node)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.lock();
        if let Some(size) = size {
            match s.file_mut(ino.0) {
                Ok((live, _, mtime)) => {
                    live.resize(usize::try_from(size).unwrap_or(usize::MAX), 0);
                    *mtime = SystemTime::now();
                }
                Err(e) => return reply.error(e),
            }
        }
        match s.nodes.get_mut(&ino.0) {
            Some(node) => {
                if let Some(mode) = mode {
                    node.perm = (mode & 0o7777) as u16;
                }
                reply.attr(&NO_CACHE, &attr(ino.0, node));
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.lock();
        let dir = Content::Dir {
            children: BTreeMap::new(),
        };
        match s.add(parent.0, name, dir, mode) {
            Ok(ino) => reply.entry(&NO_CACHE, &attr(ino, &s.nodes[&ino]), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.lock();
        let file = Content::File {
            live: Vec::new(),
            durable: Vec::new(),
        };
        match s.add(parent.0, name, file, mode) {
            Ok(ino) => reply.created(
                &NO_CACHE,
                &attr(ino, &s.nodes[&ino]),
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut s = self.lock();
        match s.file_mut(ino.0) {
            Ok((live, _, _)) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(live.len());
                let end = start.saturating_add(size as usize).min(live.len());
                reply.data(&live[start..end]);
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.lock();
        // O_SYNC includes the O_DSYNC bit: either makes each write durable on return.
        let synchronous = flags.0 & libc::O_DSYNC != 0;
        match s.file_mut(ino.0) {
            Ok((live, durable, mtime)) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                let end = start.saturating_add(data.len());
                if live.len() < end {
                    live.resize(end, 0);
                }
                live[start..end].copy_from_slice(data);
                if synchronous {
                    durable.clone_from(live);
                }
                *mtime = SystemTime::now();
                reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX));
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() is not a flush to disk.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        s.fsyncs += 1;
        match s.file_mut(ino.0) {
            Ok((live, durable, _)) => {
                durable.clone_from(live);
                reply.ok();
            }
            // fsync of a directory through a file handle: directory changes are already
            // durable here.
            Err(_) => reply.ok(),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.lock();
        // The inode stays (open handles may still read it) until the filesystem goes.
        match s.children_mut(parent.0).map(|c| c.remove(name)) {
            Ok(Some(_)) => reply.ok(),
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.lock();
        let ino = match s.child(parent.0, name) {
            Ok(ino) => ino,
            Err(e) => return reply.error(e),
        };
        match s.nodes.get(&ino).map(|n| &n.content) {
            Some(Content::Dir { children }) if children.is_empty() => {}
            Some(Content::Dir { .. }) => return reply.error(Errno::ENOTEMPTY),
            _ => return reply.error(Errno::ENOTDIR),
        }
        if let Ok(c) = s.children_mut(parent.0) {
            c.remove(name);
        }
        s.nodes.remove(&ino);
        reply.ok();
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let ino = match s.child(parent.0, name) {
            Ok(ino) => ino,
            Err(e) => return reply.error(e),
        };
        if let Err(e) = s.children_mut(newparent.0) {
            return reply.error(e);
        }
        if let Ok(c) = s.children_mut(parent.0) {
            c.remove(name);
        }
        if let Ok(c) = s.children_mut(newparent.0) {
            c.insert(newname.to_owned(), ino);
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let s = self.lock();
        let Some(Content::Dir { children }) = s.nodes.get(&ino.0).map(|n| &n.content) else {
            return reply.error(Errno::ENOTDIR);
        };
        let entries = [
            (ino.0, FileType::Directory, OsString::from(".")),
            (ino.0, FileType::Directory, OsString::from("..")),
        ]
        .into_iter()
        .chain(children.iter().map(|(name, &child)| {
            let kind = match s.nodes.get(&child).map(|n| &n.content) {
                Some(Content::Dir { .. }) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            (child, kind, name.clone())
        }));
        for (i, (child, kind, name)) in entries
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: fuser::ReplyStatfs) {
        // Plenty of room: 64 GiB in 4 KiB blocks, all free.
        let blocks = 16 * 1024 * 1024;
        reply.statfs(blocks, blocks, blocks, 1 << 20, 1 << 20, 4096, 255, 4096);
    }
}
