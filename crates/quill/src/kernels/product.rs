//! What quill's two product kernels ([`super::sgemm`], f32; [`super::packed`], bf16) share:
//! the strided operands of one product ([`Strided`]), the work fused into it ([`Fusion`]) and
//! how a register tile reaches C ([`Store`]). A leaf: it imports no other kernel file but
//! `simd`, so the kernels below [`super::matmul`] (the one product entry) never import each
//! other.

/// The sizes of C [m, n] (+)= op(A) [m, k] · op(B) [k, n].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl Dims {
    pub fn new(m: usize, k: usize, n: usize) -> Self {
        Dims { m, k, n }
    }
}

/// A read-only strided matrix: element (i, j) at ptr + i·rs + j·cs.
#[derive(Clone, Copy, Debug)]
pub struct View {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

impl View {
    pub fn new(ptr: *const f32, rs: usize, cs: usize) -> Self {
        View { ptr, rs, cs }
    }
}

// Safety: a view only reads; whoever makes one promises its elements stay alive and unwritten
// while it is used (as for `Strided`, which holds views and is shared the same way).
unsafe impl Send for View {}
unsafe impl Sync for View {}

/// A writable matrix of unit column stride: element (i, j) at ptr + i·rs + j.
#[derive(Clone, Copy, Debug)]
pub struct ViewMut {
    pub ptr: *mut f32,
    pub rs: usize,
}

impl ViewMut {
    pub fn new(ptr: *mut f32, rs: usize) -> Self {
        ViewMut { ptr, rs }
    }
}

/// Whether a product adds into C or overwrites it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    Overwrite,
    Add,
}

impl From<bool> for Accumulate {
    fn from(add: bool) -> Self {
        match add {
            true => Accumulate::Add,
            false => Accumulate::Overwrite,
        }
    }
}

/// One strided product: C (+)= op(A) · op(B) with the fused work, on the threads of the
/// current rayon pool when `parallel` and large enough.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub dims: Dims,
    pub c: ViewMut,
    pub a: View,
    pub b: View,
    pub accumulate: Accumulate,
    pub parallel: bool,
    pub fusion: Fusion<'a>,
}

// Safety: a Strided names memory that the one product it describes reads (A, B, the
// residual) or writes in parts that never overlap between threads (C, the column sums).
unsafe impl Send for Strided<'_> {}
unsafe impl Sync for Strided<'_> {}

impl Strided<'_> {
    /// A product on one thread with nothing fused: C (+)= A · B for the views given.
    pub fn new(dims: Dims, c: ViewMut, a: View, b: View, accumulate: Accumulate) -> Self {
        Strided {
            dims,
            c,
            a,
            b,
            accumulate,
            parallel: false,
            fusion: Fusion::default(),
        }
    }

    pub fn adds(&self) -> bool {
        self.accumulate == Accumulate::Add
    }
}

/// Work fused into a product, so it costs no pass of its own over memory.
#[derive(Clone, Copy, Default)]
pub struct Fusion<'a> {
    /// Added to the product as C's starting value (instead of C's old value; not with
    /// `accumulate`): bias[j] on every row.
    pub bias: Option<&'a [f32]>,
    /// Also added as C's starting value: residual[i, j] at residual + i*rs + j.
    pub residual: Option<(*const f32, usize)>,
    /// Σ over k of op(b)[k, j] is added into col_sums[j] (f32 values, in k order) while B is
    /// packed: a bias gradient, when B is the output gradient.
    pub col_sums: Option<*mut f32>,
    /// B's values are rounded to bf16 (to nearest even) as they are packed, the column sums
    /// still taken from them unrounded: the B of a bf16 product run by the f32 kernel,
    /// without a rounded copy of B. Only quill's f32 kernel ([`super::sgemm`]) does it.
    pub round_b: bool,
    /// A's values are rounded to bf16 (to nearest even) as they are copied, a block of rows
    /// at a time, into the computing thread's own buffer: the A of a bf16 product run by the
    /// f32 kernel, without a rounded copy of the whole of A. Only [`super::sgemm`] does it.
    pub round_a: bool,
    /// B's values are stored in 2 bytes of this kind (B's view holds their address, cast, and
    /// strides counted in elements) and widened to f32 as they are packed: weights kept in
    /// half precision, multiplied with no f32 copy of their own. Needs B's depths contiguous
    /// (row stride 1, as for W [out, in] read as Wᵀ). Only [`super::sgemm`] does it.
    pub b_half: Option<Half>,
    /// A's values are bf16, stored with depths contiguous (column stride 1; its address cast,
    /// strides counted in elements): weights W [out, in] as the A of yᵀ = W·xᵀ. Only the bf16
    /// kernel ([`super::packed`]) takes it, reading A's pairs in place where it can.
    pub a_bf16: bool,
}

/// The two 2-byte float formats weights come in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    /// bfloat16: f32's upper half.
    Bf16,
    /// IEEE binary16.
    F16,
}

impl Fusion<'_> {
    /// Panics unless this work fits a product of n columns: a starting value (bias,
    /// residual) excludes accumulation, and the bias has n elements.
    pub fn check(&self, n: usize, accumulate: bool) {
        assert!(
            !(accumulate && (self.bias.is_some() || self.residual.is_some())),
            "a starting value and accumulation exclude each other"
        );
        if let Some(bias) = self.bias {
            assert!(bias.len() >= n);
        }
    }

    /// C [m, n] (row stride c_rs) <- its starting value alone: zero plus the bias and the
    /// residual when given (a product with no depth).
    ///
    /// # Safety
    /// C's rows are writable; the residual has m rows of n readable elements.
    pub unsafe fn write_start(&self, c: *mut f32, c_rs: usize, m: usize, n: usize) {
        for i in 0..m {
            let row = std::slice::from_raw_parts_mut(c.add(i * c_rs), n);
            row.fill(0.0);
            if let Some(bias) = self.bias {
                row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
            }
            if let Some((r, rs)) = self.residual {
                let r = std::slice::from_raw_parts(r.add(i * rs), n);
                row.iter_mut().zip(r).for_each(|(o, b)| *o += b);
            }
        }
    }
}

// Safety: the raw pointers in a Fusion are read (residual) or written in disjoint parts
// (col_sums, by the thread packing those columns) during the one product they belong to.
unsafe impl Send for Fusion<'_> {}
unsafe impl Sync for Fusion<'_> {}

/// How a tile's accumulators reach C (both product kernels' tiles, f32 and bf16).
#[derive(Clone, Copy)]
pub enum Store {
    /// C += tile.
    Add,
    /// C = tile + bias[j] (unless null) + residual[i, j] (unless null; its row stride).
    Init(*const f32, (*const f32, usize)),
}

impl Store {
    /// The store of the tile whose first element is C[i, j]: C's starting value from the
    /// fused bias and residual when `init` (the first depth block, not accumulating), else
    /// an addition to C.
    ///
    /// # Safety
    /// (i, j) lies inside C, whose shape the bias and residual have.
    pub unsafe fn at(fusion: &Fusion, init: bool, i: usize, j: usize) -> Store {
        if !init {
            return Store::Add;
        }
        Store::Init(
            fusion.bias.map_or(std::ptr::null(), |b| b.as_ptr().add(j)),
            fusion
                .residual
                .map_or((std::ptr::null(), 0), |(r, rs)| (r.add(i * rs + j), rs)),
        )
    }

    /// Starts bringing in the lines a tile's store will touch (C's, for writing, and a
    /// residual's), so they arrive while the tile computes; see
    /// [`super::simd::prefetch_tile`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub fn prefetch(self, c: *const f32, c_rs: usize, rows: usize, cols: usize) {
        super::simd::prefetch_tile(c, c_rs, rows, cols, true);
        if let Store::Init(_, (res, rs)) = self {
            if !res.is_null() {
                super::simd::prefetch_tile(res, rs, rows, cols, false);
            }
        }
    }
}
