"""Chat templates and assistant masks against transformers' `apply_chat_template`, and clear
errors for bad conversations."""

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxlm.data import ByteTokenizer, load_tokenizer
from jaxlm.data.chat import conversation, encode_chat, get_template, stop_ids

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3 style: a BOS string from the config, headers, trimmed content, <|eot_id|>.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = [
    "<pad>",
    "<|begin_of_text|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I reverse a list?"},
        {"role": "assistant", "content": "Use reversed(x)."},
        {"role": "user", "content": "Another way?"},
        {"role": "assistant", "content": "x[::-1] works too. Héllo ✓"},
    ],
    [
        {"role": "user", "content": "add 2 and 3"},
        {"role": "assistant", "content": "5"},
    ],
]


def _hf_tokenizer(tmp_path, template, eos):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = " ".join(m["content"] for c in CONVERSATIONS for m in c)
    tok.train_from_iterator([text] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=template,
        bos_token="<|begin_of_text|>",
        eos_token=eos,
        pad_token="<pad>",
    )
    fast.save_pretrained(tmp_path)
    return fast, load_tokenizer(tmp_path)


@pytest.mark.parametrize(("template", "eos"), [(CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>")])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_token_ids_and_assistant_mask_equal_transformers(tmp_path, template, eos, index):
    fast, ours = _hf_tokenizer(tmp_path, template, eos)
    messages = CONVERSATIONS[index]
    ref = fast.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    chat = get_template("auto", ours)  # the tokenizer's own template, from its files
    assert chat.name == "tokenizer"
    ids, mask = encode_chat(messages, ours, chat)
    assert ids == ref["input_ids"]
    assert [int(m) for m in mask] == ref["assistant_masks"]
    assert sum(mask) > 0
    prompt = fast.apply_chat_template(
        messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=True
    )
    assert (
        encode_chat(messages[:-1], ours, chat, add_generation_prompt=True)[0]
        == (prompt["input_ids"])
    )
    assert fast.convert_tokens_to_ids(eos) in stop_ids(chat, ours)


def test_builtin_chatml_renders_as_the_chatml_jinja_template(tmp_path):
    fast, ours = _hf_tokenizer(tmp_path, CHATML, "<|im_end|>")
    for messages in CONVERSATIONS:
        ref = fast.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = encode_chat(messages, ours, get_template("chatml", ours))
        assert ids == ref["input_ids"] and [int(m) for m in mask] == ref["assistant_masks"]


def test_plain_template_for_bytes_trains_on_replies_and_eos():
    tok = ByteTokenizer()
    messages = CONVERSATIONS[0]
    ids, mask = encode_chat(messages, tok, get_template("auto", tok))
    text = "".join(
        f"### {m['role'].capitalize()}:\n{m['content']}"
        + ("" if m["role"] == "assistant" else "\n\n")
        + ("" if m["role"] != "assistant" else "\x00\n\n")
        for m in messages
    )
    # A naive rendering: the EOS id stands where the reference has a NUL byte.
    want = [tok.eos_id if b == 0 else b + 3 for b in text.encode()]
    assert ids == want
    trained = bytes(i - 3 for i, m in zip(ids, mask, strict=True) if m and i != tok.eos_id)
    assert trained.decode() == "".join(m["content"] for m in messages if m["role"] == "assistant")
    assert sum(1 for i, m in zip(ids, mask, strict=True) if m and i == tok.eos_id) == 2
    assert stop_ids(get_template("plain", tok), tok) == [tok.eos_id]


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"messages": [{"content": "hi"}]}, "message 0 needs 'role' and 'content'"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
            "message 1: empty assistant turn",
        ),
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
        ({"text": "hello"}, "expected 'messages' or 'prompt' \\+ 'completion'"),
        ("{not json", "chat.jsonl:3:1:2: not valid JSON"),
    ],
)
def test_bad_conversations_are_named(record, match):
    with pytest.raises(ValueError, match=match):
        conversation(record, "chat.jsonl:3")
    with pytest.raises(ValueError, match=r"chat\.jsonl:3"):
        conversation(record, "chat.jsonl:3")


def test_prompt_completion_records_are_one_turn():
    assert conversation({"prompt": "a", "completion": "b"}) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]


def test_a_failing_or_broken_template_is_a_clear_error(tmp_path):
    bad = "{{ raise_exception('only user and assistant roles') }}"
    _, ours = _hf_tokenizer(tmp_path, bad, "<|im_end|>")
    with pytest.raises(ValueError, match=r"chat template failed.*only user and assistant"):
        encode_chat(CONVERSATIONS[1], ours, get_template("tokenizer", ours))
    ours.chat_template = "{% for %}"
    with pytest.raises(ValueError, match="chat template does not parse"):
        get_template("tokenizer", ours)
    with pytest.raises(ValueError, match="unknown chat template 'chatgpt'"):
        get_template("chatgpt", ours)
    with pytest.raises(ValueError, match="has no chat_template"):
        get_template("tokenizer", ByteTokenizer())


def test_templates_pickle_for_grain_worker_processes(tmp_path):
    import pickle

    _, ours = _hf_tokenizer(tmp_path, LLAMA3, "<|eot_id|>")
    for template in (get_template("tokenizer", ours), get_template("plain", ByteTokenizer())):
        copy = pickle.loads(pickle.dumps(template))
        tok = ours if template.name == "tokenizer" else ByteTokenizer()
        assert encode_chat(CONVERSATIONS[0], tok, copy) == encode_chat(
            CONVERSATIONS[0], tok, template
        )
    assert pickle.loads(pickle.dumps(ours)).encode("x[::-1]") == ours.encode("x[::-1]")
