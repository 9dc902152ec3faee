//! A small deterministic mutation engine for the stable-toolchain run: a seeded PRNG and the
//! classic byte-level mutations (bit flips, interesting integers, arithmetic, insertion,
//! deletion, duplication, dictionary tokens, splicing between seeds). No coverage feedback: the
//! depth comes from seeds that are valid messages and from stacking several mutations.

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough to drive mutations.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`); the modulo bias is irrelevant here.
    pub fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0);
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `1 / n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
}

/// Values that sit on the edges parsers get wrong: zero, one, sign bits, all ones, and the sizes
/// of the structures and limits in vsnap's formats (FUSE header 40, 1 MiB writes, 4 KiB pages,
/// 512-byte sectors, 16 KiB/64 KiB HTTP limits).
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    15,
    16,
    24,
    32,
    39,
    40,
    41,
    63,
    64,
    100,
    127,
    128,
    255,
    256,
    511,
    512,
    513,
    1023,
    1024,
    4095,
    4096,
    4097,
    0x3fff,
    0x4000,
    0x4001,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x1_0001,
    0xf_ffff,
    0x10_0000,
    0x10_0001,
    0x10_1000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    0xffff_ffff_ffff_fffe,
    0xffff_ffff_ffff_ffff,
];

/// Produces mutated inputs from a fixed seed corpus. The same `seed` yields the same sequence.
pub struct Mutator<'a> {
    seeds: &'a [Vec<u8>],
    dict: &'a [&'a [u8]],
    max_len: usize,
    rng: Rng,
}

impl<'a> Mutator<'a> {
    /// `seeds` must not be empty; inputs never exceed `max_len` bytes.
    pub fn new(seeds: &'a [Vec<u8>], dict: &'a [&'a [u8]], max_len: usize, seed: u64) -> Self {
        assert!(!seeds.is_empty(), "a mutator needs at least one seed");
        Mutator {
            seeds,
            dict,
            max_len,
            rng: Rng::new(seed),
        }
    }

    /// Writes the next input into `out` (reusing its allocation).
    pub fn next_into(&mut self, out: &mut Vec<u8>) {
        out.clear();
        let seed = &self.seeds[self.rng.below(self.seeds.len())];
        out.extend_from_slice(seed);
        // A few seeds go through unmodified: the valid path must keep working too.
        if self.rng.one_in(64) {
            out.truncate(self.max_len);
            return;
        }
        // 1 to 8 stacked mutations, fewer more often.
        let n = 1 + (self.rng.next_u64().trailing_ones() as usize).min(7);
        for _ in 0..n {
            self.mutate(out);
        }
        out.truncate(self.max_len);
    }

    fn mutate(&mut self, b: &mut Vec<u8>) {
        if b.is_empty() {
            let n = 1 + self.rng.below(64);
            b.extend((0..n).map(|_| self.rng.byte()));
            return;
        }
        let len = b.len();
        let at = self.rng.below(len);
        match self.rng.below(12) {
            0 => b[at] ^= 1 << self.rng.below(8),
            1 => b[at] = self.rng.byte(),
            2 => {
                // An interesting integer (or the input's own length), 1/2/4/8 bytes, LE or BE.
                let width = [1, 2, 4, 8][self.rng.below(4)];
                let v = if self.rng.one_in(8) {
                    (len as u64)
                        .wrapping_add(self.rng.below(3) as u64)
                        .wrapping_sub(1)
                } else {
                    INTERESTING[self.rng.below(INTERESTING.len())]
                };
                let bytes = if self.rng.one_in(4) {
                    v.to_be_bytes()[8 - width..].to_vec()
                } else {
                    v.to_le_bytes()[..width].to_vec()
                };
                overwrite(b, at, &bytes);
            }
            3 => {
                // Small arithmetic on a little-endian field.
                let width = [1, 2, 4, 8][self.rng.below(4)];
                let end = (at + width).min(len);
                let mut v = [0u8; 8];
                v[..end - at].copy_from_slice(&b[at..end]);
                let d = 1 + self.rng.below(32) as u64;
                let n = if self.rng.one_in(2) {
                    u64::from_le_bytes(v).wrapping_add(d)
                } else {
                    u64::from_le_bytes(v).wrapping_sub(d)
                };
                b[at..end].copy_from_slice(&n.to_le_bytes()[..end - at]);
            }
            4 => {
                let n = 1 + self.rng.below(16);
                let ins: Vec<u8> = if self.rng.one_in(2) {
                    (0..n).map(|_| self.rng.byte()).collect()
                } else {
                    vec![self.rng.byte(); n]
                };
                b.splice(at..at, ins);
            }
            5 => {
                let n = 1 + self.rng.below((len - at).min(64));
                b.drain(at..at + n);
            }
            6 => {
                // Duplicate a range somewhere else (repeats records, names, headers).
                let n = 1 + self.rng.below((len - at).min(256));
                let chunk = b[at..at + n].to_vec();
                let to = self.rng.below(len + 1);
                b.splice(to..to, chunk);
            }
            7 => {
                // Copy a range over another place.
                let n = 1 + self.rng.below((len - at).min(64));
                let chunk = b[at..at + n].to_vec();
                let to = self.rng.below(len);
                overwrite(b, to, &chunk);
            }
            8 if !self.dict.is_empty() => {
                let tok = self.dict[self.rng.below(self.dict.len())];
                if self.rng.one_in(2) {
                    b.splice(at..at, tok.iter().copied());
                } else {
                    overwrite(b, at, tok);
                }
            }
            9 => {
                // Splice: our head, another seed's tail.
                let other = &self.seeds[self.rng.below(self.seeds.len())];
                if !other.is_empty() {
                    let from = self.rng.below(other.len());
                    b.truncate(at);
                    b.extend_from_slice(&other[from..]);
                }
            }
            10 => {
                // Append (or insert) a whole other seed: several messages in one input.
                let other = &self.seeds[self.rng.below(self.seeds.len())];
                let to = if self.rng.one_in(2) { len } else { at };
                b.splice(to..to, other.iter().copied());
            }
            _ => b.truncate(at),
        }
    }
}

/// Overwrites `b[at..]` with `bytes`, growing `b` if they run past its end.
fn overwrite(b: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    let end = at + bytes.len();
    if end > b.len() {
        b.resize(end, 0);
    }
    b[at..end].copy_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_inputs_and_lengths_bounded() {
        let seeds = vec![b"hello world".to_vec(), vec![0u8; 40]];
        let dict: &[&[u8]] = &[b"\r\n"];
        let run = |seed| {
            let mut m = Mutator::new(&seeds, dict, 48, seed);
            let mut v = Vec::new();
            (0..2000)
                .map(|_| {
                    m.next_into(&mut v);
                    assert!(v.len() <= 48);
                    v.clone()
                })
                .collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        assert_ne!(a, run(8));
        // Mutations actually happen: most inputs differ from both seeds.
        let changed = a.iter().filter(|v| !seeds.contains(v)).count();
        assert!(changed > 1800, "{changed}");
    }
}
