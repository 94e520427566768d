//! The CLIP tokenizer against transformers' CLIPTokenizer on a corpus of prompts
//! (tests/fixtures/tokenizer_corpus.json, written by tools/make_tokenizer_fixtures.py), its BPE
//! against a plain rescanning BPE on random merge tables, its speed on one very long word,
//! vocabulary checks, and the `celframe tokenize` command.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use celframe::text::{Encoder, Tokenizer, tokenize_plain};
use common::TempDir;
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
    let dir = TempDir::new("bad");
    let write = |vocab: &str, merges: &str| {
        std::fs::write(dir.0.join("vocab.json"), vocab).unwrap();
        std::fs::write(dir.0.join("merges.txt"), merges).unwrap();
        Tokenizer::from_dir(&dir.0).err().map(|e| (e.exit_code(), e.to_string()))
    };
    let specials = r#""<|startoftext|>": 1, "<|endoftext|>": 2, "!": 0"#;
    let cases = [
        (write("[1, 2]", "").unwrap(), "vocab.json"),
        (write(r#"{"a": 0}"#, "").unwrap(), "<|startoftext|>"),
        (write(&format!("{{{specials}, \"a\": 3, \"b</w>\": 4}}"), "#version: 0.2\na b</w>\n").unwrap(), "ab</w>"),
        (write(&format!("{{{specials}}}"), "#version: 0.2\nnospace\n").unwrap(), "line 2"),
        // Each id names one token; ids are u32.
        (write(&format!("{{{specials}, \"twice\": 2}}"), "").unwrap(), "both have id 2"),
        (write(&format!("{{{specials}, \"neg\": -1}}"), "").unwrap(), "vocab.json"),
        (write(&format!("{{{specials}, \"big\": 4294967296}}"), "").unwrap(), "vocab.json"),
    ];
    for ((code, message), needle) in cases {
        assert_eq!(code, 2, "{message}");
        assert!(message.contains(needle), "{message:?} should name {needle:?}");
    }
    // The largest u32 id is a token like any other (it once sized a 100 GB id -> token table).
    assert!(write(&format!("{{{specials}, \"huge\": 4294967295}}"), "").is_none());
    let t = Tokenizer::from_dir(&dir.0).unwrap();
    assert_eq!((t.vocab_size(), t.token(4294967295), t.token(3)), (4, Some("huge"), None));
    let missing = Tokenizer::from_dir(&dir.0.join("nowhere")).err().unwrap();
    assert!(missing.to_string().contains("vocab.json"), "{missing}");
    // A FIFO is refused by name instead of blocking the read.
    let fifo = TempDir::new("fifo");
    std::fs::write(fifo.0.join("merges.txt"), "").unwrap();
    let made = Command::new("mkfifo").arg(fifo.0.join("vocab.json")).status().unwrap();
    assert!(made.success());
    let e = Tokenizer::from_dir(&fifo.0).err().unwrap();
    assert!(e.to_string().contains("vocab.json") && e.to_string().contains("FIFO"), "{e}");
}

// ---- BPE against a plain reference --------------------------------------------------------------

/// xorshift64: reproducible random numbers without a dependency.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// The plain BPE (open_clip's `bpe` and the tokenizer's loop before the heap): the word's
/// characters, "</w>" on the last, then repeatedly merge the adjacent pair of lowest rank
/// (leftmost on a tie), rescanning the whole word after each merge.
fn reference_bpe(word: &str, ranks: &HashMap<(String, String), usize>) -> Vec<String> {
    let mut symbols: Vec<String> = word.chars().map(String::from).collect();
    if let Some(last) = symbols.last_mut() {
        last.push_str("</w>");
    }
    loop {
        let best = (0..symbols.len().saturating_sub(1))
            .filter_map(|i| ranks.get(&(symbols[i].clone(), symbols[i + 1].clone())).map(|&r| (r, i)))
            .min();
        let Some((_, i)) = best else { return symbols };
        let right = symbols.remove(i + 1);
        symbols[i].push_str(&right);
    }
}

/// Random merge tables over the letters a-c (a few hundred merges, so products of products and
/// merges that make an existing token again occur) and random words up to 60 letters: the
/// tokenizer's ids are the reference's tokens, word by word.
#[test]
fn bpe_matches_the_rescanning_reference() {
    let dir = TempDir::new("bpe");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for table in 0..20 {
        // Vocabulary: the letters with and without "</w>", then one token per merge.
        let mut vocab: Vec<String> = ["a", "b", "c", "a</w>", "b</w>", "c</w>"].map(String::from).to_vec();
        let (mut merges, mut ranks) = (Vec::new(), HashMap::new());
        for _ in 0..300 {
            // The left symbol never ends a word; the right one may.
            let lefts: Vec<&String> = vocab.iter().filter(|t| !t.ends_with("</w>")).collect();
            let left = lefts[rng.below(lefts.len())].clone();
            let right = vocab[rng.below(vocab.len())].clone();
            if ranks.contains_key(&(left.clone(), right.clone())) || left.len() + right.len() > 24 {
                continue;
            }
            ranks.insert((left.clone(), right.clone()), merges.len());
            merges.push(format!("{left} {right}"));
            let merged = format!("{left}{right}");
            if !vocab.contains(&merged) {
                vocab.push(merged);
            }
        }
        vocab.extend(["!", "<|startoftext|>", "<|endoftext|>"].map(String::from));
        let ids: HashMap<&str, u32> = vocab.iter().enumerate().map(|(i, t)| (t.as_str(), i as u32)).collect();
        std::fs::write(dir.0.join("vocab.json"), serde_json::to_string(&ids).unwrap()).unwrap();
        std::fs::write(dir.0.join("merges.txt"), format!("#version: 0.2\n{}\n", merges.join("\n"))).unwrap();
        let tokenizer = Tokenizer::from_dir(&dir.0).unwrap();
        for _ in 0..200 {
            let word: String = (0..1 + rng.below(60)).map(|_| ['a', 'b', 'c'][rng.below(3)]).collect();
            let expected: Vec<u32> = reference_bpe(&word, &ranks).iter().map(|t| ids[t.as_str()]).collect();
            assert_eq!(tokenizer.encode(&word), expected, "table {table}, word {word:?}");
        }
    }
}

/// One unbroken 200,000-letter word (the old rescanning BPE was quadratic in it: 131,000 letters
/// took 104 s). The bound is generous for a debug build on a loaded machine; the tokens spell the
/// word back.
#[test]
fn a_very_long_word_tokenizes_quickly() {
    let t = clip();
    let mut rng = Rng(42);
    let letters = b"etaoinshrdlucmfwypvbgkjqxz";
    let word: String = (0..200_000).map(|_| letters[rng.below(letters.len())] as char).collect();
    let start = Instant::now();
    let ids = t.encode(&word);
    let seconds = start.elapsed().as_secs_f64();
    println!("200,000-letter word: {} tokens in {seconds:.3} s", ids.len());
    assert!(seconds < 20.0, "took {seconds:.1} s");
    let spelled: String = ids.iter().map(|&id| t.token(id).unwrap()).collect();
    assert_eq!(spelled, format!("{word}</w>"));
}

fn celframe(args: &[&str]) -> (i32, String, String) {
    celframe_with_stdin(args, b"")
}

/// Runs the binary with `stdin` as its standard input: exit code, stdout, stderr.
fn celframe_with_stdin(args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_celframe"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    // Written from a thread: the binary may stop reading (or exit) before taking it all.
    let writer = std::thread::spawn(move || {
        let _ = std::io::Write::write_all(&mut pipe, &input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
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

    let (code, out, err) = celframe(&["tokenize", "--emphasis", "(cat:1.5) <lora:detail:0.5>"]);
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
    // Absurd weights are refused instead of printing null.
    for prompt in ["(x:1000000000000000000000000000000000000000)", "<lora:x:1e39>"] {
        let (code, out, err) = celframe(&["tokenize", "--emphasis", prompt]);
        assert_eq!(code, 2, "{prompt}: {out}{err}");
    }
    // The weights flag is --emphasis; --weights names weight files elsewhere and is not taken here.
    let (code, _, err) = celframe(&["tokenize", "--weights", "cat"]);
    assert_eq!(code, 2, "{err}");
}

/// Prompts longer than one argument may be (128 KiB): from a file or stdin, up to 1 MiB.
#[test]
fn cli_prompt_file_and_stdin() {
    let dir = TempDir::new("prompt");
    let entry = corpus().iter().find(|e| e.ids.len() > 77).unwrap();
    let (code, from_argv, err) = celframe(&["tokenize", &entry.text]);
    assert_eq!(code, 0, "{err}");
    let file = dir.0.join("prompt.txt");
    std::fs::write(&file, &entry.text).unwrap();
    let file = file.to_str().unwrap();
    let (code, from_file, err) = celframe(&["tokenize", "--prompt-file", file]);
    assert_eq!((code, &from_file), (0, &from_argv), "{err}");
    let (code, from_stdin, err) = celframe_with_stdin(&["tokenize", "--prompt-file", "-"], entry.text.as_bytes());
    assert_eq!((code, &from_stdin), (0, &from_argv), "{err}");

    // 300,000 characters: more than argv takes, within the limit; 75 "cat" per chunk.
    let long = "cat ".repeat(75_000);
    let (code, out, err) = celframe_with_stdin(&["tokenize", "--prompt-file", "-"], long.as_bytes());
    assert_eq!(code, 0, "{err}");
    let chunks: Vec<Vec<u32>> = serde_json::from_str(&out).unwrap();
    assert_eq!(chunks.len(), 1000);
    assert!(chunks.iter().all(|c| c[1..76].iter().all(|&id| id == 2368)));

    // Over 1 MiB, not UTF-8, a FIFO, both a prompt and a file, neither: exit 2, named.
    let big = vec![b'a'; (1 << 20) + 1];
    let (code, _, err) = celframe_with_stdin(&["tokenize", "--prompt-file", "-"], &big);
    assert!(code == 2 && err.contains("1048576"), "{code}: {err}");
    let big_file = dir.0.join("big.txt");
    std::fs::write(&big_file, &big).unwrap();
    let (code, _, err) = celframe(&["tokenize", "--prompt-file", big_file.to_str().unwrap()]);
    assert!(code == 2 && err.contains("1048576") && err.contains("big.txt"), "{code}: {err}");
    let (code, _, err) = celframe_with_stdin(&["tokenize", "--prompt-file", "-"], b"cat \xff");
    assert!(code == 2 && err.contains("UTF-8"), "{code}: {err}");
    let fifo = dir.0.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let (code, _, err) = celframe(&["tokenize", "--prompt-file", fifo.to_str().unwrap()]);
    assert!(code == 2 && err.contains("FIFO"), "{code}: {err}");
    let (code, _, err) = celframe(&["tokenize", "--prompt-file", file, "cat"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = celframe(&["tokenize"]);
    assert_eq!(code, 2, "{err}");
}
