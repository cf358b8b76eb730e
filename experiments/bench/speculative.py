"""Speculative decoding: acceptance and speed-up against plain `generate`, on trained models.

Trains (once; reused from `--workdir`) two byte-level models on the default corpus (the Python
standard library's source): a target of `decode.py`'s GPT-2-style shape (d_model 256, 4 layers,
MLP 1024) and the `tiny` preset as its draft (d_model 64, 2 layers: about 30x fewer non-embedding
parameters). Then, for batch 1 and greedy decoding of `--new` tokens after 8 prompts cut from
held-out stdlib files, it times, interleaved (median of `--repeats` rounds):

  (a) `sample.generate` with the target alone;
  (b) `generate_speculative` with the draft model, k = 4;
  (c) `generate_speculative` with prompt lookup (n-gram), k = 4.

All three must give the same tokens. Prints one JSON object as its last line: tokens/s of each,
acceptance rates, tokens per target forward, and the speed-ups b/a and c/a.

    python experiments/bench/speculative.py [--steps 300] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from jaxlm import checkpoint, sample
from jaxlm.run import load_for_eval
from jaxlm.speculative import Draft, generate_speculative

TARGET = ["--config", "tiny", "--set", "model.d_model=256", "--set", "model.num_layers=4",
          "--set", "model.mlp_dim=1024", "--set", "model.max_seq_len=256"]  # fmt: skip
DRAFT = ["--config", "tiny", "--set", "model.max_seq_len=256"]


def _train(workdir: Path, model: list[str], steps: int) -> None:
    if checkpoint.complete_steps(workdir):
        return
    cmd = [sys.executable, "-m", "jaxlm", "train", *model, "--workdir", str(workdir),
           "--set", f"train.steps={steps}", "--set", "train.sample_tokens=0",
           "--set", "train.eval_every=100000", "--set", "data.seq_len=256"]  # fmt: skip
    subprocess.run(cmd, check=True)


def _prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """Cuts of `length` bytes from stdlib files (the model trained on this kind of text)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[::-1][:n]
    out = []
    for f in files:
        text = f.read_text(errors="replace")
        start = len(text) // 2
        out.append([tokenizer.bos_id, *tokenizer.encode(text[start : start + length])])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--workdir", default="/tmp/jaxlm-bench-speculative")
    args = parser.parse_args()
    root = Path(args.workdir)
    _train(root / "target", TARGET, args.steps)
    _train(root / "draft", DRAFT, args.steps)
    cfg, _, params, tok = load_for_eval(root / "target")
    dcfg, _, dparams, _ = load_for_eval(root / "draft")
    config, draft = cfg.model, Draft(dcfg.model, dparams)
    prompts = _prompts(tok, 8, 96)

    def plain(p):
        return sample.generate(config, params, [p], args.new), None

    def with_draft(p):
        r = generate_speculative(config, params, [p], args.new, draft=draft, k=args.k)
        return r.tokens, r

    def lookup(p):
        r = generate_speculative(config, params, [p], args.new, draft="ngram", k=args.k)
        return r.tokens, r

    runs = {"generate": plain, "draft_model": with_draft, "prompt_lookup": lookup}
    for fn in runs.values():  # compile
        fn(prompts[0])
    times = {name: [] for name in runs}
    stats = {name: [] for name in runs if name != "generate"}
    for _ in range(args.repeats):
        outs = {}
        for name, fn in runs.items():
            start = time.perf_counter()
            results = [fn(p) for p in prompts]
            times[name].append(time.perf_counter() - start)
            outs[name] = [r[0] for r in results]
            if name in stats:
                stats[name] += [(r[1].acceptance, r[1].tokens_per_round) for r in results]
        assert outs["draft_model"] == outs["generate"] == outs["prompt_lookup"]
        print(json.dumps({k: round(v[-1], 3) for k, v in times.items()}), flush=True)
    tokens = len(prompts) * args.new
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    result = {
        "new_tokens": args.new,
        "k": args.k,
        "tokens_per_s": tps,
        "acceptance": {n: statistics.mean(a for a, _ in s) for n, s in stats.items()},
        "tokens_per_target_forward": {
            n: statistics.mean(t for _, t in s) for n, s in stats.items()
        },
        "speedup_draft_model": tps["draft_model"] / tps["generate"],
        "speedup_prompt_lookup": tps["prompt_lookup"] / tps["generate"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
