//! One flat f32 buffer holds every parameter (and, with the same layout, every gradient and
//! optimizer moment). Named views use the Hugging Face weight names, so saving and loading
//! are copies.

use std::collections::HashMap;

/// A contiguous slice of a flat buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub offset: usize,
    pub len: usize,
}

impl View {
    pub fn of<'a>(&self, buf: &'a [f32]) -> &'a [f32] {
        &buf[self.offset..self.offset + self.len]
    }
    pub fn of_mut<'a>(&self, buf: &'a mut [f32]) -> &'a mut [f32] {
        &mut buf[self.offset..self.offset + self.len]
    }
    /// Two disjoint views of one buffer, both mutable.
    pub fn pair_mut(a: View, b: View, buf: &mut [f32]) -> (&mut [f32], &mut [f32]) {
        assert!(
            a.offset + a.len <= b.offset || b.offset + b.len <= a.offset,
            "views overlap"
        );
        if a.offset < b.offset {
            let (lo, hi) = buf.split_at_mut(b.offset);
            (&mut lo[a.offset..a.offset + a.len], &mut hi[..b.len])
        } else {
            let (lo, hi) = buf.split_at_mut(a.offset);
            (&mut hi[..a.len], &mut lo[b.offset..b.offset + b.len])
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub view: View,
}

impl TensorSpec {
    /// Matrices (and embedding tables) get weight decay; vectors (biases, norm weights) do not.
    pub fn is_matrix(&self) -> bool {
        self.shape.len() >= 2
    }
}

/// The ordered list of named tensors in a flat buffer.
#[derive(Clone, Debug, Default)]
pub struct ParamLayout {
    pub tensors: Vec<TensorSpec>,
    pub total: usize,
    index: HashMap<String, usize>,
}

impl ParamLayout {
    pub fn push(&mut self, name: impl Into<String>, shape: &[usize]) -> View {
        let name = name.into();
        let len = shape.iter().product();
        let view = View {
            offset: self.total,
            len,
        };
        self.index.insert(name.clone(), self.tensors.len());
        self.tensors.push(TensorSpec {
            name,
            shape: shape.to_vec(),
            view,
        });
        self.total += len;
        view
    }

    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_tile_the_buffer() {
        let mut l = ParamLayout::default();
        let a = l.push("a.weight", &[2, 3]);
        let b = l.push("a.bias", &[3]);
        assert_eq!((a.offset, a.len, b.offset, b.len, l.total), (0, 6, 6, 3, 9));
        assert!(l.get("a.weight").unwrap().is_matrix() && !l.get("a.bias").unwrap().is_matrix());
        let mut buf: Vec<f32> = (0..9).map(|x| x as f32).collect();
        let (x, y) = View::pair_mut(b, a, &mut buf);
        assert_eq!((x[0], y[0]), (6.0, 0.0));
    }
}
