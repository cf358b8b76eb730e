"""`task.kind=sft`: supervised fine-tuning on chat data (JSONL `messages` or `prompt` +
`completion`), rendered with a chat template, the loss on assistant tokens only by default."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from jaxlm.data import open_source
from jaxlm.data.chat import Template, conversation, encode_chat, get_template, stop_ids
from jaxlm.data.sft import build_chat_dataset, chat_stats
from jaxlm.data.sources import RECORD_KEY
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.sample import generate
from jaxlm.tasks.lm import LMTask

if TYPE_CHECKING:
    from jaxlm.configs.run import RunConfig


class SFTTask(LMTask):
    """The LM loss over the trained-on targets of packed conversations (the batch keys are the
    LM task's; `mask` marks assistant tokens), so every LM metric and eval applies."""

    kind = "sft"

    def template(self, tokenizer: Tokenizer) -> Template:
        return get_template(self.config.task.chat_template, tokenizer)

    def check(self, tokenizer: Tokenizer) -> None:
        """Every record of both splits renders; some token is trained on; says how many
        conversations were truncated or dropped."""
        super().check(tokenizer)
        data, task = self.config.data, self.config.task
        template = self.template(tokenizer)
        for split in (data.train_split, data.eval_split):
            source = open_source(data.dataset, split, data_dir=data.data_dir, text_key=RECORD_KEY)
            stats = chat_stats(source, tokenizer, template, data.seq_len, task.train_on_prompt)
            if split == data.train_split and stats.trained_tokens == 0:
                raise ValueError(
                    f"{source!r} has no trainable token at all ({stats.summary(data.seq_len)}); "
                    "raise data.seq_len or check the assistant turns"
                )
            if jax.process_index() == 0:
                print(f"sft {split}: {stats.summary(data.seq_len)}", file=sys.stderr)

    def records(self, tokenizer: Tokenizer) -> tuple[str | None, Callable[..., Any] | None]:
        """Whole records, rendered and packed by the chat pipeline."""
        build = functools.partial(
            build_chat_dataset,
            template=self.template(tokenizer),
            train_on_prompt=self.config.task.train_on_prompt,
            prefix=self.config.model.prefix_lm,
        )
        return RECORD_KEY, build

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        spec = super().batch_spec()
        if self.config.model.prefix_lm:  # the first prompts, read bidirectionally
            b, t = self.config.data.batch_size, self.config.data.seq_len
            spec["prefix"] = ((b, t), jnp.bool_)
        return spec


def chat_prompt(
    messages: Sequence[dict[str, str]], tokenizer: Tokenizer, template: Template
) -> list[int]:
    """The token ids of `messages` rendered with the generation prompt (the assistant's turn)."""
    chat = conversation({"messages": list(messages)}, "chat", need_reply=False)
    return encode_chat(chat, tokenizer, template, add_generation_prompt=True)[0]


def generate_replies(
    config: RunConfig,
    params: Any,
    tokenizer: Tokenizer,
    chats: Sequence[Sequence[dict[str, str]]],
    max_new_tokens: int = 64,
    **kwargs: Any,
) -> list[str]:
    """The assistant's next reply to each chat (greedy unless `kwargs` give a `chain`), rendered
    with the run's chat template and stopped at the end of the turn; `kwargs` go to `generate`
    (call inside `use_mesh` for sharded parameters)."""
    template = get_template(config.task.chat_template, tokenizer)
    stops = stop_ids(template, tokenizer)
    prompts = [chat_prompt(chat, tokenizer, template) for chat in chats]
    budget = [min(max_new_tokens, config.model.max_seq_len - len(p)) for p in prompts]
    if min(budget) < 1:
        raise ValueError(
            f"a chat prompt of {max(map(len, prompts))} tokens leaves no room in "
            f"model.max_seq_len={config.model.max_seq_len}"
        )
    outs = generate(
        config.model, params, prompts, budget, stop_tokens=stops, pad_id=tokenizer.pad_id, **kwargs
    )
    return [tokenizer.decode([i for i in out if i not in stops]) for out in outs]
