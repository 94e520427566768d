//! A1111 prompt syntax, LoRA tags, chunking and emphasis. Expected values are worked out by hand
//! from A1111's rules (AUTOMATIC1111's modules/prompt_parser.py; the examples in `parse_prompt_attention`'s
//! docstring), not produced by this code.

use std::sync::OnceLock;

use celframe::text::prompt::{chunk_pieces, extract_loras, parse_emphasis};
use celframe::text::{Encoder, LoraRequest, Piece, Tokenizer, apply_emphasis, parse_prompt, tokenize_prompt};

fn clip() -> &'static Tokenizer {
    static CLIP: OnceLock<Tokenizer> = OnceLock::new();
    CLIP.get_or_init(|| Tokenizer::clip().unwrap())
}

fn t(text: &str, weight: f64) -> Piece {
    Piece::Text { text: text.to_string(), weight }
}

fn lora(name: &str, te_weight: f32, unet_weight: f32) -> LoraRequest {
    LoraRequest { name: name.to_string(), te_weight, unet_weight }
}

const A: u32 = 320; // "a</w>"
const B: u32 = 321; // "b</w>"
const COMMA: u32 = 267; // ",</w>"
const BOS: u32 = 49406;
const EOS: u32 = 49407;

#[test]
fn a1111_docstring_examples() {
    assert_eq!(parse_emphasis("normal text").unwrap(), [t("normal text", 1.0)]);
    assert_eq!(parse_emphasis("an (important) word").unwrap(), [t("an ", 1.0), t("important", 1.1), t(" word", 1.0)]);
    assert_eq!(parse_emphasis("(unbalanced").unwrap(), [t("unbalanced", 1.1)]);
    assert_eq!(parse_emphasis(r"\(literal\]").unwrap(), [t("(literal]", 1.0)]);
    assert_eq!(parse_emphasis("(unnecessary)(parens)").unwrap(), [t("unnecessaryparens", 1.1)]);
    // "(((house:1.3))": the weight closes one bracket, ")" a second, the third closes at the end.
    // Products in A1111's order; the decimals are the docstring's.
    let house = 1.0 * 1.3 * 1.1 * 1.1;
    let on = 1.0 * (1.0 / 1.1) * 1.1;
    let sky = 1.0 * 1.1 * 1.1 * 1.1 * 1.1;
    assert_eq!((house, on, sky), (1.5730000000000004, 1.0, 1.4641000000000006));
    assert_eq!(
        parse_emphasis("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).").unwrap(),
        [
            t("a ", 1.0),
            t("house", house),
            t(" ", 1.1),
            t("on", on),
            t(" a ", 1.1),
            t("hill", 0.5 * 1.1),
            t(", sun, ", 1.1),
            t("sky", sky),
            t(".", 1.1),
        ]
    );
}

#[test]
fn emphasis_rules() {
    let cases: Vec<(&str, Vec<Piece>)> = vec![
        ("((a:1.5))", vec![t("a", 1.5 * 1.1)]),
        ("[[a]]", vec![t("a", 1.0 / 1.1 / 1.1)]),
        ("(a:-1.5) b", vec![t("a", -1.5), t(" b", 1.0)]),
        ("(a:.5)(b:2.)", vec![t("a", 0.5), t("b", 2.0)]),
        ("(a:+2)", vec![t("a", 2.0)]),
        // Closers without an opener are text, including a weight.
        ("a:1.2) b] c)", vec![t("a:1.2) b] c)", 1.0)]),
        // ':' not followed by a number and ')' is text; "(b:)" closes normally.
        ("x:y (b:) z", vec![t("x:y ", 1.0), t("b:", 1.1), t(" z", 1.0)]),
        // Escapes; a lone backslash is dropped (A1111's `\\` alternative keeps text[1:] = "").
        (r"a\\b \(c\) \[d\] e\f", vec![t(r"a\b (c) [d] ef", 1.0)]),
        // Escaped brackets inside brackets take the bracket's weight.
        (r"(a\(b)", vec![t("a(b", 1.1)]),
        ("[a (b) c]", vec![t("a ", 1.0 / 1.1), t("b", 1.1 * (1.0 / 1.1)), t(" c", 1.0 / 1.1)]),
        ("(a) (b)", vec![t("a", 1.1), t(" ", 1.0), t("b", 1.1)]),
        ("", vec![t("", 1.0)]),
        ("()", vec![t("", 1.0)]),
        ("(a", vec![t("a", 1.1)]),
        ("[(a", vec![t("a", 1.1 * (1.0 / 1.1))]),
    ];
    for (prompt, expected) in cases {
        assert_eq!(parse_emphasis(prompt).unwrap(), expected, "{prompt:?}");
    }
}

#[test]
fn break_keyword() {
    let cases: Vec<(&str, Vec<Piece>)> = vec![
        ("a BREAK b", vec![t("a", 1.0), Piece::Break, t("b", 1.0)]),
        ("a,  BREAK\n,b", vec![t("a,", 1.0), Piece::Break, t(",b", 1.0)]),
        ("BREAK", vec![t("", 1.0), Piece::Break, t("", 1.0)]),
        ("a BREAK BREAK b", vec![t("a", 1.0), Piece::Break, t("", 1.0), Piece::Break, t("b", 1.0)]),
        // Not a whole upper-case word: text.
        ("aBREAK BREAKb BREAK_ break", vec![t("aBREAK BREAKb BREAK_ break", 1.0)]),
        ("(a) BREAK [b]", vec![t("a", 1.1), t("", 1.0), Piece::Break, t("", 1.0), t("b", 1.0 / 1.1)]),
        // Deviation: inside brackets it still breaks (A1111 would tokenize the word "BREAK").
        ("(a BREAK b)", vec![t("a", 1.1), Piece::Break, t("b", 1.1)]),
    ];
    for (prompt, expected) in cases {
        assert_eq!(parse_emphasis(prompt).unwrap(), expected, "{prompt:?}");
    }
}

#[test]
fn lora_tags() {
    let cases: Vec<(&str, &str, Vec<LoraRequest>)> = vec![
        ("a <lora:foo:0.8> b", "a  b", vec![lora("foo", 0.8, 0.8)]),
        ("<lora:foo>", "", vec![lora("foo", 1.0, 1.0)]),
        ("<lora:foo:0.5:0.25>x", "x", vec![lora("foo", 0.5, 0.25)]),
        ("<lora:foo:te=0.3:unet=0.9>", "", vec![lora("foo", 0.3, 0.9)]),
        ("<lora:foo:1:unet=0>", "", vec![lora("foo", 1.0, 0.0)]),
        ("<lora:foo:-0.5>", "", vec![lora("foo", -0.5, -0.5)]),
        (
            "<lyco:bar:0.7>, <lora:my style v2.1: 0.6 >",
            ", ",
            vec![lora("bar", 0.7, 0.7), lora("my style v2.1", 0.6, 0.6)],
        ),
        ("(1girl <lora:x:1>)", "(1girl )", vec![lora("x", 1.0, 1.0)]),
        // Not tags: kept as text.
        ("<3 <lora:> <:x> a>b <lora:x", "<3 <lora:> <:x> a>b <lora:x", vec![]),
        // As A1111's regex: the arguments run to the first '>', across spaces and '<'.
        ("<lora:a b<c:0.5>", "", vec![lora("a b<c", 0.5, 0.5)]),
    ];
    for (prompt, text, loras) in cases {
        assert_eq!(extract_loras(prompt).unwrap(), (text.to_string(), loras), "{prompt:?}");
    }
    let parsed = parse_prompt("(masterpiece:1.2) <lora:detail:0.5>, 1girl").unwrap();
    assert_eq!(parsed.pieces, [t("masterpiece", 1.2), t(" , 1girl", 1.0)]);
    assert_eq!(parsed.loras, [lora("detail", 0.5, 0.5)]);
}

#[test]
fn bad_prompts_are_input_errors() {
    for (prompt, needle) in [
        ("(a:1.2.3)", "1.2.3"),
        ("(a:.)", "."),
        ("<lora:x:strong>", "strong"),
        ("<lora:x:inf>", "inf"),
        // Weights are finite and within ±100 (MAX_WEIGHT); these once printed as JSON null.
        ("<lora:x:1e39>", "1e39"),
        ("<lora:x:nan>", "nan"),
        ("<lora:x:-infinity>", "infinity"),
        ("<lora:x:1:unet=101>", "101"),
        ("<lora:x:te=-100.5>", "-100.5"),
        (format!("(x:1{})", "0".repeat(40)).as_str(), "outside"),
        (format!("(x:1{})", "0".repeat(400)).as_str(), "outside"),
        ("(x:100.01)", "100.01"),
        ("(x:-101)", "-101"),
        // At most 100 brackets open at once (closing one multiplies every piece since its opening,
        // so a long run of unclosed brackets took time quadratic in the prompt's length).
        (format!("{}x(y)", "[".repeat(101)).as_str(), "more than 100 brackets open at once, at \"[x(y)\""),
        (format!("{}<lora:x", "(a".repeat(300_000)).as_str(), "more than 100 brackets"),
        // Nesting multiplies weights within bounds beyond them: 100 * 1.1, 1.1^49.
        ("((big:100))", "\"big\" has emphasis weight 110"),
        (format!("{}deep", "(".repeat(49)).as_str(), "\"deep\""),
        ("<lora::1>", "name"),
        ("<lora:x:1:1:8>", "dyn"),
        ("<lora:x:1:lbw=ALL>", "lbw"),
        ("<hypernet:x:1>", "hypernet"),
    ] {
        let err = parse_prompt(prompt).expect_err(prompt);
        assert_eq!(err.exit_code(), 2, "{prompt:?}: {err}");
        assert!(err.to_string().contains(needle), "{prompt:?}: {err}");
    }
    // The bounds themselves are allowed, negative emphasis too (A1111's weight pattern is
    // `[+-]?[.\d]+`), and so are products that stay within them.
    assert_eq!(parse_emphasis("(a:100)(b:-100)").unwrap(), [t("a", 100.0), t("b", -100.0)]);
    assert_eq!(parse_emphasis("((a:90.9))").unwrap(), [t("a", 90.9 * 1.1)]);
    assert_eq!(extract_loras("<lora:x:-100:100>").unwrap().1, [lora("x", -100.0, 100.0)]);
    let pieces = parse_emphasis(&format!("{}x", "([".repeat(50))).unwrap();
    assert!(matches!(&pieces[..], [Piece::Text { text, weight }] if text == "x" && (weight - 1.0).abs() < 1e-9));
    // A '<' that no '>' follows is text, at once: 300,000 of them took seconds, rescanned each time.
    let open_tags = "<a:".repeat(300_000);
    assert_eq!(extract_loras(&open_tags).unwrap(), (open_tags.clone(), vec![]));
    assert_eq!(extract_loras("<lora:x:1> <a:").unwrap(), (" <a:".to_string(), vec![lora("x", 1.0, 1.0)]));
    // Odd input never panics.
    for prompt in ["\\", "(((", ")))", "]]][[[", ":", "::)", "(:1)", "<", "<lora:", "\u{0}(\u{FFFF}:1)", "🐱(:🐱)"]
    {
        let tokens = tokenize_prompt(prompt, clip(), Encoder::ClipG).unwrap();
        assert!(!tokens.chunks.is_empty(), "{prompt:?}");
    }
}

/// The tokens between BOS and the first EOS of each chunk, with their weights.
fn contents(prompt: &str, encoder: Encoder) -> Vec<Vec<(u32, f32)>> {
    let chunks = tokenize_prompt(prompt, clip(), encoder).unwrap().chunks;
    let pad = clip().pad(encoder);
    chunks
        .iter()
        .map(|c| {
            assert_eq!((c.ids[0], c.weights[0]), (BOS, 1.0));
            let n = c.ids[1..].iter().position(|&id| id == EOS).unwrap();
            assert!(c.ids[n + 2..].iter().all(|&id| id == pad), "padding of {prompt:?}");
            assert!(c.weights[n + 1..].iter().all(|&w| w == 1.0), "EOS and padding weights of {prompt:?}");
            (1..=n).map(|i| (c.ids[i], c.weights[i])).collect()
        })
        .collect()
}

fn repeat(id: u32, weight: f32, n: usize) -> Vec<(u32, f32)> {
    vec![(id, weight); n]
}

#[test]
fn chunks_and_weights() {
    let cat = clip().id("cat</w>").unwrap();
    let dog = clip().id("dog</w>").unwrap();
    let ab = clip().id("ab</w>").unwrap();
    assert_eq!(contents("", Encoder::ClipL), [vec![]]);
    assert_eq!(contents("(cat:1.5) dog", Encoder::ClipL), [vec![(cat, 1.5), (dog, 1.0)]]);
    assert_eq!(contents("[cat] dog", Encoder::ClipG), [vec![(cat, (1.0 / 1.1) as f32), (dog, 1.0)]]);
    // Each weighted piece is tokenized on its own, so a bracket ends a word.
    assert_eq!(contents("ab", Encoder::ClipL), [vec![(ab, 1.0)]]);
    assert_eq!(contents("(a)b", Encoder::ClipL), [vec![(A, 1.1), (B, 1.0)]]);
    // Equal weights merge first: "(a)(b)" is the one word "ab".
    assert_eq!(contents("(a)(b)", Encoder::ClipL), [vec![(ab, 1.1)]]);
    // BREAK closes the current chunk, even an empty one.
    assert_eq!(contents("a BREAK b", Encoder::ClipL), [vec![(A, 1.0)], vec![(B, 1.0)]]);
    assert_eq!(contents("BREAK a", Encoder::ClipG), [vec![], vec![(A, 1.0)]]);
    assert_eq!(contents("a BREAK", Encoder::ClipL), [vec![(A, 1.0)]]);
    // LoRA tags leave no tokens.
    assert_eq!(contents("<lora:x:1>a", Encoder::ClipL), [vec![(A, 1.0)]]);
}

#[test]
fn chunk_ids_and_padding() {
    let l = &tokenize_prompt("a", clip(), Encoder::ClipL).unwrap().chunks[0];
    let g = &tokenize_prompt("a", clip(), Encoder::ClipG).unwrap().chunks[0];
    let mut expected_l = vec![BOS, A, EOS];
    expected_l.resize(77, EOS);
    let mut expected_g = vec![BOS, A, EOS];
    expected_g.resize(77, 0);
    assert_eq!((l.ids.to_vec(), g.ids.to_vec()), (expected_l, expected_g));
    assert!(l.weights.iter().chain(&g.weights).all(|&w| w == 1.0));
}

#[test]
fn chunk_lengths_and_comma_backtrack() {
    // 75 tokens fill one chunk exactly; a 76th starts a second.
    assert_eq!(contents(&"a ".repeat(75), Encoder::ClipL), [repeat(A, 1.0, 75)]);
    assert_eq!(contents(&"a ".repeat(76), Encoder::ClipL), [repeat(A, 1.0, 75), repeat(A, 1.0, 1)]);

    // A comma 5 tokens before the end of a full chunk: what follows it moves to the next chunk,
    // with its weights.
    let prompt = format!("{}, (b:0.5) {}", "a ".repeat(70), "b ".repeat(9));
    let first = [repeat(A, 1.0, 70), vec![(COMMA, 1.0)]].concat();
    let second = [vec![(B, 0.5)], repeat(B, 1.0, 9)].concat();
    assert_eq!(contents(&prompt, Encoder::ClipL), [first, second]);

    // Backtrack limit 20: a comma at index 55 (20 from the end) moves, at 54 (21) does not.
    let at = |n: usize| format!("{}, {}", "a ".repeat(n), "b ".repeat(30));
    let moved = contents(&at(55), Encoder::ClipL);
    assert_eq!(moved, [[repeat(A, 1.0, 55), vec![(COMMA, 1.0)]].concat(), repeat(B, 1.0, 30)]);
    let kept = contents(&at(54), Encoder::ClipL);
    assert_eq!(kept, [[repeat(A, 1.0, 54), vec![(COMMA, 1.0)], repeat(B, 1.0, 20)].concat(), repeat(B, 1.0, 10)]);

    // A comma arriving as the 76th token opens the next chunk and is forgotten there, so the
    // next full chunk has no comma to go back to.
    let prompt = format!("{}, {}", "a ".repeat(75), "b ".repeat(80));
    let chunks = contents(&prompt, Encoder::ClipL);
    assert_eq!(chunks.len(), 3);
    assert_eq!(chunks[1], [vec![(COMMA, 1.0)], repeat(B, 1.0, 74)].concat());
    assert_eq!(chunks[2], repeat(B, 1.0, 6));
}

#[test]
fn long_prompts_concatenate_every_token() {
    // Without commas, BREAK or emphasis, chunks are plain 75-token windows of all the tokens.
    let text = "masterpiece best quality 1girl solo long hair looking at viewer ".repeat(12);
    let ids = clip().encode(&text);
    let chunks = contents(&text, Encoder::ClipG);
    assert_eq!(chunks.len(), ids.len().div_ceil(75));
    assert_eq!(chunks.concat().iter().map(|&(id, _)| id).collect::<Vec<_>>(), ids);
}

#[test]
fn emphasis_on_hidden_states() {
    // Two tokens of two channels: [[1, 2], [3, 4]], weights [1, 2] -> [[1, 2], [6, 8]];
    // mean before 2.5, after 4.25, so everything is scaled by 2.5 / 4.25.
    let mut z = [1.0f32, 2.0, 3.0, 4.0];
    apply_emphasis(&mut z, &[1.0, 2.0], true).unwrap();
    let s = 2.5 / 4.25;
    for (got, want) in z.iter().zip([s, 2.0 * s, 6.0 * s, 8.0 * s]) {
        assert!((got - want).abs() < 1e-6, "{z:?}");
    }
    assert!((z.iter().sum::<f32>() / 4.0 - 2.5).abs() < 1e-6);

    let mut z = [1.0f32, 2.0, 3.0, 4.0];
    apply_emphasis(&mut z, &[1.0, 2.0], false).unwrap();
    assert_eq!(z, [1.0, 2.0, 6.0, 8.0]);

    // All weights 1: unchanged. Weighted mean 0: no division by zero.
    let mut z = [0.5f32, -1.5, 2.0, 7.0];
    apply_emphasis(&mut z, &[1.0, 1.0], true).unwrap();
    assert_eq!(z, [0.5, -1.5, 2.0, 7.0]);
    let mut z = [1.0f32, -1.0, 1.0, -1.0];
    apply_emphasis(&mut z, &[2.0, 1.0], true).unwrap();
    assert_eq!(z, [2.0, -2.0, 1.0, -1.0]);

    assert!(apply_emphasis(&mut [0.0; 5], &[1.0, 1.0], true).is_err());
    assert!(apply_emphasis(&mut [0.0; 4], &[], true).is_err());
}

#[test]
fn chunk_pieces_directly() {
    // The pieces API, for callers that build prompts themselves.
    let pieces = [t("a", 2.0), Piece::Break, t("b", 0.5)];
    let chunks = chunk_pieces(&pieces, clip(), Encoder::ClipL);
    assert_eq!(chunks.len(), 2);
    assert_eq!((chunks[0].ids[1], chunks[0].weights[1]), (A, 2.0));
    assert_eq!((chunks[1].ids[1], chunks[1].weights[1]), (B, 0.5));
}
