//! The content-addressed object store: immutable blobs under `objects/ab/cdef…`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::hash::{hash_bytes, hash_file, Hash, StatKey};
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

/// A private folder under `tmp/`, removed when dropped. Its name starts with the owning pid so
/// that a later process can tell leftovers of dead processes from live work.
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
        let path = self.tmp.join(format!("{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| CacheError::io(&path, e))?;
        Ok(Scratch { path })
    }

    /// Removes `tmp/` entries whose owning process is gone (a killed run's half-written output).
    pub(crate) fn clean_stale_scratch(&self) -> Result<()> {
        let entries = std::fs::read_dir(&self.tmp).map_err(|e| CacheError::io(&self.tmp, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let owner = name.split('-').next().and_then(|p| p.parse::<i32>().ok());
            let alive = owner.is_some_and(process_alive);
            if !alive {
                tracing::debug!("removing leftover scratch {}", entry.path().display());
                remove_tree(&entry.path());
            }
        }
        Ok(())
    }

    /// Stores a file this process wrote in one of its own scratch folders (moving it, when the
    /// store lacks it); returns its hash.
    pub fn put_file(&self, path: &Path) -> Result<Hash> {
        let hash = hash_file(path)?;
        self.install(path, &hash)?;
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
        self.install(&staged, &hash)?;
        Ok(hash)
    }

    /// Moves `staged` (a file this process owns, already hashed to `hash`) into place with one
    /// atomic rename. If the object already exists the staged file is simply dropped.
    fn install(&self, staged: &Path, hash: &Hash) -> Result<()> {
        let dest = self.object_path(hash);
        if dest.is_file() {
            return Ok(());
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| CacheError::io(parent, e))?;
        }
        std::fs::set_permissions(staged, std::fs::Permissions::from_mode(0o444))
            .map_err(|e| CacheError::io(staged, e))?;
        match std::fs::rename(staged, &dest) {
            Ok(()) => Ok(()),
            // Another filesystem (a symlinked output): copy into tmp first, then rename.
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let scratch = self.scratch()?;
                let local = scratch.path().join("blob");
                std::fs::copy(staged, &local).map_err(|e| CacheError::io(staged, e))?;
                std::fs::rename(&local, &dest).map_err(|e| CacheError::io(&dest, e))
            }
            Err(e) => Err(CacheError::io(&dest, e)),
        }
    }

    /// Stores every file under `dir` (moving them: `dir` must be a scratch folder this process
    /// owns) plus `extra` (tree path -> workspace file or folder, copied), and returns the hash
    /// of the resulting [`Tree`].
    pub fn put_dir(&self, dir: &Path, extra: &[(String, PathBuf)]) -> Result<Hash> {
        let mut files: Vec<(String, PathBuf, bool)> = Vec::new();
        collect_files(dir, "", &mut files, true)?;
        for (prefix, source) in extra {
            let meta = std::fs::metadata(source).map_err(|e| CacheError::io(source, e))?;
            if meta.is_dir() {
                collect_files(source, prefix, &mut files, false)?;
            } else {
                files.push((prefix.clone(), source.clone(), false));
            }
        }
        let mut entries: Vec<TreeEntry> = files
            .par_iter()
            .map(|(rel, path, movable)| {
                let meta = std::fs::metadata(path).map_err(|e| CacheError::io(path, e))?;
                let blob = hash_file(path)?;
                let executable = meta.permissions().mode() & 0o111 != 0;
                if *movable {
                    self.install(path, &blob)?;
                } else if !self.contains(&blob) {
                    let scratch = self.scratch()?;
                    let staged = scratch.path().join("blob");
                    std::fs::copy(path, &staged).map_err(|e| CacheError::io(path, e))?;
                    // The workspace file may have changed between hashing and copying.
                    let copied = hash_file(&staged)?;
                    if copied != blob {
                        return Err(CacheError::io(
                            path,
                            std::io::Error::other("the file changed while it was being stored"),
                        ));
                    }
                    self.install(&staged, &blob)?;
                }
                Ok(TreeEntry {
                    path: rel.clone(),
                    blob,
                    size: meta.len(),
                    executable,
                })
            })
            .collect::<Result<_>>()?;
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        entries.dedup_by(|a, b| a.path == b.path);
        self.put_tree(&Tree { entries })
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
    /// copied and made writable (for workspace checkouts users may edit).
    pub fn materialize(&self, tree: &Tree, prefix: &str, dest: &Path, link: bool) -> Result<()> {
        if prefix.is_empty() {
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
            let mode = match (link, entry.executable) {
                (true, true) => 0o555,
                (true, false) => 0o444,
                (false, true) => 0o755,
                (false, false) => 0o644,
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

fn collect_files(
    root: &Path,
    prefix: &str,
    out: &mut Vec<(String, PathBuf, bool)>,
    movable: bool,
) -> Result<()> {
    for entry in walkdir::WalkDir::new(root)
        .follow_links(true)
        .sort_by_file_name()
    {
        let entry = entry.map_err(|e| {
            let p = e.path().unwrap_or(root).to_path_buf();
            CacheError::io(p, std::io::Error::other(e.to_string()))
        })?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry
            .path()
            .strip_prefix(root)
            .unwrap_or(entry.path())
            .to_string_lossy()
            .replace('\\', "/");
        let tree_path = match (prefix.is_empty(), rel.is_empty()) {
            (true, _) => rel,
            (false, true) => prefix.to_string(),
            (false, false) => format!("{prefix}/{rel}"),
        };
        // A symlink out of the folder is copied, never moved: it is not ours to consume.
        let movable = movable && !entry.path_is_symlink();
        out.push((tree_path, entry.into_path(), movable));
    }
    Ok(())
}

pub(crate) fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(pid, 0) only checks that the process exists; it sends nothing.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
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
        let dead = dir.path().join("tmp/999999999-0-0");
        std::fs::create_dir_all(&dead).unwrap();
        let live = store.scratch().unwrap();
        store.clean_stale_scratch().unwrap();
        assert!(!dead.exists());
        assert!(live.path().exists());
    }
}
