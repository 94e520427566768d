//! `celframe tokenize`: a prompt's token ids as JSON, one array of 77 per chunk, to compare with
//! other tools (transformers, A1111, ComfyUI). The prompt comes from the command line or, for
//! prompts longer than a command line holds (Linux caps one argument at 128 KiB), from a file or
//! stdin.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::text::{Encoder, Tokenizer, tokenize_plain, tokenize_prompt};

/// Largest prompt read from a file or stdin (1 MiB: eight times what one argument may hold).
pub const PROMPT_LIMIT: u64 = 1 << 20;

#[derive(Args)]
pub struct TokenizeArgs {
    /// The prompt (A1111 syntax: (text:1.2), (text), [text], \( \), BREAK, <lora:name:w>).
    #[arg(required_unless_present = "prompt_file", conflicts_with = "prompt_file")]
    pub text: Option<String>,
    /// Read the prompt from a UTF-8 file instead ("-": standard input), at most 1 MiB.
    #[arg(long, value_name = "PATH")]
    pub prompt_file: Option<PathBuf>,
    /// Whose padding: clip-l pads with <|endoftext|> (49407), clip-g (bigG) with "!" (0).
    #[arg(long, value_enum, default_value = "clip-l")]
    pub encoder: EncoderArg,
    /// A tokenizer folder with vocab.json and merges.txt (a diffusers model's tokenizer/ or
    /// tokenizer_2/) instead of the built-in CLIP vocabulary.
    #[arg(long, value_name = "DIR")]
    pub vocab: Option<PathBuf>,
    /// Print {"chunks":[{"ids":[..],"weights":[..]}],"loras":[{"name","te_weight","unet_weight"}]}
    /// (each token's emphasis weight and the LoRA tags) instead of the bare id arrays.
    #[arg(long)]
    pub emphasis: bool,
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

/// The prompt from `PATH`, or from stdin for "-", at most `PROMPT_LIMIT` bytes of UTF-8.
fn read_prompt(path: &Path) -> Result<String> {
    if path != Path::new("-") {
        return crate::io::read_text(path, PROMPT_LIMIT, "--prompt-file");
    }
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .take(PROMPT_LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Io { context: "--prompt-file -: reading standard input".into(), source: e })?;
    if bytes.len() as u64 > PROMPT_LIMIT {
        return Err(Error::Input(format!(
            "--prompt-file -: standard input holds more than the {PROMPT_LIMIT}-byte (1 MiB) prompt limit"
        )));
    }
    String::from_utf8(bytes)
        .map_err(|e| Error::Input(format!("--prompt-file -: standard input is not UTF-8 text: {e}")))
}

pub fn run(args: &TokenizeArgs) -> Result<()> {
    let text = match (&args.text, &args.prompt_file) {
        (_, Some(path)) => read_prompt(path)?,
        (Some(text), None) => text.clone(),
        (None, None) => return Err(Error::Input("tokenize: give a prompt or --prompt-file PATH".into())),
    };
    let tokenizer = match &args.vocab {
        Some(dir) => Tokenizer::from_dir(dir)?,
        None => Tokenizer::clip()?,
    };
    let encoder = match args.encoder {
        EncoderArg::ClipL => Encoder::ClipL,
        EncoderArg::ClipG => Encoder::ClipG,
    };
    let (chunks, loras) = if args.raw {
        (tokenize_plain(&text, &tokenizer, encoder), Vec::new())
    } else {
        let tokens = tokenize_prompt(&text, &tokenizer, encoder)?;
        (tokens.chunks, tokens.loras)
    };
    // Serialized from f32 fields so weights print as 1.1, not as the f64 nearest their f32.
    let json = if args.emphasis {
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
