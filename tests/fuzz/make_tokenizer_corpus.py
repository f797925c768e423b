#!/usr/bin/env python3
"""Writes the seed corpora for tests/fuzz/tokenizer_json_fuzz and tests/fuzz/tokenizer_encode_fuzz.

tokenizer_json/ (inputs are whole tokenizer.json files):
  fixture_<name>.json  each golden tokenizer of tests/golden/tokenizers/ shrunk to a few KB: the
                       same normalizer, pre-tokenizer, post-processor, decoder and added tokens,
                       the model's single-character (and <0xNN>) tokens, and the first merges whose
                       parts survive, renumbered (GPT-2's keeps its original ids, with holes);
  comp_<what>.json     a tiny BPE around one component type (every normalizer, pre-tokenizer,
                       post-processor, decoder and model type `tokenizers` 0.22 knows; the C++
                       tokenizer may refuse some of them, which is fine: it must not crash);
  bad_<what>.json      one rule away from valid (truncated, wrong types, unknown ids, ...).
tokenizer_encode/ (inputs are texts): short strings in many scripts, added-token literals of
  every fixture, whitespace runs, and a few byte strings that are not valid UTF-8.

Every file is under 8 KB and the output is deterministic; rerun after changing this script (or
the golden tokenizers) and commit the result:

    python3 tests/fuzz/make_tokenizer_corpus.py [OUT_DIR]   # default: tests/fuzz/corpus

Standard library only. When the `tokenizers` package is importable (.venv-tools/bin/python), it
also checks that every fixture_* and comp_* seed loads in Hugging Face `tokenizers`.
"""

import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "..", "golden", "tokenizers")
FIXTURES = ["bytelevel_gpt2", "bytelevel_llama3", "qwen2_style", "sentencepiece_bpe",
            "sentencepiece_bpe_metaspace", "anthropic_sdk"]
MAX_MERGES = 48
MAX_BYTES = 8192


def dumps(obj, indent=None):
    if indent:
        return json.dumps(obj, ensure_ascii=False, indent=indent)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def merge_pair(m):
    return m.split(" ", 1) if isinstance(m, str) else list(m)


def shrink(j, max_merges=MAX_MERGES, renumber=True):
    """Keeps the structure of a BPE tokenizer.json, with a tiny vocab and merge list. With
    `renumber` the ids are made contiguous again as a real file has them: the kept vocabulary in
    its order, then the added tokens (HF assigns them ids itself, ignoring the file's), and the
    post-processor's TemplateProcessing ids follow. Without it the original ids stay (holes)."""
    j = copy.deepcopy(j)
    m = j["model"]
    vocab = m["vocab"]
    added = {a["content"] for a in j.get("added_tokens", [])}
    keep = set()
    for t in vocab:
        # Single characters of the byte-level alphabet (U+0021..U+0143) and "▁"; the others
        # (thousands of CJK characters in a real vocab) would not fit.
        if (len(t) == 1 and (ord(t) < 0x144 or t == "▁")) or t in added or (t.startswith("<0x") and len(t) == 6):
            keep.add(t)
    if m.get("unk_token"):
        keep.add(m["unk_token"])
    merges = []
    for mg in m["merges"]:
        a, b = merge_pair(mg)
        if a in keep and b in keep and a + b in vocab:
            merges.append(mg)
            keep.add(a + b)
            if len(merges) >= max_merges:
                break
    # Vocab-only tokens (llama3's ignore_merges probes) are short enough to keep.
    if m.get("ignore_merges"):
        for t in vocab:
            if t in ("ĠHelloWorld", "Ġsupercalifragilistic", "ĠantiDisestablishment"):
                keep.add(t)
    kept = sorted((vocab[t], t) for t in keep)
    if not renumber:
        m["vocab"] = {t: i for i, t in kept}
        m["merges"] = merges
        return j
    new_vocab = {t: n for n, (_, t) in enumerate(kept)}
    next_id = len(new_vocab)
    ids = dict(new_vocab)
    for a in j.get("added_tokens", []):
        if a["content"] not in ids:
            ids[a["content"]] = next_id
            next_id += 1
        a["id"] = ids[a["content"]]
    m["vocab"] = new_vocab
    m["merges"] = merges

    def fix(pp):
        if isinstance(pp, dict):
            if pp.get("type") == "TemplateProcessing":
                for spec in pp["special_tokens"].values():
                    spec["ids"] = [ids[t] for t in spec["tokens"]]
            for v in pp.values():
                fix(v)
        elif isinstance(pp, list):
            for v in pp:
                fix(v)
    fix(j.get("post_processor"))
    return j


def tiny_bpe(**over):
    """A minimal valid tokenizer.json with a character-level BPE over a few letters."""
    letters = "abcdehlorw ▁Ġ"
    vocab = {c: i for i, c in enumerate(letters)}
    merges = []
    for a, b in [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("w", "o"), ("r", "l"),
                 ("wo", "rl"), ("worl", "d"), ("Ġ", "w"), ("▁", "h")]:
        vocab[a + b] = len(vocab)
        merges.append([a, b])
    j = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [
            {"id": len(vocab), "content": "<s>", "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True},
            {"id": len(vocab) + 1, "content": "<x>", "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": True, "special": False},
        ],
        "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    for k, v in over.items():
        j[k] = v
    return j


def regex(p):
    return {"Regex": p}


GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def component_seeds():
    n = {}
    for t in ["NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Nmt"]:
        n[t] = {"type": t}
    n["Strip"] = {"type": "Strip", "strip_left": True, "strip_right": True}
    n["StripAccents"] = {"type": "StripAccents"}
    n["Replace_string"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    n["Replace_regex"] = {"type": "Replace", "pattern": regex(r"\s+"), "content": " "}
    n["Prepend"] = {"type": "Prepend", "prepend": "▁"}
    n["BertNormalizer"] = {"type": "BertNormalizer", "clean_text": True,
                           "handle_chinese_chars": True, "strip_accents": None,
                           "lowercase": True}
    n["Sequence"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    p = {}
    p["ByteLevel"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                      "use_regex": True}
    p["ByteLevel_noregex"] = {"type": "ByteLevel", "add_prefix_space": False,
                              "trim_offsets": False, "use_regex": False}
    for behavior in ["Removed", "Isolated", "MergedWithPrevious", "MergedWithNext",
                     "Contiguous"]:
        p["Split_" + behavior] = {"type": "Split", "pattern": regex(LLAMA3_RE),
                                  "behavior": behavior, "invert": False}
    p["Split_string_invert"] = {"type": "Split", "pattern": {"String": "o"},
                                "behavior": "Isolated", "invert": True}
    p["Metaspace_always"] = {"type": "Metaspace", "replacement": "▁",
                             "prepend_scheme": "always", "split": True}
    p["Metaspace_first"] = {"type": "Metaspace", "replacement": "▁",
                            "prepend_scheme": "first", "split": False}
    p["Metaspace_never"] = {"type": "Metaspace", "replacement": "▁",
                            "prepend_scheme": "never", "split": True}
    p["Digits"] = {"type": "Digits", "individual_digits": True}
    p["Whitespace"] = {"type": "Whitespace"}
    p["WhitespaceSplit"] = {"type": "WhitespaceSplit"}
    p["Punctuation"] = {"type": "Punctuation", "behavior": "Isolated"}
    p["BertPreTokenizer"] = {"type": "BertPreTokenizer"}
    p["UnicodeScripts"] = {"type": "UnicodeScripts"}
    p["Sequence"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": regex(GPT2_RE), "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}
    d = {}
    d["ByteLevel"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                      "use_regex": True}
    d["Replace"] = {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}
    d["ByteFallback"] = {"type": "ByteFallback"}
    d["Fuse"] = {"type": "Fuse"}
    d["Strip"] = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
    d["Metaspace"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                      "split": True}
    d["WordPiece"] = {"type": "WordPiece", "prefix": "##", "cleanup": True}
    d["BPEDecoder"] = {"type": "BPEDecoder", "suffix": "</w>"}
    d["CTC"] = {"type": "CTC", "pad_token": "<pad>", "word_delimiter_token": "|",
                "cleanup": True}
    d["Sequence"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    pp = {}
    pp["ByteLevel"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                       "use_regex": True}
    pp["TemplateProcessing"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "<s>", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [23], "tokens": ["<s>"]}}}
    pp["RobertaProcessing"] = {"type": "RobertaProcessing", "sep": ["<s>", 23],
                               "cls": ["<s>", 23], "trim_offsets": True,
                               "add_prefix_space": True}
    pp["BertProcessing"] = {"type": "BertProcessing", "sep": ["<s>", 23], "cls": ["<s>", 23]}
    pp["Sequence"] = {"type": "Sequence", "processors": [pp["ByteLevel"],
                                                        pp["TemplateProcessing"]]}
    out = {}
    for k, v in n.items():
        out["normalizer_" + k] = tiny_bpe(normalizer=v)
    for k, v in p.items():
        out["pre_tokenizer_" + k] = tiny_bpe(pre_tokenizer=v)
    for k, v in d.items():
        out["decoder_" + k] = tiny_bpe(decoder=v)
    for k, v in pp.items():
        out["post_processor_" + k] = tiny_bpe(post_processor=v)
    base = tiny_bpe()
    vocab = base["model"]["vocab"]
    out["model_BPE_minimal"] = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2},
                                          "merges": ["a b"]}}
    out["model_BPE_options"] = tiny_bpe()
    out["model_BPE_options"]["model"].update(
        unk_token="a", fuse_unk=True, byte_fallback=True, ignore_merges=True)
    out["model_WordPiece"] = tiny_bpe(model={"type": "WordPiece", "unk_token": "a",
                                             "continuing_subword_prefix": "##",
                                             "max_input_chars_per_word": 100, "vocab": vocab})
    out["model_WordLevel"] = tiny_bpe(model={"type": "WordLevel", "vocab": vocab,
                                             "unk_token": "a"})
    out["model_Unigram"] = tiny_bpe(model={"type": "Unigram", "unk_id": 0,
                                           "vocab": [[t, -float(i)] for t, i in vocab.items()],
                                           "byte_fallback": False})
    out["added_lstrip_rstrip_single_word"] = tiny_bpe(added_tokens=[
        {"id": 23, "content": "<s>", "single_word": True, "lstrip": True, "rstrip": True,
         "normalized": False, "special": True},
        {"id": 24, "content": "hello", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": True, "special": False},
        {"id": 25, "content": " ", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}])
    return out


def bad_seeds():
    base = tiny_bpe()
    text = dumps(base)
    out = {}
    out["truncated"] = text[: len(text) // 2]
    out["empty"] = ""
    out["not_object"] = "[1, 2, 3]"
    out["no_model"] = dumps({k: v for k, v in base.items() if k != "model"})
    b = copy.deepcopy(base)
    b["model"]["merges"].append(["zz", "q"])
    out["merge_unknown_token"] = dumps(b)
    b = copy.deepcopy(base)
    b["model"]["merges"].append("abc")
    out["merge_no_space"] = dumps(b)
    b = copy.deepcopy(base)
    b["model"]["vocab"]["a"] = -1
    out["negative_id"] = dumps(b)
    b = copy.deepcopy(base)
    b["model"]["vocab"]["a"] = 2147483648
    out["id_too_large"] = dumps(b)
    b = copy.deepcopy(base)
    b["model"]["vocab"]["dup"] = 0
    out["duplicate_id"] = dumps(b)
    b = copy.deepcopy(base)
    b["added_tokens"][0]["id"] = 1000000
    out["added_far_id"] = dumps(b)
    b = copy.deepcopy(base)
    b["added_tokens"][0]["content"] = ""
    out["added_empty"] = dumps(b)
    b = copy.deepcopy(base)
    b["model"]["type"] = "Nope"
    out["unknown_model"] = dumps(b)
    b = tiny_bpe(pre_tokenizer={"type": "Split", "pattern": regex("(a|(b"),
                                "behavior": "Isolated", "invert": False})
    out["bad_regex"] = dumps(b)
    b = tiny_bpe(pre_tokenizer={"type": "Split", "pattern": regex("(a*)*$"),
                                "behavior": "Isolated", "invert": False})
    out["nested_quantifier_regex"] = dumps(b)
    b = tiny_bpe(normalizer={"type": "Sequence", "normalizers": [{"type": "Sequence",
                 "normalizers": [{"type": "Sequence", "normalizers": []}]}]})
    out["nested_empty_sequences"] = dumps(b)
    b = copy.deepcopy(base)
    b["model"]["vocab"]["a"] = 1.5
    out["float_id"] = dumps(b)
    # continuing_subword_prefix / end_of_word_suffix over a vocab without them: `tokenizers`
    # panics while encoding ("byte index 2 is out of bounds").
    b = copy.deepcopy(base)
    b["model"].update(continuing_subword_prefix="##", end_of_word_suffix="</w>")
    out["bpe_subword_prefix_suffix"] = dumps(b)
    # SentencePiece's normalization table (T5, ALBERT); an empty one is refused by `tokenizers`.
    out["precompiled_empty"] = dumps(tiny_bpe(normalizer={"type": "Precompiled",
                                                          "precompiled_charsmap": ""}))
    b = tiny_bpe(decoder={"type": "Strip", "content": "  ", "start": 1, "stop": 0})
    out["strip_two_chars"] = dumps(b)
    return out


ENCODE_TEXTS = [
    "", " ", "  ", "\t", "\n", "\r\n", " \n \n", "hello", " hello", "Hello, world!",
    "I'm don't we'll THEY'VE It'S", "1234567 3.14 -42 0x1F", "!!!???...", "a+b=c; y->z",
    "café naïve", "cafe\u0301", "Å A\u030a \u212b", "ﬁ ① ｆｕｌｌ", "日本語のテキスト。", "你好，世界！",
    "안녕하세요", "Привет, мир!", "مرحبا", "नमस्ते", "😀😂🎉", "👨‍👩‍👧‍👦", "🏳️‍🌈🇺🇸",
    "\u0000 nul \u007f", "\ufeffBOM", "zero\u200bwidth", "\ufffd", "\U0010ffff\U000e0001",
    "\u00a0nbsp\u3000", "line\u2028sep", "def f(x):\n    return x\n", "<b>&amp;</b>",
    " HelloWorld supercalifragilistic", "▁leading ▁meta", "   hello   world   ",
    "a" * 64, "9" * 40, "日本" * 16,
]
SPECIAL_LITERALS = ["<|endoftext|>", "<mask>", "<|begin_of_text|>", "<|eot_id|>",
                    "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<s>", "</s>", "<unk>",
                    "<EOT>", "<META_START>", "<SOS>"]
ENCODE_BYTES = [
    b"\xff", b"\xc3", b"\xe6\x97", b"\xf0\x9f\x98", b"\xed\xa0\x80", b"\xc0\xaf",
    b"ok\x80ok", b"\xf4\x90\x80\x80", b"abc\xe6\x97\xa5\xe6\x97",
]


def encode_seeds():
    out = {}
    for i, t in enumerate(ENCODE_TEXTS):
        out[f"text_{i:02d}"] = t.encode("utf-8")
    for i, s in enumerate(SPECIAL_LITERALS):
        out[f"special_{i:02d}"] = f"x{s} hi {s}{s}\n{s[:-1]}".encode("utf-8")
    out["special_all"] = " ".join(SPECIAL_LITERALS).encode("utf-8")
    for i, b in enumerate(ENCODE_BYTES):
        out[f"invalid_utf8_{i:02d}"] = b
    # Three 1 KB inputs for the long paths: a 1024-letter word (BPE on one long pre-token), a
    # whitespace mix, and 1024 invalid bytes (1024 U+FFFD once repaired: the stream decoder's
    # held-back window).
    out["long_word"] = ("".join("abcdefghijklmnopqrstuvwxyz"[(i * 7) % 26] for i in range(1024))
                        ).encode("ascii")
    out["long_whitespace"] = ("".join(" \t\n\r "[(i * 5) % 5] for i in range(1024))).encode()
    out["long_invalid"] = b"\xff" * 1024
    return out


def hf_check(name, text):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return
    tok = Tokenizer.from_str(text)
    tok.encode("Hello world <s> 日本 😀")


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "corpus")
    jdir = os.path.join(out, "tokenizer_json")
    edir = os.path.join(out, "tokenizer_encode")
    for d in (jdir, edir):
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            os.remove(os.path.join(d, f))

    files = {}
    for i, name in enumerate(FIXTURES):
        with open(os.path.join(GOLDEN, name, "tokenizer.json"), encoding="utf-8") as f:
            j = json.load(f)
        # The first (GPT-2) keeps its original ids, so its id space has holes and the file's
        # added-token ids are not the ones HF assigns; it is also indented like the HF writer.
        files[f"fixture_{name}.json"] = dumps(shrink(j, renumber=i != 0),
                                              indent=2 if i == 0 else None)
    for k, v in component_seeds().items():
        files[f"comp_{k}.json"] = dumps(v)
    for name, text in files.items():
        try:
            hf_check(name, text)
        except BaseException as e:  # a component HF refuses is a bug in this script
            raise SystemExit(f"{name}: tokenizers refuses it: {e}")
    for k, v in bad_seeds().items():
        files[f"bad_{k}.json"] = v
    for name, text in sorted(files.items()):
        data = text.encode("utf-8")
        assert len(data) <= MAX_BYTES, (name, len(data))
        with open(os.path.join(jdir, name), "wb") as f:
            f.write(data)
    enc = encode_seeds()
    for name, data in sorted(enc.items()):
        assert len(data) <= MAX_BYTES
        with open(os.path.join(edir, name), "wb") as f:
            f.write(data)
    print(f"{len(files)} seeds in {jdir}, {len(enc)} in {edir}")


if __name__ == "__main__":
    main()
