//! The GGUF container (versions 2 and 3, little-endian), memory-mapped and read in place.
//!
//! Layout: magic `GGUF`, u32 version, u64 tensor count, u64 metadata count; the metadata
//! (key string, u32 value type, value); the tensor infos (name, u32 dimension count, u64
//! dimensions innermost first, u32 GGML type, u64 offset into the data); padding to the
//! alignment (`general.alignment`, 32 by default); the tensor data.
//!
//! Files come from strangers, so every length and count is checked against the bytes that
//! remain before anything is allocated for it, every size and offset is computed with
//! checked arithmetic, and each tensor's bytes must lie inside the file, start aligned and
//! be a whole number of its type's blocks. Metadata arrays are not copied: an [`Array`] is
//! its element type, count and byte range, read on demand (so a vocabulary of 150k strings
//! costs nothing until the tokenizer asks for it). What the parser allocates is at most a
//! small multiple of the file's size, whatever the file declares.

use crate::kernels::quant::QType;
use crate::{Error, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"GGUF";
/// Deepest nesting of arrays inside arrays accepted.
const MAX_DEPTH: usize = 3;
/// GGML's largest number of tensor dimensions.
const MAX_DIMS: usize = 4;

/// A metadata value type (GGUF's numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Bytes of a fixed-size value; the smallest encoding for strings (an empty one: its
    /// u64 length) and arrays (an empty one: type and count).
    fn min_size(self) -> usize {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }

    /// GGUF's number for the type.
    pub fn id(self) -> u32 {
        self as u32
    }

    fn fixed(self) -> bool {
        !matches!(self, ValueType::String | ValueType::Array)
    }
}

/// A metadata value. Arrays stay in the file ([`Array`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Array),
}

impl Value {
    /// The value as an unsigned integer (any integer type holding a value ≥ 0).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(x) => Some(x as u64),
            Value::U16(x) => Some(x as u64),
            Value::U32(x) => Some(x as u64),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    /// The value as a float (float types, and integers).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x as f64),
            Value::F64(x) => Some(x),
            Value::I8(x) => Some(x as f64),
            Value::I16(x) => Some(x as f64),
            Value::I32(x) => Some(x as f64),
            Value::I64(x) => Some(x as f64),
            _ => self.as_u64().map(|x| x as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// A metadata array left in the file: its element type, length and bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub elem: ValueType,
    pub len: usize,
    bytes: Range<usize>,
}

/// One tensor's description; its bytes are `Gguf::bytes`.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions innermost first, as GGUF stores them: a matrix of `rows` × `cols` (row-major)
    /// is [cols, rows].
    pub dims: Vec<usize>,
    pub qtype: QType,
    /// Byte range inside the file.
    pub range: Range<usize>,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// The shape outermost first (as PyTorch writes it): [rows, cols] for a matrix.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// An open GGUF file.
pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    map: Arc<Mmap>,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

/// A cursor over the file's bytes that never reads past the end.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: impl std::fmt::Display) -> Error {
        Error::format(self.path, format!("not a valid GGUF file: {what}"))
    }

    fn remaining(&self) -> usize {
        self.b.len() - self.at
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "{what} at byte {} needs {n} bytes but the file ends after {}",
                self.at,
                self.remaining()
            )));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A count that must fit in the remaining bytes at `min_size` bytes per item.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let room = (self.remaining() / min_size.max(1)) as u64;
        if n > room {
            return Err(self.err(format!(
                "{what} is {n}, more than the {} bytes left could hold",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<&'a str> {
        let n = self.count(&format!("the length of {what}"), 1)?;
        let at = self.at;
        let b = self.take(n, what)?;
        std::str::from_utf8(b).map_err(|_| self.err(format!("{what} at byte {at} is not UTF-8")))
    }

    fn value_type(&mut self, what: &str) -> Result<ValueType> {
        let id = self.u32(what)?;
        ValueType::from_id(id).ok_or_else(|| self.err(format!("{what} has unknown type {id}")))
    }

    fn value(&mut self, t: ValueType, what: &str, depth: usize) -> Result<Value> {
        let b = self.take(if t.fixed() { t.min_size() } else { 0 }, what)?;
        let mut a = [0u8; 8];
        a[..b.len()].copy_from_slice(b);
        Ok(match t {
            ValueType::U8 => Value::U8(a[0]),
            ValueType::I8 => Value::I8(a[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes([a[0], a[1]])),
            ValueType::I16 => Value::I16(i16::from_le_bytes([a[0], a[1]])),
            ValueType::U32 => Value::U32(u32::from_le_bytes([a[0], a[1], a[2], a[3]])),
            ValueType::I32 => Value::I32(i32::from_le_bytes([a[0], a[1], a[2], a[3]])),
            ValueType::F32 => Value::F32(f32::from_le_bytes([a[0], a[1], a[2], a[3]])),
            ValueType::U64 => Value::U64(u64::from_le_bytes(a)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(a)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(a)),
            ValueType::Bool => match a[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                x => return Err(self.err(format!("{what} is a bool holding {x}"))),
            },
            ValueType::String => Value::String(self.string(what)?.to_owned()),
            ValueType::Array => Value::Array(self.array(what, depth)?),
        })
    }

    /// An array's header, then a walk over its items (checking each) without keeping them.
    fn array(&mut self, what: &str, depth: usize) -> Result<Array> {
        if depth >= MAX_DEPTH {
            return Err(self.err(format!("{what}: arrays nested deeper than {MAX_DEPTH}")));
        }
        let elem = self.value_type(&format!("the element type of {what}"))?;
        let len = self.count(&format!("the length of {what}"), elem.min_size())?;
        let start = self.at;
        if elem.fixed() {
            self.take(len * elem.min_size(), what)?;
        } else {
            for i in 0..len {
                match elem {
                    ValueType::String => {
                        self.string(&format!("item {i} of {what}"))?;
                    }
                    _ => {
                        self.array(&format!("item {i} of {what}"), depth + 1)?;
                    }
                }
            }
        }
        Ok(Array {
            elem,
            len,
            bytes: start..self.at,
        })
    }
}

/// What a file's header says, checked against its bytes.
struct Parsed {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

/// Parses and checks the header of the GGUF file `bytes` (named `path` in errors).
fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let mut c = Cursor {
        b: bytes,
        at: 0,
        path,
    };
    let magic = c.take(4, "the magic number").map_err(|_| {
        Error::format(
            path,
            "not a GGUF file (shorter than its 4-byte magic number)",
        )
    })?;
    if magic != MAGIC {
        return Err(Error::format(
            path,
            format!("not a GGUF file (it starts with {magic:02x?}, not \"GGUF\")"),
        ));
    }
    let version = c.u32("the version")?;
    if version != 2 && version != 3 {
        return Err(c.err(format!(
            "version {version} (quill reads versions 2 and 3{})",
            if version.swap_bytes() <= 3 {
                "; this looks like a big-endian file"
            } else {
                ""
            }
        )));
    }
    // a tensor info is at least 8 (name) + 4 + 8 (one dimension) + 4 + 8 bytes
    let n_tensors = c.count("the tensor count", 32)?;
    // a key-value pair is at least 8 (key) + 4 + 1 bytes
    let n_kv = c.count("the metadata count", 13)?;
    let mut metadata = Vec::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key {i}"))?.to_owned();
        let t = c.value_type(&format!("the type of metadata {key}"))?;
        let v = c.value(t, &format!("metadata {key}"), 0)?;
        if metadata.iter().any(|(k, _)| *k == key) {
            return Err(c.err(format!("metadata key {key} appears twice")));
        }
        metadata.push((key, v));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => 32,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 16 => a as usize,
            _ => {
                return Err(c.err(format!(
                    "general.alignment is {v:?}, not a power of two up to 65536"
                )))
            }
        },
    };
    let mut infos = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.string(&format!("the name of tensor {i}"))?.to_owned();
        let n_dims = c.u32(&format!("the dimension count of tensor {name}"))? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(c.err(format!(
                "tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for d in 0..n_dims {
            let x = c.u64(&format!("dimension {d} of tensor {name}"))?;
            if x == 0 || x > usize::MAX as u64 {
                return Err(c.err(format!("tensor {name} has dimension {d} = {x}")));
            }
            dims.push(x as usize);
        }
        let type_id = c.u32(&format!("the type of tensor {name}"))?;
        let offset = c.u64(&format!("the offset of tensor {name}"))?;
        infos.push((name, dims, type_id, offset));
    }
    let data_start = c.at.div_ceil(alignment).checked_mul(alignment);
    let data_start = data_start
        .filter(|&s| s <= bytes.len())
        .ok_or_else(|| c.err("the tensor data would start past the end of the file"))?;
    let mut tensors = Vec::with_capacity(n_tensors);
    let mut by_name = HashMap::with_capacity(n_tensors);
    for (name, dims, type_id, offset) in infos {
        let qtype = QType::from_ggml(type_id).ok_or_else(|| {
            c.err(format!(
                "tensor {name} has GGML type {type_id}, which quill does not read (it reads {})",
                QType::ALL.map(|t| t.name()).join(", ")
            ))
        })?;
        let elements = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| c.err(format!("tensor {name}: dimensions {dims:?} overflow")))?;
        if !dims[0].is_multiple_of(qtype.block()) {
            return Err(c.err(format!(
                "tensor {name}: rows of {} numbers are not whole {}-number blocks of {}",
                dims[0],
                qtype.block(),
                qtype.name()
            )));
        }
        let size = qtype
            .bytes_for(elements)
            .ok_or_else(|| c.err(format!("tensor {name}: its size overflows")))?;
        let start = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data_start))
            .filter(|_| offset.is_multiple_of(alignment as u64))
            .ok_or_else(|| {
                c.err(format!(
                    "tensor {name}: offset {offset} is not a multiple of the alignment {alignment}"
                ))
            })?;
        let end = start.checked_add(size).filter(|&e| e <= bytes.len()).ok_or_else(|| {
            c.err(format!(
                "tensor {name}: its {size} bytes at offset {offset} run past the end of the file ({} bytes)",
                bytes.len()
            ))
        })?;
        if by_name.insert(name.clone(), tensors.len()).is_some() {
            return Err(c.err(format!("tensor {name} appears twice")));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            qtype,
            range: start..end,
        });
    }
    Ok(Parsed {
        version,
        metadata,
        tensors,
        by_name,
    })
}

impl Gguf {
    /// Opens and checks a GGUF file (the tensor data is mapped, not read).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // Safety: the map is read-only; a file changed underneath by another process is
        // outside what any memory-mapped reader can defend against (model files are
        // replaced by rename, never rewritten in place).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path, Arc::new(map))
    }

    fn parse(path: &Path, map: Arc<Mmap>) -> Result<Self> {
        let p = parse_bytes(path, &map[..])?;
        Ok(Gguf {
            path: path.to_path_buf(),
            version: p.version,
            map,
            metadata: p.metadata,
            tensors: p.tensors,
            by_name: p.by_name,
        })
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn bad(&self, key: &str, v: &Value, want: &str) -> Error {
        Error::format(
            &self.path,
            format!("metadata {key} is a {} ({v:?}), not {want}", v.type_name()),
        )
    }

    /// An optional unsigned integer that fits in `usize`.
    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.bad(key, v, "an unsigned integer")),
        }
    }

    /// A required unsigned integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| Error::format(&self.path, format!("metadata {key} is missing")))
    }

    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(key, v, "a number")),
        }
    }

    pub fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.bad(key, v, "a string")),
        }
    }

    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(key, v, "a bool")),
        }
    }

    /// An optional array whose items are of type `elem`.
    pub fn array_opt(&self, key: &str, elem: ValueType) -> Result<Option<&Array>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) if a.elem == elem => Ok(Some(a)),
            Some(Value::Array(a)) => Err(Error::format(
                &self.path,
                format!(
                    "metadata {key} is an array of {:?}, not of {elem:?}",
                    a.elem
                ),
            )),
            Some(v) => Err(self.bad(key, v, "an array")),
        }
    }

    /// The strings of a string array, in order.
    pub fn strings<'a>(&'a self, a: &Array) -> impl Iterator<Item = &'a str> + 'a {
        debug_assert_eq!(a.elem, ValueType::String);
        let mut c = Cursor {
            b: &self.map[a.bytes.clone()],
            at: 0,
            path: &self.path,
        };
        // the parser checked every item, so these reads succeed
        (0..a.len).map_while(move |i| c.string(&format!("item {i}")).ok())
    }

    /// The items of an array of numbers, as f64 (integers and floats of any width).
    pub fn numbers(&self, a: &Array) -> Result<Vec<f64>> {
        if !a.elem.fixed() || a.elem == ValueType::Bool {
            return Err(Error::format(
                &self.path,
                format!("an array of {:?} where numbers were expected", a.elem),
            ));
        }
        let mut c = Cursor {
            b: &self.map[a.bytes.clone()],
            at: 0,
            path: &self.path,
        };
        (0..a.len)
            .map(|i| {
                c.value(a.elem, &format!("item {i}"), 0)
                    .map(|v| v.as_f64().unwrap_or(f64::NAN))
            })
            .collect()
    }

    /// An array's items as the file encodes them (after its type and length).
    pub fn array_bytes(&self, a: &Array) -> &[u8] {
        &self.map[a.bytes.clone()]
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// A tensor's bytes (in bounds: checked when the file was opened).
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.range.clone()]
    }

    /// The memory map, for weights that stay in the file.
    pub fn map(&self) -> &Arc<Mmap> {
        &self.map
    }

    /// A tensor's numbers in f32 (dequantized).
    pub fn dequantize(&self, t: &TensorInfo) -> Vec<f32> {
        let mut out = vec![0.0; t.elements()];
        crate::kernels::quant::dequantize(t.qtype, self.bytes(t), &mut out);
        out
    }
}

/// Reads `bytes` as a GGUF file the way the loaders do, everything it declares included: every
/// metadata array's items and every tensor's numbers (dequantized). For the fuzz target
/// (`fuzz/fuzz_targets/gguf.rs`): whatever the bytes, this returns an error or the count of
/// numbers read, and never panics or allocates beyond a small multiple of their length.
pub fn check_bytes(bytes: &[u8]) -> Result<usize> {
    let path = Path::new("<fuzz input>");
    let p = parse_bytes(path, bytes)?;
    let mut read = 0usize;
    for (_, v) in &p.metadata {
        if let Value::Array(a) = v {
            let mut c = Cursor {
                b: &bytes[a.bytes.clone()],
                at: 0,
                path,
            };
            for i in 0..a.len {
                match a.elem {
                    ValueType::String => read += c.string(&format!("item {i}"))?.len(),
                    ValueType::Array => read += c.array(&format!("item {i}"), 1)?.len,
                    t => read += c.value(t, &format!("item {i}"), 0).map(|_| 1)?,
                }
            }
        }
    }
    // 64 blocks at a time through one buffer
    let mut out = vec![0.0f32; 64 * crate::kernels::quant::QK_K];
    for t in &p.tensors {
        let (n, bb) = (t.qtype.block(), t.qtype.block_bytes());
        for blocks in bytes[t.range.clone()].chunks(64 * bb) {
            let k = blocks.len() / bb * n;
            crate::kernels::quant::dequantize(t.qtype, blocks, &mut out[..k]);
            read += k;
        }
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/gguf")
            .join(name)
    }

    /// Every type's dequantization equals the `gguf` package's, bit for bit.
    #[test]
    fn dequantizes_every_type_as_the_gguf_package_does() {
        let g = Gguf::open(&fixture("quants.gguf")).unwrap();
        assert_eq!(g.version, 3);
        let mut seen = Vec::new();
        for t in g
            .tensors()
            .iter()
            .filter(|t| !t.name.ends_with(".expected"))
        {
            let want = g.tensor(&format!("{}.expected", t.name)).unwrap();
            assert_eq!(want.qtype, QType::F32);
            assert_eq!(want.dims, t.dims);
            let (got, want) = (g.dequantize(t), g.dequantize(want));
            let differ = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differ, 0, "{}: {differ} numbers differ", t.name);
            assert!(want.iter().any(|&x| x != 0.0));
            seen.push(t.qtype);
        }
        assert_eq!(seen, QType::ALL.to_vec());
    }

    /// A GGUF file built byte by byte.
    #[derive(Default)]
    struct B(Vec<u8>);

    impl B {
        fn header(version: u32, tensors: u64, kvs: u64) -> B {
            let mut b = B(b"GGUF".to_vec());
            b.u32(version).u64(tensors).u64(kvs);
            b
        }
        fn u32(&mut self, x: u32) -> &mut Self {
            self.0.extend_from_slice(&x.to_le_bytes());
            self
        }
        fn u64(&mut self, x: u64) -> &mut Self {
            self.0.extend_from_slice(&x.to_le_bytes());
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.u64(s.len() as u64);
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        /// A tensor info: name, dims, type, offset.
        fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
            self.str(name).u32(dims.len() as u32);
            dims.iter().for_each(|&d| {
                self.u64(d);
            });
            self.u32(ty).u64(offset)
        }
        fn pad_to(&mut self, align: usize, extra: usize) -> &mut Self {
            while !self.0.len().is_multiple_of(align) {
                self.0.push(0);
            }
            self.0.extend(std::iter::repeat_n(0u8, extra));
            self
        }
    }

    fn parse(bytes: &[u8]) -> Result<Gguf> {
        let dir = std::env::temp_dir().join(format!("quill-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{:x}.gguf", {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            h.finish()
        }));
        std::fs::write(&p, bytes).unwrap();
        let r = Gguf::open(&p);
        std::fs::remove_file(&p).ok();
        r
    }

    fn refused(bytes: &[u8], needle: &str) {
        match parse(bytes) {
            Ok(_) => panic!("accepted a file that should be refused ({needle})"),
            Err(e) => {
                let m = e.to_string();
                assert!(m.contains(needle), "{m:?} does not mention {needle:?}");
                assert!(!m.contains('\n'), "{m:?}");
            }
        }
    }

    #[test]
    fn a_good_file_built_here_reads_back() {
        let mut b = B::header(3, 1, 2);
        b.str("general.architecture").u32(8).str("llama");
        b.str("tokens").u32(9).u32(8).u64(2).str("a").str("bc");
        b.tensor("t", &[32, 2], QType::Q8_0.ggml_id(), 0);
        b.pad_to(32, 2 * 34);
        let g = parse(&b.0).unwrap();
        assert_eq!(g.str_opt("general.architecture").unwrap(), Some("llama"));
        let a = g.array_opt("tokens", ValueType::String).unwrap().unwrap();
        assert_eq!(g.strings(a).collect::<Vec<_>>(), ["a", "bc"]);
        assert!(g.array_opt("tokens", ValueType::I32).is_err());
        assert_eq!(g.tensor("t").unwrap().shape(), [2, 32]);
        assert_eq!(g.tensor("t").unwrap().range.len(), 68);
    }

    #[test]
    fn every_truncation_of_a_real_file_is_refused() {
        let good = std::fs::read(fixture("quants.gguf")).unwrap();
        let g = parse(&good).unwrap();
        let data_start = g.tensors().iter().map(|t| t.range.start).min().unwrap();
        let last_end = g.tensors().iter().map(|t| t.range.end).max().unwrap();
        for cut in (0..data_start).chain([data_start + 1, last_end - 1]) {
            assert!(parse(&good[..cut]).is_err(), "cut at {cut}");
            assert!(check_bytes(&good[..cut]).is_err(), "cut at {cut}");
        }
        // the fuzz target's reader reads every number of the whole file
        let numbers: usize = g.tensors().iter().map(|t| t.elements()).sum();
        assert!(check_bytes(&good).unwrap() >= numbers);
    }

    #[test]
    fn crafted_headers_are_refused_before_allocating() {
        // the 2^63-element arrays of a 43-byte file
        let mut b = B::header(3, 0, 1);
        b.str("k").u32(9).u32(0).u64(1 << 62);
        refused(&b.0, "length of metadata k");
        let mut b = B::header(3, 0, 1);
        b.str("k").u32(9).u32(8).u64(u64::MAX);
        refused(&b.0, "length of metadata k");
        // a string length that wraps when 8 is added to it (CVE-2024-23496)
        let mut b = B::header(3, 0, 1);
        b.u64(u64::MAX - 7)
            .0
            .extend_from_slice(b"key and some bytes after it");
        refused(&b.0, "metadata key 0");
        // counts larger than the file could hold
        refused(&B::header(3, u64::MAX, 0).0, "tensor count");
        refused(&B::header(3, 0, 1 << 40).0, "metadata count");
        refused(&B::header(1, 0, 0).0, "version 1");
        refused(&B::header(3u32.swap_bytes(), 0, 0).0, "big-endian");
        // a value of an unknown type, a bool that is neither 0 nor 1, nesting too deep
        let mut b = B::header(3, 0, 1);
        b.str("k").u32(13).u32(0);
        refused(&b.0, "unknown type 13");
        let mut b = B::header(3, 0, 1);
        b.str("k").u32(7).0.push(2);
        refused(&b.0, "bool holding 2");
        let mut b = B::header(3, 0, 1);
        b.str("k")
            .u32(9)
            .u32(9)
            .u64(1)
            .u32(9)
            .u64(1)
            .u32(9)
            .u64(1)
            .u32(4)
            .u64(0);
        refused(&b.0, "nested deeper");
        let mut b = B::header(3, 0, 2);
        b.str("k").u32(4).u32(1).str("k").u32(4).u32(2);
        refused(&b.0, "appears twice");
        let mut b = B::header(3, 0, 1);
        b.str("general.alignment").u32(4).u32(48);
        refused(&b.0, "power of two");
    }

    #[test]
    fn crafted_tensor_infos_are_refused() {
        let file = |name: &str, dims: &[u64], ty: u32, offset: u64, data: usize| {
            let mut b = B::header(3, 1, 0);
            b.tensor(name, dims, ty, offset).pad_to(32, data);
            b.0
        };
        let f32_id = QType::F32.ggml_id();
        assert!(parse(&file("t", &[4, 2], f32_id, 0, 32)).is_ok());
        refused(
            &file("t", &[1 << 32, 1 << 32, 1 << 32], f32_id, 0, 32),
            "overflow",
        );
        refused(&file("t", &[4, 2], f32_id, 0, 31), "past the end");
        refused(&file("t", &[4, 2], f32_id, 32, 32), "past the end");
        refused(&file("t", &[4, 2], f32_id, u64::MAX - 3, 32), "offset");
        refused(
            &file("t", &[4, 2], f32_id, 4, 64),
            "not a multiple of the alignment",
        );
        refused(&file("t", &[4, 2], 16, 0, 32), "GGML type 16");
        refused(&file("t", &[4, 2], 999, 0, 32), "GGML type 999");
        refused(
            &file("t", &[48, 1], QType::Q4_0.ggml_id(), 0, 64),
            "whole 32-number blocks",
        );
        refused(&file("t", &[0, 2], f32_id, 0, 32), "dimension 0 = 0");
        refused(&file("t", &[1, 1, 1, 1, 1], f32_id, 0, 32), "5 dimensions");
        let mut b = B::header(3, 2, 0);
        b.tensor("t", &[4], f32_id, 0).tensor("t", &[4], f32_id, 32);
        b.pad_to(32, 64);
        refused(&b.0, "appears twice");
    }
}
