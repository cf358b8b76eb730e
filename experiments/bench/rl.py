"""Online RL on a checkable task: the reward and KL curves of GRPO and PPO on the tiny model.

The task (built here, offline): a prompt is one letter of "abcde" and the right reply is the
next letter (cyclic), checked by a Python reward function. The starting policy is a tiny model
fine-tuned (SFT) on replies that mostly echo the prompt's letter, so it is right about 8% of the
time when sampling and never greedily. Each RL run starts from it with LoRA adapters (the
reference is the model without them) and reports, as one JSON object on its last line:
the greedy reward on held-out prompts every `--eval-every` steps, the per-step mean sampled
reward, KL to the reference, clip fraction, entropy and reply length, and seconds per step
(rollout + `task.ppo_epochs` updates, compile excluded).

    python experiments/bench/rl.py [--steps 100] [--kinds grpo,ppo]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from jaxlm import loop
from jaxlm.configs.overrides import load_config
from jaxlm.run import RunPlan, check_init_source, state_from_source

LETTERS = "abcde"
REWARD = """
def next_letter(replies, records):
    return [float(r.strip() == rec["answer"]) for r, rec in zip(replies, records)]
"""
COMMON = ["task.chat_template=raw", "data.seq_len=48", "train.sample_tokens=0"]


def write_data(root: Path) -> None:
    r = random.Random(0)
    with open(root / "sft.jsonl", "w") as f:
        for i in range(600):
            x = r.choice(LETTERS)
            reply = x if r.random() < 0.6 else r.choice(LETTERS)
            f.write(json.dumps({"id": i, "prompt": x, "completion": reply}) + "\n")
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(1000):
            x = r.choice(LETTERS)
            answer = LETTERS[(LETTERS.index(x) + 1) % 5]
            f.write(json.dumps({"id": i, "prompt": x, "answer": answer}) + "\n")
    (root / "reward.py").write_text(REWARD)


def rl_overrides(root: Path, kind: str, steps: int, eval_every: int) -> list[str]:
    return [
        *COMMON,
        f"task.kind={kind}",
        f"data.dataset={root / 'prompts.jsonl'}",
        f"task.reward={root / 'reward.py'}:next_letter",
        "task.max_new_tokens=4",
        "task.group_size=8",
        "task.kl_coef=0.01",
        "data.batch_size=32",
        "model.lora.rank=8",
        "model.lora.alpha=32",
        "model.lora.targets=query,value,out,up,down",
        f"train.steps={steps}",
        f"train.eval_every={eval_every}",
        "train.eval_batches=2",
        "train.log_every=10",
        "optim.learning_rate=3e-3",
        "optim.warmup_steps=2",
        "checkpoint.every=100000",
        f"train.init_from={root / 'sft'}",
        *(["model.value_head=true"] if kind == "ppo" else []),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--kinds", default="grpo,ppo")
    args = parser.parse_args()
    out: dict = {"task": "reply with the letter after the prompt's (abcde, cyclic)"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_data(root)
        sft = load_config(
            "tiny",
            [
                *COMMON,
                "task.kind=sft",
                f"data.dataset={root / 'sft.jsonl'}",
                "data.batch_size=16",
                "train.steps=150",
                "train.eval_every=100000",
                "train.eval_batches=1",
                "train.log_every=50",
                "optim.learning_rate=1e-2",
                "optim.warmup_steps=10",
                "checkpoint.every=100000",
            ],
        )
        start = time.perf_counter()
        loop.train(sft, root / "sft")
        out["sft_sec"] = round(time.perf_counter() - start, 1)
        for kind in args.kinds.split(","):
            config = load_config("tiny", rl_overrides(root, kind, args.steps, args.eval_every))
            plan = RunPlan(config)
            params = state_from_source(plan, check_init_source(plan, root / "sft")).params
            before = loop.evaluate(plan, params)["eval_reward"]
            result = loop.train(config, root / kind)
            history = result["history"]
            evals = [[0, before]]
            for line in (root / kind / "metrics.jsonl").read_text().splitlines():
                record = json.loads(line)
                if "eval_reward" in record:
                    evals.append([record["step"], round(record["eval_reward"], 3)])
            timed = [h for h in history if "tokens_per_sec" in h]
            sec = [
                config.data.batch_size * config.data.seq_len / h["tokens_per_sec"] for h in timed
            ]
            out[kind] = {
                "eval_reward_greedy": evals,
                "sec_per_step": round(sum(sec) / max(len(sec), 1), 4),
                "first_step_sec": round(history[0]["first_step_sec"], 1),
                **{
                    f"{name}_curve": [round(h[name], 3) for h in history]
                    for name in ("reward", "kl", "clip_fraction", "entropy", "response_length")
                },
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
