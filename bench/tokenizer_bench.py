#!/usr/bin/env python3
"""Tokenizer encode throughput: our C++ tokenizer against Hugging Face `tokenizers`, one thread.

Generates a deterministic mixed text (seeded: English-like prose, code, whitespace runs, numbers,
CJK, Korean, Cyrillic, emoji with ZWJ sequences and flags, accented Latin in NFC and NFD; no
downloaded data), splits it into documents on blank lines, and for each tokenizer:
  - times HF `Tokenizer.from_file(tokenizer.json).encode(doc)` per document (RAYON_NUM_THREADS=1,
    TOKENIZERS_PARALLELISM=false), best of --iters passes;
  - runs build-tok-bench/bench/tokenizer_bench on the same file (same split, same options:
    add_special_tokens and special tokens matched, HF's defaults), best of --iters passes;
  - compares every id of every document, and exits non-zero (loudly) if any differs.
Writes docs/benchmarks/tokenizer.json, tokenizer.md and tokenizer.png.

    cmake -S . -B build-tok-bench -G Ninja -DCMAKE_BUILD_TYPE=Release -DLS_SERVER=OFF -DLS_CUDA=OFF
    cmake --build build-tok-bench --target tokenizer_bench
    .venv-tools/bin/python bench/tokenizer_bench.py [--mb 4] [--iters 5] [--bin PATH] [--out-dir DIR]

MB/s is 10^6 bytes of UTF-8 input per second. "ours" is Tokenizer::Encode (ids, token strings,
offsets, like HF's Encoding); "ours ids" is Tokenizer::EncodeIds.
"""

import os

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import array
import datetime
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "tokenizers"
DEFAULT_TOKENIZERS = ["bytelevel_llama3", "qwen2_style", "sentencepiece_bpe",
                      "sentencepiece_bpe_metaspace", "bytelevel_gpt2", "anthropic_sdk"]
SEED = 20261129

# ----------------------------------------------------------------------------------------------
# Text generation.
# ----------------------------------------------------------------------------------------------
WORDS = """the of and to in is was that for it with as on be by this had not are but from or have
an they which one you were her all she there would their we him been has when who will more no if
out so said what up its about into than them can only other new some could time these two may
then do first any my now such like our over man me even most made after also did many before must
through back years where much your way well down should because each just those people how too
little state good very make world still own see men work long get here between both life being
under never day same another know while last might us great old year off come since against go
came right used take three model data system language token tokenizer server request memory cache
kernel thread queue batch adapter weight layer attention decode prefill stream latency throughput
between however although therefore meanwhile nevertheless information development government
international environment performance understanding""".split()
CONTRACTIONS = ["don't", "it's", "I'm", "we'll", "they've", "she'd", "can't", "won't",
                "you're", "HE'S", "isn't", "wouldn't"]
ACCENTED = ["café", "naïve", "résumé", "Zürich", "façade", "jalapeño", "crème brûlée", "Ångström",
            "São Paulo", "Kraków", "Dvořák", "smörgåsbord", "Málaga", "Bär", "Straße", "Übung",
            "fiancée", "coöperate", "Øresund", "Łódź"]
CYRILLIC = ["Привет", "мир", "как", "дела", "сегодня", "хорошая", "погода", "спасибо",
            "Москва", "университет"]
GREEK = ["Καλημέρα", "κόσμε", "ευχαριστώ", "θάλασσα", "Αθήνα"]
KANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
KATAKANA = "アイウエオカキクケコサシスセソタチツテトナニヌネノハヒフヘホマミムメモヤユヨラリルレロワヲン"
CJK_COMMON = ("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学"
              "对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经"
              "头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿"
              "东京日本語机器学习自然语言处理分词模型数据服务")
HANGUL_SYLLABLES = [chr(c) for c in range(0xAC00, 0xAC00 + 2000, 7)]
EMOJI = ["😀", "😂", "🎉", "👍", "❤️", "🚀", "🔥", "✨", "🤖", "🙏🏽", "👩🏽‍💻", "👨‍👩‍👧‍👦",
         "🏳️‍🌈", "🇺🇸", "🇯🇵", "🇩🇪", "☕", "🧪", "📈", "🐍"]
PY_KEYWORDS = ["def", "return", "if", "else", "for", "in", "while", "import", "from", "class",
               "with", "as", "try", "except", "lambda", "yield", "None", "True", "False"]


def prose(rng, n_sentences):
    out = []
    for _ in range(n_sentences):
        n = rng.randint(5, 22)
        words = []
        for i in range(n):
            r = rng.random()
            if r < 0.06:
                w = rng.choice(CONTRACTIONS)
            elif r < 0.09:
                w = rng.choice(ACCENTED)
            elif r < 0.12:
                w = str(rng.randint(0, 10 ** rng.randint(1, 6)))
            elif r < 0.14:
                w = rng.choice(WORDS).upper()
            else:
                w = rng.choice(WORDS)
            if rng.random() < 0.08 and i + 1 < n:
                w += rng.choice([",", ";", ":", " -", " (" + rng.choice(WORDS) + ")"])
            words.append(w)
        s = " ".join(words)
        s = s[0].upper() + s[1:]
        out.append(s + rng.choice([".", ".", ".", "!", "?", "..."]))
    text = " ".join(out)
    if rng.random() < 0.3:
        # Some text in NFD (combining accents): normalizers (NFC, NFKC) have work to do.
        text = unicodedata.normalize("NFD", text)
    return text


def code_python(rng):
    lines = []
    name = lambda: "_".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
    for _ in range(rng.randint(2, 5)):
        lines.append(f"def {name()}({', '.join(name() for _ in range(rng.randint(0, 3)))}):")
        for _ in range(rng.randint(2, 8)):
            indent = "    " * rng.randint(1, 3)
            kind = rng.random()
            if kind < 0.3:
                lines.append(f"{indent}{name()} = {name()}[{rng.randint(0, 99)}] * {rng.random():.4f}")
            elif kind < 0.5:
                lines.append(f"{indent}if {name()} >= {rng.randint(0, 1000)}:  # {rng.choice(WORDS)}")
            elif kind < 0.7:
                lines.append(f'{indent}print(f"{{{name()}!r}} -> {rng.choice(WORDS)}")')
            else:
                lines.append(f"{indent}return {rng.choice(PY_KEYWORDS)} or {name()}({rng.randint(0, 9)})")
        lines.append("")
    return "\n".join(l for l in lines if l)


def code_c(rng):
    lines = ["#include <stdio.h>", "#include <stdint.h>"]
    for _ in range(rng.randint(1, 3)):
        fn = rng.choice(WORDS) + "_" + rng.choice(WORDS)
        lines.append(f"static int {fn}(const uint8_t *p, size_t n) {{")
        for _ in range(rng.randint(2, 6)):
            lines.append(f"\tfor (size_t i = 0; i < n; ++i) {{ if (p[i] == 0x{rng.randint(0, 255):02X}) "
                         f"return -{rng.randint(1, 99)}; }}")
        lines.append(f'\tprintf("%s: %d\\n", "{fn}", (int)n);')
        lines.append("\treturn 0;")
        lines.append("}")
    return "\n".join(lines)


def numbers(rng):
    parts = []
    for _ in range(rng.randint(20, 80)):
        k = rng.random()
        if k < 0.3:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
        elif k < 0.5:
            parts.append(f"{rng.uniform(-1e6, 1e6):.{rng.randint(1, 6)}f}")
        elif k < 0.65:
            parts.append(f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}")
        elif k < 0.8:
            parts.append(f"+1 ({rng.randint(200, 999)}) {rng.randint(100, 999)}-{rng.randint(0, 9999):04d}")
        else:
            parts.append(f"${rng.randint(0, 99999):,}.{rng.randint(0, 99):02d}")
    return " ".join(parts)


def whitespace(rng):
    parts = []
    for _ in range(rng.randint(10, 40)):
        parts.append(rng.choice(WORDS))
        parts.append(rng.choice([" " * rng.randint(1, 40), "\t" * rng.randint(1, 6), " \t ",
                                 "   \n", "\r\n", "\u00a0", "\u3000", "  \n    "]))
    return "".join(parts)


def cjk(rng):
    out = []
    for _ in range(rng.randint(5, 20)):
        r = rng.random()
        if r < 0.5:
            s = "".join(rng.choice(CJK_COMMON) for _ in range(rng.randint(4, 20)))
            out.append(s + rng.choice(["。", "，", "！", "？"]))
        elif r < 0.75:
            s = "".join(rng.choice(KANA + KATAKANA) for _ in range(rng.randint(3, 12)))
            out.append(s + rng.choice(CJK_COMMON) + "。")
        else:
            out.append(" ".join("".join(rng.choice(HANGUL_SYLLABLES)
                                        for _ in range(rng.randint(1, 4)))
                                for _ in range(rng.randint(2, 6))) + ".")
    return "".join(out)


def multilingual(rng):
    out = []
    for _ in range(rng.randint(10, 40)):
        r = rng.random()
        if r < 0.35:
            out.append(rng.choice(CYRILLIC))
        elif r < 0.5:
            out.append(rng.choice(GREEK))
        elif r < 0.75:
            out.append(rng.choice(ACCENTED))
        else:
            out.append(rng.choice(WORDS))
    return " ".join(out) + "."


def emoji(rng):
    out = []
    for _ in range(rng.randint(10, 40)):
        if rng.random() < 0.5:
            out.append(rng.choice(EMOJI) * rng.randint(1, 3))
        else:
            out.append(rng.choice(WORDS))
    return " ".join(out)


GENERATORS = [  # (weight, function)
    (40, lambda rng: prose(rng, rng.randint(3, 25))),
    (12, code_python),
    (6, code_c),
    (8, numbers),
    (8, whitespace),
    (10, cjk),
    (8, multilingual),
    (8, emoji),
]


def make_text(total_bytes, seed=SEED):
    """Documents joined by blank lines; no document contains a blank line itself."""
    rng = random.Random(seed)
    weights = [w for w, _ in GENERATORS]
    docs, size = [], 0
    while size < total_bytes:
        gen = rng.choices(GENERATORS, weights=weights)[0][1]
        d = gen(rng)
        while "\n\n" in d:
            d = d.replace("\n\n", "\n")
        d = d.strip("\n")
        if not d:
            continue
        docs.append(d)
        size += len(d.encode("utf-8")) + 2
    return "\n\n".join(docs) + "\n"


def split_docs(text):
    """As the C++ bench with --doc_bytes=0: text.split("\\n\\n"), empty pieces dropped."""
    return [d for d in text.split("\n\n") if d]


# ----------------------------------------------------------------------------------------------
# Measurement.
# ----------------------------------------------------------------------------------------------
def time_hf(path, docs, iters):
    """Best-of-iters seconds for three ways of calling HF on the same documents (one thread):
    encode() per document, encode_batch() over all of them (no Python call per document), and
    encode_batch_fast() (no offsets), plus the reference ids."""
    tok = Tokenizer.from_file(str(path))
    ids = [tok.encode(d).ids for d in docs]  # warm-up, and the reference ids
    batch_ids = [e.ids for e in tok.encode_batch(docs)]
    if batch_ids != ids:
        raise SystemExit(f"HF encode_batch and encode disagree on {path}")

    def best_of(fn):
        best = float("inf")
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    def per_doc():
        for d in docs:
            tok.encode(d)

    times = {
        "encode": best_of(per_doc),
        "encode_batch": best_of(lambda: tok.encode_batch(docs)),
    }
    if hasattr(tok, "encode_batch_fast"):
        times["encode_batch_fast"] = best_of(lambda: tok.encode_batch_fast(docs))
    return times, ids


def run_ours(binary, tok_dir, text_path, iters, ids_path):
    cmd = [str(binary), f"--tokenizer_dir={tok_dir}", f"--text={text_path}", f"--iters={iters}",
           f"--ids_out={ids_path}"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"FAILED: {' '.join(cmd)}\n{p.stderr}")
    return json.loads(p.stdout)


def read_ids(path, n_docs):
    data = array.array("I")
    with open(path, "rb") as f:
        data.frombytes(f.read())
    if sys.byteorder != "little":
        data.byteswap()
    out, pos = [], 0
    while pos < len(data):
        n = data[pos]
        out.append([v if v < 2 ** 31 else v - 2 ** 32 for v in data[pos + 1:pos + 1 + n]])
        pos += 1 + n
    if len(out) != n_docs:
        raise SystemExit(f"IDS DIFFER: C++ wrote {len(out)} documents, HF has {n_docs}")
    return out


def compare_ids(name, docs, hf_ids, our_ids):
    bad = [i for i, (a, b) in enumerate(zip(hf_ids, our_ids)) if a != b]
    if not bad:
        return
    lines = [f"IDS DIFFER for {name}: {len(bad)} of {len(docs)} documents"]
    for i in bad[:5]:
        a, b = hf_ids[i], our_ids[i]
        k = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
        lines.append(f"  doc {i} ({len(docs[i].encode('utf-8'))} bytes): first difference at "
                     f"token {k}: HF {a[max(0, k - 3):k + 4]} vs ours {b[max(0, k - 3):k + 4]}; "
                     f"text {docs[i][:120]!r}")
    raise SystemExit("\n".join(lines))


def cpu_model():
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_outputs(out_dir, result):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    rows = result["results"]
    md = [
        "# Tokenizer encode throughput",
        "",
        "One thread, encoding a generated mixed text document by document "
        f"({result['text_mb']:.2f} MB, {result['docs']} documents split on blank lines; "
        "prose, code, whitespace runs, numbers, CJK/Korean, Cyrillic/Greek, emoji, accented "
        "Latin in NFC and NFD). MB/s is 10^6 input bytes per second, best of "
        f"{result['iters']} passes. HF is `tokenizers` {result['hf_tokenizers_version']} "
        "timed three ways on the same documents with RAYON_NUM_THREADS=1: `encode(doc)` per "
        "document, `encode_batch(docs)` (one call, so no Python overhead per document) and "
        "`encode_batch_fast(docs)` (no offsets). \"HF\" below is the faster of the first two "
        "(full encodings, as ours), and \"ratio\" is ours/that; \"ratio ids\" compares "
        "`EncodeIds` with the fastest HF call of all three. "
        "\"ours\" is `Tokenizer::Encode` (full Encoding: ids, tokens, offsets), \"ours ids\" "
        "`Tokenizer::EncodeIds`, both with HF's defaults (post-processor on, special tokens "
        "matched). The ids of every document are compared with HF's in the same run "
        "(the run fails if any differs).",
        "",
        f"Date: {result['date']}. CPU: {result['cpu']} ({result['cores']} cores; 1-minute load "
        f"average {result['loadavg_start']:.1f} at the start, {result['loadavg_end']:.1f} at the "
        f"end). Build: `{result['build']}`.",
        "",
        "| tokenizer | tokens | MB/s ours | MB/s ours ids | MB/s HF encode | MB/s HF encode_batch "
        "| MB/s HF encode_batch_fast | ratio ours/HF | ratio ids |",
        "|-----------|-------:|----------:|--------------:|---------------:|-----------------:"
        "|----------------------:|--------------:|----------:|",
    ]
    for r in rows:
        fast = r.get("hf_encode_batch_fast_mb_per_s")
        md.append(f"| `{r['tokenizer']}` | {r['tokens']:,} | {r['ours_mb_per_s']:.2f} | "
                  f"{r['ours_ids_mb_per_s']:.2f} | {r['hf_encode_mb_per_s']:.2f} | "
                  f"{r['hf_encode_batch_mb_per_s']:.2f} | "
                  f"{(f'{fast:.2f}' if fast else 'n/a')} | {r['ratio']:.2f} | "
                  f"{r['ratio_ids']:.2f} |")
    md += [
        "",
        "Notes:",
        "",
        "- The fixture tokenizers have 1000-token vocabularies, so a word takes many more merges "
        "than with a real 32k-150k vocabulary; `anthropic_sdk` is a real one (65,000 tokens).",
        "- The two SentencePiece layouts do not split on whitespace (no pre-tokenizer, or "
        "`Metaspace(split=false)`), so BPE runs over each whole document at once (perf: ours spends over half its "
        "time in the merge loop and its priority queue there), and the gap is smallest.",
        "- `encode` per document pays a Python call and an offsets conversion per document; "
        "`encode_batch` with one thread avoids most of that, which is why the table's HF figure "
        "is the faster of the two.",
    ]
    if result.get("note"):
        md += [f"- {result['note']}"]
    md += [
        "",
        "Reproduce:",
        "",
        "```sh",
        "cmake -S . -B build-tok-bench -G Ninja -DCMAKE_BUILD_TYPE=Release -DLS_SERVER=OFF "
        "-DLS_CUDA=OFF",
        "cmake --build build-tok-bench --target tokenizer_bench",
        f".venv-tools/bin/python bench/tokenizer_bench.py --mb {result['requested_mb']} "
        f"--iters {result['iters']}",
        "```",
        "",
        "Plot: `tokenizer.png`; raw numbers: `tokenizer.json`.",
        "",
    ]
    (out_dir / "tokenizer.md").write_text("\n".join(md), encoding="utf-8")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["tokenizer"] for r in rows]
    x = list(range(len(rows)))
    w = 0.27
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ours = [r["ours_mb_per_s"] for r in rows]
    ours_ids = [r["ours_ids_mb_per_s"] for r in rows]
    hf = [r["hf_mb_per_s"] for r in rows]  # the faster full-encoding HF call
    ax.bar([i - w for i in x], ours, w, label="ours (Encode)", color="#3b75af")
    ax.bar(x, ours_ids, w, label="ours (EncodeIds)", color="#86b4de")
    ax.bar([i + w for i in x], hf, w, label=f"HF tokenizers {result['hf_tokenizers_version']}",
           color="#999999")
    for i, r in enumerate(rows):
        ax.text(i - w, ours[i], f"{r['ratio']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, rotation=15)
    ax.set_ylabel("MB/s (one thread)")
    ax.set_title(f"Tokenizer encode throughput, {result['text_mb']:.1f} MB mixed text "
                 f"({result['date']}, {result['cpu']})", fontsize=10)
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "tokenizer.png", dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=4.0, help="size of the generated text")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--bin", type=Path,
                    default=REPO / "build-tok-bench" / "bench" / "tokenizer_bench")
    ap.add_argument("--tokenizers", nargs="+", default=DEFAULT_TOKENIZERS)
    ap.add_argument("--out-dir", type=Path, default=REPO / "docs" / "benchmarks")
    ap.add_argument("--keep-text", type=Path, help="also write the generated text here")
    ap.add_argument("--note", default="", help="a line added to the notes of tokenizer.md")
    args = ap.parse_args()
    if not args.bin.exists():
        raise SystemExit(f"no {args.bin}: build the tokenizer_bench target (see --help)")

    loadavg_start = os.getloadavg()[0]
    text = make_text(int(args.mb * 1e6))
    docs = split_docs(text)
    doc_bytes = sum(len(d.encode("utf-8")) for d in docs)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        text_path = Path(args.keep_text or Path(tmp) / "text.txt")
        text_path.write_text(text, encoding="utf-8", newline="")
        for name in args.tokenizers:
            tok_dir = GOLDEN / name
            ours = run_ours(args.bin, tok_dir, text_path, args.iters, Path(tmp) / "ids.bin")
            if ours["docs"] != len(docs) or ours["doc_bytes"] != doc_bytes:
                raise SystemExit(f"document split differs: C++ {ours['docs']} docs / "
                                 f"{ours['doc_bytes']} bytes, Python {len(docs)} / {doc_bytes}")
            hf_times, hf_ids = time_hf(tok_dir / "tokenizer.json", docs, args.iters)
            compare_ids(name, docs, hf_ids, read_ids(Path(tmp) / "ids.bin", len(docs)))
            hf_rates = {k: doc_bytes / 1e6 / v for k, v in hf_times.items()}
            # The comparison counts HF's fastest way to get full encodings (with offsets).
            hf_mb = max(hf_rates["encode"], hf_rates["encode_batch"])
            r = {
                "tokenizer": name,
                "tokens": sum(len(i) for i in hf_ids),
                "ids_identical": True,
                "checksum": ours["checksum"],
                "ours_mb_per_s": ours["encode_mb_per_s"],
                "ours_ids_mb_per_s": ours["encode_ids_mb_per_s"],
                "hf_mb_per_s": hf_mb,
                "hf_encode_mb_per_s": hf_rates["encode"],
                "hf_encode_batch_mb_per_s": hf_rates["encode_batch"],
                "hf_encode_batch_fast_mb_per_s": hf_rates.get("encode_batch_fast"),
                "ratio": ours["encode_mb_per_s"] / hf_mb,
                "ratio_ids": (ours["encode_ids_mb_per_s"] /
                              max(hf_mb, hf_rates.get("encode_batch_fast") or 0)),
                "ours_load_s": ours["load_s"],
            }
            print(f"{name:30s} ours {r['ours_mb_per_s']:7.2f} MB/s (ids {r['ours_ids_mb_per_s']:7.2f})"
                  f"  HF {hf_mb:7.2f} MB/s  ratio {r['ratio']:.2f}  ids identical "
                  f"({r['tokens']} tokens, checksum {r['checksum']})", flush=True)
            results.append(r)

    result = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "hf_tokenizers_version": tokenizers.__version__,
        "build": "cmake -DCMAKE_BUILD_TYPE=Release (build-tok-bench)",
        "requested_mb": args.mb,
        "text_mb": doc_bytes / 1e6,
        "docs": len(docs),
        "iters": args.iters,
        "seed": SEED,
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg()[0],
        "note": args.note,
        "results": results,
    }
    write_outputs(args.out_dir, result)
    print(f"wrote {args.out_dir}/tokenizer.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
