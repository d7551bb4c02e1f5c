//! [`DiskCache`]: compiled kernel images on disk, under `$XDG_CACHE_HOME/arfuse/<backend>/` (else
//! `~/.cache/arfuse/<backend>/`), one file per key that the backend puts in the file name.
//!
//! A file is `magic` (8 bytes, per backend), a kind tag (u32, the backend's), a reserved u32 (0),
//! the payload length (u64) and the FNV-1a of the payload (u64), all little-endian, then the
//! payload. Best effort throughout: a file that is short, damaged or of another format reads as
//! absent (and is compiled afresh and rewritten); a write that fails leaves the cache as it was.

use crate::source::fnv1a;
use std::path::{Path, PathBuf};

const HEADER: usize = 32;

/// The disk cache of one backend.
pub(crate) struct DiskCache {
    /// The first 8 bytes of every file.
    pub(crate) magic: &'static [u8; 8],
    /// The backend's folder under `<cache>/arfuse/`.
    pub(crate) backend: &'static str,
}

impl DiskCache {
    /// `<cache>/arfuse/<backend>`, or `None` where neither `XDG_CACHE_HOME` nor `HOME` is an
    /// absolute path.
    pub(crate) fn root(&self) -> Option<PathBuf> {
        let absolute = |var: &str| std::env::var_os(var).map(PathBuf::from).filter(|p| p.is_absolute());
        let base = absolute("XDG_CACHE_HOME").or_else(|| absolute("HOME").map(|home| home.join(".cache")))?;
        Some(base.join("arfuse").join(self.backend))
    }

    /// The kind tag and payload of the file at `path` if it is whole (length and checksum agree).
    pub(crate) fn read(&self, path: &Path) -> Option<(u32, Vec<u8>)> {
        let file = std::fs::read(path).ok()?;
        let header = file.get(..HEADER)?;
        let word = |at: usize| Some(u64::from_le_bytes(header.get(at..at + 8)?.try_into().ok()?));
        if header.get(..8)? != self.magic {
            return None;
        }
        let kind = u32::from_le_bytes(header.get(8..12)?.try_into().ok()?);
        let payload = &file[HEADER..];
        (word(16)? == payload.len() as u64 && word(24)? == fnv1a(payload)).then(|| (kind, payload.to_vec()))
    }

    /// Writes `payload` with its kind tag to `path` (to a temporary name, then renamed, so readers
    /// never see half a file).
    pub(crate) fn write(&self, path: &Path, kind: u32, payload: &[u8]) {
        let Some(dir) = path.parent() else { return };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        let mut file = Vec::with_capacity(HEADER + payload.len());
        file.extend_from_slice(self.magic);
        file.extend_from_slice(&kind.to_le_bytes());
        file.extend_from_slice(&0u32.to_le_bytes());
        file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        file.extend_from_slice(&fnv1a(payload).to_le_bytes());
        file.extend_from_slice(payload);
        let extension = path.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
        let temporary = path.with_extension(format!("{extension}.tmp{}", std::process::id()));
        if std::fs::write(&temporary, &file).is_err() || std::fs::rename(&temporary, path).is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_and_damage_reads_as_absent() {
        let cache = DiskCache { magic: b"ARFTEST1", backend: "test" };
        let dir = std::env::temp_dir().join(format!("arfuse-disk-cache-test-{}", std::process::id()));
        let path = dir.join("arch").join("x.bin");
        cache.write(&path, 7, b"payload");
        assert_eq!(cache.read(&path), Some((7, b"payload".to_vec())));
        assert_eq!(DiskCache { magic: b"ARFTEST2", backend: "test" }.read(&path), None, "another format");
        let mut file = std::fs::read(&path).unwrap_or_default();
        std::fs::write(&path, &file[..file.len() - 1]).ok();
        assert_eq!(cache.read(&path), None, "truncated");
        let last = file.len() - 1;
        file[last] ^= 1;
        std::fs::write(&path, &file).ok();
        assert_eq!(cache.read(&path), None, "a flipped bit");
        assert!(
            std::fs::read_dir(path.parent().unwrap_or(&dir)).map(|d| d.count()).unwrap_or(0) == 1,
            "no temporary left"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
