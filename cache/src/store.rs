//! The content-addressed object store: immutable blobs under `objects/ab/cdef…`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::hash::{hash_bytes, hash_file, Hash, StatKey};
use crate::machine::process_alive;
use crate::{CacheError, Result};

/// A stage output: every file it wrote, by relative path, sorted. Stored as a JSON blob whose
/// hash is the output's identity, so identical outputs are stored and keyed once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub entries: Vec<TreeEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// Relative, `/`-separated.
    pub path: String,
    pub blob: Hash,
    pub size: u64,
    pub executable: bool,
    /// Permission bits to restore, when narrower than the default (0644, or 0755 when
    /// `executable`): see [`recorded_mode`]. Absent for ordinary files, so that their trees
    /// serialise, and hash, exactly as before the field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

impl TreeEntry {
    /// The permission bits a restored copy gets: never wider than the file that was stored.
    pub fn restore_mode(&self) -> u32 {
        self.mode.unwrap_or_else(|| default_mode(self.executable))
    }
}

fn default_mode(executable: bool) -> u32 {
    if executable {
        0o755
    } else {
        0o644
    }
}

/// What a tree records of a file's permission bits `perm`: the default narrowed to them,
/// `None` when that is the default itself. A `0600` file is restored `0600`, a `0664` one
/// `0644` (narrower than the source, as every restore was before): a restore never widens.
pub fn recorded_mode(perm: u32) -> Option<u32> {
    let default = default_mode(perm & 0o111 != 0);
    let mode = perm & default;
    (mode != default).then_some(mode)
}

impl Tree {
    pub fn total_size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
    pub fn get(&self, path: &str) -> Option<&TreeEntry> {
        self.entries
            .binary_search_by(|e| e.path.as_str().cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }
}

/// The `objects/` and `tmp/` folders of a cache.
pub struct Store {
    objects: PathBuf,
    /// `objects/`, open, so an object's stat walks two path components, not the whole path
    /// (a no-op run stats every object it reuses).
    objects_dir: std::fs::File,
    tmp: PathBuf,
}

/// A private folder under `tmp/`, removed when dropped. Its name starts with the owner's pid
/// space and pid (see [`scratch_name`]) so that a later process can tell leftovers of dead
/// processes from live work, and leaves alone what it cannot tell.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

/// Removes a folder even where an op left read-only subfolders.
fn remove_tree(path: &Path) {
    if std::fs::remove_dir_all(path).is_ok() || !path.exists() {
        return;
    }
    for entry in walkdir::WalkDir::new(path).into_iter().flatten() {
        if entry.file_type().is_dir() {
            let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o755));
        }
    }
    let _ = std::fs::remove_dir_all(path);
}

static SCRATCH_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// The store of an existing cache, without its database: for workers on other machines,
    /// which write objects but leave recording to the driver.
    pub fn open_existing(root: &Path) -> Result<Self> {
        if !root.join("objects").is_dir() {
            return Err(CacheError::io(
                root.join("objects"),
                std::io::Error::new(std::io::ErrorKind::NotFound, "no object store here"),
            ));
        }
        Self::open(root)
    }

    pub(crate) fn open(root: &Path) -> Result<Self> {
        let objects = root.join("objects");
        let tmp = root.join("tmp");
        for dir in [&objects, &tmp] {
            std::fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
        }
        let objects_dir = std::fs::File::open(&objects).map_err(|e| CacheError::io(&objects, e))?;
        Ok(Self {
            objects,
            objects_dir,
            tmp,
        })
    }

    /// Where the blob `hash` lives (whether or not it exists).
    pub fn object_path(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.objects.join(&hex[..2]).join(&hex[2..])
    }

    /// The stat of the object `hash`, looked up relative to the open `objects/` folder.
    pub(crate) fn object_stat(&self, hash: &Hash) -> std::io::Result<StatKey> {
        use std::os::unix::io::AsRawFd;
        let hex = blake3::Hash::from_bytes(*hash.as_bytes()).to_hex();
        // "ab/cdef…" and a NUL, on the stack.
        let mut rel = [0u8; 2 + 1 + 62 + 1];
        rel[..2].copy_from_slice(&hex.as_bytes()[..2]);
        rel[2] = b'/';
        rel[3..65].copy_from_slice(&hex.as_bytes()[2..]);
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `rel` is NUL-terminated, the folder descriptor is owned by `self` and open,
        // and `st` is written by the call before it is read (only when it returns 0).
        let r = unsafe {
            libc::fstatat(
                self.objects_dir.as_raw_fd(),
                rel.as_ptr().cast(),
                st.as_mut_ptr(),
                0,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fstatat returned 0, so it filled `st`.
        let st = unsafe { st.assume_init() };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(std::io::Error::other("not a regular file"));
        }
        // The field types differ between targets, hence the casts (no-ops on x86_64 Linux).
        #[allow(clippy::unnecessary_cast)]
        Ok(StatKey {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime as i64 * 1_000_000_000 + st.st_mtime_nsec as i64,
        })
    }

    pub fn contains(&self, hash: &Hash) -> bool {
        self.object_path(hash).is_file()
    }

    /// A fresh private folder under `tmp/`.
    pub fn scratch(&self) -> Result<Scratch> {
        let n = SCRATCH_COUNTER.fetch_add(1, Ordering::SeqCst);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = self.tmp.join(scratch_name(&format!("{n}-{nanos}")));
        std::fs::create_dir_all(&path).map_err(|e| CacheError::io(&path, e))?;
        Ok(Scratch { path })
    }

    /// Where a file proving the cache is writable is written (and at once removed): named
    /// like scratch, so a leftover is reaped like scratch.
    pub(crate) fn probe_path(&self) -> PathBuf {
        self.tmp.join(scratch_name("probe"))
    }

    /// Removes `tmp/` entries of dead processes of this pid space (a killed run's
    /// half-written output). Entries of other pid spaces (another host sharing the cache,
    /// a container, before a reboot) are left alone: their pid means nothing here. With
    /// `legacy`, entries named the old way (`<pid>-…`, no pid space) whose pid is not alive
    /// here go too: only safe under the exclusive lock, when no engine run is in progress.
    pub(crate) fn clean_stale_scratch(&self, legacy: bool) -> Result<()> {
        let entries = std::fs::read_dir(&self.tmp).map_err(|e| CacheError::io(&self.tmp, e))?;
        // One grace period for the whole sweep, however many dying supervisors there are.
        let grace_ends = std::time::Instant::now() + DYING_SUPERVISOR_GRACE;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let stale = match ScratchOwner::of(&name.to_string_lossy()) {
                ScratchOwner::Here(pid) => {
                    !process_alive(pid) && !live_work_after(&entry.path(), grace_ends)
                }
                ScratchOwner::Legacy(pid) => legacy && !process_alive(pid),
                ScratchOwner::Elsewhere | ScratchOwner::Unknown => false,
            };
            if stale {
                tracing::debug!("removing leftover scratch {}", entry.path().display());
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&entry.path());
                } else {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    /// Whether processes of the dead engine `pid` (of this pid space) still work in one of
    /// its scratch folders: a stage's command supervisor holds a shared `flock` on the
    /// stage's output folder until the last process of the command is gone (see
    /// `ops::supervisor`). A take-over of that engine's claims waits for this to turn false,
    /// so a stage never runs twice at once.
    pub fn holds_live_work_of(&self, pid: i32) -> bool {
        let Ok(entries) = std::fs::read_dir(&self.tmp) else {
            return false;
        };
        entries.flatten().any(|entry| {
            matches!(ScratchOwner::of(&entry.file_name().to_string_lossy()), ScratchOwner::Here(p) if p == pid)
                && holds_live_work(&entry.path())
        })
    }

    /// Stores a file this process wrote in one of its own scratch folders (moving it, when the
    /// store lacks it); returns its hash.
    pub fn put_scratch_file(&self, path: &Path) -> Result<Hash> {
        let hash = hash_file(path)?;
        self.install(path, &hash, false)?;
        Ok(hash)
    }

    /// Stores bytes; returns their hash. Idempotent.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Hash> {
        let hash = hash_bytes(bytes);
        if self.contains(&hash) {
            return Ok(hash);
        }
        let scratch = self.scratch()?;
        let staged = scratch.path().join("blob");
        std::fs::write(&staged, bytes).map_err(|e| CacheError::io(&staged, e))?;
        self.install(&staged, &hash, false)?;
        Ok(hash)
    }

    /// Moves `staged` (a file this process owns and no one else links to, already hashed to
    /// `hash`) into place with one atomic rename. If the object already exists the staged
    /// file is simply dropped. A `private` object (its source had no group or other read
    /// bit) is stored `0400`, and an existing object is narrowed to that, never widened.
    fn install(&self, staged: &Path, hash: &Hash, private: bool) -> Result<()> {
        let dest = self.object_path(hash);
        if !dest.is_file() {
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(|e| CacheError::io(parent, e))?;
            }
            // Safe to chmod: `staged` is this process's own file (a copy, or a file the stage
            // created with a link count of 1), never a user's.
            let mode = if private { 0o400 } else { 0o444 };
            std::fs::set_permissions(staged, std::fs::Permissions::from_mode(mode))
                .map_err(|e| CacheError::io(staged, e))?;
            match std::fs::rename(staged, &dest) {
                Ok(()) => {}
                // Another filesystem (something mounted inside the output folder): copy into
                // tmp first, then rename.
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                    let scratch = self.scratch()?;
                    let local = scratch.path().join("blob");
                    std::fs::copy(staged, &local).map_err(|e| CacheError::io(staged, e))?;
                    std::fs::rename(&local, &dest).map_err(|e| CacheError::io(&dest, e))?;
                }
                Err(e) => return Err(CacheError::io(&dest, e)),
            }
        }
        // Also after our own rename: another process may have installed the same bytes from
        // a readable file meanwhile.
        if private {
            narrow_to_owner(&dest)?;
        }
        Ok(())
    }

    /// Stores every file under `dir` (a scratch folder this process owns; see below) plus
    /// `extra` (tree path -> workspace file or folder, copied), and returns the hash of the
    /// resulting [`Tree`].
    ///
    /// Only a regular file the stage created in `dir`, reached through no symbolic link and
    /// with a link count of 1, is moved into the store (renamed: instant, no copy). Anything
    /// else may be a user's file and is copied, its bytes re-hashed after the copy: a file
    /// reached through a symbolic link (to a file or a folder, at any depth, wherever it
    /// points) is stored as the content of its target, and a hard link to a user's file is
    /// copied without touching its mode. A dangling link, a link loop, a name that is not
    /// UTF-8 or a special file (FIFO, device, socket) is an error naming the path.
    pub fn put_dir(&self, dir: &Path, extra: &[(String, PathBuf)]) -> Result<Hash> {
        let mut files: Vec<Found> = Vec::new();
        collect_files(dir, "", true, &mut files)?;
        for (prefix, source) in extra {
            collect_files(source, prefix, false, &mut files)?;
        }
        // Copies first: a link in the output may lead to a file of the output itself, which
        // must still be where the link points when it is copied.
        let (copies, moves): (Vec<&Found>, Vec<&Found>) =
            files.iter().partition(|f| f.take == Take::Copy);
        let mut entries: Vec<TreeEntry> = copies
            .par_iter()
            .map(|f| self.put_file(f))
            .collect::<Result<_>>()?;
        let moved: Vec<TreeEntry> = moves
            .par_iter()
            .map(|f| self.put_file(f))
            .collect::<Result<_>>()?;
        entries.extend(moved);
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        entries.dedup_by(|a, b| a.path == b.path);
        self.put_tree(&Tree { entries })
    }

    /// Stores one file found by [`collect_files`]; returns its tree entry.
    fn put_file(&self, found: &Found) -> Result<TreeEntry> {
        let path = &found.path;
        // Follows a link the walk followed: the entry describes the target.
        let meta = std::fs::metadata(path).map_err(|e| CacheError::io(path, e))?;
        if !meta.is_file() {
            return Err(CacheError::NotRegular {
                path: path.clone(),
                kind: crate::hash::kind_of(&meta.file_type()),
            });
        }
        let perm = meta.permissions().mode() & 0o777;
        let private = perm & 0o044 == 0;
        let blob = hash_file(path)?;
        match found.take {
            Take::Move => self.install(path, &blob, private)?,
            Take::Copy if self.contains(&blob) => {
                if private {
                    narrow_to_owner(&self.object_path(&blob))?;
                }
            }
            Take::Copy => {
                let scratch = self.scratch()?;
                let staged = scratch.path().join("blob");
                std::fs::copy(path, &staged).map_err(|e| CacheError::io(path, e))?;
                // The file may have changed between hashing and copying.
                let copied = hash_file(&staged)?;
                if copied != blob {
                    return Err(CacheError::io(
                        path,
                        std::io::Error::other("the file changed while it was being stored"),
                    ));
                }
                self.install(&staged, &blob, private)?;
            }
        }
        Ok(TreeEntry {
            path: found.tree_path.clone(),
            blob,
            size: meta.len(),
            executable: perm & 0o111 != 0,
            mode: recorded_mode(perm),
        })
    }

    pub fn put_tree(&self, tree: &Tree) -> Result<Hash> {
        let bytes = serde_json::to_vec(tree).map_err(|e| {
            CacheError::io(
                PathBuf::from("<tree>"),
                std::io::Error::other(e.to_string()),
            )
        })?;
        self.put_bytes(&bytes)
    }

    pub fn read_tree(&self, hash: &Hash) -> Result<Tree> {
        let path = self.object_path(hash);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CacheError::MissingObject(*hash))
            }
            Err(e) => return Err(CacheError::io(path, e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| CacheError::BadTree {
            hash: *hash,
            message: e.to_string(),
        })
    }

    /// Re-hashes one object and compares with its name.
    pub fn verify_object(&self, hash: &Hash) -> Result<()> {
        let path = self.object_path(hash);
        if !path.is_file() {
            return Err(CacheError::MissingObject(*hash));
        }
        let actual = hash_file(&path)?;
        if actual != *hash {
            return Err(CacheError::CorruptObject {
                hash: *hash,
                actual,
            });
        }
        Ok(())
    }

    /// Writes the files of `tree` whose path starts with `prefix` under `dest` (prefix removed).
    /// `link` hard-links objects (read-only, instant; for scratch inputs); otherwise files are
    /// copied and given their recorded mode (for workspace checkouts users may edit). A
    /// restored file is never more permissive than the file that was stored.
    pub fn materialize(&self, tree: &Tree, prefix: &str, dest: &Path, link: bool) -> Result<()> {
        self.materialize_below(tree, prefix, dest, dest, link)
    }

    /// [`Store::materialize`] (copying) into `dest` inside `root`, a folder users own (the
    /// workspace): fails, naming it, if a folder between `root` and a file to write is a
    /// symbolic link, since writing through it would put the file in the link's target.
    pub fn materialize_in(
        &self,
        tree: &Tree,
        prefix: &str,
        root: &Path,
        dest: &Path,
    ) -> Result<()> {
        if !dest.starts_with(root) {
            return Err(CacheError::PathEscape {
                path: dest.to_path_buf(),
            });
        }
        self.materialize_below(tree, prefix, root, dest, false)
    }

    fn materialize_below(
        &self,
        tree: &Tree,
        prefix: &str,
        root: &Path,
        dest: &Path,
        link: bool,
    ) -> Result<()> {
        if prefix.is_empty() {
            refuse_symlinked_folders(root, dest)?;
            std::fs::create_dir_all(dest).map_err(|e| CacheError::io(dest, e))?;
        }
        for entry in &tree.entries {
            let Some(rel) = entry.path.strip_prefix(prefix) else {
                continue;
            };
            // `out` must not match `outputs/x`: the prefix ends at a path boundary.
            if !prefix.is_empty()
                && !rel.is_empty()
                && !rel.starts_with('/')
                && !prefix.ends_with('/')
            {
                continue;
            }
            let rel = rel.trim_start_matches('/');
            let target = if rel.is_empty() {
                dest.to_path_buf()
            } else {
                safe_join(dest, rel)?
            };
            if let Some(parent) = target.parent() {
                refuse_symlinked_folders(root, parent)?;
                std::fs::create_dir_all(parent).map_err(|e| CacheError::io(parent, e))?;
            }
            let source = self.object_path(&entry.blob);
            if !source.is_file() {
                return Err(CacheError::MissingObject(entry.blob));
            }
            if target.exists() || target.is_symlink() {
                std::fs::remove_file(&target).map_err(|e| CacheError::io(&target, e))?;
            }
            if link && std::fs::hard_link(&source, &target).is_ok() {
                continue;
            }
            std::fs::copy(&source, &target).map_err(|e| CacheError::io(&target, e))?;
            // Inputs are read-only, like the objects they would have been linked to.
            let mode = if link {
                entry.restore_mode() & 0o555
            } else {
                entry.restore_mode()
            };
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                .map_err(|e| CacheError::io(&target, e))?;
        }
        Ok(())
    }

    /// Deletes one object (gc, or a corrupt object so that a recomputation can replace it).
    pub fn remove_object(&self, hash: &Hash) -> Result<()> {
        let path = self.object_path(hash);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CacheError::io(path, e)),
        }
    }

    /// Every object hash present (for verify and gc).
    pub fn all_objects(&self) -> Result<Vec<Hash>> {
        let mut out = Vec::new();
        let fans =
            std::fs::read_dir(&self.objects).map_err(|e| CacheError::io(&self.objects, e))?;
        for fan in fans.flatten() {
            let prefix = fan.file_name().to_string_lossy().into_owned();
            let Ok(files) = std::fs::read_dir(fan.path()) else {
                continue;
            };
            for file in files.flatten() {
                let name = format!("{prefix}{}", file.file_name().to_string_lossy());
                if let Ok(h) = name.parse() {
                    out.push(h);
                }
            }
        }
        Ok(out)
    }
}

/// Joins a tree path under `dest`, refusing `..` and absolute components.
fn safe_join(dest: &Path, rel: &str) -> Result<PathBuf> {
    let rel_path = Path::new(rel);
    if rel_path
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(CacheError::PathEscape {
            path: rel_path.to_path_buf(),
        });
    }
    Ok(dest.join(rel_path))
}

/// Fails if a folder on the way from `root` (excluded) down to `dir` (included) exists and is
/// a symbolic link. Folders that do not exist yet end the check: they will be created, real.
fn refuse_symlinked_folders(root: &Path, dir: &Path) -> Result<()> {
    let Ok(below) = dir.strip_prefix(root) else {
        return Ok(());
    };
    let mut at = root.to_path_buf();
    for part in below.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(CacheError::SymlinkInPath { path: at });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(CacheError::io(at, e)),
        }
    }
    Ok(())
}

/// Removes group and other bits from an object (never adds any).
fn narrow_to_owner(object: &Path) -> Result<()> {
    let mode = std::fs::metadata(object)
        .map_err(|e| CacheError::io(object, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(object, std::fs::Permissions::from_mode(mode & 0o700))
            .map_err(|e| CacheError::io(object, e))?;
    }
    Ok(())
}

/// How a file found in an output gets into the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Take {
    /// Renamed: the stage's own file.
    Move,
    /// Copied: possibly a user's file.
    Copy,
}

/// A file to store: its tree path, where it is, and how it is taken.
#[derive(Debug)]
struct Found {
    tree_path: String,
    path: PathBuf,
    take: Take,
}

/// Every regular file at or under `root` (a file, a folder, or a link to either), with tree
/// paths under `prefix`, in name order. Files may be moved only when `movable` and reached
/// through no link with a link count of 1. Links are followed (a dangling one or a loop is
/// an error); special files and names that are not UTF-8 are errors.
fn collect_files(root: &Path, prefix: &str, movable: bool, out: &mut Vec<Found>) -> Result<()> {
    let mut ancestors: Vec<(u64, u64)> = Vec::new();
    visit(root, prefix.to_string(), movable, &mut ancestors, out)
}

fn visit(
    path: &Path,
    tree_path: String,
    movable: bool,
    ancestors: &mut Vec<(u64, u64)>,
    out: &mut Vec<Found>,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::symlink_metadata(path).map_err(|e| CacheError::io(path, e))?;
    let (meta, movable) = if own.file_type().is_symlink() {
        let target = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => CacheError::DanglingLink {
                path: path.to_path_buf(),
            },
            _ if e.raw_os_error() == Some(libc::ELOOP) => CacheError::LinkLoop {
                path: path.to_path_buf(),
            },
            _ => CacheError::io(path, e),
        })?;
        // Whatever is reached through a link is not the stage's to consume.
        (target, false)
    } else {
        (own, movable)
    };
    if meta.is_file() {
        let take = if movable && meta.nlink() == 1 {
            Take::Move
        } else {
            Take::Copy
        };
        out.push(Found {
            tree_path,
            path: path.to_path_buf(),
            take,
        });
        return Ok(());
    }
    if !meta.is_dir() {
        return Err(CacheError::NotRegular {
            path: path.to_path_buf(),
            kind: crate::hash::kind_of(&meta.file_type()),
        });
    }
    let id = (meta.dev(), meta.ino());
    if ancestors.contains(&id) {
        return Err(CacheError::LinkLoop {
            path: path.to_path_buf(),
        });
    }
    let mut children: Vec<(String, PathBuf)> = Vec::new();
    let entries = std::fs::read_dir(path).map_err(|e| CacheError::io(path, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| CacheError::io(path, e))?;
        let child = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            return Err(CacheError::NotUtf8Name { path: child });
        };
        children.push((name, child));
    }
    children.sort();
    ancestors.push(id);
    for (name, child) in children {
        let child_tree_path = if tree_path.is_empty() {
            name
        } else {
            format!("{tree_path}/{name}")
        };
        visit(&child, child_tree_path, movable, ancestors, out)?;
    }
    ancestors.pop();
    Ok(())
}

/// How long a dead engine's stage supervisors get to finish dying before their scratch is left
/// for a later start: a supervisor kills its command's processes as soon as its engine dies
/// and then exits, releasing its lock within milliseconds on an idle machine.
const DYING_SUPERVISOR_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// [`holds_live_work`] once the lock is still held at `deadline`.
fn live_work_after(scratch: &Path, deadline: std::time::Instant) -> bool {
    while holds_live_work(scratch) {
        if std::time::Instant::now() >= deadline {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

/// Whether a folder directly inside the scratch folder `scratch` is locked (`flock`) by a
/// live process.
fn holds_live_work(scratch: &Path) -> bool {
    use std::os::unix::io::AsRawFd;
    let Ok(entries) = std::fs::read_dir(scratch) else {
        return false;
    };
    entries.flatten().any(|entry| {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            return false;
        }
        let Ok(folder) = std::fs::File::open(entry.path()) else {
            return false;
        };
        // SAFETY: flock on a descriptor we own; closing it (on drop) releases our lock.
        let r = unsafe { libc::flock(folder.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
    })
}

/// The pid space ([`crate::pid_space_id`]) and pid that own a `tmp/` entry, by its name.
enum ScratchOwner {
    /// A process of this pid space.
    Here(i32),
    /// A process of another pid space.
    Elsewhere,
    /// Named by an engine that did not record its pid space: `<pid>-<n>-<nanos>`.
    Legacy(i32),
    /// Not named by an engine.
    Unknown,
}

/// `o<pid space>-<pid>-<tag>`: the `o` keeps the name apart from the legacy `<pid>-…` form.
fn scratch_name(tag: &str) -> String {
    format!(
        "o{}-{}-{tag}",
        crate::machine::pid_space_id(),
        std::process::id()
    )
}

impl ScratchOwner {
    fn of(name: &str) -> Self {
        let mut parts = name.split('-');
        let (Some(first), Some(second)) = (parts.next(), parts.next()) else {
            return ScratchOwner::Unknown;
        };
        if let Some(space) = first.strip_prefix('o') {
            return match second.parse::<i32>() {
                Ok(pid) if space == crate::machine::pid_space_id() => ScratchOwner::Here(pid),
                Ok(_) => ScratchOwner::Elsewhere,
                Err(_) => ScratchOwner::Unknown,
            };
        }
        match first.parse::<i32>() {
            Ok(pid) if second.parse::<u64>().is_ok() => ScratchOwner::Legacy(pid),
            _ => ScratchOwner::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_outputs_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut trees = Vec::new();
        for _ in 0..2 {
            let s = store.scratch().unwrap();
            std::fs::create_dir_all(s.path().join("sub")).unwrap();
            std::fs::write(s.path().join("sub/x.bin"), "same").unwrap();
            std::fs::write(s.path().join("y"), "same").unwrap();
            trees.push(store.put_dir(s.path(), &[]).unwrap());
        }
        assert_eq!(trees[0], trees[1]);
        let tree = store.read_tree(&trees[0]).unwrap();
        assert_eq!(tree.entries.len(), 2);
        assert_eq!(tree.entries[0].blob, tree.entries[1].blob);
        // tree manifest + one blob
        assert_eq!(store.all_objects().unwrap().len(), 2);
    }

    #[test]
    fn materialize_round_trip_and_extra() {
        let dir = tempfile::tempdir().unwrap();
        let ws = tempfile::tempdir().unwrap();
        std::fs::write(ws.path().join("w.txt"), "ws").unwrap();
        let store = Store::open(dir.path()).unwrap();
        let s = store.scratch().unwrap();
        std::fs::write(s.path().join("a"), "A").unwrap();
        let h = store
            .put_dir(s.path(), &[("@ws/w.txt".into(), ws.path().join("w.txt"))])
            .unwrap();
        let tree = store.read_tree(&h).unwrap();
        let out = tempfile::tempdir().unwrap();
        store.materialize(&tree, "", out.path(), true).unwrap();
        assert_eq!(std::fs::read_to_string(out.path().join("a")).unwrap(), "A");
        let back = tempfile::tempdir().unwrap();
        store
            .materialize(&tree, "@ws/w.txt", &back.path().join("w.txt"), false)
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(back.path().join("w.txt")).unwrap(),
            "ws"
        );
        // the workspace file was copied, not consumed
        assert!(ws.path().join("w.txt").exists());
    }

    #[test]
    fn verify_finds_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let h = store.put_bytes(b"payload").unwrap();
        store.verify_object(&h).unwrap();
        let p = store.object_path(&h);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&p, b"pAyload").unwrap();
        assert!(matches!(
            store.verify_object(&h),
            Err(CacheError::CorruptObject { .. })
        ));
        std::fs::remove_file(&p).unwrap();
        assert!(matches!(
            store.verify_object(&h),
            Err(CacheError::MissingObject(_))
        ));
    }

    #[test]
    fn stale_scratch_of_dead_process_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let dead = dir
            .path()
            .join(format!("tmp/o{}-999999999-0-0", crate::pid_space_id()));
        std::fs::create_dir_all(&dead).unwrap();
        let live = store.scratch().unwrap();
        store.clean_stale_scratch(false).unwrap();
        assert!(!dead.exists());
        assert!(live.path().exists());
    }

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// A user's folder and file reached through links (to a folder, to a file, at depth, and
    /// a link inside the linked folder) are copied: still there, same bytes, same mode.
    #[test]
    fn files_reached_through_links_are_copied_never_moved() {
        let dir = tempfile::tempdir().unwrap();
        let ws = tempfile::tempdir().unwrap();
        let data = ws.path().join("data");
        let other = ws.path().join("other");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(data.join("a.txt"), "user a").unwrap();
        std::fs::set_permissions(data.join("a.txt"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        std::fs::write(other.join("b.txt"), "user b").unwrap();
        std::os::unix::fs::symlink(&other, data.join("inner")).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let s = store.scratch().unwrap();
        std::fs::create_dir_all(s.path().join("sub")).unwrap();
        std::os::unix::fs::symlink(&data, s.path().join("data")).unwrap();
        std::os::unix::fs::symlink(data.join("a.txt"), s.path().join("f")).unwrap();
        std::os::unix::fs::symlink(&data, s.path().join("sub/deep")).unwrap();
        std::fs::write(s.path().join("own"), "stage's own").unwrap();
        let h = store.put_dir(s.path(), &[]).unwrap();
        let tree = store.read_tree(&h).unwrap();
        let paths: Vec<&str> = tree.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "data/a.txt",
                "data/inner/b.txt",
                "f",
                "own",
                "sub/deep/a.txt",
                "sub/deep/inner/b.txt"
            ]
        );
        assert_eq!(
            std::fs::read_to_string(data.join("a.txt")).unwrap(),
            "user a"
        );
        assert_eq!(mode_of(&data.join("a.txt")), 0o640);
        assert_eq!(
            std::fs::read_to_string(other.join("b.txt")).unwrap(),
            "user b"
        );
        assert_eq!(tree.get("f").unwrap().blob, hash_bytes(b"user a"));
        // The stage's own file was moved.
        assert!(!s.path().join("own").exists());
        // Deleting the objects leaves the user's files alone.
        for h in store.all_objects().unwrap() {
            store.remove_object(&h).unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(data.join("a.txt")).unwrap(),
            "user a"
        );
        assert_eq!(
            std::fs::read_to_string(other.join("b.txt")).unwrap(),
            "user b"
        );
    }

    /// A hard link to a user's file is copied: the user's file keeps its inode and mode.
    #[test]
    fn a_hard_link_is_copied_and_its_mode_left_alone() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let ws = tempfile::tempdir().unwrap();
        let user = ws.path().join("u.txt");
        std::fs::write(&user, "user").unwrap();
        std::fs::set_permissions(&user, std::fs::Permissions::from_mode(0o664)).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let s = store.scratch().unwrap();
        std::fs::hard_link(&user, s.path().join("u")).unwrap();
        let h = store.put_dir(s.path(), &[]).unwrap();
        assert_eq!(mode_of(&user), 0o664);
        let object = store.object_path(&hash_bytes(b"user"));
        assert_ne!(
            std::fs::metadata(&object).unwrap().ino(),
            std::fs::metadata(&user).unwrap().ino()
        );
        assert_eq!(store.read_tree(&h).unwrap().entries[0].mode, None);
    }

    #[test]
    fn dangling_links_loops_odd_names_and_special_files_are_errors() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        type Make = fn(&Path);
        let cases: [(&str, Make); 4] = [
            ("dangling", |out| {
                std::os::unix::fs::symlink(out.join("nothing"), out.join("dangling")).unwrap()
            }),
            ("loop", |out| {
                std::fs::create_dir_all(out.join("d")).unwrap();
                std::os::unix::fs::symlink("..", out.join("d/loop")).unwrap()
            }),
            ("odd", |out| {
                let name = std::ffi::OsStr::from_bytes(b"odd\xff");
                std::fs::write(out.join(name), "x").unwrap()
            }),
            ("fifo", |out| {
                let p = std::ffi::CString::new(out.join("fifo").as_os_str().as_bytes()).unwrap();
                // SAFETY: a NUL-terminated path we own.
                assert_eq!(unsafe { libc::mkfifo(p.as_ptr(), 0o644) }, 0);
            }),
        ];
        for (what, make) in cases {
            let s = store.scratch().unwrap();
            make(s.path());
            let err = store.put_dir(s.path(), &[]).unwrap_err();
            let ok = match (what, &err) {
                ("dangling", CacheError::DanglingLink { path }) => path.ends_with("dangling"),
                ("loop", CacheError::LinkLoop { path }) => path.ends_with("d/loop"),
                ("odd", CacheError::NotUtf8Name { path }) => {
                    path.file_name().unwrap().as_bytes() == b"odd\xff"
                }
                ("fifo", CacheError::NotRegular { path, kind }) => {
                    path.ends_with("fifo") && kind.contains("FIFO")
                }
                _ => false,
            };
            assert!(ok, "{what}: {err}");
        }
    }

    /// Trees of ordinary files serialise exactly as before `mode` existed (their hashes, and so
    /// every existing cache, stay valid); a 0600 file records its mode, is stored 0400 and is
    /// restored 0600; storing it narrows an existing 0444 object of the same bytes.
    #[test]
    fn modes_are_recorded_only_when_narrower_and_never_widened() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let s = store.scratch().unwrap();
        std::fs::write(s.path().join("plain"), "p").unwrap();
        std::fs::set_permissions(
            s.path().join("plain"),
            std::fs::Permissions::from_mode(0o664),
        )
        .unwrap();
        std::fs::write(s.path().join("run.sh"), "r").unwrap();
        std::fs::set_permissions(
            s.path().join("run.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let h = store.put_dir(s.path(), &[]).unwrap();
        let old_format = format!(
            r#"{{"entries":[{{"path":"plain","blob":"{}","size":1,"executable":false}},{{"path":"run.sh","blob":"{}","size":1,"executable":true}}]}}"#,
            hash_bytes(b"p"),
            hash_bytes(b"r")
        );
        assert_eq!(h, hash_bytes(old_format.as_bytes()));
        let old: Tree = serde_json::from_str(&old_format).unwrap();
        assert_eq!(old, store.read_tree(&h).unwrap());

        let public = store.put_bytes(b"secret").unwrap();
        assert_eq!(mode_of(&store.object_path(&public)), 0o444);
        let s = store.scratch().unwrap();
        std::fs::write(s.path().join("key"), "secret").unwrap();
        std::fs::set_permissions(s.path().join("key"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let h = store.put_dir(s.path(), &[]).unwrap();
        let tree = store.read_tree(&h).unwrap();
        assert_eq!(tree.entries[0].mode, Some(0o600));
        assert_eq!(mode_of(&store.object_path(&public)), 0o400, "narrowed");
        let out = tempfile::tempdir().unwrap();
        store.materialize(&tree, "", out.path(), false).unwrap();
        assert_eq!(mode_of(&out.path().join("key")), 0o600);
        // Storing readable bytes again does not widen the object.
        store.put_bytes(b"secret").unwrap();
        assert_eq!(mode_of(&store.object_path(&public)), 0o400);
        assert_eq!(recorded_mode(0o700), Some(0o700));
        assert_eq!(recorded_mode(0o775), None);
        assert_eq!(recorded_mode(0o640), Some(0o640));
    }

    #[test]
    fn restoring_into_a_workspace_refuses_symlinked_folders() {
        let dir = tempfile::tempdir().unwrap();
        let ws = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let s = store.scratch().unwrap();
        std::fs::write(s.path().join("r.txt"), "r").unwrap();
        let tree = store
            .read_tree(&store.put_dir(s.path(), &[]).unwrap())
            .unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), ws.path().join("results")).unwrap();
        let dest = ws.path().join("results/r.txt");
        let err = store
            .materialize_in(&tree, "r.txt", ws.path(), &dest)
            .unwrap_err();
        assert!(
            matches!(&err, CacheError::SymlinkInPath { path } if path == &ws.path().join("results")),
            "{err}"
        );
        assert!(!elsewhere.path().join("r.txt").exists());
        // A real folder is fine.
        std::fs::remove_file(ws.path().join("results")).unwrap();
        store
            .materialize_in(&tree, "r.txt", ws.path(), &dest)
            .unwrap();
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "r");
    }

    /// Scratch of another pid space (another host, container or boot) is never reaped; the
    /// legacy `<pid>-…` form only under the exclusive lock (`legacy`).
    #[test]
    fn only_our_pid_space_dead_scratch_is_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tmp = dir.path().join("tmp");
        let ours = tmp.join(format!("o{}-999999999-0-0", crate::pid_space_id()));
        let elsewhere = tmp.join("o000000000000-999999999-0-0");
        let legacy = tmp.join("999999999-0-0");
        for d in [&ours, &elsewhere, &legacy] {
            std::fs::create_dir_all(d).unwrap();
        }
        store.clean_stale_scratch(false).unwrap();
        assert!(!ours.exists());
        assert!(elsewhere.exists());
        assert!(legacy.exists());
        store.clean_stale_scratch(true).unwrap();
        assert!(elsewhere.exists());
        assert!(!legacy.exists());
    }
}
