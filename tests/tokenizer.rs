//! The CLIP tokenizer against transformers' CLIPTokenizer on a corpus of prompts
//! (tests/fixtures/tokenizer_corpus.json, written by tools/make_tokenizer_fixtures.py), and the
//! `celframe tokenize` command.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use celframe::text::{Encoder, Tokenizer, tokenize_plain};
use serde::Deserialize;

#[derive(Deserialize)]
struct Corpus {
    prompts: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    text: String,
    ids: Vec<u32>,
    clip_l: Vec<u32>,
    clip_g: Vec<u32>,
    clip_g_diffusers: Vec<u32>,
    small: Vec<u32>,
}

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

fn corpus() -> &'static [Entry] {
    static CORPUS: OnceLock<Corpus> = OnceLock::new();
    &CORPUS
        .get_or_init(|| {
            let text = std::fs::read_to_string(fixtures().join("tokenizer_corpus.json")).unwrap();
            serde_json::from_str(&text).unwrap()
        })
        .prompts
}

fn clip() -> &'static Tokenizer {
    static CLIP: OnceLock<Tokenizer> = OnceLock::new();
    CLIP.get_or_init(|| Tokenizer::clip().unwrap())
}

/// Every prompt where `actual` differs from `expected`, reported together.
fn compare(what: &str, pairs: impl Iterator<Item = (String, Vec<u32>, Vec<u32>)>) {
    let (mut total, mut bad) = (0, Vec::new());
    for (text, actual, expected) in pairs {
        total += 1;
        if actual != expected {
            bad.push(format!("{text:?}\n  got      {actual:?}\n  expected {expected:?}"));
        }
    }
    assert!(total >= 60, "{what}: corpus has only {total} prompts");
    assert!(bad.is_empty(), "{what}: {} of {total} prompts differ:\n{}", bad.len(), bad.join("\n"));
}

#[test]
fn vocabulary() {
    let t = clip();
    assert_eq!(t.vocab_size(), 49408);
    assert_eq!((t.bos(), t.eos(), t.pad(Encoder::ClipL), t.pad(Encoder::ClipG)), (49406, 49407, 49407, 0));
    assert_eq!((t.id("!"), t.id(",</w>"), t.id("cat</w>")), (Some(0), Some(267), Some(2368)));
    assert_eq!(t.token(49406), Some("<|startoftext|>"));
}

#[test]
fn corpus_ids_match_transformers() {
    let t = clip();
    compare(
        "ids",
        corpus().iter().map(|e| {
            let mut ids = vec![t.bos()];
            ids.extend(t.encode(&e.text));
            ids.push(t.eos());
            (e.text.clone(), ids, e.ids.clone())
        }),
    );
}

#[test]
fn corpus_padded_clip_l_matches_transformers() {
    let t = clip();
    compare(
        "clip-l",
        corpus().iter().map(|e| (e.text.clone(), t.encode_padded(&e.text, Encoder::ClipL), e.clip_l.clone())),
    );
    // The first plain chunk is the same thing.
    compare(
        "clip-l plain chunk",
        corpus()
            .iter()
            .map(|e| (e.text.clone(), tokenize_plain(&e.text, t, Encoder::ClipL)[0].ids.to_vec(), e.clip_l.clone())),
    );
}

#[test]
fn corpus_padded_clip_g() {
    let t = clip();
    compare(
        "clip-g",
        corpus().iter().map(|e| (e.text.clone(), t.encode_padded(&e.text, Encoder::ClipG), e.clip_g.clone())),
    );
    // diffusers' tokenizer_2 agrees wherever its "!" quirk (see the fixture script) cannot apply.
    let without_bang = corpus().iter().filter(|e| !e.text.contains('!'));
    let same =
        without_bang.map(|e| (e.text.clone(), t.encode_padded(&e.text, Encoder::ClipG), e.clip_g_diffusers.clone()));
    let (mut n, mut bad) = (0, 0);
    for (_, actual, expected) in same {
        n += 1;
        bad += usize::from(actual != expected);
    }
    assert!(n > 50 && bad == 0, "{bad} of {n} prompts without '!' differ from diffusers' tokenizer_2");
}

#[test]
fn plain_chunks_cover_long_prompts() {
    let t = clip();
    for e in corpus().iter().filter(|e| e.ids.len() > 77) {
        let chunks = tokenize_plain(&e.text, t, Encoder::ClipL);
        let content: Vec<u32> = chunks
            .iter()
            .flat_map(|c| c.ids[1..].iter().copied().take_while(|&id| id != t.eos()).collect::<Vec<_>>())
            .collect();
        assert_eq!(content, e.ids[1..e.ids.len() - 1], "{:?}", e.text);
        assert_eq!(chunks.len(), (e.ids.len() - 2).div_ceil(75));
    }
}

#[test]
fn model_tokenizer_folder_matches_transformers() {
    // A cut-down vocab.json + merges.txt (first 3000 merges, real ids) loaded by transformers.
    let small = Tokenizer::from_dir(&fixtures().join("tokenizer_small")).unwrap();
    compare(
        "tokenizer_small",
        corpus().iter().map(|e| {
            let mut ids = vec![small.bos()];
            ids.extend(small.encode(&e.text));
            ids.push(small.eos());
            (e.text.clone(), ids, e.small.clone())
        }),
    );
}

#[test]
fn bad_tokenizer_folders_are_input_errors() {
    let dir = std::env::temp_dir().join(format!("celframe-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |vocab: &str, merges: &str| {
        std::fs::write(dir.join("vocab.json"), vocab).unwrap();
        std::fs::write(dir.join("merges.txt"), merges).unwrap();
        Tokenizer::from_dir(&dir).err().map(|e| (e.exit_code(), e.to_string()))
    };
    let specials = r#""<|startoftext|>": 3, "<|endoftext|>": 4, "!": 0"#;
    let cases = [
        (write("[1, 2]", "").unwrap(), "vocab.json"),
        (write(r#"{"a": 1}"#, "").unwrap(), "<|startoftext|>"),
        (write(&format!("{{{specials}, \"a\": 1, \"b</w>\": 2}}"), "#version: 0.2\na b</w>\n").unwrap(), "ab</w>"),
        (write(&format!("{{{specials}}}"), "#version: 0.2\nnospace\n").unwrap(), "line 2"),
    ];
    for ((code, message), needle) in cases {
        assert_eq!(code, 2, "{message}");
        assert!(message.contains(needle), "{message:?} should name {needle:?}");
    }
    let missing = Tokenizer::from_dir(&dir.join("nowhere")).err().unwrap();
    assert!(missing.to_string().contains("vocab.json"), "{missing}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn celframe(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_celframe")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn cli_tokenize() {
    let entry = corpus().iter().find(|e| e.ids.len() > 77).unwrap();
    let (code, out, err) = celframe(&["tokenize", "--raw", "--encoder", "clip-g", &entry.text]);
    assert_eq!(code, 0, "{err}");
    let chunks: Vec<Vec<u32>> = serde_json::from_str(&out).unwrap();
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[0], entry.clip_g);

    let (code, out, err) = celframe(&["tokenize", "--weights", "(cat:1.5) <lora:detail:0.5>"]);
    assert_eq!(code, 0, "{err}");
    let value: serde_json::Value = serde_json::from_str(&out).unwrap();
    let chunk: (Vec<u32>, Vec<f32>) =
        serde_json::from_value(serde_json::json!([value["chunks"][0]["ids"], value["chunks"][0]["weights"]])).unwrap();
    assert_eq!((&chunk.0[..3], &chunk.1[..3]), (&[49406, 2368, 49407][..], &[1.0, 1.5, 1.0][..]));
    assert_eq!(value["loras"], serde_json::json!([{"name": "detail", "te_weight": 0.5, "unet_weight": 0.5}]));

    let (code, _, err) = celframe(&["tokenize", "<lora:detail:strong>"]);
    assert_eq!(code, 2, "bad LoRA weight should be an input error: {err}");
    assert!(err.contains("strong"), "{err}");
    let (code, _, err) = celframe(&["tokenize", "--vocab", "/nonexistent-dir", "cat"]);
    assert_eq!(code, 2, "{err}");
}
