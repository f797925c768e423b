#!/usr/bin/env python3
"""Builds PEFT LoRA adapters for the tiny fixture models of make_fixtures.py and records PEFT's own
outputs as golden fixtures for the C++ engine.

Usage (from the repository root, with the tools environment described in tools/README.md; run
make_fixtures.py first, this script rebuilds the same base models in memory):

    .venv-tools/bin/python tools/make_lora_fixtures.py            # writes the LoRA fixtures
    .venv-tools/bin/python tools/make_lora_fixtures.py --only mistral
    .venv-tools/bin/python tools/make_lora_fixtures.py --check    # only re-validates them

For every model in make_fixtures.MODELS it writes, under tests/golden/fixtures/<model>/:
  adapters/<adapter>/adapter_config.json, adapter_model.safetensors   (PEFT save_pretrained, F32)
  expected_lora.safetensors   per adapter a and prompt i: a.prompt<i>.ids I32 [len],
                              a.prompt<i>.logits_f32 F32 [len, vocab], a.prompt<i>.greedy_f32 I32
                              [32], a.prompt<i>.logits_bf16, a.prompt<i>.greedy_bf16; and the mixed
                              batch: mixed.row<j>.ids I32 [len_j], mixed.row<j>.logits_f32 F32
                              [len_j, vocab]
  expected_lora.json          readable summary: adapters, wrapped modules, scales, saved tensor
                              names and shapes, prompts, margins, merge check, mixed batch rows

The adapter weights are created by PEFT with init_lora_weights=False and then overwritten with
seeded normals (see redraw_lora) so that every A and B is non-zero and each adapter moves the
logits clearly. The "bf16" runs round the base matrices (as make_fixtures.py does) and every LoRA
A/B to bfloat16 (round-to-nearest-even) and widen them back; all arithmetic stays fp32.

The script re-executes itself with PYTHONHASHSEED=0: PEFT turns list-valued target_modules and
exclude_modules into Python sets and writes them to adapter_config.json in set order, which
depends on the string hash seed.
"""

import argparse
import copy
import json
import math
import os
import shutil
import sys
import warnings

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import numpy as np
import torch

import safetensors
import safetensors.numpy
import transformers

import accelerate
import peft
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (the base models, run_prompt, margins, validators)

FORMAT_VERSION = 1
LORA_SEED_OFFSET = 500  # adapter seeds: model_seed + LORA_SEED_OFFSET + 10 * adapter index
PROMPT_LENGTHS = [3, 11]  # per adapter; kept short so the expected files stay small
MIXED_SEED_OFFSET = 900
BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
MERGE_REL_TOL = 1e-4
MIXED_REL_TOL = 1e-5
MIN_EFFECT_REL = 0.05  # adapter-vs-base max|diff| must be >= this * max|base logit|

ALL_LINEAR_RANK_PATTERN = {"q_proj": 8, "layers.1.mlp.down_proj": 4}
ALL_LINEAR_ALPHA_PATTERN = {"v_proj": 4, r"layers\.0\.mlp\.(gate|up)_proj": 64}
RSLORA_REGEX = r".*\.layers\.0\.self_attn\.(q_proj|v_proj)|.*\.layers\.1\.mlp\.down_proj"


def adapter_specs():
    """name -> (LoraConfig kwargs, t): t is the target std(scale * B @ A) / std(W_base)."""
    return {
        "attn_r4": (dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, lora_alpha=8), 0.2),
        "all_linear_r16_patterns": (
            dict(
                target_modules="all-linear",
                r=16,
                lora_alpha=32,
                rank_pattern=dict(ALL_LINEAR_RANK_PATTERN),
                alpha_pattern=dict(ALL_LINEAR_ALPHA_PATTERN),
            ),
            0.15,
        ),
        "rslora_r64_regex": (
            dict(target_modules=RSLORA_REGEX, r=64, lora_alpha=16, use_rslora=True), 0.3),
        "embed_head_r8": (dict(target_modules=["embed_tokens", "lm_head", "up_proj"], r=8, lora_alpha=16), 0.25),
        "layers1_excl_r8": (
            dict(
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                layers_to_transform=[1],
                exclude_modules=["k_proj", "mlp.up_proj"],
                r=8,
                lora_alpha=16,
            ),
            0.25,
        ),
    }


ADAPTERS = list(adapter_specs())


# Adapters saved without a task_type (PEFT then writes "task_type": null and an "auto_mapping"); the
# others use "CAUSAL_LM" like most published adapters. The tensor names are the same either way.
NO_TASK_TYPE = ("layers1_excl_r8",)


def lora_config(name):
    kwargs, _ = adapter_specs()[name]
    task_type = None if name in NO_TASK_TYPE else "CAUSAL_LM"
    return LoraConfig(init_lora_weights=False, lora_dropout=0.0, bias="none", task_type=task_type, **kwargs)


def adapter_seed(model_index, adapter_index):
    return mf.model_seed(model_index) + LORA_SEED_OFFSET + 10 * adapter_index


def lora_layers(pm):
    """[(module path inside the PeftModel, LoRA layer)] in named_modules order."""
    return [(n, m) for n, m in pm.named_modules() if isinstance(m, BaseTunerLayer)]


def lora_tensors(layer, adapter):
    """(kind, A, B) of one adapter on one LoRA layer; A [r, in], B [out, r] as PEFT stores them."""
    if adapter in layer.lora_A:
        return "Linear", layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return "Embedding", layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]


def redraw_lora(pm, adapter, seed, t):
    """Overwrites A and B with k * N(0, 1), k chosen so std(scale * B @ A) = t * std(W_base)."""
    gen = torch.Generator().manual_seed(seed)
    info = {}
    with torch.no_grad():
        for name, layer in sorted(lora_layers(pm), key=lambda kv: kv[0]):
            kind, a, b = lora_tensors(layer, adapter)
            r, scale = layer.r[adapter], layer.scaling[adapter]
            w_std = float(layer.get_base_layer().weight.float().std())
            k = math.sqrt(t * w_std / (scale * math.sqrt(r)))
            a.copy_(k * torch.randn(tuple(a.shape), generator=gen, dtype=torch.float32))
            b.copy_(k * torch.randn(tuple(b.shape), generator=gen, dtype=torch.float32))
            assert bool((a != 0).all()) and bool((b != 0).all()), (name, adapter)
            info[name.removeprefix("base_model.model.")] = k
    return info


def round_lora_to_bf16(pm, adapter):
    with torch.no_grad():
        for _, layer in lora_layers(pm):
            _, a, b = lora_tensors(layer, adapter)
            a.copy_(a.to(torch.bfloat16).to(torch.float32))
            b.copy_(b.to(torch.bfloat16).to(torch.float32))


def make_peft(model_index, model_name, adapter, bf16):
    """Fresh base model (bf16-rounded matrices if bf16) wrapped in a fresh PEFT adapter."""
    base, _ = mf.build_model(model_index, model_name)
    if bf16:
        mf.round_matrices_to_bf16(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = get_peft_model(base, lora_config(adapter), adapter_name=adapter)
    pm.eval()
    return pm, sorted({str(w.message).split("\n")[0] for w in caught})


def dumps(obj, indent=0):
    """json.dumps(obj, indent=1), except that lists of numbers and short lists/dicts stay on one line."""
    pad = " " * (indent + 1)
    flat = json.dumps(obj)
    if len(flat) <= 160 or (isinstance(obj, list) and all(isinstance(x, (int, float)) for x in obj)):
        return flat
    if isinstance(obj, dict) and obj:
        items = [f"{pad}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(obj, list) and obj and not all(
            isinstance(x, (int, float)) or (isinstance(x, str) and len(x) < 40) for x in obj):
        return "[\n" + ",\n".join(pad + dumps(x, indent + 1) for x in obj) + "\n" + " " * indent + "]"
    return json.dumps(obj)


def rel_diff(a, b):
    return float((a - b).abs().max()) / float(b.abs().max())


def module_table(pm, adapter):
    rows = []
    for name, layer in lora_layers(pm):
        kind, a, b = lora_tensors(layer, adapter)
        rows.append({
            "module": name.removeprefix("base_model.model."),
            "kind": kind,
            "r": layer.r[adapter],
            "alpha": layer.lora_alpha[adapter],
            "scale": layer.scaling[adapter],
            "A_shape": list(a.shape),
            "B_shape": list(b.shape),
        })
    return rows


def saved_keys(path):
    hdr = mf.validate_safetensors(path)
    return {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in sorted(hdr.items()) if k != "__metadata__"}


def make_model_fixtures(model_index, model_name):
    out_dir = os.path.join(mf.OUT_DIR, model_name)
    if not os.path.exists(os.path.join(out_dir, "model.safetensors")):
        raise RuntimeError(f"{out_dir}: run tools/make_fixtures.py first")
    adapters_dir = os.path.join(out_dir, "adapters")
    if os.path.exists(adapters_dir):
        shutil.rmtree(adapters_dir)
    for stale in ("expected_lora.safetensors", "expected_lora.json"):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))

    base_f32, seed = mf.build_model(model_index, model_name)
    vocab = base_f32.config.vocab_size
    tensors, adapters_meta, solo = {}, {}, {}

    for a_index, adapter in enumerate(ADAPTERS):
        _, t = adapter_specs()[adapter]
        a_seed = adapter_seed(model_index, a_index)
        pm, warns = make_peft(model_index, model_name, adapter, bf16=False)
        init = redraw_lora(pm, adapter, a_seed, t)
        pm_b, _ = make_peft(model_index, model_name, adapter, bf16=True)
        with torch.no_grad():
            for (n1, l1), (n2, l2) in zip(lora_layers(pm), lora_layers(pm_b)):
                assert n1 == n2
                for src, dst in zip(lora_tensors(l1, adapter)[1:], lora_tensors(l2, adapter)[1:]):
                    dst.copy_(src)
        round_lora_to_bf16(pm_b, adapter)
        # The bf16 model differs from the f32 one exactly in the rounded base matrices and LoRA tensors.
        for (n1, p1), (n2, p2) in zip(pm.named_parameters(), pm_b.named_parameters()):
            assert n1 == n2
            if (n1.endswith(".weight") and p1.dim() == 2) or "lora_embedding_" in n1:
                assert torch.equal(p1.to(torch.bfloat16).to(torch.float32), p2), n1
            else:
                assert torch.equal(p1, p2), n1

        a_dir = os.path.join(adapters_dir, adapter)
        # save_embedding_layers=False: PEFT's default ("auto") would also store full copies of the base
        # embed_tokens / lm_head weights when they are targeted.
        # PEFT writes an adapter not named "default" into <dir>/<adapter name>/.
        pm.save_pretrained(adapters_dir, safe_serialization=True, save_embedding_layers=False,
                           selected_adapters=[adapter])
        for readme in (os.path.join(adapters_dir, "README.md"), os.path.join(a_dir, "README.md")):
            if os.path.exists(readme):  # PEFT's model card
                os.remove(readme)
        keys = saved_keys(os.path.join(a_dir, "adapter_model.safetensors"))
        saved = safetensors.numpy.load_file(os.path.join(a_dir, "adapter_model.safetensors"))
        for k, v in saved.items():
            assert v.dtype == np.float32 and bool((v != 0).all()), (adapter, k)
        with open(os.path.join(a_dir, "adapter_config.json")) as f:
            saved_cfg = json.load(f)

        rng = np.random.default_rng(a_seed)
        prompts_meta = []
        for i, length in enumerate(PROMPT_LENGTHS):
            for draw in range(mf.MAX_DRAWS_PER_PROMPT):
                ids = [int(x) for x in rng.integers(0, vocab, size=length)]
                res, ok = {}, True
                for tag, m in (("f32", pm), ("bf16", pm_b)):
                    logits, greedy, grows = mf.run_prompt(m, ids)
                    gap, rel = mf.margins(torch.cat([logits, grows], dim=0))
                    res[tag] = (logits, greedy, gap, rel)
                    if not bool((rel > mf.MARGIN_REL).all()) or len(set(greedy)) < 3:
                        ok = False
                        break
                if ok:
                    break
            else:
                raise RuntimeError(f"{model_name}/{adapter}: no prompt of length {length} passed")
            lf, gf, gapf, relf = res["f32"]
            lb, gb, gapb, relb = res["bf16"]
            base_logits, base_greedy, _ = mf.run_prompt(base_f32, ids)
            # The merged model (merge_and_unload on a copy) against the unmerged one.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                merged = copy.deepcopy(pm).merge_and_unload()
            merge_warns = sorted({str(w.message).split("\n")[0] for w in caught})
            merged_logits, merged_greedy, _ = mf.run_prompt(merged, ids)
            merge_rel = rel_diff(merged_logits, lf)
            p = f"{adapter}.prompt{i}"
            tensors[f"{p}.ids"] = np.asarray(ids, dtype=np.int32)
            tensors[f"{p}.logits_f32"] = np.ascontiguousarray(lf.numpy().astype(np.float32))
            tensors[f"{p}.greedy_f32"] = np.asarray(gf, dtype=np.int32)
            tensors[f"{p}.logits_bf16"] = np.ascontiguousarray(lb.numpy().astype(np.float32))
            tensors[f"{p}.greedy_bf16"] = np.asarray(gb, dtype=np.int32)
            effect = float((lf - base_logits).abs().max()) / float(base_logits.abs().max())
            prompts_meta.append({
                "index": i,
                "length": length,
                "draws_rejected": draw,
                "ids": ids,
                "greedy_f32": gf,
                "greedy_bf16": gb,
                "greedy_f32_equals_bf16": gf == gb,
                "greedy_base_f32": base_greedy,
                "greedy_f32_equals_base": gf == base_greedy,
                "distinct_greedy_tokens_f32": len(set(gf)),
                "min_margin_rel_f32": float(relf.min()),
                "min_margin_rel_bf16": float(relb.min()),
                "min_margin_rel": float(min(relf.min(), relb.min())),
                "max_abs_logit_f32": float(lf.abs().max()),
                "max_abs_logit_base_f32": float(base_logits.abs().max()),
                "max_abs_diff_vs_base_over_max_abs_base_logit": effect,
                "max_abs_diff_logits_f32_vs_bf16": float((lf - lb).abs().max()),
                "merged_vs_unmerged_max_rel_diff": merge_rel,
                "merged_greedy_equals_unmerged": merged_greedy == gf,
                "merge_warnings": merge_warns,
            })
            if effect < MIN_EFFECT_REL:
                raise RuntimeError(f"{model_name}/{adapter} prompt{i}: adapter barely changes logits ({effect})")
            ratio = float(lf.abs().max()) / float(base_logits.abs().max())
            if not 0.25 < ratio < 4.0:
                raise RuntimeError(f"{model_name}/{adapter} prompt{i}: logits out of range ({ratio})")

        tied = bool(base_f32.config.tie_word_embeddings)
        head_targeted = any(r["module"] == "lm_head" for r in module_table(pm, adapter))
        merge_expected_ok = not (tied and head_targeted)
        worst_merge = max(p["merged_vs_unmerged_max_rel_diff"] for p in prompts_meta)
        if merge_expected_ok:
            assert worst_merge <= MERGE_REL_TOL, (model_name, adapter, worst_merge)
        else:
            # Tied embeddings with both embed_tokens and lm_head wrapped: both merges write into the one
            # shared matrix, so the merged model is not the unmerged one (PEFT warns about it).
            assert worst_merge > MERGE_REL_TOL, (model_name, adapter, worst_merge)
        solo[adapter] = pm

        adapters_meta[adapter] = {
            "seed": a_seed,
            "init_target_rel_std": t,
            "lora_config_kwargs": {k: v for k, v in adapter_specs()[adapter][0].items()},
            "saved_config": {k: saved_cfg[k] for k in (
                "target_modules", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
                "layers_to_transform", "layers_pattern", "exclude_modules", "init_lora_weights",
                "fan_in_fan_out", "bias", "lora_bias", "use_dora", "modules_to_save",
                "ensure_weight_tying", "task_type", "peft_version", "base_model_name_or_path")},
            "peft_warnings_on_create": warns,
            "wrapped_modules": module_table(pm, adapter),
            "init": init,
            "saved_tensors": keys,
            "merge_check": {
                "rule": f"merge_and_unload() on a deepcopy; max|merged - unmerged| <= {MERGE_REL_TOL} * "
                        "max|unmerged| on every prompt",
                "expected_to_match": merge_expected_ok,
                "max_rel_diff": worst_merge,
                "matches": worst_merge <= MERGE_REL_TOL,
            },
            "prompts": prompts_meta,
        }

    mixed = mixed_batch(model_index, model_name, adapters_dir, base_f32, solo, tensors, vocab)

    exp_path = os.path.join(out_dir, "expected_lora.safetensors")
    safetensors.numpy.save_file(tensors, exp_path, metadata={"format": f"loraserve-golden-lora-v{FORMAT_VERSION}"})
    for root, dirs, files in os.walk(adapters_dir):
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    os.chmod(exp_path, 0o644)

    summary = {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "base_seed": seed,
        "prompt_lengths": PROMPT_LENGTHS,
        "new_tokens": mf.NEW_TOKENS,
        "margin_rule": "per adapter, keep a prompt only if top1-top2 > 1e-3 * max|logit| for every prompt "
                       "position and every greedy step, in both the f32 and bf16 runs, and the f32 and bf16 "
                       "greedy continuations have >= 3 distinct tokens; otherwise draw another",
        "bf16_rule": "base: every 2-D .weight parameter rounded to bf16 (RNE) and widened; adapter: every "
                     "lora_A/lora_B/lora_embedding_A/lora_embedding_B rounded the same way; fp32 arithmetic",
        "tie_word_embeddings": bool(base_f32.config.tie_word_embeddings),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "accelerate": accelerate.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
        "adapters": adapters_meta,
        "mixed_batch": mixed,
        "tensors": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()},
    }
    with open(os.path.join(out_dir, "expected_lora.json"), "w") as f:
        f.write(dumps(summary) + "\n")
    os.chmod(os.path.join(out_dir, "expected_lora.json"), 0o644)
    return summary


MIXED_ROWS = [  # (adapter, prompt length); right-padded to the longest row
    ("attn_r4", 5),
    (BASE, 3),
    ("all_linear_r16_patterns", 6),
    ("embed_head_r8", 2),
    ("rslora_r64_regex", 4),
    ("layers1_excl_r8", 7),
    (BASE, 1),
    ("attn_r4", 3),
]
PAD_ID = 0


def load_all_adapters(model_index, model_name, adapters_dir):
    base, _ = mf.build_model(model_index, model_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(base, os.path.join(adapters_dir, ADAPTERS[0]), adapter_name=ADAPTERS[0])
        for a in ADAPTERS[1:]:
            pm.load_adapter(os.path.join(adapters_dir, a), adapter_name=a)
    pm.eval()
    return pm


def mixed_batch(model_index, model_name, adapters_dir, base_f32, solo, tensors, vocab):
    """All adapters loaded from the saved folders into one PeftModel; one forward with adapter_names."""
    pm = load_all_adapters(model_index, model_name, adapters_dir)
    rng = np.random.default_rng(mf.model_seed(model_index) + MIXED_SEED_OFFSET)
    rows = [(a, [int(x) for x in rng.integers(0, vocab, size=n)]) for a, n in MIXED_ROWS]
    width = max(len(ids) for _, ids in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, (_, ids) in enumerate(rows):
        input_ids[j, :len(ids)] = torch.tensor(ids)
        mask[j, :len(ids)] = 1
    with torch.no_grad():
        out = pm(input_ids=input_ids, attention_mask=mask, adapter_names=[a for a, _ in rows], use_cache=False)
    meta = []
    for j, (a, ids) in enumerate(rows):
        got = out.logits[j, :len(ids)].float().clone()
        with torch.no_grad():
            ref_model = base_f32 if a == BASE else solo[a]
            want = ref_model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
        d = rel_diff(got, want)
        assert d <= MIXED_REL_TOL, (model_name, j, a, d)
        tensors[f"mixed.row{j}.ids"] = np.asarray(ids, dtype=np.int32)
        tensors[f"mixed.row{j}.logits_f32"] = np.ascontiguousarray(got.numpy().astype(np.float32))
        meta.append({"row": j, "adapter": a, "length": len(ids), "ids": ids, "max_rel_diff_vs_solo": d})
    return {
        "how": "PeftModel.from_pretrained + load_adapter of every adapters/<name> folder, one forward over "
               "the right-padded batch with attention_mask and adapter_names=[row adapters], use_cache False; "
               "logits kept only at real token positions (positions 0..len-1 of each row)",
        "padding_side": "right",
        "pad_id": PAD_ID,
        "batch_shape": [len(rows), width],
        "adapter_names": [a for a, _ in rows],
        "solo_check": f"each row's logits equal a solo forward of that row alone (its adapter's PeftModel, "
                      f"or the base model for {BASE}) within {MIXED_REL_TOL} * max|logit|",
        "rows": meta,
    }


# --- validation -----------------------------------------------------------------------------------

def validate_model(model_index, model_name):
    d = os.path.join(mf.OUT_DIR, model_name)
    with open(os.path.join(d, "expected_lora.json")) as f:
        summary = json.load(f)
    hdr = mf.validate_safetensors(os.path.join(d, "expected_lora.safetensors"))
    loaded = safetensors.numpy.load_file(os.path.join(d, "expected_lora.safetensors"))
    vocab = summary["tensors"][f"{ADAPTERS[0]}.prompt0.logits_f32"]["shape"][1]
    n = 0
    for adapter in ADAPTERS:
        a_dir = os.path.join(d, "adapters", adapter)
        assert sorted(os.listdir(a_dir)) == ["adapter_config.json", "adapter_model.safetensors"], a_dir
        mf.validate_safetensors(os.path.join(a_dir, "adapter_model.safetensors"))
        for i, length in enumerate(summary["prompt_lengths"]):
            p = f"{adapter}.prompt{i}"
            exp = {
                f"{p}.ids": ("I32", [length]),
                f"{p}.logits_f32": ("F32", [length, vocab]),
                f"{p}.greedy_f32": ("I32", [mf.NEW_TOKENS]),
                f"{p}.logits_bf16": ("F32", [length, vocab]),
                f"{p}.greedy_bf16": ("I32", [mf.NEW_TOKENS]),
            }
            for k, (dt, shape) in exp.items():
                assert hdr[k]["dtype"] == dt and hdr[k]["shape"] == shape, (model_name, k, hdr[k])
            n += len(exp)
    for j, row in enumerate(summary["mixed_batch"]["rows"]):
        assert hdr[f"mixed.row{j}.ids"]["shape"] == [row["length"]]
        assert hdr[f"mixed.row{j}.logits_f32"]["shape"] == [row["length"], vocab]
        n += 2
    assert len([k for k in hdr if k != "__metadata__"]) == n

    # Round trip: the saved adapters, loaded the way a user would, reproduce the outputs.
    pm = load_all_adapters(model_index, model_name, os.path.join(d, "adapters"))
    pm_b = load_all_adapters(model_index, model_name, os.path.join(d, "adapters"))
    with torch.no_grad():
        for name, p in pm_b.named_parameters():
            if (name.endswith(".weight") and p.dim() == 2) or "lora_embedding_" in name:
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    for adapter in ADAPTERS:
        pm.set_adapter(adapter)
        pm_b.set_adapter(adapter)
        for i in range(len(summary["prompt_lengths"])):
            p = f"{adapter}.prompt{i}"
            ids = [int(x) for x in loaded[f"{p}.ids"]]
            for tag, m in (("f32", pm), ("bf16", pm_b)):
                logits, greedy, _ = mf.run_prompt(m, ids)
                want = loaded[f"{p}.logits_{tag}"]
                diff = float(np.abs(logits.numpy() - want).max())
                assert diff <= 1e-5 * float(np.abs(want).max()), (model_name, p, tag, diff)
                assert greedy == [int(x) for x in loaded[f"{p}.greedy_{tag}"]], (model_name, p, tag)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only validate existing fixtures")
    ap.add_argument("--only", nargs="*", help="model names to (re)generate; default all")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)

    names = args.only or list(mf.MODELS)
    for name in names:
        if name not in mf.MODELS:
            sys.exit(f"unknown model {name}; known: {', '.join(mf.MODELS)}")
    index = {name: i for i, name in enumerate(mf.MODELS)}
    if not args.check:
        for name in names:
            s = make_model_fixtures(index[name], name)
            for a, m in s["adapters"].items():
                print(f"{name}/{a}: {len(m['wrapped_modules'])} modules, min margin "
                      f"{min(p['min_margin_rel'] for p in m['prompts']):.2e}, effect "
                      f"{[round(p['max_abs_diff_vs_base_over_max_abs_base_logit'], 3) for p in m['prompts']]}, "
                      f"rejected {[p['draws_rejected'] for p in m['prompts']]}, merge rel "
                      f"{m['merge_check']['max_rel_diff']:.1e}")
                print("    wrapped: " + ", ".join(
                    f"{w['module'].replace('model.layers.', 'L')} ({w['kind']} r={w['r']} alpha={w['alpha']} "
                    f"scale={w['scale']:g})" for w in m["wrapped_modules"]))
            print(f"{name}/mixed: max rel diff vs solo "
                  f"{max(r['max_rel_diff_vs_solo'] for r in s['mixed_batch']['rows']):.1e}")
    total = 0
    for name in names:
        validate_model(index[name], name)
        d = os.path.join(mf.OUT_DIR, name)
        size = sum(os.path.getsize(os.path.join(d, f)) for f in ("expected_lora.safetensors", "expected_lora.json"))
        for root, _, files in os.walk(os.path.join(d, "adapters")):
            size += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        total += size
        print(f"ok {name}: {size} bytes (LoRA files)")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
