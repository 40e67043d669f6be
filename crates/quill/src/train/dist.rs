//! Data-parallel training: the processes of a run (ranks) and the few collectives the
//! trainer needs of them.
//!
//! Every rank holds the whole model. A step's global batch is cut into equal row ranges, one
//! per rank; each rank runs forward and backward on its rows, and the gradients are summed
//! over ranks with a reduce-scatter: each rank receives the summed gradient of one contiguous
//! shard of the flat parameter vector. Then
//! - with ZeRO-1 (the default), each rank updates its shard alone with AdamW moments it alone
//!   holds (1/N of the optimizer's memory), and an all-gather hands every rank the updated
//!   parameters;
//! - without, the summed shards are all-gathered into every rank's full gradient and each
//!   rank takes the same AdamW step on the whole model.
//!
//! Either way each gradient element is summed once, on the rank that owns it, and copied from
//! there: every rank ends a step with bit-identical weights, whatever order the MPI library
//! sums in. The windows a step trains on are a function of the seed, the step and the row
//! (not of the number of ranks), so a run gives the same losses (up to the order of float
//! sums) on 1, 2 or N ranks, and resumes on a different number of ranks than it saved from.
//!
//! [`Single`] is the one-process run (every collective is the identity); `Mpi` (Cargo
//! feature `mpi`) runs over MPI's world communicator.

use crate::{Error, Result};
use std::ops::Range;

/// The ranks of a run and the collectives over them. Every rank must call each collective in
/// the same order (they block until all ranks arrive).
pub trait Comm {
    /// This process's index, 0..size.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn size(&self) -> usize;
    /// What carries the collectives (for the run's header).
    fn describe(&self) -> String;
    /// Element-wise sum over ranks, in place, on every rank.
    fn sum_f64(&self, x: &mut [f64]);
    /// `send` [size × recv.len()]: rank r receives the sum over ranks of block r.
    fn reduce_scatter(&self, send: &[f32], recv: &mut [f32]);
    /// Every rank's `send` (rank r's of length counts[r]) concatenated into `recv`.
    fn all_gather(&self, send: &[f32], recv: &mut [f32], counts: &[usize]);
    /// As [`Comm::all_gather`], into rank 0's `recv` alone (other ranks pass None).
    fn gather_to_root(&self, send: &[f32], recv: Option<&mut [f32]>, counts: &[usize]);
    /// Rank 0's `buf` copied into every rank's.
    fn broadcast(&self, buf: &mut [f32]);
    /// Waits until every rank arrives.
    fn barrier(&self);
    /// Ends every rank of the job (MPI_Abort); a single process exits.
    fn abort(&self, code: i32) -> !;
}

/// One process: rank 0 of 1.
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn describe(&self) -> String {
        "one process".into()
    }
    fn sum_f64(&self, _: &mut [f64]) {}
    fn reduce_scatter(&self, send: &[f32], recv: &mut [f32]) {
        recv.copy_from_slice(&send[..recv.len()]);
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32], _: &[usize]) {
        recv[..send.len()].copy_from_slice(send);
    }
    fn gather_to_root(&self, send: &[f32], recv: Option<&mut [f32]>, _: &[usize]) {
        if let Some(r) = recv {
            r[..send.len()].copy_from_slice(send);
        }
    }
    fn broadcast(&self, _: &mut [f32]) {}
    fn barrier(&self) {}
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Whether this process was started by an MPI launcher (`mpirun`, `mpiexec`, `srun`), as the
/// launchers' environment variables tell.
pub fn launched_by_mpi() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// Ranks the launcher started on this host (to share its cores), when it says.
pub fn local_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .filter(|&n| n > 0)
}

/// The run's communicator: MPI's world when launched by an MPI launcher, one process otherwise.
/// Launched by MPI without the `mpi` feature, it refuses (N independent copies of one run
/// would overwrite each other's output).
pub fn from_env() -> Result<std::rc::Rc<dyn Comm>> {
    if !launched_by_mpi() {
        return Ok(std::rc::Rc::new(Single));
    }
    #[cfg(feature = "mpi")]
    {
        Ok(std::rc::Rc::new(mpi_comm::Mpi::init()?))
    }
    #[cfg(not(feature = "mpi"))]
    {
        Err(Error::Input(
            "started by an MPI launcher, but this quill was built without MPI: build it with `cargo build --release --features mpi`".into(),
        ))
    }
}

/// The flat parameter vector cut into one contiguous shard per rank: `len` numbers each (the
/// last shorter, or empty, when `size` does not divide the total).
#[derive(Clone, Debug, PartialEq)]
pub struct Shards {
    pub total: usize,
    pub size: usize,
    pub len: usize,
}

impl Shards {
    pub fn new(total: usize, size: usize) -> Self {
        Shards {
            total,
            size,
            len: total.div_ceil(size.max(1)),
        }
    }

    /// The indices rank `r` owns.
    pub fn range(&self, r: usize) -> Range<usize> {
        (r * self.len).min(self.total)..((r + 1) * self.len).min(self.total)
    }

    /// Numbers owned by each rank.
    pub fn counts(&self) -> Vec<usize> {
        (0..self.size).map(|r| self.range(r).len()).collect()
    }

    /// Length of a buffer that holds every shard padded to `len` (for the reduce-scatter).
    pub fn padded(&self) -> usize {
        self.len * self.size
    }
}

/// Rows `[lo, hi)` of a global batch of `b` rows that rank `rank` of `size` trains on.
pub fn rows(b: usize, rank: usize, size: usize) -> Range<usize> {
    let per = b / size;
    rank * per..(rank + 1) * per
}

/// Checks that a global batch splits evenly over the ranks and that the collectives' counts
/// (32-bit in MPI) hold the model.
pub fn check_split(batch: usize, params: usize, size: usize) -> Result<()> {
    if size > 1 && !batch.is_multiple_of(size) {
        return Err(Error::Input(format!(
            "the batch ({batch} sequences) must split evenly over the {size} ranks: give --batch a multiple of {size}"
        )));
    }
    if size > 1 && params > i32::MAX as usize {
        return Err(Error::Input(format!(
            "{params} trained numbers are more than one MPI message holds (2^31 - 1)"
        )));
    }
    Ok(())
}

/// A 64-bit hash of the parameters' bits (FNV-1a over each number), to check that ranks agree.
pub fn params_hash(params: &[f32]) -> u64 {
    params.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x.to_bits() as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The exchange of a data-parallel step: the gradient summed over ranks, clipped by its
/// global norm, and AdamW's step (on this rank's shard alone with ZeRO-1), after which every
/// rank holds the same parameters. With one rank it is AdamW's plain step.
pub struct DataParallel {
    pub comm: std::rc::Rc<dyn Comm>,
    pub shards: Shards,
    /// ZeRO-1: AdamW's moments sharded over the ranks.
    pub zero: bool,
    /// This rank's shard of the summed gradient, then of the updated parameters.
    part: Vec<f32>,
    /// Numbers each rank owns (`shards.counts()`, kept: the exchange reads it every step).
    counts: Vec<usize>,
}

impl DataParallel {
    /// `trained`: how many numbers train.
    pub fn new(comm: std::rc::Rc<dyn Comm>, trained: usize, zero: bool) -> Self {
        let shards = Shards::new(trained, comm.size());
        let part = if comm.size() > 1 {
            vec![0.0; shards.len]
        } else {
            Vec::new()
        };
        DataParallel {
            zero: zero && comm.size() > 1,
            comm,
            counts: shards.counts(),
            shards,
            part,
        }
    }

    /// One process, no exchange.
    pub fn single(trained: usize) -> Self {
        Self::new(std::rc::Rc::new(Single), trained, false)
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Length of the gradient buffer (padded to whole shards when there are several ranks;
    /// the padding stays zero).
    pub fn grad_len(&self) -> usize {
        if self.size() > 1 {
            self.shards.padded()
        } else {
            self.shards.total
        }
    }

    /// The flat indices whose AdamW moments this rank holds.
    pub fn moment_range(&self) -> Range<usize> {
        if self.zero {
            self.shards.range(self.rank())
        } else {
            0..self.shards.total
        }
    }

    /// Sums `x` over ranks (identity with one).
    pub fn sum(&self, x: &mut [f64]) {
        if self.size() > 1 {
            self.comm.sum_f64(x);
        }
    }

    /// Clips and steps: `grads` (this rank's, [`DataParallel::grad_len`]) are summed over
    /// ranks; returns the summed gradient's norm before clipping.
    pub fn step(
        &mut self,
        opt: &mut crate::train::optimizer::AdamW,
        layout: &crate::model::ParamLayout,
        params: &mut [f32],
        grads: &mut [f32],
        (lr, clip): (f32, f32),
    ) -> f32 {
        use crate::train::optimizer::{clip_scale, sum_sq};
        let total = self.shards.total;
        if self.size() == 1 {
            return opt.step_clipped(layout, params, &grads[..total], lr, clip);
        }
        let r = self.shards.range(self.rank());
        let counts = &self.counts;
        self.comm.reduce_scatter(grads, &mut self.part);
        if !self.zero {
            // every rank gets the whole summed gradient and takes the same step
            self.comm
                .all_gather(&self.part[..r.len()], &mut grads[..total], counts);
            return opt.step_clipped(layout, params, &grads[..total], lr, clip);
        }
        let mut s = [sum_sq(&self.part[..r.len()])];
        self.comm.sum_f64(&mut s);
        let norm = s[0].sqrt() as f32;
        let own = &mut params[r.clone()];
        opt.step_part(
            layout,
            (own, r.start),
            &self.part[..r.len()],
            lr,
            clip_scale(norm, clip),
        );
        self.part[..r.len()].copy_from_slice(&params[r.clone()]);
        self.comm
            .all_gather(&self.part[..r.len()], &mut params[..total], counts);
        norm
    }

    /// The whole of a moment vector whose shards the ranks hold (ZeRO-1), on rank 0 (None
    /// elsewhere).
    pub fn gather_moments(&self, mine: &[f32]) -> Option<Vec<f32>> {
        if self.rank() == 0 {
            let mut full = vec![0.0; self.shards.total];
            self.comm
                .gather_to_root(mine, Some(&mut full), &self.counts);
            Some(full)
        } else {
            self.comm.gather_to_root(mine, None, &self.counts);
            None
        }
    }

    /// Whether every rank holds parameters with the same bits (each rank's hash gathered).
    pub fn ranks_agree(&self, params: &[f32]) -> bool {
        if self.size() == 1 {
            return true;
        }
        let h = params_hash(params);
        // 16-bit pieces: exact in f32
        let mine: Vec<f32> = (0..4).map(|i| ((h >> (16 * i)) & 0xffff) as f32).collect();
        let mut all = vec![0.0f32; 4 * self.size()];
        self.comm.all_gather(&mine, &mut all, &vec![4; self.size()]);
        all.chunks(4).all(|c| c == &mine[..])
    }
}

#[cfg(feature = "mpi")]
mod mpi_comm {
    use super::Comm;
    use crate::{Error, Result};
    use mpi::collective::SystemOperation;
    use mpi::datatype::PartitionMut;
    use mpi::environment::Universe;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;
    use mpi::Threading;

    /// MPI's world communicator. Dropping it finalizes MPI.
    pub struct Mpi {
        world: SimpleCommunicator,
        rank: usize,
        size: usize,
        // declared last: finalizes after the communicator is gone
        _universe: Universe,
    }

    fn displs(counts: &[i32]) -> Vec<i32> {
        counts
            .iter()
            .scan(0, |acc, &c| {
                let d = *acc;
                *acc += c;
                Some(d)
            })
            .collect()
    }

    impl Mpi {
        pub fn init() -> Result<Self> {
            // the training loop calls MPI from one thread at a time (the command's thread,
            // which need not be the one that started the process)
            let (universe, _) = mpi::initialize_with_threading(Threading::Serialized)
                .ok_or_else(|| Error::Input("MPI could not be initialized".into()))?;
            let world = universe.world();
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            Ok(Mpi {
                world,
                rank,
                size,
                _universe: universe,
            })
        }
    }

    impl Comm for Mpi {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn describe(&self) -> String {
            let v = mpi::environment::library_version().unwrap_or_else(|_| "MPI".into());
            let name = v.split(',').next().unwrap_or("MPI").trim().to_string();
            format!("{} ranks over {name}", self.size)
        }
        fn sum_f64(&self, x: &mut [f64]) {
            // the step's few scalars (counts, losses, flags) go through a stack copy: no
            // allocation per step
            let mut small = [0.0f64; 4];
            let send: std::borrow::Cow<[f64]> = if x.len() <= small.len() {
                small[..x.len()].copy_from_slice(x);
                std::borrow::Cow::Borrowed(&small[..x.len()])
            } else {
                std::borrow::Cow::Owned(x.to_vec())
            };
            self.world
                .all_reduce_into(&send[..], x, SystemOperation::sum());
        }
        fn reduce_scatter(&self, send: &[f32], recv: &mut [f32]) {
            self.world
                .reduce_scatter_block_into(send, recv, SystemOperation::sum());
        }
        fn all_gather(&self, send: &[f32], recv: &mut [f32], counts: &[usize]) {
            let counts: Vec<i32> = counts.iter().map(|&c| c as i32).collect();
            let d = displs(&counts);
            let total = counts.iter().sum::<i32>() as usize;
            let mut part = PartitionMut::new(&mut recv[..total], &counts[..], &d[..]);
            self.world.all_gather_varcount_into(send, &mut part);
        }
        fn gather_to_root(&self, send: &[f32], recv: Option<&mut [f32]>, counts: &[usize]) {
            let root = self.world.process_at_rank(0);
            match recv {
                Some(recv) => {
                    let counts: Vec<i32> = counts.iter().map(|&c| c as i32).collect();
                    let d = displs(&counts);
                    let total = counts.iter().sum::<i32>() as usize;
                    let mut part = PartitionMut::new(&mut recv[..total], &counts[..], &d[..]);
                    root.gather_varcount_into_root(send, &mut part);
                }
                None => root.gather_varcount_into(send),
            }
        }
        fn broadcast(&self, buf: &mut [f32]) {
            self.world.process_at_rank(0).broadcast_into(buf);
        }
        fn barrier(&self) {
            self.world.barrier();
        }
        fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_vector_once() {
        for (total, size) in [(10, 3), (9, 3), (1, 4), (0, 2), (1000, 7)] {
            let s = Shards::new(total, size);
            let mut next = 0;
            for r in 0..size {
                let range = s.range(r);
                assert_eq!(range.start, next.min(total));
                assert!(range.len() <= s.len);
                next = range.end;
            }
            assert_eq!(next, total);
            assert_eq!(s.counts().iter().sum::<usize>(), total);
            assert!(s.padded() >= total);
        }
    }

    #[test]
    fn rows_split_the_batch() {
        assert_eq!(rows(8, 0, 2), 0..4);
        assert_eq!(rows(8, 1, 2), 4..8);
        assert_eq!(rows(8, 0, 1), 0..8);
        assert!(check_split(8, 100, 3).is_err());
        assert!(check_split(9, 100, 3).is_ok());
    }

    #[test]
    fn hash_sees_every_bit() {
        let a = vec![1.0f32, 2.0, 3.0];
        let mut b = a.clone();
        b[2] = f32::from_bits(b[2].to_bits() ^ 1);
        assert_ne!(params_hash(&a), params_hash(&b));
        assert_eq!(params_hash(&a), params_hash(&a.clone()));
    }
}
