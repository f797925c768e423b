"""The demo model's synthetic data and tasks: the base corpus, the four adapter tasks, and the
checker that grades an answer. Pure Python (no torch): the end-to-end tests import it too.

A task prompt is "<task>: <items> =>" and its answer " <items>" (then EOS):
  upper    words -> the same words in capitals          "upper: cat red sun =>"  " CAT RED SUN"
  reverse  words -> the same words in reverse order     "reverse: cat red sun =>" " sun red cat"
  sort     numbers 0..99 -> ascending order             "sort: 42 7 19 =>"       " 7 19 42"
  next     numbers 0..98 -> each plus one               "next: 42 7 19 =>"       " 43 8 20"
Each has 1 to 6 items.
"""
import random

TASKS = ("upper", "reverse", "sort", "next")
MAX_ITEMS = 6
MAX_NEW_TOKENS = 16
EVAL_SEED = 7919

NOUNS = ("cat dog sun moon tree bird fish king queen ship road lake hill star rain snow wind "
         "door book cup hat box car bus map pen key bell ring coin drum rose leaf stone cloud "
         "river horse mouse apple bread milk tea fox owl bee frog").split()
ADJECTIVES = "red blue green old new big small warm cold fast slow dark bright quiet happy sad".split()
VERBS = "sees likes finds holds makes takes meets wants reads draws helps calls".split()
WORDS = NOUNS + ADJECTIVES


def _items(task, rng):
    n = rng.randint(1, MAX_ITEMS)
    if task in ("upper", "reverse"):
        return [rng.choice(WORDS) for _ in range(n)]
    top = 99 if task == "sort" else 98
    return [str(rng.randint(0, top)) for _ in range(n)]


def answer(task, items):
    if task == "upper":
        return [w.upper() for w in items]
    if task == "reverse":
        return list(reversed(items))
    if task == "sort":
        return sorted(items, key=int)
    if task == "next":
        return [str(int(x) + 1) for x in items]
    raise ValueError(f"unknown task {task!r}")


def prompt_of(task, items):
    return f"{task}: {' '.join(items)} =>"


def make(task, rng):
    """One (prompt, answer) training pair; the answer starts with a space."""
    items = _items(task, rng)
    return prompt_of(task, items), " " + " ".join(answer(task, items))


def eval_cases(task, n):
    """The fixed evaluation prompts of a task (the same for the training script and the tests)."""
    rng = random.Random(f"{EVAL_SEED}-{task}")
    return [make(task, rng) for _ in range(n)]


def parse_prompt(prompt):
    task, rest = prompt.split(":", 1)
    items = rest.strip()
    if not items.endswith("=>"):
        raise ValueError(f"not a task prompt: {prompt!r}")
    return task.strip(), items[:-2].split()


def check(task, prompt, text):
    """True when `text` (the generated continuation, special tokens skipped) is the answer."""
    parsed_task, items = parse_prompt(prompt)
    if parsed_task != task:
        raise ValueError(f"prompt {prompt!r} is not a {task} prompt")
    return text.split() == answer(task, items) and text.startswith(" ")


def base_corpus(rng, n):
    """Lines the base model learns from: simple sentences, word lists (also in capitals) and
    counting, so it knows every token the tasks use but none of the tasks."""
    lines = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.45:
            lines.append(f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
                         f"the {rng.choice(NOUNS)}.")
        elif kind < 0.6:
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, MAX_ITEMS))]
            lines.append(f"words: {' '.join(words)}.")
        elif kind < 0.72:
            words = [rng.choice(WORDS).upper() for _ in range(rng.randint(1, MAX_ITEMS))]
            lines.append(f"WORDS: {' '.join(words)}.")
        elif kind < 0.88:
            start = rng.randint(0, 94)
            lines.append(f"count: {' '.join(str(i) for i in range(start, start + rng.randint(2, 6)))}.")
        else:
            nums = [str(rng.randint(0, 99)) for _ in range(rng.randint(1, MAX_ITEMS))]
            lines.append(f"numbers: {' '.join(nums)}.")
    return lines


def vocabulary_text():
    """Extra tokenizer-training text: every word, capital and number, and the task prompts'
    shape, so each is one or few tokens. Only the tokenizer sees this."""
    rng = random.Random(EVAL_SEED)
    lines = [" ".join(WORDS), " ".join(w.upper() for w in WORDS), " ".join(str(i) for i in range(100))]
    for task in TASKS:
        lines += [make(task, rng)[0] for _ in range(200)]
    return lines * 20


def write_model_card(out, n_params, vocab, results, minutes, total_bytes, n_eval):
    rows = "\n".join(
        f"| `{task}` | {r['r']} | {r['lora_alpha']} | "
        f"{r['target_modules'] if isinstance(r['target_modules'], str) else ', '.join(r['target_modules'])} | "
        f"{'yes' if r['use_rslora'] else 'no'} | {r['adapter_accuracy']:.1%} | {r['base_accuracy']:.1%} |"
        for task, r in results.items())
    card = f"""# loraserve demo model

A small Llama-architecture causal language model and four LoRA adapters, trained from scratch by
`tools/train_demo.py` on synthetic data that script generates. It is the model `loraserve` serves
when started without `--model`; it exists to show adapters changing a model's behaviour, not to
be useful as a language model.

- **Architecture**: `LlamaForCausalLM`, {n_params / 1e6:.2f} M parameters, 4 layers, hidden 256,
  8 query heads sharing 2 KV heads (GQA), tied input/output embeddings, fp32 weights.
- **Tokenizer**: byte-level BPE, {vocab} tokens, trained on the same data.
- **Data**: generated by `tools/demo_tasks.py`: simple sentences from a small grammar ("the red
  cat sees the moon."), word lists (also in capitals), counting sequences and number lists. No
  external text. The base model never sees a task prompt.
- **Licence**: the same as loraserve's; the data is synthetic, so nothing else applies.
- **Training**: {minutes:.0f} minutes on 2 CPU cores (seeded; `training.json` has the settings).
- **Size on disk**: {total_bytes / 1e6:.1f} MB for everything in this folder.

## Tasks and adapters

A prompt is `<task>: <items> =>`; the answer is the transformed items, then EOS. Accuracy is
greedy decoding on {n_eval} fixed prompts per task (`demo_tasks.eval_cases`), graded by
`demo_tasks.check`, measured with Hugging Face transformers + PEFT when the adapters were trained.

| adapter | rank | alpha | target modules | rsLoRA | accuracy | base model |
|---|---|---|---|---|---|---|
{rows}

Try it: `loractl generate --adapter reverse "reverse: cat red sun =>"`.
"""
    with open(f"{out}/README.md", "w", encoding="utf-8") as f:
        f.write(card)
