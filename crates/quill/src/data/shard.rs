//! Token shards: a 32-byte header, then the tokens.
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `QUILLTOK` |
//! | 8..12 | version, u32 little-endian (1) |
//! | 12..16 | bytes per token, u32 (2 for u16, 4 for u32) |
//! | 16..24 | token count, u64 |
//! | 24..32 | vocabulary size, u64 |
//! | 32.. | tokens, little-endian |
//!
//! Writers write a temporary file and rename it when complete (the count is filled in last),
//! so a shard under its final name is always whole. Readers memory-map and check the header
//! against the file size.

use crate::{Error, Result};
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"QUILLTOK";
pub const VERSION: u32 = 1;
pub const HEADER: usize = 32;

/// u16 tokens when the vocabulary fits, else u32.
pub fn token_bytes_for(vocab_size: usize) -> u32 {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: BufWriter<File>,
    token_bytes: u32,
    vocab_size: u64,
    count: u64,
}

impl ShardWriter {
    pub fn create(path: &Path, token_bytes: u32, vocab_size: usize) -> Result<Self> {
        if token_bytes == 2 && vocab_size > 1 << 16 {
            return Err(Error::Input(format!(
                "a vocabulary of {vocab_size} tokens does not fit u16 shards (at most 65536); use u32"
            )));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = ShardWriter {
            path: path.to_path_buf(),
            tmp,
            file: BufWriter::with_capacity(1 << 20, file),
            token_bytes,
            vocab_size: vocab_size as u64,
            count: 0,
        };
        w.write_header()?;
        Ok(w)
    }

    fn write_header(&mut self) -> Result<()> {
        let mut h = [0u8; HEADER];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.token_bytes.to_le_bytes());
        h[16..24].copy_from_slice(&self.count.to_le_bytes());
        h[24..32].copy_from_slice(&self.vocab_size.to_le_bytes());
        self.file.write_all(&h).map_err(|e| Error::io(&self.tmp, e))
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn write(&mut self, tokens: &[u32]) -> Result<()> {
        let mut buf = Vec::with_capacity(tokens.len() * self.token_bytes as usize);
        for &t in tokens {
            if t as u64 >= self.vocab_size {
                return Err(Error::Input(format!(
                    "token {t} is outside the vocabulary ({})",
                    self.vocab_size
                )));
            }
            if self.token_bytes == 2 {
                buf.extend_from_slice(&(t as u16).to_le_bytes());
            } else {
                buf.extend_from_slice(&t.to_le_bytes());
            }
        }
        self.count += tokens.len() as u64;
        self.file
            .write_all(&buf)
            .map_err(|e| Error::io(&self.tmp, e))
    }

    /// Fills in the count, syncs, and renames the shard to its final name.
    pub fn finish(mut self) -> Result<u64> {
        let tmp = self.tmp.clone();
        let r = (|| -> std::io::Result<()> {
            self.file.flush()?;
            let f = self.file.get_mut();
            f.seek(SeekFrom::Start(16))?;
            f.write_all(&self.count.to_le_bytes())?;
            f.sync_all()?;
            std::fs::rename(&self.tmp, &self.path)?;
            Ok(())
        })();
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(&self.path, e));
        }
        Ok(self.count)
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        // an unfinished shard never appears under its final name
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// A memory-mapped shard.
pub struct Shard {
    pub path: PathBuf,
    mmap: Mmap,
    token_bytes: usize,
    count: usize,
    pub vocab_size: usize,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len() as usize;
        if len < HEADER {
            return Err(Error::format(
                path,
                "not a token shard (shorter than its header)",
            ));
        }
        // Safety: shards are written once and renamed into place, never modified.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if &mmap[..8] != MAGIC {
            return Err(Error::format(
                path,
                "not a token shard (wrong magic number)",
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes(mmap[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(mmap[i..i + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(Error::format(
                path,
                format!("token shard version {version} is not supported (expected {VERSION})"),
            ));
        }
        let token_bytes = u32_at(12) as usize;
        if token_bytes != 2 && token_bytes != 4 {
            return Err(Error::format(
                path,
                format!("bad token size {token_bytes} in the shard header"),
            ));
        }
        let count = u64_at(16) as usize;
        let vocab_size = u64_at(24) as usize;
        let want = count
            .checked_mul(token_bytes)
            .and_then(|b| b.checked_add(HEADER));
        if want != Some(len) {
            return Err(Error::format(
                path,
                format!("truncated or damaged token shard: the header says {count} tokens, the file holds {} bytes", len - HEADER),
            ));
        }
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            token_bytes,
            count,
            vocab_size,
        })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Tokens start..start+out.len().
    pub fn read(&self, start: usize, out: &mut [u32]) {
        let d = &self.mmap[HEADER..];
        if self.token_bytes == 2 {
            for (i, o) in out.iter_mut().enumerate() {
                let p = (start + i) * 2;
                *o = u16::from_le_bytes([d[p], d[p + 1]]) as u32;
            }
        } else {
            for (i, o) in out.iter_mut().enumerate() {
                let p = (start + i) * 4;
                *o = u32::from_le_bytes([d[p], d[p + 1], d[p + 2], d[p + 3]]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_and_reject_damaged_shards() {
        let dir = std::env::temp_dir().join(format!("quill-shard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (tb, vocab) in [(2u32, 1000usize), (4, 100_000)] {
            let p = dir.join(format!("s{tb}.bin"));
            let mut w = ShardWriter::create(&p, tb, vocab).unwrap();
            assert!(!p.exists(), "not under its final name before finish");
            w.write(&[1, 2, 999]).unwrap();
            w.write(&[7]).unwrap();
            assert_eq!(w.finish().unwrap(), 4);
            let s = Shard::open(&p).unwrap();
            let mut out = [0u32; 3];
            s.read(1, &mut out);
            assert_eq!((s.len(), out), (4, [2, 999, 7]));
        }
        assert!(ShardWriter::create(&dir.join("x.bin"), 2, 70_000).is_err());
        let p = dir.join("s2.bin");
        let good = std::fs::read(&p).unwrap();
        let mut bad = good.clone();
        bad[0] = b'X';
        std::fs::write(&p, &bad).unwrap();
        assert!(Shard::open(&p).err().unwrap().to_string().contains("magic"));
        let mut bad = good.clone();
        bad[8] = 9;
        std::fs::write(&p, &bad).unwrap();
        assert!(Shard::open(&p)
            .err()
            .unwrap()
            .to_string()
            .contains("version"));
        std::fs::write(&p, &good[..good.len() - 1]).unwrap();
        assert!(Shard::open(&p)
            .err()
            .unwrap()
            .to_string()
            .contains("truncated"));
        // an abandoned writer leaves nothing behind
        drop(ShardWriter::create(&dir.join("gone.bin"), 2, 10).unwrap());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
