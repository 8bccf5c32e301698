//! blake3 content hashes of bytes, files and folders.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rayon::prelude::*;

use crate::{CacheError, Result};

/// A blake3 hash, shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash([u8; 32]);

impl Hash {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Hash(bytes)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
    /// The first 12 hex digits, for people.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.short())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a 64-digit hex blake3 hash")]
pub struct HashParseError(pub String);

impl FromStr for Hash {
    type Err = HashParseError;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        blake3::Hash::from_hex(s)
            .map(|h| Hash(*h.as_bytes()))
            .map_err(|_| HashParseError(s.to_string()))
    }
}

impl serde::Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

pub fn hash_bytes(bytes: &[u8]) -> Hash {
    Hash(*blake3::hash(bytes).as_bytes())
}

/// Files at least this big are memory-mapped and hashed on all cores.
const MMAP_THRESHOLD: u64 = 4 << 20;

/// Hashes a regular file's content (following a symbolic link to one). Anything else (a
/// FIFO, a device such as `/dev/zero`, a socket, a folder) is an error naming it, not a read
/// that may never end.
pub fn hash_file(path: &Path) -> Result<Hash> {
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, so that opening a FIFO returns at once (its type is checked next); reads of
    // a regular file ignore the flag.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| CacheError::io(path, e))?;
    let meta = file.metadata().map_err(|e| CacheError::io(path, e))?;
    if !meta.is_file() {
        return Err(CacheError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(&meta.file_type()),
        });
    }
    let len = meta.len();
    let mut hasher = blake3::Hasher::new();
    if len >= MMAP_THRESHOLD {
        hasher
            .update_mmap_rayon(path)
            .map_err(|e| CacheError::io(path, e))?;
    } else {
        let mut buf = [0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf).map_err(|e| CacheError::io(path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    Ok(Hash(*hasher.finalize().as_bytes()))
}

/// What a file that is not a regular file is, in words, for errors.
pub(crate) fn kind_of(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "folder"
    } else if t.is_fifo() {
        "FIFO (named pipe)"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else if t.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// What the stat cache remembers about a file: if all of it still matches, the hash does too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatKey {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
}

impl StatKey {
    pub(crate) fn of(meta: &std::fs::Metadata) -> Self {
        StatKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        }
    }
}

/// A file's stat and content hash, as remembered in the stat cache.
pub(crate) type StatEntry = (PathBuf, StatKey, Hash);

/// A file modified this recently may still be changing within the same mtime tick; such files
/// are hashed but not remembered (git's "racy clean" problem).
const RACY_WINDOW_NS: i64 = 2_000_000_000;

/// Whether a file with this stat was modified too recently to be remembered (see above).
pub(crate) fn is_racy(stat: &StatKey, now_ns: i64) -> bool {
    now_ns - stat.mtime_ns <= RACY_WINDOW_NS
}

pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Paths expanded into the files to hash: folders into their files (sorted), plain files
/// with the stat taken while expanding (so it is not taken twice).
pub(crate) struct Expanded {
    pub files: Vec<PathBuf>,
    stats: Vec<Option<StatKey>>,
    plans: Vec<Result<PathPlan>>,
}

pub(crate) fn expand(paths: &[PathBuf]) -> Expanded {
    let mut out = Expanded {
        files: Vec::new(),
        stats: Vec::new(),
        plans: Vec::with_capacity(paths.len()),
    };
    for path in paths {
        let plan = plan_path(path, &mut out.files, &mut out.stats);
        out.plans.push(plan);
    }
    out
}

/// Below this many files, hashing runs on the calling thread: waking the pool costs more than
/// checking a few stats (a cache hit checks two or three objects).
pub(crate) const PARALLEL_FROM: usize = 16;

/// Hashes files and folders in parallel, reusing `known` hashes whose stat still matches.
/// Returns the results in order plus the stat entries worth remembering.
#[cfg(test)]
pub(crate) fn hash_paths_with(
    paths: &[PathBuf],
    known: &HashMap<PathBuf, (StatKey, Hash)>,
) -> (Vec<Result<Hash>>, Vec<StatEntry>) {
    hash_expanded(expand(paths), known)
}

/// [`hash_paths_with`] on paths already expanded.
pub(crate) fn hash_expanded(
    expanded: Expanded,
    known: &HashMap<PathBuf, (StatKey, Hash)>,
) -> (Vec<Result<Hash>>, Vec<StatEntry>) {
    let Expanded {
        files,
        stats,
        plans,
    } = expanded;
    let now = now_ns();
    let one = |(file, stat): (&PathBuf, &Option<StatKey>)| -> Result<(Hash, Option<StatKey>)> {
        let stat = match stat {
            Some(s) => *s,
            None => StatKey::of(&std::fs::metadata(file).map_err(|e| CacheError::io(file, e))?),
        };
        if let Some((old, hash)) = known.get(file) {
            if *old == stat {
                return Ok((*hash, None));
            }
        }
        let hash = hash_file(file)?;
        let remember = (!is_racy(&stat, now)).then_some(stat);
        Ok((hash, remember))
    };
    let hashed: Vec<Result<(Hash, Option<StatKey>)>> = if files.len() < PARALLEL_FROM {
        files.iter().zip(&stats).map(one).collect()
    } else {
        files.par_iter().zip(&stats).map(one).collect()
    };
    let mut fresh = Vec::new();
    for (file, result) in files.iter().zip(&hashed) {
        if let Ok((hash, Some(stat))) = result {
            fresh.push((file.clone(), *stat, *hash));
        }
    }
    let results = plans
        .into_iter()
        .map(|plan| match plan? {
            PathPlan::File(i) => match &hashed[i] {
                Ok((h, _)) => Ok(*h),
                Err(e) => Err(clone_error(e)),
            },
            PathPlan::Dir { root, range } => {
                // A folder's hash covers each file's relative path and content hash, in order.
                let mut hasher = blake3::Hasher::new();
                hasher.update(b"dir\0");
                for i in range {
                    let (h, _) = hashed[i].as_ref().map_err(clone_error)?;
                    let rel = files[i].strip_prefix(&root).unwrap_or(&files[i]);
                    // The name's own bytes: the same as before for UTF-8 names, and names
                    // that are not UTF-8 stay distinct instead of collapsing.
                    hasher.update(rel.as_os_str().as_bytes());
                    hasher.update(b"\0");
                    hasher.update(h.as_bytes());
                }
                Ok(Hash(*hasher.finalize().as_bytes()))
            }
        })
        .collect();
    (results, fresh)
}

enum PathPlan {
    File(usize),
    Dir {
        root: PathBuf,
        range: std::ops::Range<usize>,
    },
}

/// A path to hash: a regular file, or a folder of regular files and folders. Symbolic links
/// are followed, at the top and inside folders (a link inside a folder hashes as its target's
/// content under the link's own name); a dangling link, a link loop and anything that is
/// not a regular file or folder (FIFO, device, socket) are errors naming the path.
fn plan_path(
    path: &Path,
    files: &mut Vec<PathBuf>,
    stats: &mut Vec<Option<StatKey>>,
) -> Result<PathPlan> {
    let meta = std::fs::metadata(path).map_err(|e| CacheError::io(path, e))?;
    if meta.is_dir() {
        let start = files.len();
        let mut found = Vec::new();
        for entry in walkdir::WalkDir::new(path)
            .follow_links(true)
            .sort_by_file_name()
        {
            let entry = entry.map_err(|e| {
                let p = e.path().unwrap_or(path).to_path_buf();
                if e.loop_ancestor().is_some() {
                    CacheError::LinkLoop { path: p }
                } else if e.io_error().map(|io| io.kind()) == Some(std::io::ErrorKind::NotFound) {
                    CacheError::DanglingLink { path: p }
                } else {
                    CacheError::io(p, std::io::Error::other(e.to_string()))
                }
            })?;
            let t = entry.file_type();
            if t.is_file() {
                found.push(entry.into_path());
            } else if !t.is_dir() {
                return Err(CacheError::NotRegular {
                    path: entry.into_path(),
                    kind: kind_of(&t),
                });
            }
        }
        stats.extend(found.iter().map(|_| None));
        files.extend(found);
        Ok(PathPlan::Dir {
            root: path.to_path_buf(),
            range: start..files.len(),
        })
    } else if meta.is_file() {
        files.push(path.to_path_buf());
        stats.push(Some(StatKey::of(&meta)));
        Ok(PathPlan::File(files.len() - 1))
    } else {
        Err(CacheError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(&meta.file_type()),
        })
    }
}

fn clone_error(e: &CacheError) -> CacheError {
    match e {
        CacheError::Io { path, source } => CacheError::io(
            path.clone(),
            std::io::Error::new(source.kind(), source.to_string()),
        ),
        CacheError::NotRegular { path, kind } => CacheError::NotRegular {
            path: path.clone(),
            kind,
        },
        CacheError::DanglingLink { path } => CacheError::DanglingLink { path: path.clone() },
        CacheError::LinkLoop { path } => CacheError::LinkLoop { path: path.clone() },
        other => CacheError::io(PathBuf::new(), std::io::Error::other(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_bytes_agree_small_and_large() {
        let dir = tempfile::tempdir().unwrap();
        for size in [0usize, 10, (MMAP_THRESHOLD as usize) + 3] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let p = dir.path().join(format!("f{size}"));
            std::fs::write(&p, &data).unwrap();
            assert_eq!(hash_file(&p).unwrap(), hash_bytes(&data));
        }
    }

    #[test]
    fn hex_round_trip() {
        let h = hash_bytes(b"x");
        assert_eq!(h.to_hex().parse::<Hash>().unwrap(), h);
        assert!("zz".parse::<Hash>().is_err());
    }

    #[test]
    fn folder_hash_sees_renames_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("a"), "1").unwrap();
        std::fs::write(d.join("sub/b"), "2").unwrap();
        let h = |known: &HashMap<_, _>| {
            hash_paths_with(std::slice::from_ref(&d), known)
                .0
                .remove(0)
                .unwrap()
        };
        let h1 = h(&HashMap::new());
        std::fs::rename(d.join("a"), d.join("c")).unwrap();
        let h2 = h(&HashMap::new());
        assert_ne!(h1, h2);
        std::fs::write(d.join("sub/b"), "3").unwrap();
        assert_ne!(h(&HashMap::new()), h2);
    }

    /// A FIFO or a device as a dep (or inside a dep folder) is an error naming it, at once:
    /// reading one never ends. A link inside a folder hashes as its target's content.
    #[test]
    fn special_files_are_errors_and_links_in_folders_are_followed() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let folder = dir.path().join("folder");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(dir.path().join("real"), "content").unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), folder.join("link")).unwrap();
        let plain = dir.path().join("plain");
        std::fs::create_dir_all(&plain).unwrap();
        std::fs::write(plain.join("link"), "content").unwrap();
        let with_fifo = dir.path().join("with_fifo");
        std::fs::create_dir_all(&with_fifo).unwrap();
        std::os::unix::fs::symlink(&fifo, with_fifo.join("p")).unwrap();
        let paths = [fifo.clone(), zero.clone(), folder, plain, with_fifo.clone()];
        let (mut results, _) = hash_paths_with(&paths, &HashMap::new());
        let expect_special = |r: Result<Hash>, path: &Path, kind: &str| match r {
            Err(CacheError::NotRegular { path: p, kind: k }) => {
                assert_eq!(p, path);
                assert!(k.contains(kind), "{k}");
            }
            other => panic!("{}: {other:?}", path.display()),
        };
        let with_fifo_result = results.pop().unwrap();
        let plain_hash = results.pop().unwrap().unwrap();
        let folder_hash = results.pop().unwrap().unwrap();
        assert_eq!(folder_hash, plain_hash);
        expect_special(results.pop().unwrap(), &zero, "character device");
        expect_special(results.pop().unwrap(), &fifo, "FIFO");
        expect_special(with_fifo_result, &with_fifo.join("p"), "FIFO");
        assert!(matches!(
            hash_file(&fifo),
            Err(CacheError::NotRegular { .. })
        ));
    }
}
