//! Bloom filters over the words of a block's variables: which blocks a search for a word
//! with digits (an id, a number, a request id) can skip without reading them.
//!
//! A split-block Bloom filter, as Parquet and Impala use: the filter is an array of 256-bit
//! blocks; a word sets (and a probe tests) eight bits in one block, so a probe touches one
//! cache line. Words are hashed without the JSON path they were found under, so a search
//! anywhere probes once (probing each path would add each path's false positives); a search
//! on a field is checked against that field's column once the filter lets the block in.

use xxhash_rust::xxh3::xxh3_64;

/// Bits per distinct word. Eight give about 2 % false positives: a search for a rare word
/// reads one block in fifty for nothing, and the filter costs one byte a word.
pub const BITS_PER_WORD: usize = 8;

const SALT: [u32; 8] = [
    0x47b6137b, 0x44974d91, 0x8824ad5b, 0xa2b7289d, 0x705495c7, 0x2df1424b, 0x9efc4947, 0x5c6bfb31,
];

/// A split-block Bloom filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bloom {
    blocks: Vec<[u32; 8]>,
}

/// The hash of a word, lower-cased.
pub fn word_hash(word: &str) -> u64 {
    if word
        .bytes()
        .all(|b| b.is_ascii() && !b.is_ascii_uppercase())
    {
        xxh3_64(word.as_bytes())
    } else {
        xxh3_64(word.to_lowercase().as_bytes())
    }
}

/// Calls `each` with the [`word_hash`] of every word (run of alphanumerics) of `text`, as
/// [`words_of`](super::block::words_of) cuts them. ASCII text, nearly all of it, is cut
/// byte by byte without decoding characters.
pub fn for_each_word_hash(text: &[u8], mut each: impl FnMut(u64)) {
    if !text.is_ascii() {
        for word in super::block::words_of(text) {
            each(word_hash(word));
        }
        return;
    }
    let mut lower = [0u8; 64];
    let mut at = 0;
    while at < text.len() {
        if !text[at].is_ascii_alphanumeric() {
            at += 1;
            continue;
        }
        let start = at;
        let mut upper = false;
        while at < text.len() && text[at].is_ascii_alphanumeric() {
            upper |= text[at].is_ascii_uppercase();
            at += 1;
        }
        let word = &text[start..at];
        each(match (upper, word.len() <= lower.len()) {
            (false, _) => xxh3_64(word),
            (true, true) => {
                let lower = &mut lower[..word.len()];
                lower.copy_from_slice(word);
                lower.make_ascii_lowercase();
                xxh3_64(lower)
            }
            (true, false) => xxh3_64(&word.to_ascii_lowercase()),
        });
    }
}

/// A hasher for keys that already are hashes.
#[derive(Default)]
pub struct Identity(u64);

impl std::hash::Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A set of hashes.
pub type HashSet = std::collections::HashSet<u64, std::hash::BuildHasherDefault<Identity>>;

/// The hash of an entry id, for ids that the store cannot find by their timestamp.
pub fn id_hash(id: &uuid::Uuid) -> u64 {
    xxh3_64(id.as_bytes()) ^ 0x6964_0000_0000_0000
}

impl Bloom {
    /// A filter for about `words` distinct words.
    pub fn with_capacity(words: usize) -> Bloom {
        let blocks = (words * BITS_PER_WORD).div_ceil(256).max(1);
        Bloom {
            blocks: vec![[0; 8]; blocks],
        }
    }

    fn block_of(&self, hash: u64) -> usize {
        Bloom::block_index(hash, self.blocks.len())
    }

    /// Which of a filter's `blocks` 256-bit blocks a hash falls in.
    pub fn block_index(hash: u64, blocks: usize) -> usize {
        (((hash >> 32) * blocks as u64) >> 32) as usize
    }

    /// Whether one block of a filter, as [`Bloom::to_bytes`] wrote it (32 bytes), may hold
    /// the hash: a probe that reads only the block it needs.
    pub fn block_contains(bytes: &[u8; 32], hash: u64) -> bool {
        bytes
            .chunks_exact(4)
            .zip(Bloom::mask(hash))
            .all(|(b, bit)| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & bit != 0)
    }

    fn mask(hash: u64) -> [u32; 8] {
        let key = hash as u32;
        let mut mask = [0u32; 8];
        for (m, salt) in mask.iter_mut().zip(SALT) {
            *m = 1 << (key.wrapping_mul(salt) >> 27);
        }
        mask
    }

    pub fn insert(&mut self, hash: u64) {
        if self.blocks.is_empty() {
            return;
        }
        let block = self.block_of(hash);
        for (word, bit) in self.blocks[block].iter_mut().zip(Bloom::mask(hash)) {
            *word |= bit;
        }
    }

    /// False: the word is certainly not there. True: it may be.
    pub fn contains(&self, hash: u64) -> bool {
        if self.blocks.is_empty() {
            return true;
        }
        let block = &self.blocks[self.block_of(hash)];
        block
            .iter()
            .zip(Bloom::mask(hash))
            .all(|(word, bit)| word & bit != 0)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.blocks.len() * 32);
        for block in &self.blocks {
            for word in block {
                out.extend_from_slice(&word.to_le_bytes());
            }
        }
        out
    }

    /// Reads what [`Bloom::to_bytes`] wrote; `None` if the length is not whole blocks.
    pub fn from_bytes(bytes: &[u8]) -> Option<Bloom> {
        if !bytes.len().is_multiple_of(32) {
            return None;
        }
        let blocks = bytes
            .chunks_exact(32)
            .map(|chunk| {
                let mut block = [0u32; 8];
                for (word, b) in block.iter_mut().zip(chunk.chunks_exact(4)) {
                    *word = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                block
            })
            .collect();
        Some(Bloom { blocks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::{Just, any};

    fn slow_hashes(text: &[u8]) -> Vec<u64> {
        text.split(|&b| b == 0)
            .flat_map(|value| super::super::block::words_of(value).map(word_hash))
            .collect()
    }

    fn fast_hashes(text: &[u8]) -> Vec<u64> {
        let mut out = Vec::new();
        for_each_word_hash(text, |h| out.push(h));
        out
    }

    #[test]
    fn words_are_hashed_byte_by_byte_as_by_characters() {
        let long = format!("Req{}X", "a".repeat(80));
        for text in [
            "order-4711 Alice\0bob_42\0\0",
            "ÄRGER über 12 Grüße",
            long.as_str(),
            "UPPER lower MiXeD 0x1F",
            "",
            "---",
        ] {
            assert_eq!(
                fast_hashes(text.as_bytes()),
                slow_hashes(text.as_bytes()),
                "{text:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_text_hashes_the_same_words(text in proptest::collection::vec(
            proptest::prop_oneof![Just(0u8), Just(b' '), Just(b'A'), Just(b'z'), Just(b'7'), Just(0xc3), Just(0xa4), any::<u8>()],
            0..200,
        )) {
            // One value at a time, as bloom_of does for a column that is not all ASCII.
            for value in text.split(|&b| b == 0) {
                proptest::prop_assert_eq!(fast_hashes(value), slow_hashes(value));
            }
            if text.is_ascii() {
                proptest::prop_assert_eq!(fast_hashes(&text), slow_hashes(&text));
            }
        }
    }

    #[test]
    fn inserted_words_are_found_and_others_mostly_not() {
        let mut bloom = Bloom::with_capacity(10_000);
        for i in 0..10_000 {
            bloom.insert(word_hash(&format!("w{i}")));
        }
        for i in 0..10_000 {
            assert!(bloom.contains(word_hash(&format!("W{i}"))));
        }
        let false_positives = (0..100_000)
            .filter(|i| bloom.contains(word_hash(&format!("x{i}"))))
            .count();
        assert!(false_positives < 5_000, "{false_positives} in 100,000");
        let bytes = bloom.to_bytes();
        let back = Bloom::from_bytes(&bytes).unwrap();
        assert_eq!(back, bloom);
        // Probing the bytes one block at a time says what the filter says.
        let blocks = bytes.len() / 32;
        for i in 0..20_000 {
            let hash = word_hash(&format!("w{i}"));
            let at = Bloom::block_index(hash, blocks) * 32;
            let block: &[u8; 32] = bytes[at..at + 32].try_into().unwrap();
            assert_eq!(Bloom::block_contains(block, hash), bloom.contains(hash));
        }
        assert!(Bloom::from_bytes(&[1, 2, 3]).is_none());
    }
}
