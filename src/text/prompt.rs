//! A1111 prompt syntax and chunking, following AUTOMATIC1111's
//! `extra_networks.parse_prompt`, `prompt_parser.parse_prompt_attention` and
//! `sd_hijack_clip.tokenize_line`:
//!
//! * `<lora:name>`, `<lora:name:w>`, `<lora:name:te_w:unet_w>`, `te=`/`unet=` (`lyco` is an alias)
//!   are removed from the text first and returned as [`LoraRequest`]s.
//! * `(text)` x1.1, `[text]` /1.1, `(text:w)` x w, nesting multiplies, unclosed brackets count
//!   as closed at the end, `\(` `\)` `\[` `\]` `\\` are literal, neighbours of equal weight merge.
//! * `BREAK` (a whole word, upper case) ends the current chunk.
//! * Each weighted piece is tokenized on its own; tokens fill chunks of 75; a chunk that fills up
//!   within 20 tokens after a comma moves the text after that comma to the next chunk. Each chunk
//!   is BOS + 75 + EOS, padded, with one weight per token (1.0 for BOS, EOS and padding).
//!
//! Weights: an emphasis weight (the product of nested brackets included) and a LoRA weight must
//! be finite and within ±`MAX_WEIGHT`; A1111 takes any number Python's `float` parses (LoRA
//! weights "inf" and "nan" too) and sends it to the encoder or the merge unchecked. Negative
//! weights stay allowed, as A1111's `[+-]?` in its weight pattern allows them.
//!
//! Deviations from A1111: `BREAK` inside brackets still breaks (A1111 multiplies its marker weight
//! and then tokenizes the word "BREAK"); extra networks other than LoRA, and LoRA options other
//! than `te`/`unet`, are errors instead of being skipped; more than `MAX_OPEN_BRACKETS` brackets
//! open at once is an error. Prompt editing (`[a:b:when]`,
//! `[a|b]`), `AND`, comment lines and textual inversions are not handled here.

use crate::error::Result;
use crate::input_err;

use super::tokenizer::{Encoder, Tokenizer, is_letter};
use super::{CHUNK_TOKENS, CONTEXT_TOKENS};

/// A1111's `comma_padding_backtrack` default: how far back a comma may sit to move the text after
/// it into the next chunk.
pub const COMMA_BACKTRACK: usize = 20;
const ROUND_MULTIPLIER: f64 = 1.1;
/// Most brackets open at once. Closing a bracket multiplies every piece since its opening, so
/// without a bound a long prompt of unclosed brackets ("(a(a(a...") takes time quadratic in its
/// length; A1111 has no such bound, and prompts nest a handful deep.
pub const MAX_OPEN_BRACKETS: usize = 100;
/// Largest |weight| of an emphasis or a LoRA tag. Prompts use about 0.5 to 2; 100 leaves room for
/// experiments and keeps weights far from f32's range (1e40 printed as JSON null).
pub const MAX_WEIGHT: f64 = 100.0;

/// One entry of a parsed prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    /// Text and its emphasis weight (f64, as A1111 computes it, so equal-weight merging agrees).
    Text { text: String, weight: f64 },
    /// `BREAK`: close the current chunk.
    Break,
}

/// A `<lora:...>` tag: which LoRA, at what strength on the text encoders and on the UNet.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraRequest {
    pub name: String,
    pub te_weight: f32,
    pub unet_weight: f32,
}

/// A prompt with its LoRA tags taken out and its emphasis parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedPrompt {
    pub pieces: Vec<Piece>,
    pub loras: Vec<LoraRequest>,
}

/// 77 ids for one text encoder and the emphasis weight of each.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    pub ids: [u32; CONTEXT_TOKENS],
    pub weights: [f32; CONTEXT_TOKENS],
}

/// What a prompt becomes for one encoder: its chunks (concatenated along tokens after encoding)
/// and the LoRAs it asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptTokens {
    pub chunks: Vec<Chunk>,
    pub loras: Vec<LoraRequest>,
}

/// Prompt -> chunks for `encoder`, with A1111 semantics (module doc).
pub fn tokenize_prompt(prompt: &str, tokenizer: &Tokenizer, encoder: Encoder) -> Result<PromptTokens> {
    let parsed = parse_prompt(prompt)?;
    Ok(PromptTokens { chunks: chunk_pieces(&parsed.pieces, tokenizer, encoder), loras: parsed.loras })
}

/// Text without prompt syntax, cut into plain 75-token windows (no comma rule), weights 1. The
/// first chunk is what diffusers feeds the encoder (it truncates to one window).
pub fn tokenize_plain(text: &str, tokenizer: &Tokenizer, encoder: Encoder) -> Vec<Chunk> {
    let ids = tokenizer.encode(text);
    let mut chunks: Vec<Chunk> = ids
        .chunks(CHUNK_TOKENS)
        .map(|window| make_chunk(&window.iter().map(|&id| (id, 1.0)).collect::<Vec<_>>(), tokenizer, encoder))
        .collect();
    if chunks.is_empty() {
        chunks.push(make_chunk(&[], tokenizer, encoder));
    }
    chunks
}

/// LoRA tags out, then emphasis.
pub fn parse_prompt(prompt: &str) -> Result<ParsedPrompt> {
    let (text, loras) = extract_loras(prompt)?;
    Ok(ParsedPrompt { pieces: parse_emphasis(&text)?, loras })
}

/// Removes every extra-network tag `<type:args>` (A1111's `<(\w+):([^>]+)>`) and returns the text
/// without them and the LoRA requests, in prompt order.
pub fn extract_loras(prompt: &str) -> Result<(String, Vec<LoraRequest>)> {
    let mut text = String::with_capacity(prompt.len());
    let mut loras = Vec::new();
    let mut rest = prompt;
    while let Some(open) = rest.find('<') {
        text.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let kind_len = after.char_indices().find(|&(_, c)| !is_word(c)).map_or(after.len(), |(i, _)| i);
        let args = after[kind_len..].strip_prefix(':').filter(|_| kind_len > 0);
        match args.map(|s| (s, s.find('>'))) {
            Some((s, Some(close))) if close > 0 => {
                loras.push(lora_request(&after[..kind_len], &s[..close])?);
                rest = &s[close + 1..];
            }
            // No '>' in the rest of the prompt: no later tag can close either, and searching
            // again from every '<' would take time quadratic in the prompt's length.
            Some((_, None)) => {
                rest = &rest[open..];
                break;
            }
            _ => {
                text.push('<');
                rest = after;
            }
        }
    }
    text.push_str(rest);
    Ok((text, loras))
}

/// One tag's arguments, as A1111's Lora extension reads them: positional name, te weight (1.0),
/// unet weight (the te weight); `te=` and `unet=` override.
fn lora_request(kind: &str, args: &str) -> Result<LoraRequest> {
    let tag = format!("<{kind}:{args}>");
    if kind != "lora" && kind != "lyco" {
        return input_err!("{tag}: extra network type {kind:?} is not supported (only lora)");
    }
    let (mut positional, mut named) = (Vec::new(), Vec::new());
    for item in args.split(':') {
        // A1111 splits on '=' at most twice and takes exactly two parts as name=value.
        match item.split_once('=') {
            Some((key, value)) if !value.contains('=') => named.push((key, value)),
            _ => positional.push(item),
        }
    }
    let number = |s: &str| -> Result<f32> {
        match s.trim().parse::<f64>() {
            Ok(v) if v.abs() <= MAX_WEIGHT => Ok(v as f32),
            _ => input_err!("{tag}: weight {s:?} is not a number from -{MAX_WEIGHT} to {MAX_WEIGHT}"),
        }
    };
    let Some(name) = positional.first().filter(|n| !n.is_empty()) else { return input_err!("{tag}: no LoRA name") };
    if positional.len() > 3 {
        return input_err!("{tag}: a fourth argument (dyn) is not supported");
    }
    let mut te_weight = positional.get(1).map_or(Ok(1.0), |s| number(s))?;
    let mut unet_weight = positional.get(2).map(|s| number(s)).transpose()?;
    for (key, value) in named {
        match key {
            "te" => te_weight = number(value)?,
            "unet" => unet_weight = Some(number(value)?),
            _ => return input_err!("{tag}: option {key:?} is not supported (te=, unet=)"),
        }
    }
    Ok(LoraRequest { name: name.to_string(), te_weight, unet_weight: unet_weight.unwrap_or(te_weight) })
}

/// A1111's `parse_prompt_attention`: scans the text as its regex does (escapes, brackets,
/// `:weight)`, runs of other text, a lone ':'), multiplies the weights of everything inside a
/// bracket when it closes, closes unclosed brackets at the end, and merges equal neighbours.
pub fn parse_emphasis(text: &str) -> Result<Vec<Piece>> {
    let mut res: Vec<Piece> = Vec::new();
    let (mut round, mut square) = (Vec::new(), Vec::new());
    let multiply = |res: &mut Vec<Piece>, from: usize, by: f64| {
        for piece in &mut res[from..] {
            if let Piece::Text { weight, .. } = piece {
                *weight *= by;
            }
        }
    };
    let text_piece = |s: &str| Piece::Text { text: s.to_string(), weight: 1.0 };
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let len = match c {
            '\\' => {
                // An escape keeps the next character literally; a lone backslash keeps nothing.
                match rest[1..].chars().next() {
                    Some(e @ ('(' | ')' | '[' | ']' | '\\')) => {
                        res.push(text_piece(&e.to_string()));
                        2
                    }
                    _ => {
                        res.push(text_piece(""));
                        1
                    }
                }
            }
            '(' | '[' if round.len() + square.len() == MAX_OPEN_BRACKETS => {
                return input_err!(
                    "prompt: more than {MAX_OPEN_BRACKETS} brackets open at once, at {:?}",
                    excerpt(rest)
                );
            }
            '(' => {
                round.push(res.len());
                1
            }
            '[' => {
                square.push(res.len());
                1
            }
            ':' => {
                let sign = usize::from(rest[1..].starts_with(['+', '-']));
                let digits = run_len(&rest[1 + sign..], |c| c == '.' || c.is_ascii_digit());
                let end = 1 + sign + digits;
                if digits > 0 && rest[end..].starts_with(')') {
                    let matched = &rest[..end + 1];
                    if let Some(open) = round.pop() {
                        let w = match rest[1..end].parse::<f64>() {
                            Ok(w) if w.abs() <= MAX_WEIGHT => w,
                            Ok(_) => {
                                return input_err!(
                                    "prompt: emphasis weight {matched:?} is outside -{MAX_WEIGHT} to {MAX_WEIGHT}"
                                );
                            }
                            Err(_) => return input_err!("prompt: bad emphasis weight {matched:?}"),
                        };
                        multiply(&mut res, open, w);
                    } else {
                        res.push(text_piece(matched)); // no '(' to close: plain text
                    }
                    end + 1
                } else {
                    res.push(text_piece(":"));
                    1
                }
            }
            ')' | ']' => {
                let stack = if c == ')' { &mut round } else { &mut square };
                match stack.pop() {
                    Some(open) => {
                        multiply(&mut res, open, if c == ')' { ROUND_MULTIPLIER } else { 1.0 / ROUND_MULTIPLIER })
                    }
                    None => res.push(text_piece(&c.to_string())),
                }
                1
            }
            _ => {
                let len = run_len(rest, |c| !matches!(c, '\\' | '(' | ')' | '[' | ']' | ':'));
                for (i, part) in split_break(&rest[..len]).into_iter().enumerate() {
                    if i > 0 {
                        res.push(Piece::Break);
                    }
                    res.push(text_piece(part));
                }
                len
            }
        };
        rest = &rest[len..];
    }
    for open in round {
        multiply(&mut res, open, ROUND_MULTIPLIER);
    }
    for open in square {
        multiply(&mut res, open, 1.0 / ROUND_MULTIPLIER);
    }
    if res.is_empty() {
        res.push(text_piece(""));
    }
    // Nesting multiplies: "((x:100))" is 110 though each factor is within bounds.
    for piece in &res {
        if let Piece::Text { text, weight } = piece
            && (!weight.is_finite() || weight.abs() > MAX_WEIGHT)
        {
            return input_err!(
                "prompt: {:?} has emphasis weight {weight} (nested brackets multiply), outside -{MAX_WEIGHT} to {MAX_WEIGHT}",
                excerpt(text)
            );
        }
    }
    // Merge runs of identical weights (exact f64 equality, as A1111).
    let mut merged: Vec<Piece> = Vec::with_capacity(res.len());
    for piece in res {
        match (merged.last_mut(), piece) {
            (Some(Piece::Text { text, weight }), Piece::Text { text: next, weight: w }) if *weight == w => {
                text.push_str(&next)
            }
            (_, piece) => merged.push(piece),
        }
    }
    Ok(merged)
}

/// The first 40 characters of `text`, "..." marking a cut: enough to find the spot in a long prompt.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

/// Python's `re.split(r"\s*\bBREAK\b\s*", text)`: BREAK as a whole word, with the whitespace
/// around it.
fn split_break(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut part_start, mut search) = (0, 0);
    while let Some(found) = text[search..].find("BREAK") {
        let at = search + found;
        let end = at + "BREAK".len();
        let before_ok = !text[..at].chars().next_back().is_some_and(is_word);
        let after_ok = !text[end..].chars().next().is_some_and(is_word);
        if !(before_ok && after_ok) {
            search = at + 1; // 'B' is one byte
            continue;
        }
        let start = part_start + text[part_start..at].trim_end_matches(char::is_whitespace).len();
        parts.push(&text[part_start..start]);
        part_start = end + (text[end..].len() - text[end..].trim_start_matches(char::is_whitespace).len());
        search = part_start;
    }
    parts.push(&text[part_start..]);
    parts
}

/// Python's `\w`: letters, numbers, underscore.
fn is_word(c: char) -> bool {
    is_letter(c) || c.is_numeric() || c == '_'
}

fn run_len(s: &str, keep: impl Fn(char) -> bool) -> usize {
    s.char_indices().find(|&(_, c)| !keep(c)).map_or(s.len(), |(i, _)| i)
}

/// A1111's `tokenize_line`: each piece tokenized on its own, chunks of 75 tokens, BREAK closes a
/// chunk, a full chunk hands the text after a comma within the last 20 tokens to the next one.
pub fn chunk_pieces(pieces: &[Piece], tokenizer: &Tokenizer, encoder: Encoder) -> Vec<Chunk> {
    let comma = tokenizer.id(",</w>");
    let mut chunks = Vec::new();
    let mut current: Vec<(u32, f32)> = Vec::with_capacity(CHUNK_TOKENS);
    // Position of the last comma in `current`; closing a chunk forgets it.
    let mut last_comma: Option<usize> = None;
    for piece in pieces {
        let (text, weight) = match piece {
            Piece::Break => {
                chunks.push(make_chunk(&current, tokenizer, encoder));
                current.clear();
                last_comma = None;
                continue;
            }
            Piece::Text { text, weight } => (text, *weight as f32),
        };
        for id in tokenizer.encode(text) {
            if Some(id) == comma {
                last_comma = Some(current.len());
            } else if let Some(at) = last_comma
                && current.len() == CHUNK_TOKENS
                && CHUNK_TOKENS - at <= COMMA_BACKTRACK
            {
                let moved = current.split_off(at + 1);
                chunks.push(make_chunk(&current, tokenizer, encoder));
                (current, last_comma) = (moved, None);
            }
            if current.len() == CHUNK_TOKENS {
                chunks.push(make_chunk(&current, tokenizer, encoder));
                current.clear();
                last_comma = None;
            }
            current.push((id, weight));
        }
    }
    if !current.is_empty() || chunks.is_empty() {
        chunks.push(make_chunk(&current, tokenizer, encoder));
    }
    chunks
}

/// BOS + tokens + EOS + padding, weights 1.0 outside the tokens. Padding is the encoder's pad id
/// (A1111 pads with EOS and, for bigG, overwrites everything after the EOS with 0: the same ids).
fn make_chunk(tokens: &[(u32, f32)], tokenizer: &Tokenizer, encoder: Encoder) -> Chunk {
    let mut ids = [tokenizer.pad(encoder); CONTEXT_TOKENS];
    let mut weights = [1.0; CONTEXT_TOKENS];
    ids[0] = tokenizer.bos();
    for (i, &(id, w)) in tokens.iter().take(CHUNK_TOKENS).enumerate() {
        ids[1 + i] = id;
        weights[1 + i] = w;
    }
    ids[1 + tokens.len().min(CHUNK_TOKENS)] = tokenizer.eos();
    Chunk { ids, weights }
}

/// A1111's "Original" emphasis on one encoded chunk, `hidden` = [tokens][dim] with one weight per
/// token: every token's vector is multiplied by its weight, then (with `renormalize`) the whole
/// chunk is rescaled so its mean over all tokens and channels is what it was before. `renormalize
/// = false` is A1111's "No norm". If the weighted mean is 0 the rescale is skipped (A1111 would
/// divide by zero).
pub fn apply_emphasis(hidden: &mut [f32], weights: &[f32], renormalize: bool) -> Result<()> {
    if weights.is_empty() || !hidden.len().is_multiple_of(weights.len()) {
        return input_err!("emphasis: {} values are not {} token rows", hidden.len(), weights.len());
    }
    let dim = hidden.len() / weights.len();
    let mean = |h: &[f32]| h.iter().map(|&v| v as f64).sum::<f64>() / h.len().max(1) as f64;
    let before = mean(hidden);
    for (row, &w) in hidden.chunks_exact_mut(dim.max(1)).zip(weights) {
        row.iter_mut().for_each(|v| *v *= w);
    }
    let after = mean(hidden);
    let scale = before / after;
    if renormalize && after != 0.0 && scale.is_finite() {
        hidden.iter_mut().for_each(|v| *v = (*v as f64 * scale) as f32);
    }
    Ok(())
}
