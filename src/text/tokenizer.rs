//! The CLIP byte-level BPE tokenizer, as transformers' `CLIPTokenizer` runs it (the tokenizer the
//! diffusers SDXL pipeline uses for both text encoders; transformers' models/clip/tokenization_clip.py):
//!
//! 1. `<|startoftext|>` / `<|endoftext|>` written literally in the text become their ids; they
//!    are found in the raw text, before any normalisation (transformers' added tokens).
//! 2. Each stretch between them is normalised: NFC, then lower-cased one character at a time
//!    (so no final-sigma rule). transformers 5 applies neither ftfy nor HTML unescaping (open_clip
//!    does: `&amp;`, curly quotes and full-width letters tokenize differently there).
//! 3. Pre-tokenization, CLIP's regex `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|
//!    \p{L}+|\p{N}|[^\s\p{L}\p{N}]+` by hand: pieces are matched, whitespace between them dropped.
//! 4. Each piece's UTF-8 bytes map to GPT-2's byte-to-unicode symbols, "</w>" marks the last one,
//!    and adjacent symbols merge lowest merge rank first until no ranked pair is left.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Mutex;

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

use crate::error::{Error, Result};
use crate::input_err;

/// open_clip's `bpe_simple_vocab_16e6.txt.gz` (MIT; see assets/README.md).
static EMBEDDED_BPE_GZ: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");
/// CLIP keeps the first 48894 merges of that file: 49408 tokens = 256 byte symbols + the same with
/// "</w>" + one token per merge + the two specials.
const CLIP_MERGES: usize = 49408 - 2 * 256 - 2;

pub const BOS_TEXT: &str = "<|startoftext|>";
pub const EOS_TEXT: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";
/// Pieces remembered by the BPE cache before it is cleared (prompts repeat words).
const CACHE_LIMIT: usize = 65536;
/// Longest piece (bytes) the cache keeps: with `CACHE_LIMIT` this bounds the cache to a few tens
/// of MB whatever the text; longer pieces are rare and are merged afresh each time.
const CACHE_PIECE_BYTES: usize = 64;

/// A CLIP BPE tokenizer. `encode` gives the ids of a text without BOS/EOS; `encode_padded` gives
/// the 77 ids one text encoder sees. Shared between threads (the word cache sits behind a mutex).
pub struct Tokenizer {
    ids: HashMap<String, u32>,
    /// id -> token text. A cut-down vocab.json may keep a model's ids with gaps between them
    /// (transformers accepts it), so this is a map, sized by the entries and never by an id.
    tokens: HashMap<u32, String>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Id of each byte's symbol inside a word [0] and at its end, with "</w>" [1].
    byte_ids: [[u32; 256]; 2],
    bos: u32,
    eos: u32,
    /// "!", the pad token of the bigG encoder.
    bang: u32,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

/// Which SDXL text encoder a sequence is padded for (diffusers' pipeline_stable_diffusion_xl.py: tokenizer and tokenizer_2): CLIP-L pads with
/// `<|endoftext|>` (49407), OpenCLIP bigG with "!" (id 0), as diffusers' tokenizer_2, SGM,
/// A1111 and ComfyUI do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoder {
    ClipL,
    ClipG,
}

impl Tokenizer {
    /// The CLIP vocabulary built from the merge list embedded in the binary (both SDXL
    /// tokenizers use it).
    pub fn clip() -> Result<Tokenizer> {
        Self::from_bpe_merges(flate2::read::GzDecoder::new(EMBEDDED_BPE_GZ), "embedded bpe_simple_vocab_16e6.txt.gz")
    }

    /// Builds the vocabulary the way CLIP and open_clip do from a `bpe_simple_vocab` merge list
    /// (first line a header, then one "left right" merge per line): byte symbols in GPT-2 order,
    /// the same with "</w>", one token per merge, then `<|startoftext|>` and `<|endoftext|>`.
    pub fn from_bpe_merges(reader: impl Read, what: &str) -> Result<Tokenizer> {
        let table = byte_to_unicode();
        // GPT-2 order: the printable bytes in byte order, then the others in byte order.
        let order: Vec<usize> =
            (0..256).filter(|&b| is_printable_byte(b)).chain((0..256).filter(|&b| !is_printable_byte(b))).collect();
        let mut vocab: Vec<String> = order.iter().map(|&b| table[b].to_string()).collect();
        vocab.extend(order.iter().map(|&b| format!("{}{END_OF_WORD}", table[b])));

        let mut merges = Vec::with_capacity(CLIP_MERGES);
        // Only the first lines are needed: stop reading (and inflating) once they are in.
        for line in BufReader::new(reader).lines().skip(1).take(CLIP_MERGES) {
            let line = line.map_err(|e| Error::Io { context: format!("reading {what}"), source: e })?;
            let Some((left, right)) = line.split_once(' ') else {
                return input_err!("{what}: merge line {:?} is not two symbols", line);
            };
            vocab.push(format!("{left}{right}"));
            merges.push((left.to_string(), right.to_string()));
        }
        if merges.len() != CLIP_MERGES {
            return input_err!("{what}: {} merges, CLIP needs {CLIP_MERGES}", merges.len());
        }
        vocab.push(BOS_TEXT.to_string());
        vocab.push(EOS_TEXT.to_string());
        let ids = vocab.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
        Self::from_parts(ids, &merges, what, what)
    }

    /// A model's own tokenizer files (diffusers `tokenizer/` and `tokenizer_2/`): `vocab.json`
    /// (token -> id) and `merges.txt` ("#version" header, then one merge per line, rank = order).
    /// Each is read up to `io::JSON_LIMIT` bytes.
    pub fn from_files(vocab_json: &Path, merges_txt: &Path) -> Result<Tokenizer> {
        let vocab_text = crate::io::read_text(vocab_json, crate::io::JSON_LIMIT, "tokenizer vocab.json")?;
        let ids: HashMap<String, u32> = serde_json::from_str(&vocab_text)
            .map_err(|e| Error::Input(format!("{}: not a token -> id JSON object: {e}", vocab_json.display())))?;
        let mut merges = Vec::new();
        for (n, line) in
            crate::io::read_text(merges_txt, crate::io::JSON_LIMIT, "tokenizer merges.txt")?.lines().enumerate()
        {
            if line.trim().is_empty() || (n == 0 && line.starts_with("#version")) {
                continue;
            }
            let Some((left, right)) = line.split_once(' ') else {
                return input_err!("{}: line {} is not two symbols: {line:?}", merges_txt.display(), n + 1);
            };
            merges.push((left.to_string(), right.to_string()));
        }
        Self::from_parts(ids, &merges, &vocab_json.display().to_string(), &merges_txt.display().to_string())
    }

    /// `dir/vocab.json` + `dir/merges.txt`.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        for p in [&vocab, &merges] {
            if !p.exists() {
                return input_err!(
                    "{}: no such file (a tokenizer folder holds vocab.json and merges.txt)",
                    p.display()
                );
            }
        }
        Self::from_files(&vocab, &merges)
    }

    /// `vocab` and `merges_what` name the vocabulary's and the merges' sources in errors.
    fn from_parts(
        ids: HashMap<String, u32>,
        merges: &[(String, String)],
        vocab: &str,
        merges_what: &str,
    ) -> Result<Tokenizer> {
        let tokens = tokens_by_id(&ids, vocab)?;
        let id = |t: &str, what: &str| {
            ids.get(t).copied().ok_or_else(|| Error::Input(format!("{what}: vocabulary has no {t:?}")))
        };
        let (bos, eos, bang) = (id(BOS_TEXT, vocab)?, id(EOS_TEXT, vocab)?, id("!", vocab)?);
        // A byte symbol missing from the vocabulary becomes the unknown token (EOS), as in transformers.
        let table = byte_to_unicode();
        let mut byte_ids = [[eos; 256]; 2];
        for b in 0..256 {
            byte_ids[0][b] = ids.get(table[b].to_string().as_str()).copied().unwrap_or(eos);
            byte_ids[1][b] = ids.get(&format!("{}{END_OF_WORD}", table[b])).copied().unwrap_or(eos);
        }
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (left, right)) in merges.iter().enumerate() {
            let key = (id(left, merges_what)?, id(right, merges_what)?);
            let merged = id(&format!("{left}{right}"), merges_what)?;
            // A repeated merge keeps its first (best) rank.
            merge_map.entry(key).or_insert((rank as u32, merged));
        }
        Ok(Tokenizer { ids, tokens, merges: merge_map, byte_ids, bos, eos, bang, cache: Mutex::new(HashMap::new()) })
    }

    pub fn bos(&self) -> u32 {
        self.bos
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// The id sequences for `encoder` are padded with.
    pub fn pad(&self, encoder: Encoder) -> u32 {
        match encoder {
            Encoder::ClipL => self.eos,
            Encoder::ClipG => self.bang,
        }
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token written in the vocabulary's byte-level form (`"cat</w>"`, `",</w>"`).
    pub fn id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// The vocabulary form of an id.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(&id).map(String::as_str)
    }

    /// The ids of `text`, without BOS/EOS and without any length limit
    /// (transformers: `tokenizer(text, add_special_tokens=False)`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        // One left-to-right pass over the places "<|" occurs: both specials start with it.
        let (mut plain_from, mut search_from) = (0, 0);
        while let Some(found) = text[search_from..].find("<|") {
            let at = search_from + found;
            let special =
                [(BOS_TEXT, self.bos), (EOS_TEXT, self.eos)].into_iter().find(|(s, _)| text[at..].starts_with(s));
            match special {
                Some((s, id)) => {
                    self.encode_plain(&text[plain_from..at], &mut out);
                    out.push(id);
                    plain_from = at + s.len();
                    search_from = plain_from;
                }
                None => search_from = at + "<|".len(),
            }
        }
        self.encode_plain(&text[plain_from..], &mut out);
        out
    }

    /// What one text encoder sees for `text` in diffusers: BOS, the first 75 ids, EOS, padding to 77.
    pub fn encode_padded(&self, text: &str, encoder: Encoder) -> Vec<u32> {
        let ids = self.encode(text);
        let n = ids.len().min(super::CHUNK_TOKENS);
        let mut out = Vec::with_capacity(super::CONTEXT_TOKENS);
        out.push(self.bos);
        out.extend_from_slice(&ids[..n]);
        out.push(self.eos);
        out.resize(super::CONTEXT_TOKENS, self.pad(encoder));
        out
    }

    /// Text with no special tokens in it: normalise, split into pieces, BPE each piece.
    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let normal: String = text.nfc().flat_map(char::to_lowercase).collect();
        for piece in pre_tokenize(&normal) {
            self.bpe(piece, out);
        }
    }

    fn bpe(&self, piece: &str, out: &mut Vec<u32>) {
        if piece.len() > CACHE_PIECE_BYTES {
            out.extend(self.merge_symbols(piece));
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(ids) = cache.get(piece) {
            out.extend_from_slice(ids);
            return;
        }
        let ids = self.merge_symbols(piece);
        out.extend_from_slice(&ids);
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(piece.to_string(), ids);
    }

    /// The piece's byte symbols, merged best-ranked adjacent pair first (leftmost on a tie) until
    /// no pair is ranked. A merge's product only ever appears in later merges, so this equals
    /// merging every occurrence of the best pair per pass (open_clip's `bpe`) and transformers'
    /// priority queue (tokenizers' `Word::merge_all`). Like the latter it keeps the symbols in a
    /// doubly linked list and the candidate pairs in a heap keyed by (rank, position of the left
    /// symbol), so a piece of n bytes takes O(n log n) instead of rescanning it after every merge.
    /// A merge leaves older heap entries for its neighbours behind; an entry is stale, and
    /// skipped, when its left symbol is gone or the pair now there has another rank.
    fn merge_symbols(&self, piece: &str) -> Vec<u32> {
        let bytes = piece.as_bytes();
        let n = bytes.len();
        let mut symbols: Vec<u32> =
            bytes.iter().enumerate().map(|(i, &b)| self.byte_ids[usize::from(i + 1 == n)][b as usize]).collect();
        // Neighbour links by position; `alive` marks the positions still holding a symbol (a
        // merge keeps the left one).
        let mut prev: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
        let mut next: Vec<Option<usize>> = (1..=n).map(|i| (i < n).then_some(i)).collect();
        let mut alive = vec![true; n];
        let rank_at = |symbols: &[u32], left: usize, right: usize| self.merges.get(&(symbols[left], symbols[right]));
        let mut heap: BinaryHeap<Reverse<(u32, usize)>> =
            (1..n).filter_map(|i| rank_at(&symbols, i - 1, i).map(|&(rank, _)| Reverse((rank, i - 1)))).collect();
        while let Some(Reverse((rank, left))) = heap.pop() {
            let Some(right) = next[left].filter(|_| alive[left]) else { continue };
            let merged = match rank_at(&symbols, left, right) {
                Some(&(current, merged)) if current == rank => merged,
                _ => continue,
            };
            // Merge: `left` takes the product, `right` leaves the list; the product's pairs with
            // its neighbours become candidates.
            symbols[left] = merged;
            alive[right] = false;
            next[left] = next[right];
            if let Some(after) = next[left] {
                prev[after] = Some(left);
            }
            let pairs = [prev[left].map(|before| (before, left)), next[left].map(|after| (left, after))];
            for (a, b) in pairs.into_iter().flatten() {
                if let Some(&(r, _)) = rank_at(&symbols, a, b) {
                    heap.push(Reverse((r, a)));
                }
            }
        }
        (0..n).filter(|&i| alive[i]).map(|i| symbols[i]).collect()
    }
}

/// id -> token of a vocabulary (`what` names it in errors); two tokens with one id are an error.
fn tokens_by_id(ids: &HashMap<String, u32>, what: &str) -> Result<HashMap<u32, String>> {
    let mut tokens = HashMap::with_capacity(ids.len());
    for (token, &id) in ids {
        if let Some(other) = tokens.insert(id, token.clone()) {
            return input_err!("{what}: tokens {other:?} and {token:?} both have id {id}; each id names one token");
        }
    }
    Ok(tokens)
}

/// Splits normalised text into the pieces CLIP's pre-tokenizer regex matches (module doc, step 3).
/// The regex tries its alternatives in order at each position; whitespace matches none and is
/// dropped. A special token that survives to here (only a case variant such as `<|ENDOFTEXT|>`,
/// lower-cased) is split again by the byte-level stage's GPT-2 regex into `<|`, the word, `|>`.
fn pre_tokenize(text: &str) -> Vec<&str> {
    const CONTRACTIONS: [&str; 7] = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"];
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c.is_whitespace() {
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if let Some(special) = [BOS_TEXT, EOS_TEXT].into_iter().find(|s| rest.starts_with(s)) {
            let word = &special[2..special.len() - 2];
            pieces.extend(["<|", word, "|>"]);
            rest = &rest[special.len()..];
            continue;
        }
        let len = if let Some(contraction) = CONTRACTIONS.iter().find(|s| rest.starts_with(**s)) {
            contraction.len()
        } else if is_letter(c) {
            run_len(rest, is_letter)
        } else if c.is_numeric() {
            c.len_utf8() // digits one at a time
        } else {
            run_len(rest, |c| !c.is_whitespace() && !is_letter(c) && !c.is_numeric())
        };
        pieces.push(&rest[..len]);
        rest = &rest[len..];
    }
    pieces
}

/// Byte length of the longest prefix whose characters all satisfy `keep`.
fn run_len(s: &str, keep: impl Fn(char) -> bool) -> usize {
    s.char_indices().find(|&(_, c)| !keep(c)).map_or(s.len(), |(i, _)| i)
}

/// `\p{L}` (general category Letter). std has no general-category query, so: Alphabetic, minus
/// numbers (Nl), marks (Mn/Mc that are Other_Alphabetic) and the circled/parenthesised/squared
/// Latin letters (So that are Other_Alphabetic). Checked against transformers' regex engine for
/// every code point assigned in Unicode 14; characters assigned later may be classed differently
/// by the reference (which does not know them) than here.
pub(crate) fn is_letter(c: char) -> bool {
    c.is_alphabetic()
        && !c.is_numeric()
        && !is_combining_mark(c)
        && !matches!(c, '\u{24B6}'..='\u{24E9}' | '\u{1F130}'..='\u{1F149}' | '\u{1F150}'..='\u{1F169}' | '\u{1F170}'..='\u{1F189}')
}

/// GPT-2's printable bytes, which stand for themselves in the byte-level alphabet.
fn is_printable_byte(b: usize) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// GPT-2's byte-to-unicode table: printable bytes map to themselves, the others (space, control
/// bytes, 0x7F-0xA0, 0xAD) to U+0100 onwards in byte order, so every byte is a visible symbol.
fn byte_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 0x100;
    for (b, slot) in table.iter_mut().enumerate() {
        let code = if is_printable_byte(b) {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).unwrap_or('\0'); // always valid: below U+0180
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_matches_gpt2() {
        let t = byte_to_unicode();
        assert_eq!(
            (t[b'!' as usize], t[b' ' as usize], t[0], t[0x7F], t[0xAD], t[0xFF]),
            ('!', 'Ġ', 'Ā', 'ġ', 'Ń', 'ÿ')
        );
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn pieces() {
        assert_eq!(pre_tokenize("don't 'sam ''s"), ["don", "'t", "'s", "am", "''", "s"]);
        assert_eq!(pre_tokenize("a1234b!?c"), ["a", "1", "2", "3", "4", "b", "!?", "c"]);
        assert_eq!(pre_tokenize("x<|endoftext|>!"), ["x", "<|", "endoftext", "|>", "!"]);
        assert_eq!(pre_tokenize("!<|endoftext|>"), ["!<|", "endoftext", "|>"]);
        assert_eq!(pre_tokenize("  \t\n"), Vec::<&str>::new());
        assert_eq!(pre_tokenize("café ⓐb ⅻ"), ["café", "ⓐ", "b", "ⅻ"]);
    }

    #[test]
    fn letters() {
        for c in ['a', 'é', 'ß', 'ж', '日', 'ー', 'ª'] {
            assert!(is_letter(c), "{c:?}");
        }
        for c in ['1', 'Ⅻ', '\u{301}', '\u{93F}', 'Ⓐ', '🅰', '_', '!', ' '] {
            assert!(!is_letter(c), "{c:?}");
        }
    }
}
