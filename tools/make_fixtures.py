#!/usr/bin/env python3
"""Builds tiny random Hugging Face Llama-family models and records HF's own outputs as golden
fixtures for the C++ engine.

Usage (from the repository root, with the tools environment described in tools/README.md):

    .venv-tools/bin/python tools/make_fixtures.py            # writes tests/golden/fixtures/
    .venv-tools/bin/python tools/make_fixtures.py --check    # only re-validates existing files

For every model in MODELS it writes tests/golden/fixtures/<name>/:
  config.json, generation_config.json, model.safetensors   (save_pretrained, fp32)
  expected.safetensors   per prompt i: prompt<i>.ids I32 [len], prompt<i>.logits_f32 F32
                         [len, vocab], prompt<i>.greedy_f32 I32 [32], prompt<i>.logits_bf16,
                         prompt<i>.greedy_bf16
  expected.json          readable summary: prompts, margins, versions, seed, config highlights

The "bf16" runs use the same model with every 2-D ".weight" parameter (embedding, q/k/v/o,
gate/up/down, lm_head) rounded to bfloat16 (round-to-nearest-even) and widened back to fp32;
norm weights and biases stay fp32, and so does all arithmetic. This is what the C++ engine does
when it stores the matrices in bf16.

CI runs no Python: the outputs are committed and the C++ tests only read them.
"""

import argparse
import json
import os
import random
import struct
import sys

import numpy as np
import torch

import safetensors
import safetensors.numpy
import transformers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SEED = 20240611
PROMPT_LENGTHS = [1, 5, 17, 40]  # 40 + 32 generated tokens reaches position 71 (> 64, see llama3)
NEW_TOKENS = 32
MARGIN_REL = 10 * 1e-4  # top1 - top2 must exceed MARGIN_REL * max|logit| of the row
MAX_DRAWS_PER_PROMPT = 200
FORMAT_VERSION = 1
# The files this script writes in each model folder (make_lora_fixtures.py adds adapters/ and
# expected_lora.* next to them).
BASE_FILES = ("config.json", "generation_config.json", "model.safetensors", "expected.safetensors",
              "expected.json")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(REPO_ROOT, "tests", "golden", "fixtures")

COMMON = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=256,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)


def _cfg(**overrides):
    kw = dict(COMMON)
    kw.update(overrides)
    return kw


# name -> (config class, model class, config kwargs). Shapes vary a little between models.
MODELS = {
    "llama_gqa": (
        LlamaConfig,
        LlamaForCausalLM,
        _cfg(
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            rope_scaling=None,
            rms_norm_eps=1e-5,
        ),
    ),
    "llama_tied_llama3rope": (
        LlamaConfig,
        LlamaForCausalLM,
        _cfg(
            intermediate_size=128,
            num_key_value_heads=1,
            head_dim=32,  # 4 heads x 32 = 128 != hidden 64
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rms_norm_eps=1e-5,
        ),
    ),
    "qwen2_bias": (
        Qwen2Config,
        Qwen2ForCausalLM,
        _cfg(
            intermediate_size=176,
            vocab_size=272,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_theta=1000000.0,
            use_sliding_window=False,
            rms_norm_eps=1e-6,
        ),
    ),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        _cfg(
            intermediate_size=144,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            sliding_window=None,
            rms_norm_eps=1e-5,
        ),
    ),
    "llama_linear_rope": (
        LlamaConfig,
        LlamaForCausalLM,
        _cfg(
            vocab_size=240,
            num_key_value_heads=4,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            attention_bias=True,
            rms_norm_eps=1e-6,
        ),
    ),
}


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def model_seed(index):
    return SEED + 1000 * (index + 1)


def redraw_parameters(model, seed):
    """Re-draws every parameter so the outputs have spread (HF's init gives near-zero logits)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            shape = tuple(p.shape)
            if name.endswith("norm.weight"):
                # RMSNorm gains around 1.0.
                new = 1.0 + 0.15 * torch.randn(shape, generator=gen, dtype=torch.float32)
            elif name.endswith(".bias"):
                new = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float32)
            elif name.endswith("embed_tokens.weight"):
                # When tied, the embedding is also the lm_head: a large embedding would dominate
                # the residual stream and the model would just predict its input token.
                std = 0.02 if model.config.tie_word_embeddings else 0.5
                new = std * torch.randn(shape, generator=gen, dtype=torch.float32)
            elif name.endswith("lm_head.weight"):
                new = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float32)
            elif p.dim() == 2:
                new = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float32)
            else:
                raise RuntimeError(f"unexpected parameter {name} {shape}")
            p.copy_(new)


def round_matrices_to_bf16(model):
    """Rounds every 2-D '.weight' parameter to bf16 (RNE) and back; returns the names."""
    rounded = []
    with torch.no_grad():
        for name, p in model.named_parameters():  # shared (tied) parameters appear once
            if name.endswith(".weight") and p.dim() == 2:
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
                rounded.append(name)
    return rounded


def run_prompt(model, ids):
    """Returns (prompt logits [len, vocab], greedy ids [NEW_TOKENS], greedy rows [NEW_TOKENS, V]).

    Greedy row k is the logits row whose argmax is greedy token k: row 0 is the last prompt
    position, row k > 0 the decode step that consumed greedy token k-1.
    """
    with torch.no_grad():
        inp = torch.tensor([ids], dtype=torch.long)
        out = model(input_ids=inp, use_cache=True)
        prompt_logits = out.logits[0].float().clone()
        past = out.past_key_values
        row = prompt_logits[-1]
        greedy, rows = [], []
        for step in range(NEW_TOKENS):
            tok = int(torch.argmax(row).item())
            greedy.append(tok)
            rows.append(row.clone())
            if step == NEW_TOKENS - 1:
                break
            out = model(
                input_ids=torch.tensor([[tok]], dtype=torch.long),
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            row = out.logits[0, -1].float()
    return prompt_logits, greedy, torch.stack(rows)


def margins(rows):
    """Per row: (top1 - top2) and that divided by max|logit|."""
    top2 = torch.topk(rows, 2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    scale = rows.abs().max(dim=-1).values
    return gap, gap / scale


def position_spread(logits):
    """Mean relative L2 distance between logits rows of consecutive positions."""
    if logits.shape[0] < 2:
        return None
    d = (logits[1:] - logits[:-1]).norm(dim=-1)
    n = logits[:-1].norm(dim=-1)
    return float((d / n).mean())


def config_summary(cfg):
    keys = [
        "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
        "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
        "tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window",
        "sliding_window", "max_window_layers", "layer_types", "hidden_act", "bos_token_id",
        "eos_token_id",
    ]
    d = cfg.to_dict()
    return {k: d[k] for k in keys if k in d}


def build_model(index, name):
    cfg_cls, model_cls, kwargs = MODELS[name]
    seed = model_seed(index)
    seed_everything(seed)
    config = cfg_cls(**kwargs)
    model = model_cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    redraw_parameters(model, seed)
    model.eval()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    return model, seed


def make_fixture(index, name):
    model, seed = build_model(index, name)
    out_dir = os.path.join(OUT_DIR, name)
    os.makedirs(out_dir, exist_ok=True)
    for stale in ("model.safetensors", "expected.safetensors", "expected.json"):
        path = os.path.join(out_dir, stale)
        if os.path.exists(path):
            os.remove(path)
    model.save_pretrained(out_dir, safe_serialization=True)

    vocab = model.config.vocab_size
    bf16_model, _ = build_model(index, name)
    rounded = round_matrices_to_bf16(bf16_model)
    # Sanity: the two models differ only in the rounded matrices.
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), bf16_model.named_parameters()):
        assert n1 == n2
        if n1 not in rounded:
            assert torch.equal(p1, p2), n1

    rng = np.random.default_rng(seed)
    tensors = {}
    prompts_meta = []
    for i, length in enumerate(PROMPT_LENGTHS):
        for draw in range(MAX_DRAWS_PER_PROMPT):
            ids = [int(x) for x in rng.integers(0, vocab, size=length)]
            res = {}
            ok = True
            for tag, m in (("f32", model), ("bf16", bf16_model)):
                logits, greedy, grows = run_prompt(m, ids)
                gap, rel = margins(torch.cat([logits, grows], dim=0))
                res[tag] = (logits, greedy, gap, rel)
                if not bool((rel > MARGIN_REL).all()):
                    ok = False
                    break
            if ok:
                break
        else:
            raise RuntimeError(f"{name}: no prompt of length {length} passed the margin filter")
        lf, gf, gapf, relf = res["f32"]
        lb, gb, gapb, relb = res["bf16"]
        tensors[f"prompt{i}.ids"] = np.asarray(ids, dtype=np.int32)
        tensors[f"prompt{i}.logits_f32"] = np.ascontiguousarray(lf.numpy().astype(np.float32))
        tensors[f"prompt{i}.greedy_f32"] = np.asarray(gf, dtype=np.int32)
        tensors[f"prompt{i}.logits_bf16"] = np.ascontiguousarray(lb.numpy().astype(np.float32))
        tensors[f"prompt{i}.greedy_bf16"] = np.asarray(gb, dtype=np.int32)
        spread = position_spread(lf)
        if spread is not None and spread < 0.1:
            raise RuntimeError(f"{name} prompt{i}: logits barely change between positions ({spread})")
        if len(set(gf)) < 3:
            raise RuntimeError(f"{name} prompt{i}: degenerate greedy output {gf}")
        prompts_meta.append({
            "index": i,
            "length": length,
            "draws_rejected": draw,
            "ids": ids,
            "greedy_f32": gf,
            "greedy_bf16": gb,
            "greedy_f32_equals_bf16": gf == gb,
            "distinct_greedy_tokens_f32": len(set(gf)),
            "min_margin_rel_f32": float(relf.min()),
            "min_margin_rel_bf16": float(relb.min()),
            "min_margin_rel": float(min(relf.min(), relb.min())),
            "min_margin_abs_f32": float(gapf.min()),
            "min_margin_abs_bf16": float(gapb.min()),
            "max_abs_logit_f32": float(lf.abs().max()),
            "max_abs_diff_logits_f32_vs_bf16": float((lf - lb).abs().max()),
            "mean_rel_change_between_positions_f32": spread,
        })

    exp_path = os.path.join(out_dir, "expected.safetensors")
    safetensors.numpy.save_file(
        # One metadata key only: safetensors writes the map in hash order, so two keys would make
        # the file's bytes differ from run to run.
        tensors, exp_path, metadata={"format": f"loraserve-golden-v{FORMAT_VERSION}"}
    )

    for f in os.listdir(out_dir):  # safetensors creates its files 0600
        if os.path.isfile(os.path.join(out_dir, f)):  # not adapters/ (make_lora_fixtures.py)
            os.chmod(os.path.join(out_dir, f), 0o644)

    with open(os.path.join(out_dir, "config.json")) as f:
        saved_config = json.load(f)
    summary = {
        "format_version": FORMAT_VERSION,
        "model": name,
        "architecture": type(model).__name__,
        "seed": seed,
        "global_seed": SEED,
        "prompt_count": len(PROMPT_LENGTHS),
        "prompt_lengths": PROMPT_LENGTHS,
        "new_tokens": NEW_TOKENS,
        "margin_rule": "keep a prompt only if top1-top2 > 1e-3 * max|logit| for every prompt "
                       "position and every greedy step, in both the f32 and bf16 runs",
        "min_margin_rel": min(p["min_margin_rel"] for p in prompts_meta),
        "attn_implementation": "eager",
        "bf16_rounded_parameters": rounded,
        "parameter_count": sum(p.numel() for p in model.parameters()),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
        "config_summary": config_summary(model.config),
        # HF's fp32 RoPE inverse frequencies (after scaling) and cos/sin multiplier, exactly.
        "rope_inv_freq_f32": [float(x) for x in model.model.rotary_emb.inv_freq.float()],
        "rope_attention_scaling": float(model.model.rotary_emb.attention_scaling),
        "config_json_keys": sorted(saved_config.keys()),
        "tensors": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()},
        "prompts": prompts_meta,
    }
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    return summary


# --- validation (mirrors the C++ reader's rules in model/safetensors.cc) ---------------------

_DTYPE_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "U8": 1, "I8": 1}


def validate_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n].decode("utf-8")
    text = header.rstrip(" ")
    assert text.startswith("{") and text.endswith("}"), f"{path}: bad header framing"
    assert (8 + n) % 8 == 0, f"{path}: data section not 8-byte aligned"
    root = json.loads(text)
    body = len(data) - 8 - n
    spans = []
    for name, e in root.items():
        if name == "__metadata__":
            assert all(isinstance(v, str) for v in e.values())
            continue
        assert set(e.keys()) == {"dtype", "shape", "data_offsets"}, (path, name, e.keys())
        numel = 1
        for s in e["shape"]:
            numel *= s
        b, end = e["data_offsets"]
        assert end - b == numel * _DTYPE_SIZE[e["dtype"]], (path, name)
        spans.append((b, end, name))
    spans.sort()
    pos = 0
    for b, end, name in spans:
        assert b == pos, f"{path}: {name}: hole or overlap at {b} (expected {pos})"
        pos = end
    assert pos == body, f"{path}: trailing bytes"
    return root


def validate_fixture(name):
    d = os.path.join(OUT_DIR, name)
    validate_safetensors(os.path.join(d, "model.safetensors"))
    hdr = validate_safetensors(os.path.join(d, "expected.safetensors"))
    with open(os.path.join(d, "expected.json")) as f:
        summary = json.load(f)
    loaded = safetensors.numpy.load_file(os.path.join(d, "expected.safetensors"))
    vocab = summary["config_summary"]["vocab_size"]
    for i, length in enumerate(summary["prompt_lengths"]):
        exp = {
            f"prompt{i}.ids": ("I32", [length]),
            f"prompt{i}.logits_f32": ("F32", [length, vocab]),
            f"prompt{i}.greedy_f32": ("I32", [NEW_TOKENS]),
            f"prompt{i}.logits_bf16": ("F32", [length, vocab]),
            f"prompt{i}.greedy_bf16": ("I32", [NEW_TOKENS]),
        }
        for k, (dt, shape) in exp.items():
            assert hdr[k]["dtype"] == dt and hdr[k]["shape"] == shape, (name, k, hdr[k])
            assert loaded[k].flags["C_CONTIGUOUS"]
        # Greedy token 0 is the argmax of the last prompt row.
        assert int(loaded[f"prompt{i}.greedy_f32"][0]) == int(loaded[f"prompt{i}.logits_f32"][-1].argmax())
        assert int(loaded[f"prompt{i}.greedy_bf16"][0]) == int(loaded[f"prompt{i}.logits_bf16"][-1].argmax())
    assert len([k for k in hdr if k != "__metadata__"]) == 5 * len(summary["prompt_lengths"])

    # Round trip: the saved checkpoint, loaded the way a user would, reproduces the outputs.
    cls = MODELS[name][1]
    f32 = cls.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    bf16 = cls.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    round_matrices_to_bf16(bf16)
    for i in range(len(summary["prompt_lengths"])):
        ids = [int(x) for x in loaded[f"prompt{i}.ids"]]
        for tag, m in (("f32", f32), ("bf16", bf16)):
            logits, greedy, _ = run_prompt(m, ids)
            want = loaded[f"prompt{i}.logits_{tag}"]
            diff = float(np.abs(logits.numpy() - want).max())
            assert diff <= 1e-5 * float(np.abs(want).max()), (name, i, tag, diff)
            assert greedy == [int(x) for x in loaded[f"prompt{i}.greedy_{tag}"]], (name, i, tag)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only validate existing fixtures")
    ap.add_argument("--only", nargs="*", help="model names to (re)generate; default all")
    args = ap.parse_args()

    torch.set_num_threads(1)  # same reduction order on every run of the same machine
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)

    names = args.only or list(MODELS)
    for name in names:
        if name not in MODELS:
            sys.exit(f"unknown model {name}; known: {', '.join(MODELS)}")
    if not args.check:
        for index, name in enumerate(MODELS):
            if name not in names:
                continue
            s = make_fixture(index, name)
            print(f"{name}: min margin {s['min_margin_rel']:.2e}, rejected draws "
                  f"{[p['draws_rejected'] for p in s['prompts']]}, greedy f32==bf16 "
                  f"{[p['greedy_f32_equals_bf16'] for p in s['prompts']]}")
    total = 0
    for name in names:
        validate_fixture(name)
        d = os.path.join(OUT_DIR, name)
        size = sum(os.path.getsize(os.path.join(d, f)) for f in BASE_FILES)
        total += size
        print(f"ok {name}: {size} bytes")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
