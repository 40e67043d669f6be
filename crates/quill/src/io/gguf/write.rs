//! Writing GGUF files (version 3): metadata, tensor descriptions, then the tensors' bytes,
//! each at an offset aligned to 32 bytes. The file is written atomically (a temporary file
//! renamed over the target), and tensors are produced one at a time, so a model is never
//! held twice in memory.

use super::reader::{Array, Gguf, Value, ValueType};
use crate::io::write_atomic;
use crate::kernels::quant::QType;
use crate::{Error, Result};
use std::io::Write;
use std::path::Path;

/// GGUF's default alignment of tensor data.
pub const ALIGNMENT: usize = 32;

/// Keys and values in the order they are written.
pub type Metadata = Vec<(String, Meta)>;

/// A metadata value to write.
#[derive(Clone, Debug, PartialEq)]
pub enum Meta {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
    /// A value as another file stores it: its type id and encoded bytes (arrays copied whole).
    Raw(u32, Vec<u8>),
}

impl Meta {
    /// A value read from a GGUF file, to copy it as it is.
    pub fn copy(g: &Gguf, v: &Value) -> Meta {
        let (t, b): (ValueType, Vec<u8>) = match v {
            Value::U8(x) => (ValueType::U8, vec![*x]),
            Value::I8(x) => (ValueType::I8, vec![*x as u8]),
            Value::U16(x) => (ValueType::U16, x.to_le_bytes().to_vec()),
            Value::I16(x) => (ValueType::I16, x.to_le_bytes().to_vec()),
            Value::U32(x) => (ValueType::U32, x.to_le_bytes().to_vec()),
            Value::I32(x) => (ValueType::I32, x.to_le_bytes().to_vec()),
            Value::U64(x) => (ValueType::U64, x.to_le_bytes().to_vec()),
            Value::I64(x) => (ValueType::I64, x.to_le_bytes().to_vec()),
            Value::F32(x) => (ValueType::F32, x.to_le_bytes().to_vec()),
            Value::F64(x) => (ValueType::F64, x.to_le_bytes().to_vec()),
            Value::Bool(x) => (ValueType::Bool, vec![*x as u8]),
            Value::String(s) => return Meta::Str(s.clone()),
            Value::Array(a) => (ValueType::Array, array_bytes(g, a)),
        };
        Meta::Raw(t.id(), b)
    }

    fn encode(&self, w: &mut Vec<u8>) {
        let typed = |w: &mut Vec<u8>, t: ValueType| w.extend_from_slice(&t.id().to_le_bytes());
        let array = |w: &mut Vec<u8>, t: ValueType, n: usize| {
            typed(w, ValueType::Array);
            typed(w, t);
            w.extend_from_slice(&(n as u64).to_le_bytes());
        };
        match self {
            Meta::U32(x) => {
                typed(w, ValueType::U32);
                w.extend_from_slice(&x.to_le_bytes());
            }
            Meta::I32(x) => {
                typed(w, ValueType::I32);
                w.extend_from_slice(&x.to_le_bytes());
            }
            Meta::F32(x) => {
                typed(w, ValueType::F32);
                w.extend_from_slice(&x.to_le_bytes());
            }
            Meta::Bool(x) => {
                typed(w, ValueType::Bool);
                w.push(*x as u8);
            }
            Meta::Str(s) => {
                typed(w, ValueType::String);
                string(w, s);
            }
            Meta::Strs(v) => {
                array(w, ValueType::String, v.len());
                v.iter().for_each(|s| string(w, s));
            }
            Meta::I32s(v) => {
                array(w, ValueType::I32, v.len());
                v.iter().for_each(|x| w.extend_from_slice(&x.to_le_bytes()));
            }
            Meta::F32s(v) => {
                array(w, ValueType::F32, v.len());
                v.iter().for_each(|x| w.extend_from_slice(&x.to_le_bytes()));
            }
            Meta::Raw(t, b) => {
                w.extend_from_slice(&t.to_le_bytes());
                w.extend_from_slice(b);
            }
        }
    }
}

/// An array's element type, length and items, as the file stores them.
fn array_bytes(g: &Gguf, a: &Array) -> Vec<u8> {
    let mut b = a.elem.id().to_le_bytes().to_vec();
    b.extend_from_slice(&(a.len as u64).to_le_bytes());
    b.extend_from_slice(g.array_bytes(a));
    b
}

fn string(w: &mut Vec<u8>, s: &str) {
    w.extend_from_slice(&(s.len() as u64).to_le_bytes());
    w.extend_from_slice(s.as_bytes());
}

/// A tensor to write: its name, dimensions innermost first (a matrix of `rows` × `cols` is
/// `[cols, rows]`) and type.
#[derive(Clone, Debug)]
pub struct TensorOut {
    pub name: String,
    pub dims: Vec<usize>,
    pub qtype: QType,
}

impl TensorOut {
    /// The bytes its data takes (None if the innermost dimension is not whole blocks).
    pub fn bytes(&self) -> Option<usize> {
        let inner = *self.dims.first()?;
        let rows = self.dims[1..]
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))?;
        self.qtype.bytes_for(inner)?.checked_mul(rows)
    }
}

/// Writes a GGUF file: `meta` in order, then `tensors`, the bytes of tensor `i` produced by
/// `data(i, buffer)` (appended to the cleared buffer; its length must match the tensor's).
pub fn write(
    path: &Path,
    meta: &[(String, Meta)],
    tensors: &[TensorOut],
    mut data: impl FnMut(usize, &mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        string(&mut head, key);
        value.encode(&mut head);
    }
    let mut offset = 0usize;
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in tensors {
        let size = t.bytes().ok_or_else(|| {
            Error::Input(format!(
                "tensor {} of shape {:?} cannot be stored as {}",
                t.name,
                t.dims,
                t.qtype.name()
            ))
        })?;
        string(&mut head, &t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for &d in &t.dims {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&t.qtype.ggml_id().to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        sizes.push(size);
        offset += size.next_multiple_of(ALIGNMENT);
    }
    head.resize(head.len().next_multiple_of(ALIGNMENT), 0);
    let mut failure = None;
    let written = write_atomic(path, |w| {
        w.write_all(&head)?;
        let mut buf = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            buf.clear();
            if let Err(e) = data(i, &mut buf) {
                failure = Some(e);
                return Err(std::io::Error::other("stopped"));
            }
            if buf.len() != size {
                failure = Some(Error::Input(format!(
                    "tensor {}: {} bytes produced for {size}",
                    tensors[i].name,
                    buf.len()
                )));
                return Err(std::io::Error::other("stopped"));
            }
            buf.resize(size.next_multiple_of(ALIGNMENT), 0);
            w.write_all(&buf)?;
        }
        Ok(())
    });
    match failure {
        Some(e) => Err(e),
        None => written,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_reads_back() {
        let dir = std::env::temp_dir().join(format!("quill-gguf-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.gguf");
        let meta = vec![
            (
                "general.architecture".to_string(),
                Meta::Str("llama".into()),
            ),
            ("a.u32".into(), Meta::U32(7)),
            ("a.f32".into(), Meta::F32(0.5)),
            ("a.bool".into(), Meta::Bool(true)),
            (
                "a.strs".into(),
                Meta::Strs(vec!["x".into(), "".into(), "yz".into()]),
            ),
            ("a.i32s".into(), Meta::I32s(vec![1, -2, 3])),
        ];
        let tensors = vec![
            TensorOut {
                name: "m".into(),
                dims: vec![32, 3],
                qtype: QType::Q8_0,
            },
            TensorOut {
                name: "v".into(),
                dims: vec![5],
                qtype: QType::F32,
            },
        ];
        let values: Vec<Vec<f32>> = vec![
            (0..96).map(|i| i as f32 - 40.0).collect(),
            vec![1.0, 2.0, 3.0, 4.0, 5.0],
        ];
        write(&path, &meta, &tensors, |i, buf| {
            crate::kernels::quant::quantize::quantize(tensors[i].qtype, &values[i], buf);
            Ok(())
        })
        .unwrap();
        let g = Gguf::open(&path).unwrap();
        assert_eq!(g.usize("a.u32").unwrap(), 7);
        assert_eq!(g.f64_opt("a.f32").unwrap(), Some(0.5));
        assert_eq!(g.bool_opt("a.bool").unwrap(), Some(true));
        let a = g.array_opt("a.strs", ValueType::String).unwrap().unwrap();
        assert_eq!(g.strings(a).collect::<Vec<_>>(), ["x", "", "yz"]);
        let a = g.array_opt("a.i32s", ValueType::I32).unwrap().unwrap();
        assert_eq!(g.numbers(a).unwrap(), [1.0, -2.0, 3.0]);
        assert_eq!(g.dequantize(g.tensor("v").unwrap()), values[1]);
        let m = g.dequantize(g.tensor("m").unwrap());
        for (a, b) in m.iter().zip(&values[0]) {
            assert!((a - b).abs() <= 0.5 * 55.0 / 127.0 + 1e-6);
        }
        // copying every value through Meta::copy gives the same metadata
        let copied: Vec<(String, Meta)> = g
            .metadata()
            .iter()
            .map(|(k, v)| (k.clone(), Meta::copy(&g, v)))
            .collect();
        let path2 = dir.join("w2.gguf");
        write(&path2, &copied, &[], |_, _| Ok(())).unwrap();
        let g2 = Gguf::open(&path2).unwrap();
        assert_eq!(g2.metadata().len(), g.metadata().len());
        let a = g2.array_opt("a.strs", ValueType::String).unwrap().unwrap();
        assert_eq!(g2.strings(a).collect::<Vec<_>>(), ["x", "", "yz"]);
        assert_eq!(g2.usize("a.u32").unwrap(), 7);
        // a failing producer leaves no file behind
        let path3 = dir.join("w3.gguf");
        let r = write(&path3, &meta, &tensors, |_, _| {
            Err(Error::Input("no".into()))
        });
        assert!(r.is_err() && !path3.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
