//! Training data: token sequences (in memory or memory-mapped shards) split into train and
//! validation parts, random training windows drawn from a seeded generator, and the
//! validation split cut into windows that predict every validation token exactly once.

pub mod prepare;
pub mod sft;
pub mod shard;

use crate::kernels::crossentropy::IGNORE;
use crate::rng::Rng;
use crate::{Error, Result};
use shard::Shard;

/// A token sequence: a vector, or shards read as one concatenated sequence.
pub enum Tokens {
    Mem(Vec<u32>),
    Shards {
        shards: Vec<Shard>,
        starts: Vec<usize>,
        len: usize,
    },
}

impl Tokens {
    pub fn from_shards(shards: Vec<Shard>) -> Self {
        let mut starts = Vec::with_capacity(shards.len());
        let mut len = 0;
        for s in &shards {
            starts.push(len);
            len += s.len();
        }
        Tokens::Shards {
            shards,
            starts,
            len,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Tokens::Mem(v) => v.len(),
            Tokens::Shards { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens start..start+out.len() (across shard boundaries).
    pub fn read(&self, start: usize, out: &mut [u32]) {
        match self {
            Tokens::Mem(v) => out.copy_from_slice(&v[start..start + out.len()]),
            Tokens::Shards { shards, starts, .. } => {
                let mut done = 0;
                let mut i = starts.partition_point(|&s| s <= start).saturating_sub(1);
                while done < out.len() {
                    let pos = start + done - starts[i];
                    let n = (shards[i].len() - pos).min(out.len() - done);
                    shards[i].read(pos, &mut out[done..done + n]);
                    done += n;
                    i += 1;
                }
            }
        }
    }

    /// A cheap identity of the sequence (its length and a hash of a sample of its tokens),
    /// so a resumed run can check it trains on the same data.
    pub fn fingerprint(&self) -> String {
        let n = self.len();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let stride = (n / 65_536).max(1);
        let mut buf = [0u32; 1];
        let mut i = 0;
        while i < n {
            self.read(i, &mut buf);
            h = (h ^ buf[0] as u64 ^ ((i as u64) << 32)).wrapping_mul(0x100_0000_01b3);
            i += stride;
        }
        format!("{n}:{h:016x}")
    }
}

pub struct Split {
    pub train: Tokens,
    pub val: Tokens,
}

/// The first (1 - val_fraction) of the tokens train, the rest validate.
pub fn split(tokens: Vec<u32>, val_fraction: f64, context: usize) -> Result<Split> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(Error::Input(format!(
            "validation fraction {val_fraction} must be in [0, 1)"
        )));
    }
    let n_val = (tokens.len() as f64 * val_fraction) as usize;
    let n_train = tokens.len() - n_val;
    if n_train < context + 1 {
        return Err(Error::Input(format!(
            "the training split has {n_train} tokens; at least {} are needed for a context of {context}",
            context + 1
        )));
    }
    let mut train = tokens;
    let val = train.split_off(n_train);
    Ok(Split {
        train: Tokens::Mem(train),
        val: Tokens::Mem(val),
    })
}

/// ids/targets [B, T] from random windows of `data`: targets are the ids shifted by one.
pub fn sample_batch(
    rng: &mut Rng,
    data: &Tokens,
    b: usize,
    t: usize,
    ids: &mut [u32],
    targets: &mut [u32],
) {
    sample_rows(rng, data, (b, 0..b), t, ids, targets);
}

/// Rows `rows` of a batch of `b` random windows (a data-parallel rank's share): every
/// window's start is drawn, so `rng` ends where a whole batch leaves it and the windows do
/// not depend on how the batch is split; only the rows in `rows` are read, into ids/targets
/// [rows.len(), T].
pub fn sample_rows(
    rng: &mut Rng,
    data: &Tokens,
    (b, rows): (usize, std::ops::Range<usize>),
    t: usize,
    ids: &mut [u32],
    targets: &mut [u32],
) {
    for bi in 0..b {
        let start = rng.below(data.len() - t);
        if rows.contains(&bi) {
            let r = bi - rows.start;
            data.read(start, &mut ids[r * t..(r + 1) * t]);
            data.read(start + 1, &mut targets[r * t..(r + 1) * t]);
        }
    }
}

/// Number of evaluation windows of length t over `data` (consecutive, non-overlapping).
pub fn eval_windows(data: &Tokens, t: usize) -> usize {
    data.len().saturating_sub(1).div_ceil(t)
}

/// Fills ids/targets [B, T] with windows first..first+B; positions past the end are padding
/// with IGNORE targets (causal attention keeps them from affecting the real positions).
pub fn eval_batch(
    data: &Tokens,
    t: usize,
    first: usize,
    b: usize,
    ids: &mut [u32],
    targets: &mut [u32],
) {
    let last = data.len().saturating_sub(1);
    let mut one = [0u32; 2];
    for bi in 0..b {
        for ti in 0..t {
            let pos = (first + bi) * t + ti;
            let k = bi * t + ti;
            if pos < last {
                data.read(pos, &mut one);
                ids[k] = one[0];
                targets[k] = one[1];
            } else {
                ids[k] = 0;
                targets[k] = IGNORE;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_windows_predict_each_token_once() {
        let data = Tokens::Mem((0..23).collect());
        let t = 5;
        let w = eval_windows(&data, t);
        assert_eq!(w, 5);
        let mut seen = vec![];
        let (mut ids, mut tg) = (vec![0; 2 * t], vec![0; 2 * t]);
        let mut first = 0;
        while first < w {
            eval_batch(&data, t, first, 2, &mut ids, &mut tg);
            for k in 0..2 * t {
                if tg[k] != IGNORE {
                    assert_eq!(tg[k], ids[k] + 1);
                    seen.push(tg[k]);
                }
            }
            first += 2;
        }
        assert_eq!(seen, (1..23).collect::<Vec<u32>>());
    }

    #[test]
    fn a_ranks_rows_are_those_rows_of_the_whole_batch() {
        let data = Tokens::Mem((0..500).collect());
        let (b, t) = (6, 7);
        let mut rng = Rng::new(9);
        let (mut ids, mut tg) = (vec![0; b * t], vec![0; b * t]);
        sample_batch(&mut rng, &data, b, t, &mut ids, &mut tg);
        for rows in [0..3, 3..6, 2..4] {
            let mut r = Rng::new(9);
            let n = rows.len() * t;
            let (mut i2, mut t2) = (vec![0; n], vec![0; n]);
            sample_rows(&mut r, &data, (b, rows.clone()), t, &mut i2, &mut t2);
            assert_eq!(i2, ids[rows.start * t..rows.end * t]);
            assert_eq!(t2, tg[rows.start * t..rows.end * t]);
            // the stream ends where the whole batch left it
            assert_eq!(r, rng);
        }
    }

    #[test]
    fn batches_are_shifted_windows_and_split_checks_sizes() {
        let s = split((0..100).collect(), 0.1, 8).unwrap();
        assert_eq!((s.train.len(), s.val.len()), (90, 10));
        let mut first = [0u32];
        s.val.read(0, &mut first);
        assert_eq!(first[0], 90);
        assert!(split((0..5).collect(), 0.1, 8).is_err());
        let mut rng = Rng::new(1);
        let (mut ids, mut tg) = (vec![0; 24], vec![0; 24]);
        sample_batch(&mut rng, &s.train, 3, 8, &mut ids, &mut tg);
        for k in 0..24 {
            assert_eq!(tg[k], ids[k] + 1);
        }
    }

    #[test]
    fn shards_read_as_one_sequence() {
        let dir = std::env::temp_dir().join(format!("quill-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut shards = vec![];
        let mut all = vec![];
        for (i, n) in [5usize, 1, 7].into_iter().enumerate() {
            let p = dir.join(format!("{i}.bin"));
            let toks: Vec<u32> = (0..n as u32).map(|x| x * 10 + i as u32).collect();
            let mut w = shard::ShardWriter::create(&p, 2, 1000).unwrap();
            w.write(&toks).unwrap();
            w.finish().unwrap();
            all.extend(toks);
            shards.push(Shard::open(&p).unwrap());
        }
        let t = Tokens::from_shards(shards);
        let m = Tokens::Mem(all.clone());
        assert_eq!(t.len(), 13);
        for start in 0..13 {
            for len in 0..=13 - start {
                let (mut a, mut b) = (vec![0; len], vec![0; len]);
                t.read(start, &mut a);
                m.read(start, &mut b);
                assert_eq!(a, b);
            }
        }
        assert_eq!(t.fingerprint(), m.fingerprint());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
