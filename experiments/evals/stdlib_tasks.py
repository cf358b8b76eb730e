"""Two local lm-evaluation-harness tasks built from the held-out part of the default corpus
(this Python's standard library): what `jaxlm eval --tasks` runs offline on the default job.

- `stdlib_cloze` (multiple choice, accuracy): ~200 bytes of code, then which identifier comes
  next: the true one or three others from earlier in the same file (chance: 0.25).
- `stdlib_line` (generation, exact match): the first half of a line; generate the rest of it
  (until the newline).

Only files the default job holds out for validation (the same content hash as the data pipeline)
are used, so no item was trained on. Writes `<out>/stdlib_cloze.{yaml,jsonl}` and
`<out>/stdlib_line.{yaml,jsonl}`; deterministic for a given Python.

    python experiments/evals/stdlib_tasks.py --out evals/   # then:
    jaxlm eval --workdir runs/default --tasks evals/stdlib_cloze.yaml,evals/stdlib_line.yaml
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from jaxlm.data.sources import _hash, stdlib_files
from jaxlm.evals.harness import write_task

IDENT = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{3,}\b")
CONTEXT = 200  # bytes of code before the blank (cut back to a line start)


def held_out(percent: float = 5.0) -> list[tuple[Path, str]]:
    """(path, text) of the standard-library files the default job keeps for validation."""
    out = []
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if text and _hash(text) < percent / 100:
            out.append((path, text))
    return out


def _context(text: str, at: int) -> str:
    start = max(at - CONTEXT, 0)
    line = text.find("\n", start, at)  # begin at the first whole line
    return text[line + 1 if line >= 0 else start : at]


def cloze_items(files: list[tuple[Path, str]], n: int, rng: random.Random) -> list[dict]:
    items = []
    for _, text in files:
        seen: list[str] = []
        for m in IDENT.finditer(text):
            word = m.group()
            others = sorted(set(seen) - {word})
            if m.start() > CONTEXT and word in seen and len(others) >= 3 and text.isascii():
                context = _context(text, m.start())
                if context.strip():
                    choices = [word, *rng.sample(others, 3)]
                    rng.shuffle(choices)
                    items.append(
                        {"context": context, "choices": choices, "answer": choices.index(word)}
                    )
            if word not in seen:
                seen.append(word)
    rng.shuffle(items)
    return items[:n]


def line_items(files: list[tuple[Path, str]], n: int, rng: random.Random) -> list[dict]:
    items = []
    for _, text in files:
        if not text.isascii():
            continue
        at = 0
        for line in text.splitlines(keepends=True):
            body = line.rstrip("\n")
            if at > CONTEXT and len(body.strip()) >= 16 and line.endswith("\n"):
                half = len(body) - len(body.lstrip()) + len(body.strip()) // 2
                items.append({"context": _context(text, at + half), "rest": body[half:]})
            at += len(line)
    rng.shuffle(items)
    return items[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--items", type=int, default=300, help="documents per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = held_out()
    rng = random.Random(args.seed)
    cloze = write_task(
        out,
        "stdlib_cloze",
        cloze_items(files, args.items, rng),
        output_type="multiple_choice",
        doc_to_text="{{context}}",
        doc_to_choice="{{choices}}",
        doc_to_target="{{answer}}",
        target_delimiter="",
        metric_list=[{"metric": "acc"}],
    )
    line = write_task(
        out,
        "stdlib_line",
        line_items(files, args.items, rng),
        output_type="generate_until",
        doc_to_text="{{context}}",
        doc_to_target="{{rest}}",
        target_delimiter="",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 64, "do_sample": False},
        metric_list=[{"metric": "exact_match"}],
    )
    print(json.dumps({"files": len(files), "tasks": [str(cloze), str(line)]}))


if __name__ == "__main__":
    main()
