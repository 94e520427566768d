#!/usr/bin/env python3
"""Writes tests/fixtures/tokenizer_corpus.json and tests/fixtures/tokenizer_small/: token ids of a
corpus of prompts as transformers' CLIPTokenizer produces them, for tests/tokenizer.rs.

Needs: transformers (5.x), open_clip_torch (for its vocabulary file and its SimpleTokenizer), ftfy.

Reference. diffusers' SDXL pipeline tokenizes with transformers' CLIPTokenizer loaded from the
model's tokenizer/ and tokenizer_2/ folders. Those hold the CLIP vocabulary: vocab.json with 49408
entries and merges.txt with 48894 merges, both derived from OpenAI's bpe_simple_vocab_16e6.txt.gz.
No model hub is reachable here, so this script writes the same two files from the copy of that
merge list inside open_clip_torch, building the vocabulary in CLIP's order (byte symbols, byte
symbols + "</w>", one token per merge, the two specials), and checks the result against the
well-known ids of "a photo of a cat". tokenizer/ uses transformers' defaults (pad = <|endoftext|>);
tokenizer_2/ only adds pad_token "!" in its config. Both are loaded with from_pretrained from
folders holding the files and a tokenizer_config.json, as diffusers loads them.

Per prompt the corpus records:
  ids               tokenizer(text)["input_ids"]: BOS + all ids + EOS, no truncation
  clip_l            tokenizer(text, padding="max_length", max_length=77, truncation=True)
  clip_g            the same ids with the padding positions set to 0 ("!"): what A1111, ComfyUI
                    and SGM feed OpenCLIP bigG
  clip_g_diffusers  tokenizer_2(...) as diffusers runs it. Because "!" is its pad token,
                    transformers treats "!" as a special token and cuts it out of the text before
                    BPE ("wow!!" -> "wow", "!", "!" instead of "wow", "!!</w>"); celframe follows
                    A1111/ComfyUI there, so this differs from clip_g exactly for prompts with "!".
  open_clip         open_clip's SimpleTokenizer (ftfy + HTML unescape, the tokenizer bigG was
                    trained with): informational, it differs on HTML entities, curly quotes,
                    full-width forms, literal special tokens.
  small             ids with the cut-down tokenizer folder tests/fixtures/tokenizer_small (byte
                    symbols, the first 3000 merges, specials, real ids; loaded by transformers
                    with from_pretrained), which checks loading a model's own vocab.json +
                    merges.txt.

Usage: python3 tools/make_tokenizer_fixtures.py
"""

import gzip
import json
import os
import shutil
import tempfile

import transformers
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SMALL_MERGES = 3000

LONG = (
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile, open mouth, bangs, "
    "blue eyes, shirt, hair ornament, long sleeves, dress, bow, holding, twintails, very long hair, "
    "school uniform, standing, full body, white shirt, outdoors, sky, day, serafuku, cloud, bag, "
    "blue sky, petals, cherry blossoms, wind, building, scenery, city, road, street, power lines"
)

CORPUS = [
    # plain anime prompts
    "a photo of a cat",
    "1girl, solo, long hair, blue eyes, smile",
    "masterpiece, best quality, highres, anime screencap, 2boys, fighting, dynamic pose",
    "cel shading, flat color, lineart, studio ghibli style, hayao miyazaki",
    "Hatsune Miku singing on stage, neon lights, crowd, confetti",
    "a girl with silver hair and red eyes walking through a rainy tokyo street at night",
    "",
    "   ",
    # prompt-syntax characters, tokenized as plain text
    "(masterpiece:1.2), (best quality), [blurry]",
    "((very detailed)), [[low quality]], (red:0.5) hair",
    "\\(escaped\\) brackets \\[here\\] and a \\\\ backslash",
    "a BREAK b BREAK c",
    "<lora:add_detail:0.6> 1girl, <lyco:style:1:0.5>",
    "[cat:dog:0.5] [a|b|c] AND (text:-1.5)",
    "(unbalanced (brackets [everywhere",
    "weird:colons::and:::more, (a:1.2.3), (b:)",
    # case, accents, decomposed forms
    "CAPITALS and MiXeD CaSe Words",
    "café, naïve, résumé, jalapeño, Über, façade",
    "e\u0301cole, cafe\u0301 (decomposed accents)",
    "Ångström ÆØÅ æøå ß straße",
    "İstanbul, DİYARBAKIR, ı dotless",
    "ΟΔΟΣ οδός ΣΊΣΥΦΟΣ",
    "Москва, красивая девушка, аниме",
    "ελληνικά, עברית, العربية, हिन्दी",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "ﬁne ligatures ﬂ ǅ ǈ",
    "Ⓐ circled, ⅻ roman, ½ fraction, ² superscript",
    # CJK
    "初音ミク, 桜, 夜空, 東京",
    "一个女孩在樱花树下",
    "아름다운 소녀, 벚꽃",
    "カタカナとひらがなとー長音",
    # emoji
    "cute cat 🐱 with a heart ❤️",
    "👩‍👩‍👧‍👦 family emoji, 🏳️‍🌈 flag, 👍🏽 skin tone",
    "🔥🔥🔥 fire",
    # whitespace oddities
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand\u000bvertical",
    "non\u00a0breaking\u2003em\u3000ideographic\u0085nel",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "many     spaces     between",
    "control\x00chars\x01\x1f here\x7f",
    # html entities (transformers does not unescape them)
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;apos&#39; &nbsp;",
    # apostrophes and contractions
    "don't can't won't it's I'm you're we've they'll she'd",
    "DON'T IT'S 'sam' ''s '''",
    "curly \u2019s apostrophe \u201cquotes\u201d",
    "rock'n'roll, o'clock, l'amour",
    # numbers
    "1girl 2boys 3others 1024x576 16:9",
    "3.14159 1,000,000 -42 +7 0.5",
    "v1.5 sdxl_1.0 ep_0025 12345678901234567890",
    "١٢٣ ٤ Arabic-Indic and ߀ digits",
    # punctuation runs
    "!!! ??? ... --- ___ *** ### @@@",
    "wow!! amazing! hello world!",
    "a!b?c.d,e;f:g",
    "(((((((((( ))))))))))",
    "~!@#$%^&*()_+-=[]{}|;':\",./<>?`",
    "<<<<>>>>  ||||  \\\\\\\\  ////",
    # special tokens written in the text
    "<|startoftext|>a<|endoftext|>b",
    "x <|endoftext|> y <|startoftext|>",
    "<|ENDOFTEXT|> upper case specials <|StartOfText|>",
    "!<|endoftext|>! and <|endoftext|>!",
    # long prompts (over 75 tokens)
    LONG,
    LONG + ", " + LONG,
    "word " * 120,
    "a" * 300,
    ", ".join(f"tag{i}" for i in range(60)),
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
    # assorted
    "https://example.com/path?query=1&x=y#frag",
    "user@example.com, #hashtag, @mention",
    "snake_case_words and kebab-case-words and CamelCaseWords",
    "score_9, score_8_up, score_7_up, source_anime, rating_safe",
]


def write_clip_files(folder, merges_count=None, pad_token="<|endoftext|>"):
    """vocab.json + merges.txt from open_clip's merge list, in CLIP's vocabulary order."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408 and len(merges) == 48894
    ids = {t: i for i, t in enumerate(vocab)}
    if merges_count is not None:
        # Keep the real ids of the byte symbols, the first merges' tokens and the specials.
        keep = vocab[:512] + ["".join(m) for m in merges[:merges_count]] + vocab[-2:]
        ids = {t: ids[t] for t in keep}
        merges = merges[:merges_count]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(ids, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    # The SDXL repository's tokenizer_config.json, reduced to what changes tokenization.
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)


def main():
    tmp = tempfile.mkdtemp()
    write_clip_files(os.path.join(tmp, "tokenizer"))
    write_clip_files(os.path.join(tmp, "tokenizer_2"), pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer_2"))
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer_2.pad_token_id == 0 and tokenizer.pad_token_id == 49407

    small_dir = os.path.join(FIXTURES, "tokenizer_small")
    write_clip_files(small_dir, SMALL_MERGES)
    small = CLIPTokenizer.from_pretrained(small_dir)
    open_clip_tokenizer = SimpleTokenizer()

    assert len(CORPUS) == len(set(CORPUS)) >= 60
    entries = []
    for text in CORPUS:
        padded = dict(padding="max_length", max_length=77, truncation=True)
        clip_l = tokenizer(text, **padded)
        clip_g = [i if m else 0 for i, m in zip(clip_l["input_ids"], clip_l["attention_mask"])]
        clip_g_diffusers = tokenizer_2(text, **padded)["input_ids"]
        if "!" not in text:
            assert clip_g == clip_g_diffusers, text
        entries.append(
            {
                "text": text,
                "ids": tokenizer(text)["input_ids"],
                "clip_l": clip_l["input_ids"],
                "clip_g": clip_g,
                "clip_g_diffusers": clip_g_diffusers,
                "open_clip": open_clip_tokenizer.encode(text),
                "small": small(text)["input_ids"],
            }
        )

    out = os.path.join(FIXTURES, "tokenizer_corpus.json")
    with open(out, "w", encoding="utf-8") as f:
        f.write('{"reference": "transformers %s CLIPTokenizer, CLIP vocabulary from open_clip\'s '
                'bpe_simple_vocab_16e6.txt.gz (tools/make_tokenizer_fixtures.py)",\n' % transformers.__version__)
        f.write(' "prompts": [\n')
        f.write(",\n".join("  " + json.dumps(e, ensure_ascii=False) for e in entries))
        f.write("\n]}\n")
    shutil.rmtree(tmp)
    long_ones = sum(len(e["ids"]) > 77 for e in entries)
    same_open_clip = sum(e["ids"][1:-1] == e["open_clip"] for e in entries)
    print(f"wrote {out}: {len(entries)} prompts, {long_ones} over 77 tokens, "
          f"open_clip agrees on {same_open_clip}; {small_dir}")


if __name__ == "__main__":
    main()
