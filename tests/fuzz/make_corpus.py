#!/usr/bin/env python3
"""Writes the seed corpus for tests/fuzz/safetensors_fuzz.

Small valid files (laid out like the reference writer: header padded with spaces to a multiple
of 8, tensors by descending alignment then name) and near-valid ones, each one rule away from
valid, so the fuzzer starts next to every check. Every file is under 4 KB and the output is
deterministic; rerun after changing this script and commit the result:

    python3 tests/fuzz/make_corpus.py [OUT_DIR]   # default: tests/fuzz/corpus/safetensors

Standard library only.
"""

import json
import os
import random
import struct
import sys

# safetensors dtype token -> bits per element
DTYPES = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
    "U16": 16, "I16": 16, "F16": 16, "BF16": 16,
    "U32": 32, "I32": 32, "F32": 32, "U64": 64, "I64": 64, "F64": 64, "C64": 64,
}
MAX_BYTES = 4096


def nbytes(dtype, shape):
    n = 1
    for d in shape:
        n *= d
    return n * DTYPES[dtype] // 8


def pad_header(text):
    text += " " * (-len(text) % 8)
    return text.encode("utf-8")


def raw_file(header, data=b""):
    """A file with `header` bytes verbatim (no padding) and its true length prefix."""
    if isinstance(header, str):
        header = header.encode("utf-8")
    return struct.pack("<Q", len(header)) + header + data


def serialize(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, bytes). The reference writer's layout."""
    order = sorted(tensors, key=lambda t: (-max(1, DTYPES[t[1]] // 8), t[0]))
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    data = b""
    for name, dtype, shape, payload in order:
        assert len(payload) == nbytes(dtype, shape), name
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(payload)]}
        offset += len(payload)
        data += payload
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    return raw_file(pad_header(text), data)


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def header_file(header_obj, data=b"", pad=True):
    text = json.dumps(header_obj, separators=(",", ":"))
    return raw_file(pad_header(text) if pad else text, data)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "corpus", "safetensors")
    os.makedirs(out, exist_ok=True)
    rng = random.Random(20261129)

    def rand(n):
        return bytes(rng.getrandbits(8) for _ in range(n))

    def t(name, dtype, shape):
        return (name, dtype, shape, rand(nbytes(dtype, shape)))

    files = {}

    # ---- Valid -------------------------------------------------------------------------------
    files["valid_empty"] = serialize([])
    files["valid_metadata_only"] = serialize([], {"format": "pt"})
    files["valid_f32"] = serialize([t("weight", "F32", [2, 3])])
    files["valid_scalar"] = serialize([t("scale", "F32", [])])
    files["valid_zero_size"] = serialize(
        [t("a", "F16", [0]), t("b", "I64", [3, 0, 2]), t("c", "U8", [2])])
    files["valid_all_dtypes"] = serialize(
        [t("t_" + d.lower(), d, [4] if DTYPES[d] >= 8 else [2, 4]) for d in DTYPES])
    files["valid_lora_adapter"] = serialize(
        [t("base_model.model.layers.0.self_attn.q_proj.lora_A.weight", "BF16", [4, 16]),
         t("base_model.model.layers.0.self_attn.q_proj.lora_B.weight", "BF16", [16, 4]),
         t("base_model.model.layers.0.self_attn.v_proj.lora_A.weight", "F16", [4, 16]),
         t("base_model.model.layers.0.self_attn.v_proj.lora_B.weight", "F32", [16, 4])],
        {"format": "pt", "peft_version": "0.13.2"})
    files["valid_subbyte"] = serialize([t("f4", "F4", [3, 2]), t("f6", "F6_E3M2", [4])])
    files["valid_unicode"] = serialize(
        [t("\u03bb.weight", "F16", [2]), t("a\nb", "U8", [1])], {"note": "\u20ac\u0000x"})
    # Unaligned: the data section starts at an odd offset (another writer's layout).
    files["valid_unaligned"] = header_file(
        {"a": entry("F32", [2], 0, 8), "b": entry("BF16", [3], 8, 14)}, rand(14), pad=False)
    files["valid_spaces_only_padding"] = raw_file(
        json.dumps({"x": entry("U8", [1], 0, 1)}) + " " * 13, b"!")

    # ---- Near-valid: one rule broken each ----------------------------------------------------
    files["bad_short"] = b"\x10\x00\x00"
    files["bad_header_too_large"] = struct.pack("<Q", 100_000_001) + b"{}"
    files["bad_header_past_eof"] = struct.pack("<Q", 64) + b"{}      "
    files["bad_not_utf8"] = raw_file(b'{"w\xff":' + json.dumps(
        entry("U8", [1], 0, 1)).encode() + b"}", b"a")
    files["bad_not_json"] = raw_file('{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}',
                                     b"a")
    files["bad_no_brace"] = raw_file(" {}")
    files["bad_newline_padding"] = raw_file("{}\n     ")
    files["bad_nul_in_header"] = raw_file(b'{}\x00{"w":1}')
    files["bad_duplicate_key"] = raw_file(
        '{"w":' + json.dumps(entry("U8", [1], 0, 1)) + ',"w":' +
        json.dumps(entry("U8", [1], 1, 2)) + "}", b"ab")
    files["bad_unknown_dtype"] = header_file({"w": entry("F31", [1], 0, 4)}, rand(4))
    files["bad_unknown_key"] = header_file(
        {"w": dict(entry("U8", [1], 0, 1), extra=0)}, b"a")
    files["bad_missing_key"] = header_file({"w": {"dtype": "U8", "shape": [1]}}, b"a")
    files["bad_negative_offset"] = header_file({"w": entry("U8", [4], -4, 0)}, rand(4))
    files["bad_float_offset"] = header_file({"w": entry("U8", [4], 0.0, 4)}, rand(4))
    files["bad_huge_offset"] = header_file({"w": entry("U8", [4], 0, 2**64)}, rand(4))
    files["bad_three_offsets"] = header_file(
        {"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 2, 4]}}, rand(4))
    files["bad_begin_after_end"] = header_file({"w": entry("U8", [0], 4, 0)}, rand(4))
    files["bad_negative_dim"] = header_file({"w": entry("U8", [-1], 0, 0)})
    files["bad_overflow_shape"] = header_file({"w": entry("U8", [2**32, 2**32], 0, 0)})
    files["bad_overflow_bits"] = header_file({"w": entry("F32", [2**62], 0, 0)})
    files["bad_rank"] = header_file({"w": entry("U8", [1] * 9, 0, 1)}, b"a")
    files["bad_subbyte_fraction"] = header_file({"w": entry("F4", [3], 0, 1)}, b"a")
    files["bad_size_mismatch"] = header_file({"w": entry("F32", [2, 2], 0, 12)}, rand(12))
    files["bad_overlap"] = header_file(
        {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, rand(12))
    files["bad_same_bytes"] = header_file(
        {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 0, 8)}, rand(8))
    files["bad_hole"] = header_file(
        {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, rand(12))
    files["bad_hole_at_start"] = header_file({"a": entry("F32", [1], 4, 8)}, rand(8))
    files["bad_trailing_bytes"] = header_file({"a": entry("F32", [1], 0, 4)}, rand(6))
    files["bad_past_eof"] = header_file({"a": entry("F32", [2], 0, 8)}, rand(4))
    files["bad_metadata_int"] = header_file({"__metadata__": {"format": 1}})
    files["bad_metadata_array"] = header_file({"__metadata__": ["pt"]})
    files["bad_metadata_null"] = header_file({"__metadata__": None})
    files["bad_dtype_bool"] = header_file(
        {"w": {"dtype": True, "shape": [1], "data_offsets": [0, 1]}}, b"a")
    files["bad_entry_not_object"] = header_file({"w": 5})
    files["bad_empty_name"] = header_file({"": entry("U8", [1], 0, 1)}, b"a")
    files["bad_name_too_long"] = header_file({"n" * 1025: entry("U8", [1], 0, 1)}, b"a")
    files["bad_deep_nesting"] = raw_file('{"__metadata__":{"k":' + "[" * 40 + "]" * 40 + "}}")

    for name, blob in sorted(files.items()):
        assert len(blob) < MAX_BYTES, (name, len(blob))
        with open(os.path.join(out, name + ".safetensors"), "wb") as f:
            f.write(blob)
    print(f"wrote {len(files)} files to {out}")


if __name__ == "__main__":
    main()
