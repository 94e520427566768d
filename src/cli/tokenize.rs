//! `celframe tokenize`: a prompt's token ids as JSON, one array of 77 per chunk, to compare with
//! other tools (transformers, A1111, ComfyUI).

use std::io::Write as _;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::text::{Encoder, Tokenizer, tokenize_plain, tokenize_prompt};

#[derive(Args)]
pub struct TokenizeArgs {
    /// The prompt (A1111 syntax: (text:1.2), (text), [text], \( \), BREAK, <lora:name:w>).
    pub text: String,
    /// Whose padding: clip-l pads with <|endoftext|> (49407), clip-g (bigG) with "!" (0).
    #[arg(long, value_enum, default_value = "clip-l")]
    pub encoder: EncoderArg,
    /// A tokenizer folder with vocab.json and merges.txt (a diffusers model's tokenizer/ or
    /// tokenizer_2/) instead of the built-in CLIP vocabulary.
    #[arg(long, value_name = "DIR")]
    pub vocab: Option<PathBuf>,
    /// Print {"chunks":[{"ids":[..],"weights":[..]}],"loras":[{"name","te_weight","unet_weight"}]}
    /// instead of the bare id arrays.
    #[arg(long)]
    pub weights: bool,
    /// No prompt syntax: the text as transformers' CLIPTokenizer sees it, cut into plain 75-token
    /// windows (the first is what diffusers feeds the encoder).
    #[arg(long)]
    pub raw: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum EncoderArg {
    ClipL,
    ClipG,
}

#[derive(Serialize)]
struct PromptJson<'a> {
    chunks: Vec<ChunkJson<'a>>,
    loras: Vec<LoraJson<'a>>,
}

#[derive(Serialize)]
struct ChunkJson<'a> {
    ids: &'a [u32],
    weights: &'a [f32],
}

#[derive(Serialize)]
struct LoraJson<'a> {
    name: &'a str,
    te_weight: f32,
    unet_weight: f32,
}

pub fn run(args: &TokenizeArgs) -> Result<()> {
    let tokenizer = match &args.vocab {
        Some(dir) => Tokenizer::from_dir(dir)?,
        None => Tokenizer::clip()?,
    };
    let encoder = match args.encoder {
        EncoderArg::ClipL => Encoder::ClipL,
        EncoderArg::ClipG => Encoder::ClipG,
    };
    let (chunks, loras) = if args.raw {
        (tokenize_plain(&args.text, &tokenizer, encoder), Vec::new())
    } else {
        let tokens = tokenize_prompt(&args.text, &tokenizer, encoder)?;
        (tokens.chunks, tokens.loras)
    };
    // Serialized from f32 fields so weights print as 1.1, not as the f64 nearest their f32.
    let json = if args.weights {
        let chunks = chunks.iter().map(|c| ChunkJson { ids: &c.ids, weights: &c.weights }).collect();
        let loras = loras
            .iter()
            .map(|l| LoraJson { name: &l.name, te_weight: l.te_weight, unet_weight: l.unet_weight })
            .collect();
        serde_json::to_string(&PromptJson { chunks, loras })
    } else {
        serde_json::to_string(&chunks.iter().map(|c| &c.ids[..]).collect::<Vec<_>>())
    }
    .map_err(|e| Error::Input(format!("tokenize: {e}")))?;
    // A closed pipe (`celframe tokenize ... | head`) is not an error worth reporting.
    match writeln!(std::io::stdout().lock(), "{json}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::Io { context: "writing to stdout".into(), source: e })
        }
        _ => Ok(()),
    }
}
