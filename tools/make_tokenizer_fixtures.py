#!/usr/bin/env python3
"""Golden fixtures for the C++ tokenizer: small tokenizers built with Hugging Face `tokenizers`.

Builds (trains on an embedded corpus) a handful of small tokenizers in the layouts used by real
models (GPT-2, Llama 3, Llama 2 / TinyLlama SentencePiece-BPE, Qwen2), saves each as
tests/golden/tokenizers/<name>/{tokenizer.json,tokenizer_config.json,special_tokens_map.json}
and records what `tokenizers` does on a fixed list of test strings in expected.json.
The format is described in tests/golden/tokenizers/README.md.

It also records expected.json for *vendored* tokenizers: real tokenizer.json files that a PyPI
package ships, copied byte for byte into tests/golden/tokenizers/<name>/ (see VENDORED). Their
tokenizer.json is never rewritten; its sha256 is checked against VENDORED before use.

Usage (from the repository root):
    .venv-tools/bin/python tools/make_tokenizer_fixtures.py            # regenerate everything
    .venv-tools/bin/python tools/make_tokenizer_fixtures.py --only qwen2_style
    .venv-tools/bin/python tools/make_tokenizer_fixtures.py --out /tmp/x   # write elsewhere
    .venv-tools/bin/python tools/make_tokenizer_fixtures.py --only anthropic_sdk --fetch
        # (re)vendor: pip download the wheel, check the sha256, copy tokenizer.json in

Deterministic: no randomness except a seeded random.Random; training is single-threaded
(RAYON_NUM_THREADS=1). Run twice and diff to confirm.
"""

import os

# Must be set before tokenizers is imported: single-threaded training, no network.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from pathlib import Path

import tokenizers
from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SEED = 1234
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "golden" / "tokenizers"

GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
               r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# ----------------------------------------------------------------------------------------------
# Training corpus (a few KB of varied text).
# ----------------------------------------------------------------------------------------------
CORPUS_TEXT = r"""
The quick brown fox jumps over the lazy dog. The dog didn't care; it's been sleeping all day.
I'm sure they'll come back, and we've said we'd wait. You're right, it isn't THAT late. HE'S HERE!
She sells sea shells by the sea shore. How much wood would a woodchuck chuck if a woodchuck could chuck wood?
In 1969, 600 million people watched the landing. The price rose from $3.50 to $12,345.67 in 2024.
Call 555-0199 or +1 (800) 123-4567 before 10:30 a.m. on 2025-03-14. Pi is 3.14159265358979.
The model has 7B parameters, 32 layers, 4096 hidden units and a 128000-token vocabulary.
Hello, world! Hello again, world!! Hello?? ... --- *** ### !!! ??? ;;; ::: ((( ))) [[[ ]]] {{{ }}}
Il était une fois une fée très élégante qui habitait à côté d'un château près de la forêt.
Ça va? Où est la bibliothèque? Je préfère le café crème, s'il vous plaît. Noël à Montréal.
Der Bär läuft über die Straße. Größe, Übung, schön, Mädchen, Fußball, Grüße aus München.
El niño comió jalapeños en la mañana. ¿Dónde está el baño? ¡Qué día tan bonito! Año nuevo.
Ελληνικά: Καλημέρα κόσμε. Русский: Привет, мир! Как дела? Українська: Добрий день.
日本語のテキストです。東京は日本の首都です。今日はいい天気ですね。
中文文本：你好，世界！我们今天学习分词器。机器学习和自然语言处理。
한국어 텍스트: 안녕하세요, 세계! 오늘 날씨가 좋네요.
العربية: مرحبا بالعالم. עברית: שלום עולם. हिन्दी: नमस्ते दुनिया। ไทย: สวัสดีชาวโลก
Emoji: 😀 😂 🎉 👍 ❤️ 🚀 🇺🇸 🇯🇵 👨‍👩‍👧‍👦 🏳️‍🌈 👩🏽‍💻 ✨ 🔥 and more 😀😀😀.
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(f"fib({i}) = {fibonacci(i)}")

#include <stdio.h>
int main(int argc, char **argv) {
	for (int i = 0; i < argc; ++i) {
		printf("%d: %s\n", i, argv[i]);
	}
	return 0;
}

const x = { "key": [1, 2, 3], "nested": { "a": null, "b": true } };
SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;
<html><body><p class="intro">Hello &amp; welcome</p></body></html>
    indented with four spaces
		indented with two tabs
trailing spaces here     
Windows line\r\nendings and     many     spaces between words.
A line with a\ttab\tor\ttwo.
"""

def corpus_lines():
    """Corpus lines, plus a seeded pseudo-random mixture so that ~1000 merges are learnable."""
    lines = [l for l in CORPUS_TEXT.replace("\\r\\n", "\r\n").split("\n")]
    rng = random.Random(SEED)
    words = []
    for l in lines:
        words.extend(l.split())
    extra = []
    for _ in range(400):
        n = rng.randint(3, 12)
        extra.append(" ".join(rng.choice(words) for _ in range(n)))
    for _ in range(100):
        extra.append(" ".join(str(rng.randint(0, 10 ** rng.randint(1, 7))) for _ in range(5)))
    return [l + "\n" for l in lines] + [l + "\n" for l in extra]


# ----------------------------------------------------------------------------------------------
# Test strings.
# ----------------------------------------------------------------------------------------------
def test_strings():
    rng = random.Random(SEED + 1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    long_word = "".join(rng.choice(letters) for _ in range(1200))
    s = [
        "",
        " ",
        "  ",
        "          ",
        " " * 37,
        "\t",
        "\n",
        "\r\n",
        "\n\n\n",
        " \n \n",
        "\t\t  \n\t",
        "a\r\nb\r\n\r\nc",
        "hello",
        " hello",
        "hello ",
        "   hello   world   ",
        "Hello world",
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "I'm don't we'll they've she'd it's you're",
        "I'M DON'T WE'LL THEY'VE SHE'D IT'S YOU'RE",
        "It'S wE'lL tHeY'Ve",
        "'s 're 'll ''' 'x",
        "1",
        "12",
        "123",
        "1234",
        "12345",
        "123456",
        "1234567",
        "3.14159 and -42 and 1,000,000 and 0x1F",
        "Version 2.0.1-rc3 released 2024-12-31T23:59:59Z",
        "!!!???...",
        "...---...",
        "\"quoted\" 'single' `back` (paren) [bracket] {brace}",
        "a+b=c; x*=2; y->z; p::q; r<=s>=t!=u",
        "café naïve résumé Zürich",
        unicodedata.normalize("NFD", "café naïve résumé Zürich"),
        "e\u0301",
        "\u00e9",
        "Å vs A\u030a vs \u212b",
        "ﬁ ligature and ① and ｆｕｌｌｗｉｄｔｈ",
        "日本語のテキストです。",
        "你好，世界！",
        "안녕하세요 세계",
        "Привет, мир!",
        "مرحبا بالعالم",
        "नमस्ते दुनिया",
        "😀",
        "😀😂🎉",
        "👨‍👩‍👧‍👦 family",
        "🏳️‍🌈 and 🇺🇸🇯🇵 flags and 👩🏽‍💻",
        "❤️ ✨ 🔥",
        "\u0000 nul and \u007f del",
        "\ufeffBOM at start",
        "zero\u200bwidth\u200cjoiner\u200dhere",
        "\ufffd replacement char",
        "ends with replacement \ufffd",
        "\U0010ffff max code point and \U0001f9ff",
        "\ufffe\uffff noncharacters \ud7ff\ue000 around the surrogate gap \U000e0001 tag",
        "Say HelloWorld supercalifragilistic antiDisestablishment",
        " HelloWorld",
        "\u00a0non-breaking\u00a0space and\u3000ideographic space",
        "line\u2028separator\u2029paragraph",
        "tab\tseparated\tvalues\t",
        "mixed  \t \n  whitespace \r\n end",
        "def f(x):\n    return x * 2\n",
        "int main() {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
        "<html><body class=\"x\">Hi &amp; bye</body></html>",
        "SELECT * FROM t WHERE a >= 10 AND b <> 'x';",
        "a" * 1500,
        long_word,
        "日本" * 600,
        "9" * 1100,
        "😀" * 300,
    ]
    return s


def special_strings(specials):
    """Strings containing the literal text of this tokenizer's added tokens."""
    out = []
    if not specials:
        return out
    a = specials[0]
    b = specials[-1]
    out.append(a)
    out.append(a + "hello" + b)
    out.append(" " + a + " hello " + b + " ")
    out.append("x" + a + a + "y")
    out.append(a[:-1] + " not quite " + a[1:])
    out.append("".join(specials))
    out.append("\n".join(specials) + "\n")
    return out


# ----------------------------------------------------------------------------------------------
# Builders.
# ----------------------------------------------------------------------------------------------
def train_bpe(pre_tok, normalizer, vocab_size, special_tokens, initial_alphabet=(),
              limit_alphabet=None):
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre_tok is not None:
        tok.pre_tokenizer = pre_tok
    kw = dict(vocab_size=vocab_size, min_frequency=2, show_progress=False,
              special_tokens=list(special_tokens), initial_alphabet=list(initial_alphabet))
    if limit_alphabet is not None:
        kw["limit_alphabet"] = limit_alphabet
    tok.train_from_iterator(corpus_lines(), trainer=trainers.BpeTrainer(**kw))
    return tok


def set_model_fields(tok, **fields):
    """Edit model fields via the JSON form (the Python setters do not cover every field)."""
    j = json.loads(tok.to_str())
    j["model"].update(fields)
    return Tokenizer.from_str(json.dumps(j))


def build_bytelevel_gpt2():
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok = train_bpe(pre, None, 1000, [], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    # A RoBERTa-like mask token with lstrip=True exercises the whitespace-absorbing flag.
    tok.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True, normalized=False)])
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    # GPT-2's file uses the legacy "a b" merge strings.
    j = json.loads(tok.to_str())
    j["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    text = json.dumps(j, ensure_ascii=False, indent=2)
    cfg = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
               mask_token="<mask>")
    return text, cfg, ["<|endoftext|>", "<mask>"]


def build_bytelevel_llama3():
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=tokenizers.Regex(LLAMA3_REGEX), behavior="isolated",
                             invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok = train_bpe(pre, None, 1000, [], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    # Vocab-only tokens (no merge produces them), as Llama 3 has: with ignore_merges they are
    # emitted whole when a pre-token equals them; without it they are unreachable.
    extra = ["ĠHelloWorld", "Ġsupercalifragilistic", "ĠantiDisestablishment"]
    for t in extra:
        if t not in vocab:
            vocab[t] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(j))
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = "<|begin_of_text|>"
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, bos_id)]),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok = set_model_fields(tok, ignore_merges=True)
    text = json.dumps(json.loads(tok.to_str()), ensure_ascii=False, indent=2)
    cfg = dict(bos_token=bos, eos_token="<|end_of_text|>")
    return text, cfg, specials


def build_qwen2_style():
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=tokenizers.Regex(QWEN2_REGEX), behavior="isolated",
                             invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok = train_bpe(pre, normalizers.NFC(), 1000, [],
                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    # Qwen3-style non-special added tokens: matched like specials, but not skipped on decode and
    # not affected by split_special_tokens.
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    tok.decoder = decoders.ByteLevel()
    j = json.loads(tok.to_str())
    # The Python ByteLevel decoder constructor ignores its arguments; write Qwen2's values (the
    # decoder does not use them).
    j["decoder"].update(add_prefix_space=False, trim_offsets=False, use_regex=False)
    text = json.dumps(j, ensure_ascii=False, indent=2)
    cfg = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return text, cfg, specials + ["<think>", "</think>"]


def _sentencepiece_model():
    """Train a SentencePiece-style BPE and lay out its vocab as Llama 2 does:
    0 <unk>, 1 <s>, 2 </s>, 3..258 <0x00>..<0xFF>, then the learned pieces."""
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    # limit_alphabet keeps only the most frequent characters, so rarer ones (some CJK, emoji)
    # must go through byte fallback.
    tok = train_bpe(pre, None, 1000, ["<unk>", "<s>", "</s>"], limit_alphabet=120)
    j = json.loads(tok.to_str())
    learned = sorted(j["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in learned:
        if t not in vocab:
            vocab[t] = len(vocab)
    merges = [tuple(m) for m in j["model"]["merges"]]
    return vocab, merges


def _sentencepiece_finish(tok):
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in ["<unk>", "<s>", "</s>"]])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    text = json.dumps(json.loads(tok.to_str()), ensure_ascii=False, indent=2)
    cfg = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return text, cfg, ["<s>", "</s>", "<unk>"]


def build_sentencepiece_bpe():
    """Llama 2 / TinyLlama "legacy" layout: Prepend+Replace normalizer, no pre-tokenizer."""
    vocab, merges = _sentencepiece_model()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)])
    return _sentencepiece_finish(tok)


def build_sentencepiece_bpe_metaspace():
    """Same model, "non-legacy" layout: Metaspace(prepend_scheme="first", split=False)."""
    vocab, merges = _sentencepiece_model()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    # Metaspace must come before Fuse: on the first token of a decode call it drops *every* "▁"
    # (not only a leading one), so after Fuse it would delete all spaces.
    tok.decoder = decoders.Sequence([
        decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False),
        decoders.ByteFallback(), decoders.Fuse()])
    return _sentencepiece_finish(tok)


BUILDERS = {
    "bytelevel_gpt2": build_bytelevel_gpt2,
    "bytelevel_llama3": build_bytelevel_llama3,
    "sentencepiece_bpe": build_sentencepiece_bpe,
    "sentencepiece_bpe_metaspace": build_sentencepiece_bpe_metaspace,
    "qwen2_style": build_qwen2_style,
}


# ----------------------------------------------------------------------------------------------
# Vendored real tokenizers: tokenizer.json files shipped inside PyPI wheels, copied verbatim into
# tests/golden/tokenizers/<name>/tokenizer.json. Only licences that allow redistribution.
# ----------------------------------------------------------------------------------------------
VENDORED = {
    # Anthropic's pre-Claude-3 tokenizer, shipped by the Python SDK for Anthropic.count_tokens
    # (anthropic/_tokenizers.py loads it with tokenizers.Tokenizer.from_str). Byte-level BPE, 65000 vocab,
    # 64739 merges, NFKC normalizer, ByteLevel pre-tokenizer with the GPT-2 regex (the file has
    # no "use_regex" key: the default, true), no post-processor, 5 special added tokens.
    "anthropic_sdk": dict(
        package="anthropic", version="0.25.0", path="anthropic/tokenizer.json",
        sha256="c241737df24b4e7f7c9af4fdcee29a0ca903dcb288a8b753bc346a3092911767",
        licence="MIT (Copyright 2023 Anthropic, PBC; anthropic-0.25.0.dist-info/licenses/LICENSE)",
        # MIT asks for the notice to travel with copies: vendored next to the file as LICENSE.
        licence_path="anthropic-0.25.0.dist-info/licenses/LICENSE",
        # tokenizer_config.json is not shipped; these are the names the SDK used (<EOT> ends a
        # text). Written only so transformers can load the folder for the cross-check.
        cfg=dict(eos_token="<EOT>"),
        specials=["<EOT>", "<META>", "<META_START>", "<META_END>", "<SOS>"],
    ),
}

ALL_NAMES = list(BUILDERS) + list(VENDORED)


def sha256_of(data):
    return hashlib.sha256(data).hexdigest()


def fetch_vendored(name, dest):
    """pip-downloads the wheel named in VENDORED (no dependencies, not installed), checks the
    sha256 of the file inside it and writes it verbatim to dest/tokenizer.json."""
    v = VENDORED[name]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "-d", tmp, f"{v['package']}=={v['version']}"], check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        assert len(wheels) == 1, wheels
        with zipfile.ZipFile(wheels[0]) as z:
            data = z.read(v["path"])
            licence = z.read(v["licence_path"])
    got = sha256_of(data)
    if got != v["sha256"]:
        raise SystemExit(f"{name}: {v['package']}=={v['version']}:{v['path']} has sha256 {got}, "
                         f"expected {v['sha256']}")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.json").write_bytes(data)
    (dest / "LICENSE").write_bytes(licence)


def load_vendored(name):
    """The vendored tokenizer.json (from the committed fixture directory), sha256-checked."""
    v = VENDORED[name]
    path = DEFAULT_OUT / name / "tokenizer.json"
    if not path.exists():
        raise SystemExit(f"{name}: {path} is missing; rerun with --only {name} --fetch")
    data = path.read_bytes()
    got = sha256_of(data)
    if got != v["sha256"]:
        raise SystemExit(f"{name}: {path} has sha256 {got}, expected {v['sha256']} "
                         f"({v['package']}=={v['version']}:{v['path']}); rerun with --fetch")
    licence = (DEFAULT_OUT / name / "LICENSE").read_bytes()
    return data, licence, dict(v["cfg"]), list(v["specials"])


# ----------------------------------------------------------------------------------------------
# Recording.
# ----------------------------------------------------------------------------------------------
def byte_offsets(text, char_offsets):
    """Python's Encoding.offsets are in code points; convert to UTF-8 byte offsets."""
    pos = [0]
    for ch in text:
        pos.append(pos[-1] + len(ch.encode("utf-8")))
    return [[pos[a], pos[b]] for a, b in char_offsets]


def encode(tok, text, add_special, split_special):
    tok.encode_special_tokens = split_special
    try:
        return tok.encode(text, add_special_tokens=add_special)
    finally:
        tok.encode_special_tokens = False


def stream_trace(tok, ids, skip):
    ds = decoders.DecodeStream(skip_special_tokens=skip)
    out = []
    for i in ids:
        try:
            out.append(ds.step(tok, i))
        except Exception as e:  # recorded, not hidden
            out.append({"error": str(e)})
            break
    return out


def prefix_trace(tok, ids, skip):
    """The brief's definition: after token i, emit the new text of decode(ids[:i+1]) beyond what
    was emitted, holding back while the decoded text ends in U+FFFD (an incomplete character)."""
    out, emitted = [], ""
    for i in range(len(ids)):
        full = tok.decode(ids[: i + 1], skip_special_tokens=skip)
        if len(full) > len(emitted) and not full.endswith("\ufffd") and full.startswith(emitted):
            out.append(full[len(emitted):])
            emitted = full
        else:
            out.append(None)
    return out


def pre_tokens(tok, text, added):
    """Normalized text and pre-tokens (debugging aid), only where the text holds no added-token
    literal (added tokens are split out before normalization) and is short."""
    if len(text) > 200 or any(a in text for a in added):
        return None
    norm = tok.normalizer.normalize_str(text) if tok.normalizer is not None else text
    if tok.pre_tokenizer is None:
        return norm, [norm] if norm else []
    return norm, [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(norm)]


def record_case(tok, text, added, ignore_merges_alt=None):
    e = encode(tok, text, True, False)
    e_noadd = encode(tok, text, False, False)
    e_split = encode(tok, text, True, True)
    e_split_noadd = encode(tok, text, False, True)
    ids = e.ids
    c = {
        "text": text,
        "ids": ids,
        "ids_no_special": e_noadd.ids,
        "ids_split_special": e_split.ids,
        "ids_split_special_no_special": e_split_noadd.ids,
        "tokens": e.tokens,
        "offsets": byte_offsets(text, e.offsets),
        "special_tokens_mask": e.special_tokens_mask,
    }
    pt = pre_tokens(tok, text, added)
    if pt is not None:
        if tok.normalizer is not None:
            c["normalized"] = pt[0]
        c["pre_tokens"] = pt[1]
    if e_split.ids != ids:
        c["tokens_split_special"] = e_split.tokens
        c["offsets_split_special"] = byte_offsets(text, e_split.offsets)
    c["decode"] = tok.decode(ids, skip_special_tokens=False)
    c["decode_skip_special"] = tok.decode(ids, skip_special_tokens=True)
    if e_split.ids != ids:
        c["decode_split_special"] = tok.decode(e_split.ids, skip_special_tokens=False)
    c["stream"] = stream_trace(tok, ids, False)
    c["stream_skip_special"] = stream_trace(tok, ids, True)
    pt = prefix_trace(tok, ids, False)
    if pt != c["stream"]:
        c["stream_full_prefix"] = pt
    if ignore_merges_alt is not None:
        alt = ignore_merges_alt.encode(text, add_special_tokens=True).ids
        if alt != ids:
            c["ids_if_ignore_merges_false"] = alt
    return c


def cross_check_transformers(d, tok, cases):
    """Reload the saved directory with transformers and check it agrees with `tokenizers`."""
    hf = AutoTokenizer.from_pretrained(str(d))
    for c in cases:
        t = c["text"]
        assert hf(t, add_special_tokens=True)["input_ids"] == c["ids"], (d.name, t[:40])
        assert hf(t, add_special_tokens=False)["input_ids"] == c["ids_no_special"], (d.name, t[:40])
        assert hf(t, add_special_tokens=True, split_special_tokens=True)["input_ids"] == \
            c["ids_split_special"], (d.name, "split", t[:40])
        assert hf.decode(c["ids"], skip_special_tokens=False,
                         clean_up_tokenization_spaces=False) == c["decode"], (d.name, t[:40])
        assert hf.decode(c["ids"], skip_special_tokens=True,
                         clean_up_tokenization_spaces=False) == c["decode_skip_special"]


def bytes_to_unicode():
    """GPT-2's byte -> char map used by the ByteLevel pre-tokenizer/decoder."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def decode_cases(tok):
    """Id sequences that encoding never produces (broken UTF-8 in byte tokens), to pin down the
    lossy decoding. Each byte is the id of its single-byte token."""
    vocab = tok.get_vocab()
    if "<0x00>" in vocab:
        byte_id = lambda b: vocab[f"<0x{b:02X}>"]
    else:
        m = bytes_to_unicode()
        byte_id = lambda b: vocab[m[b]]
    seqs = [
        [0xE6, 0x97],                 # truncated 3-byte character
        [0xE6, 0x97, 0xA5],           # the complete character
        [0xFF],                       # never valid in UTF-8
        [0x80, 0x41],                 # lone continuation byte, then "A"
        [0xC3, 0x41, 0xA9],           # lead byte, ASCII, continuation
        [0xF0, 0x9F, 0x98],           # truncated 4-byte emoji
        [0xED, 0xA0, 0x80],           # encoded surrogate (invalid)
        [0xC0, 0xAF],                 # overlong "/"
        [0x41, 0xE6, 0x97, 0xA5, 0x42],
    ]
    out = []
    for bs in seqs:
        ids = [byte_id(b) for b in bs]
        out.append({"bytes_hex": bytes(bs).hex(), "ids": ids,
                    "decode": tok.decode(ids, skip_special_tokens=False),
                    "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
                    "stream": stream_trace(tok, ids, False)})
    return out


def write_expected(path, meta, cases, dcases):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("{\n\"meta\": ")
        f.write(json.dumps(meta, ensure_ascii=False, sort_keys=True))
        f.write(",\n\"cases\": [\n")
        for i, c in enumerate(cases):
            f.write(json.dumps(c, ensure_ascii=False))
            f.write(",\n" if i + 1 < len(cases) else "\n")
        f.write("],\n\"decode_cases\": [\n")
        for i, c in enumerate(dcases):
            f.write(json.dumps(c, ensure_ascii=False))
            f.write(",\n" if i + 1 < len(dcases) else "\n")
        f.write("]\n}\n")


def make(name, out_dir):
    vendored = name in VENDORED
    if vendored:
        raw, licence, cfg, specials = load_vendored(name)
        text = raw.decode("utf-8")
    else:
        text, cfg, specials = BUILDERS[name]()
    d = out_dir / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    if vendored:
        (d / "tokenizer.json").write_bytes(raw)  # verbatim, as the package ships it
        (d / "LICENSE").write_bytes(licence)
    tok = Tokenizer.from_str(text)
    # tokenizer_config.json / special_tokens_map.json as transformers writes them. save_pretrained
    # would re-serialize tokenizer.json (losing e.g. the legacy merge form), so it writes to a
    # temporary directory and only the two config files are kept.
    with tempfile.TemporaryDirectory() as tmp:
        fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text),
                                       clean_up_tokenization_spaces=False,
                                       model_max_length=4096, **cfg)
        fast.save_pretrained(tmp)
        for fn in ("tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(Path(tmp) / fn, d / fn)
    if not vendored:
        (d / "tokenizer.json").write_text(text + "\n", encoding="utf-8")

    alt = None
    if json.loads(text)["model"].get("ignore_merges"):
        j = json.loads(text)
        j["model"]["ignore_merges"] = False
        alt = Tokenizer.from_str(json.dumps(j))

    strings = test_strings() + special_strings(specials)
    cases = [record_case(tok, s, specials, alt) for s in strings]
    cross_check_transformers(d, tok, cases)
    meta = {
        "name": name,
        "tokenizers_version": tokenizers.__version__,
        "transformers_version": transformers.__version__,
        "vocab_size_with_added": tok.get_vocab_size(with_added_tokens=True),
        "added_tokens": specials,
        "offsets_unit": "utf8_bytes",
        "num_cases": len(cases),
    }
    if vendored:
        v = VENDORED[name]
        meta["source"] = {k: v[k] for k in ("package", "version", "path", "sha256", "licence")}
    write_expected(d / "expected.json", meta, cases, decode_cases(tok))
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(ALL_NAMES), action="append")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--fetch", action="store_true",
                    help="first (re)vendor the selected VENDORED tokenizers: pip download the "
                         "wheel, check its sha256, copy tokenizer.json into the fixture folder")
    args = ap.parse_args()
    names = args.only or ALL_NAMES
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fetch:
        for n in names:
            if n in VENDORED:
                fetch_vendored(n, DEFAULT_OUT / n)
    for n in names:
        d = make(n, args.out)
        size = sum(p.stat().st_size for p in d.iterdir())
        print(f"{n}: {size} bytes in {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
