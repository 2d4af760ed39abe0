//! A small raw-deflate (RFC 1951) encoder for compressed clusters.
//!
//! QEMU inflates compressed clusters with a 4 KiB window (zlib `windowBits` -12), so no back-reference here
//! ever reaches further than [`MAX_DISTANCE`] bytes. Matches come from hash chains over the last 4 KiB with
//! one step of lazy evaluation; the tokens are then cut into blocks and each block is written the cheapest
//! way of three: dynamic Huffman codes, the fixed codes, or stored.

use alloc::collections::BinaryHeap;
use alloc::vec;
use alloc::vec::Vec;
use core::cmp::Reverse;

/// Farthest back-reference the encoder emits (QEMU's window).
pub const MAX_DISTANCE: usize = 4096;

const MIN_MATCH: usize = 3;
const MAX_MATCH: usize = 258;
const HASH_BITS: u32 = 15;
const NONE: u32 = u32::MAX;
/// Candidates examined per position.
const MAX_CHAIN: usize = 96;
/// A match this long ends the search along the chain.
const NICE_LENGTH: usize = 128;
/// A match this long is taken without looking one byte further.
const LAZY_LIMIT: usize = 16;
/// With a match this long in hand, looking one byte further searches a quarter of the chain.
const GOOD_LENGTH: usize = 8;
/// Tokens per block (each block gets its own Huffman codes).
const BLOCK_TOKENS: usize = 16 * 1024;

const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
/// The order in which code-length code lengths are sent.
const CL_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];
const END_OF_BLOCK: usize = 256;
const LITLEN_SYMBOLS: usize = 286;
const DIST_SYMBOLS: usize = 30;

/// One LZ77 token: a literal byte, or a match of `len` bytes `dist` bytes back.
#[derive(Debug, Clone, Copy)]
enum Token {
    Literal(u8),
    Match { len: u16, dist: u16 },
}

/// Index of the largest `table` entry not above `v` (`table` ascending, `v >= table[0]`).
fn code_index(table: &[u16], v: u16) -> usize {
    table.partition_point(|&b| b <= v).saturating_sub(1)
}

fn len_code(len: u16) -> usize {
    code_index(&LEN_BASE, len)
}

fn dist_code(dist: u16) -> usize {
    code_index(&DIST_BASE, dist)
}

/// Hash chains over the last [`MAX_DISTANCE`] bytes.
struct Matcher<'a> {
    data: &'a [u8],
    head: Vec<u32>,
    prev: Vec<u32>,
}

impl<'a> Matcher<'a> {
    fn new(data: &'a [u8]) -> Self {
        Matcher {
            data,
            head: vec![NONE; 1 << HASH_BITS],
            prev: vec![NONE; MAX_DISTANCE],
        }
    }

    fn hash(&self, pos: usize) -> Option<usize> {
        let b = self.data.get(pos..pos.checked_add(MIN_MATCH)?)?;
        let v = u32::from(b[0]) | (u32::from(b[1]) << 8) | (u32::from(b[2]) << 16);
        Some((v.wrapping_mul(0x9E37_79B1) >> (32 - HASH_BITS)) as usize)
    }

    /// Adds `pos` to its chain (positions must be inserted in increasing order).
    fn insert(&mut self, pos: usize) {
        if let Some(h) = self.hash(pos) {
            self.prev[pos % MAX_DISTANCE] = self.head[h];
            self.head[h] = pos as u32;
        }
    }

    /// The longest match for the bytes at `pos` (not yet inserted): (length, distance), length 0 if none.
    fn find(&self, pos: usize, max_chain: usize) -> (usize, usize) {
        let Some(h) = self.hash(pos) else {
            return (0, 0);
        };
        let max_len = (self.data.len() - pos).min(MAX_MATCH);
        let here = &self.data[pos..pos + max_len];
        let (mut best_len, mut best_dist) = (0usize, 0usize);
        let mut cand = self.head[h];
        let mut chain = max_chain;
        while cand != NONE && chain > 0 {
            let c = cand as usize;
            if c >= pos || pos - c > MAX_DISTANCE {
                break;
            }
            let there = &self.data[c..c + max_len];
            // Only a candidate that beats the best so far at its last byte is worth comparing in full.
            if there.get(best_len) == here.get(best_len) {
                let len = here.iter().zip(there).take_while(|(a, b)| a == b).count();
                if len > best_len {
                    best_len = len;
                    best_dist = pos - c;
                    if len == max_len || len >= NICE_LENGTH {
                        break;
                    }
                }
            }
            let next = self.prev[c % MAX_DISTANCE];
            if next == NONE || next as usize >= c {
                break;
            }
            cand = next;
            chain -= 1;
        }
        if best_len >= MIN_MATCH {
            (best_len, best_dist)
        } else {
            (0, 0)
        }
    }
}

/// LZ77 parse of `data` with one step of lazy matching.
fn tokenize(data: &[u8]) -> Vec<Token> {
    let mut m = Matcher::new(data);
    let mut tokens = Vec::with_capacity(data.len() / 4 + 16);
    let n = data.len();
    let mut i = 0;
    let mut carried: Option<(usize, usize)> = None;
    while i < n {
        let (len, dist) = carried.take().unwrap_or_else(|| m.find(i, MAX_CHAIN));
        if len < MIN_MATCH {
            m.insert(i);
            tokens.push(Token::Literal(data[i]));
            i += 1;
            continue;
        }
        m.insert(i);
        if len < LAZY_LIMIT && i + 1 < n {
            let chain = if len >= GOOD_LENGTH {
                MAX_CHAIN / 4
            } else {
                MAX_CHAIN
            };
            let next = m.find(i + 1, chain);
            if next.0 > len {
                tokens.push(Token::Literal(data[i]));
                i += 1;
                carried = Some(next);
                continue;
            }
        }
        tokens.push(Token::Match {
            len: len as u16,
            dist: dist as u16,
        });
        for p in i + 1..i + len {
            m.insert(p);
        }
        i += len;
    }
    tokens
}

/// Huffman code lengths for `freqs`, none longer than `limit`. Symbols of frequency 0 get length 0; a lone
/// used symbol gets length 1.
fn huffman_lengths(freqs: &[u32], limit: u8) -> Vec<u8> {
    let mut freqs: Vec<u32> = freqs.to_vec();
    loop {
        let lens = huffman_lengths_unlimited(&freqs);
        if lens.iter().all(|&l| l <= limit) {
            return lens;
        }
        // Flatten the distribution and try again; all-ones gives a balanced tree, which always fits.
        for f in freqs.iter_mut().filter(|f| **f > 0) {
            *f = (*f >> 1).max(1);
        }
    }
}

fn huffman_lengths_unlimited(freqs: &[u32]) -> Vec<u8> {
    let mut lens = vec![0u8; freqs.len()];
    let used: Vec<usize> = (0..freqs.len()).filter(|&s| freqs[s] > 0).collect();
    match used.as_slice() {
        [] => return lens,
        [only] => {
            lens[*only] = 1;
            return lens;
        }
        _ => {}
    }
    // Nodes 0..used.len() are leaves; internal nodes follow, each created after its children.
    let mut parent: Vec<usize> = vec![usize::MAX; used.len()];
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = used
        .iter()
        .enumerate()
        .map(|(i, &s)| Reverse((u64::from(freqs[s]), i)))
        .collect();
    while heap.len() > 1 {
        let (Some(Reverse((fa, a))), Some(Reverse((fb, b)))) = (heap.pop(), heap.pop()) else {
            break;
        };
        let id = parent.len();
        parent.push(usize::MAX);
        parent[a] = id;
        parent[b] = id;
        heap.push(Reverse((fa + fb, id)));
    }
    let mut depth = vec![0u8; parent.len()];
    for id in (0..parent.len()).rev() {
        if let Some(&p) = parent.get(id).filter(|&&p| p != usize::MAX) {
            depth[id] = depth[p].saturating_add(1);
        }
    }
    for (i, &s) in used.iter().enumerate() {
        lens[s] = depth[i];
    }
    lens
}

/// Canonical codes for `lens`, bit-reversed for deflate's LSB-first bit order.
fn canonical_codes(lens: &[u8]) -> Vec<u16> {
    let mut count = [0u16; 16];
    for &l in lens {
        count[usize::from(l)] += 1;
    }
    count[0] = 0;
    let mut next = [0u16; 16];
    let mut code = 0u16;
    for bits in 1..16 {
        code = (code + count[bits - 1]) << 1;
        next[bits] = code;
    }
    lens.iter()
        .map(|&l| {
            if l == 0 {
                return 0;
            }
            let c = next[usize::from(l)];
            next[usize::from(l)] += 1;
            c.reverse_bits() >> (16 - u32::from(l))
        })
        .collect()
}

/// Makes sure at least two symbols are used, so that every tree is a complete code of lengths >= 1.
fn at_least_two(freqs: &mut [u32]) {
    while freqs.iter().filter(|&&f| f > 0).count() < 2 {
        match freqs.iter_mut().find(|f| **f == 0) {
            Some(f) => *f = 1,
            None => break,
        }
    }
}

struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    bits: u32,
}

impl BitWriter {
    fn put(&mut self, value: u32, count: u32) {
        self.acc |= u64::from(value) << self.bits;
        self.bits += count;
        while self.bits >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.bits -= 8;
        }
    }

    fn align(&mut self) {
        if self.bits > 0 {
            self.out.push(self.acc as u8);
            self.acc = 0;
            self.bits = 0;
        }
    }
}

/// One code-length-alphabet symbol with its extra bits.
type ClSymbol = (u8, u8);

/// Run-length codes the concatenated code lengths with symbols 16 (repeat), 17 and 18 (zeros).
fn rle_lengths(lens: &[u8]) -> Vec<ClSymbol> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lens.len() {
        let v = lens[i];
        let run = lens[i..].iter().take_while(|&&l| l == v).count();
        if v == 0 && run >= 3 {
            let r = run.min(138);
            if r >= 11 {
                out.push((18, (r - 11) as u8));
            } else {
                out.push((17, (r - 3) as u8));
            }
            i += r;
            continue;
        }
        out.push((v, 0));
        i += 1;
        if v != 0 {
            let mut rem = run - 1;
            while rem >= 3 {
                let r = rem.min(6);
                out.push((16, (r - 3) as u8));
                rem -= r;
                i += r;
            }
        }
    }
    out
}

fn cl_extra_bits(sym: u8) -> u32 {
    match sym {
        16 => 2,
        17 => 3,
        18 => 7,
        _ => 0,
    }
}

/// Everything needed to write one block with dynamic codes.
struct DynamicCodes {
    lit_lens: Vec<u8>,
    dist_lens: Vec<u8>,
    hlit: usize,
    hdist: usize,
    cl_lens: Vec<u8>,
    hclen: usize,
    rle: Vec<ClSymbol>,
}

impl DynamicCodes {
    fn new(tokens: &[Token]) -> Self {
        let mut lit_freq = [0u32; LITLEN_SYMBOLS];
        let mut dist_freq = [0u32; DIST_SYMBOLS];
        for t in tokens {
            match *t {
                Token::Literal(b) => lit_freq[usize::from(b)] += 1,
                Token::Match { len, dist } => {
                    lit_freq[257 + len_code(len)] += 1;
                    dist_freq[dist_code(dist)] += 1;
                }
            }
        }
        lit_freq[END_OF_BLOCK] += 1;
        at_least_two(&mut lit_freq);
        at_least_two(&mut dist_freq);
        let lit_lens = huffman_lengths(&lit_freq, 15);
        let dist_lens = huffman_lengths(&dist_freq, 15);
        let hlit = lit_lens
            .iter()
            .rposition(|&l| l > 0)
            .map_or(257, |p| (p + 1).max(257));
        let hdist = dist_lens.iter().rposition(|&l| l > 0).map_or(1, |p| p + 1);
        let mut all = Vec::with_capacity(hlit + hdist);
        all.extend_from_slice(&lit_lens[..hlit]);
        all.extend_from_slice(&dist_lens[..hdist]);
        let rle = rle_lengths(&all);
        let mut cl_freq = [0u32; 19];
        for &(sym, _) in &rle {
            cl_freq[usize::from(sym)] += 1;
        }
        at_least_two(&mut cl_freq);
        let cl_lens = huffman_lengths(&cl_freq, 7);
        let hclen = CL_ORDER
            .iter()
            .rposition(|&s| cl_lens[s] > 0)
            .map_or(4, |p| (p + 1).max(4));
        DynamicCodes {
            lit_lens,
            dist_lens,
            hlit,
            hdist,
            cl_lens,
            hclen,
            rle,
        }
    }

    /// Size of the block header after the three block-type bits.
    fn header_bits(&self) -> u64 {
        let rle: u64 = self
            .rle
            .iter()
            .map(|&(s, _)| u64::from(self.cl_lens[usize::from(s)]) + u64::from(cl_extra_bits(s)))
            .sum();
        14 + 3 * self.hclen as u64 + rle
    }

    fn write_header(&self, w: &mut BitWriter) {
        w.put((self.hlit - 257) as u32, 5);
        w.put((self.hdist - 1) as u32, 5);
        w.put((self.hclen - 4) as u32, 4);
        for &s in &CL_ORDER[..self.hclen] {
            w.put(u32::from(self.cl_lens[s]), 3);
        }
        let codes = canonical_codes(&self.cl_lens);
        for &(sym, extra) in &self.rle {
            let s = usize::from(sym);
            w.put(u32::from(codes[s]), u32::from(self.cl_lens[s]));
            let eb = cl_extra_bits(sym);
            if eb > 0 {
                w.put(u32::from(extra), eb);
            }
        }
    }
}

fn fixed_lit_lens() -> Vec<u8> {
    (0..288)
        .map(|s| match s {
            0..=143 => 8,
            144..=255 => 9,
            256..=279 => 7,
            _ => 8,
        })
        .collect()
}

/// Bits the tokens (and the end-of-block code) take with these code lengths.
fn token_bits(tokens: &[Token], lit_lens: &[u8], dist_lens: &[u8]) -> u64 {
    let mut bits = u64::from(lit_lens[END_OF_BLOCK]);
    for t in tokens {
        bits += match *t {
            Token::Literal(b) => u64::from(lit_lens[usize::from(b)]),
            Token::Match { len, dist } => {
                let lc = len_code(len);
                let dc = dist_code(dist);
                u64::from(lit_lens[257 + lc])
                    + u64::from(LEN_EXTRA[lc])
                    + u64::from(dist_lens[dc])
                    + u64::from(DIST_EXTRA[dc])
            }
        };
    }
    bits
}

fn write_tokens(w: &mut BitWriter, tokens: &[Token], lit_lens: &[u8], dist_lens: &[u8]) {
    let lit_codes = canonical_codes(lit_lens);
    let dist_codes = canonical_codes(dist_lens);
    for t in tokens {
        match *t {
            Token::Literal(b) => {
                let s = usize::from(b);
                w.put(u32::from(lit_codes[s]), u32::from(lit_lens[s]));
            }
            Token::Match { len, dist } => {
                let lc = len_code(len);
                let s = 257 + lc;
                w.put(u32::from(lit_codes[s]), u32::from(lit_lens[s]));
                if LEN_EXTRA[lc] > 0 {
                    w.put(u32::from(len - LEN_BASE[lc]), u32::from(LEN_EXTRA[lc]));
                }
                let dc = dist_code(dist);
                w.put(u32::from(dist_codes[dc]), u32::from(dist_lens[dc]));
                if DIST_EXTRA[dc] > 0 {
                    w.put(u32::from(dist - DIST_BASE[dc]), u32::from(DIST_EXTRA[dc]));
                }
            }
        }
    }
    w.put(
        u32::from(lit_codes[END_OF_BLOCK]),
        u32::from(lit_lens[END_OF_BLOCK]),
    );
}

/// Bytes of input a token stands for.
fn token_span(t: &Token) -> usize {
    match *t {
        Token::Literal(_) => 1,
        Token::Match { len, .. } => usize::from(len),
    }
}

/// Compresses `data` into a raw deflate stream (no zlib header) whose back-references reach at most
/// [`MAX_DISTANCE`] bytes. Returns `None` as soon as the stream would be longer than `limit` bytes.
pub fn deflate_raw(data: &[u8], limit: usize) -> Option<Vec<u8>> {
    let tokens = tokenize(data);
    let mut w = BitWriter {
        out: Vec::with_capacity(limit.min(data.len()) + 64),
        acc: 0,
        bits: 0,
    };
    let fixed_lit = fixed_lit_lens();
    let fixed_dist = [5u8; 30];
    let blocks: Vec<&[Token]> = if tokens.is_empty() {
        vec![&[]]
    } else {
        tokens.chunks(BLOCK_TOKENS).collect()
    };
    let mut input_at = 0usize;
    for (bi, block) in blocks.iter().enumerate() {
        let last = u32::from(bi + 1 == blocks.len());
        let span: usize = block.iter().map(token_span).sum();
        let raw = data.get(input_at..input_at + span)?;
        input_at += span;

        let dynamic = DynamicCodes::new(block);
        let dyn_bits =
            dynamic.header_bits() + token_bits(block, &dynamic.lit_lens, &dynamic.dist_lens);
        let fixed_bits = token_bits(block, &fixed_lit, &fixed_dist);
        // Stored: alignment (at most 7 bits) plus LEN/NLEN per piece of up to 65535 bytes.
        let pieces = raw.len().div_ceil(65535).max(1) as u64;
        let stored_bits = pieces * (3 + 7 + 32) + 8 * raw.len() as u64;

        if stored_bits < dyn_bits.min(fixed_bits) {
            let mut chunks: Vec<&[u8]> = raw.chunks(65535).collect();
            if chunks.is_empty() {
                chunks.push(&[]);
            }
            let n = chunks.len();
            for (ci, chunk) in chunks.into_iter().enumerate() {
                let final_bit = if ci + 1 == n { last } else { 0 };
                w.put(final_bit, 1);
                w.put(0, 2);
                w.align();
                let len = chunk.len() as u16;
                w.put(u32::from(len), 16);
                w.put(u32::from(!len), 16);
                w.out.extend_from_slice(chunk);
            }
        } else if fixed_bits <= dyn_bits {
            w.put(last, 1);
            w.put(1, 2);
            write_tokens(&mut w, block, &fixed_lit, &fixed_dist);
        } else {
            w.put(last, 1);
            w.put(2, 2);
            dynamic.write_header(&mut w);
            write_tokens(&mut w, block, &dynamic.lit_lens, &dynamic.dist_lens);
        }
        if w.out.len() > limit {
            return None;
        }
    }
    w.align();
    (w.out.len() <= limit).then_some(w.out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use miniz_oxide::inflate::decompress_to_vec;

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
            })
            .collect()
    }

    fn text(len: usize) -> Vec<u8> {
        let words = [
            "cluster ",
            "refcount ",
            "the ",
            "L2 table ",
            "of ",
            "guest ",
            "offset ",
            "host ",
            "backing file ",
            "and ",
            "COPIED ",
            "zero ",
            "compressed ",
            "a ",
            "snapshot ",
        ];
        let mut out = Vec::with_capacity(len + 32);
        let mut x = 0x1234_5678u32;
        let mut n = 0u32;
        while out.len() < len {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            out.extend_from_slice(words[(x >> 16) as usize % words.len()].as_bytes());
            if x.is_multiple_of(7) {
                n += 1;
                out.extend_from_slice(alloc::format!("{n}. ").as_bytes());
            }
        }
        out.truncate(len);
        out
    }

    fn round_trip(data: &[u8]) {
        let out = deflate_raw(data, usize::MAX).expect("no limit");
        let back = decompress_to_vec(&out).expect("inflate");
        assert_eq!(back.len(), data.len());
        assert!(back == data, "round trip differs");
    }

    #[test]
    fn tokens_stay_in_window() {
        for data in [noise(1, 70000), text(300_000), vec![0u8; 100_000]] {
            let mut covered = 0usize;
            for t in tokenize(&data) {
                if let Token::Match { len, dist } = t {
                    assert!((1..=MAX_DISTANCE).contains(&usize::from(dist)));
                    assert!((MIN_MATCH..=MAX_MATCH).contains(&usize::from(len)));
                    let (l, d) = (usize::from(len), usize::from(dist));
                    assert_eq!(
                        data[covered..covered + l],
                        data[covered - d..covered - d + l]
                    );
                }
                covered += token_span(&t);
            }
            assert_eq!(covered, data.len());
        }
    }

    #[test]
    fn round_trips_every_cluster_size() {
        let mut bits = 9;
        while bits <= 21 {
            let size = 1usize << bits;
            round_trip(&vec![0u8; size]);
            round_trip(&noise(bits as u64, size));
            round_trip(&text(size));
            let mut mixed = text(size);
            mixed[size / 3..size / 2].copy_from_slice(&noise(7, size / 2 - size / 3));
            round_trip(&mixed);
            let pattern: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            round_trip(&pattern);
            let far: Vec<u8> = (0..size)
                .map(|i| ((i / 5000) % 3) as u8 ^ (i % 4096 == 0) as u8)
                .collect();
            round_trip(&far);
            bits += 1;
        }
    }

    #[test]
    fn small_and_odd_inputs() {
        for len in [
            0usize, 1, 2, 3, 4, 5, 17, 258, 259, 1000, 4095, 4096, 4097, 65535, 65536, 65537,
        ] {
            round_trip(&noise(len as u64 + 3, len));
            round_trip(&vec![0xcd; len]);
            round_trip(&text(len));
        }
    }

    #[test]
    fn compresses_well_and_respects_the_limit() {
        let zeros = deflate_raw(&[0u8; 65536], usize::MAX).unwrap();
        assert!(zeros.len() < 200, "zeros: {}", zeros.len());
        let t = text(65536);
        let c = deflate_raw(&t, usize::MAX).unwrap();
        assert!(c.len() < t.len() / 3, "text: {}", c.len());
        let r = noise(5, 65536);
        let c = deflate_raw(&r, usize::MAX).unwrap();
        // Incompressible data is stored: only a few bytes of overhead.
        assert!(c.len() <= r.len() + 64, "noise: {}", c.len());
        assert!(deflate_raw(&r, 65535).is_none());
        assert!(deflate_raw(&t, 1000).is_none());
    }

    #[test]
    fn huffman_lengths_are_limited_and_complete() {
        // Fibonacci frequencies make the deepest unlimited tree.
        let mut f = vec![0u32; 40];
        let (mut a, mut b) = (1u32, 1u32);
        for x in f.iter_mut() {
            *x = a;
            let c = a.saturating_add(b);
            a = b;
            b = c;
        }
        for limit in [7u8, 15] {
            let lens = huffman_lengths(&f[..19], limit);
            assert!(lens.iter().all(|&l| (1..=limit).contains(&l)));
            let kraft: u32 = lens.iter().map(|&l| 1u32 << (15 - l)).sum();
            assert_eq!(kraft, 1 << 15);
        }
        let lens = huffman_lengths(&f, 15);
        assert!(lens.iter().all(|&l| (1..=15).contains(&l)));
    }
}
