//! safetensors files: memory-mapped reading (f32, f16 and bf16 tensors, converted to f32)
//! through the `safetensors` crate, and atomic writing of f32 tensors.

use crate::{Error, Result};
use ::safetensors::{Dtype, SafeTensors};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An open, validated safetensors file. Its header is parsed once, when it is opened (a
/// lookup per tensor parsing it again made loading quadratic in the tensor count).
pub struct SafetensorsFile {
    pub path: PathBuf,
    mmap: Arc<Mmap>,
    /// Every tensor's dtype, shape and byte range in the map, by name.
    entries: HashMap<String, Entry>,
    /// Names in the header's order.
    order: Vec<String>,
}

struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(Error::format(
                path,
                "not a safetensors file (shorter than its 8-byte header length)",
            ));
        }
        // Safety: the file is opened read-only; quill never writes a file in place (atomic
        // renames), so the mapping's contents do not change under us.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut f = SafetensorsFile {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            entries: HashMap::new(),
            order: Vec::new(),
        };
        let base = f.mmap.as_ptr() as usize;
        let mut entries = HashMap::new();
        let mut order = Vec::new();
        for (name, view) in f.tensors()?.iter() {
            let start = view.data().as_ptr() as usize - base;
            let entry = Entry {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                range: start..start + view.data().len(),
            };
            order.push(name.to_string());
            entries.insert(name.to_string(), entry);
        }
        order.sort_by_key(|n| entries[n].range.start);
        (f.entries, f.order) = (entries, order);
        Ok(f)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| Error::format(&self.path, format!("no tensor named {name}")))
    }

    /// The parsed file (cheap: parses the JSON header only).
    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| {
            Error::format(
                &self.path,
                format!("not a valid safetensors file (truncated or damaged?): {e}"),
            )
        })
    }

    /// The header's `__metadata__` strings.
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) = SafeTensors::read_metadata(&self.mmap)
            .map_err(|e| Error::format(&self.path, format!("bad safetensors header: {e}")))?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    /// Tensor names in the order of their data.
    pub fn names(&self) -> Result<Vec<String>> {
        Ok(self.order.clone())
    }

    /// Copies tensor `name` into `dst`, converting to f32, after checking its shape.
    pub fn read_into(&self, name: &str, shape: &[usize], dst: &mut [f32]) -> Result<()> {
        let e = self.entry(name)?;
        if e.shape != shape {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor {name} has shape {:?}, expected {:?}",
                    e.shape, shape
                ),
            ));
        }
        to_f32(e.dtype, &self.mmap[e.range.clone()], dst)
            .map_err(|m| Error::format(&self.path, format!("tensor {name}: {m}")))
    }

    /// The stored dtype and bytes of tensor `name` (inside the memory map).
    pub fn raw(&self, name: &str) -> Result<(Dtype, &[u8])> {
        let e = self.entry(name)?;
        Ok((e.dtype, &self.mmap[e.range.clone()]))
    }

    /// The memory map itself, to keep borrowed tensor bytes alive.
    pub fn map(&self) -> Arc<Mmap> {
        self.mmap.clone()
    }

    /// Numbers held by every tensor of the file (None on overflow).
    pub fn elements(&self) -> Option<usize> {
        self.entries.values().try_fold(0usize, |a, e| {
            a.checked_add(e.shape.iter().try_fold(1usize, |p, &d| p.checked_mul(d))?)
        })
    }

    /// The shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Result<Option<Vec<usize>>> {
        Ok(self.entries.get(name).map(|e| e.shape.clone()))
    }
}

fn to_f32(dtype: Dtype, data: &[u8], dst: &mut [f32]) -> std::result::Result<(), String> {
    let n = dst.len();
    match dtype {
        Dtype::F32 => {
            for (d, b) in dst.iter_mut().zip(data.chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::F16 => {
            for (d, b) in dst.iter_mut().zip(data.chunks_exact(2)) {
                *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        Dtype::BF16 => {
            for (d, b) in dst.iter_mut().zip(data.chunks_exact(2)) {
                *d = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        other => {
            return Err(format!(
                "dtype {other:?} is not supported (supported: F32, F16, BF16)"
            ))
        }
    }
    if data.len() / dtype.bitsize().div_ceil(8).max(1) != n {
        return Err("data size does not match its shape".into());
    }
    Ok(())
}

/// Writes f32 tensors (name, shape, data) as a safetensors file, atomically.
pub fn write_f32(
    path: &Path,
    tensors: &[(&str, &[usize], &[f32])],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("strings serialize"),
        );
    }
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape of {name}"
        );
        let bytes = data.len() * 4;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_string(&header).expect("header serializes");
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }
    crate::io::atomic::write_atomic(path, |w| {
        w.write_all(&(json.len() as u64).to_le_bytes())?;
        w.write_all(json.as_bytes())?;
        let mut buf = Vec::with_capacity(1 << 16);
        for (_, _, data) in tensors {
            for chunk in data.chunks(1 << 14) {
                buf.clear();
                for v in chunk {
                    buf.extend_from_slice(&v.to_le_bytes());
                }
                w.write_all(&buf)?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_round_trip_and_errors() {
        let dir = std::env::temp_dir().join(format!("quill-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.safetensors");
        let a: Vec<f32> = (0..6).map(|x| x as f32 * 0.5 - 1.0).collect();
        let b = vec![3.25f32];
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        write_f32(&p, &[("a", &[2, 3], &a), ("b", &[1], &b)], &meta).unwrap();
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.metadata().unwrap()["format"], "pt");
        let mut out = vec![0.0; 6];
        f.read_into("a", &[2, 3], &mut out).unwrap();
        assert_eq!(out, a);
        let e = f.read_into("a", &[3, 2], &mut out).unwrap_err().to_string();
        assert!(e.contains("shape [2, 3], expected [3, 2]"), "{e}");
        assert!(f
            .read_into("c", &[1], &mut out[..1])
            .unwrap_err()
            .to_string()
            .contains("no tensor named c"));
        // truncated data is refused at open
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        assert!(SafetensorsFile::open(&p).is_err());
        std::fs::write(&p, b"hello").unwrap();
        assert!(SafetensorsFile::open(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
