//! Text to token ids for the SDXL text encoders: the CLIP BPE tokenizer (`tokenizer`) and A1111
//! prompt syntax with 77-token chunking and emphasis weights (`prompt`). Sources: transformers' tokenization_clip.py, AUTOMATIC1111's modules/prompt_parser.py and sd_hijack_clip.py.

pub mod prompt;
pub mod tokenizer;

pub use prompt::{
    Chunk, LoraRequest, Piece, PromptTokens, apply_emphasis, parse_prompt, tokenize_plain, tokenize_prompt,
};
pub use tokenizer::{Encoder, Tokenizer};

/// Ids a text encoder takes: BOS + 75 + EOS.
pub const CONTEXT_TOKENS: usize = 77;
/// Prompt tokens per 77-token chunk.
pub const CHUNK_TOKENS: usize = CONTEXT_TOKENS - 2;
