"""Tests of engine.data.chat against transformers' own `apply_chat_template` on the same folders.

Tiny byte-level BPE tokenizers are trained in memory (no downloads), given the special tokens of
ChatML (Qwen) or Llama 3, saved with transformers' `save_pretrained` together with a chat template
written out below (Qwen2.5's, a variant of it with `{% generation %}` markers, a Llama 3.1/3.2 one,
a Qwen3 one), then reloaded by both sides.
"""

from __future__ import annotations

import json
import pickle
import random

import pytest

from engine.data.chat import (
    ChatTemplate,
    ConversationError,
    encode_conversation,
    load_chat_template,
    special_tokens,
)
from engine.data.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# ------------------------------------------------------------------ templates

QWEN2 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# The same rendering, with the assistant content, tool calls and <|im_end|> inside {% generation %}.
_QWEN2_LOOP_START = QWEN2.index("{%- for message in messages %}")
_QWEN2_TOOL_BRANCH = QWEN2.index('    {%- elif message.role == "tool" %}')
QWEN2_MARKED = QWEN2[:_QWEN2_LOOP_START] + r"""{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {%- if message.content %}
                {{- message.content }}
                {%- if message.tool_calls %}
                    {{- '\n' }}
                {%- endif %}
            {%- endif %}
            {%- for tool_call in message.tool_calls %}
                {%- if not loop.first %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {{- tool_call.arguments | tojson }}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
            {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
""" + QWEN2[_QWEN2_TOOL_BRANCH:]

LLAMA3 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

# ------------------------------------------------------------------ conversations

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
WEATHER_CALL = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]

SIMPLE = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]
MULTI_TURN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello there!"},
    {"role": "assistant", "content": "Hello! How can I help you today?"},
    {"role": "user", "content": "Tell me a fact about the moon."},
    {"role": "assistant", "content": "The moon has no air, and its day lasts about a month."},
]
TOOL_USE = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": WEATHER_CALL},
    {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}'},
    {"role": "assistant", "content": "It is 21 degrees and clear in Paris."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome.", "tool_calls": None},
]
TOOL_CALL_WITH_TEXT = [
    {"role": "user", "content": "Weather in Paris please."},
    {"role": "assistant", "content": "Let me check.", "tool_calls": WEATHER_CALL},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."},
]
CONVERSATIONS = {"simple": SIMPLE, "multi_turn": MULTI_TURN, "tool_use": TOOL_USE,
                 "tool_call_with_text": TOOL_CALL_WITH_TEXT}
# What the targets of each conversation decode to, turn by turn, with a ChatML template.
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CHATML_TARGETS = {
    "simple": ["The capital of France is Paris.<|im_end|>"],
    "multi_turn": ["Hello! How can I help you today?<|im_end|>",
                   "The moon has no air, and its day lasts about a month.<|im_end|>"],
    "tool_use": [CALL_TEXT + "<|im_end|>", "It is 21 degrees and clear in Paris.<|im_end|>",
                 "You are welcome.<|im_end|>"],
    "tool_call_with_text": ["Let me check.\n" + CALL_TEXT + "<|im_end|>", "It is sunny.<|im_end|>"],
}
LLAMA_TARGETS = {
    "simple": ["The capital of France is Paris.<|eot_id|>"],
    "multi_turn": ["Hello! How can I help you today?<|eot_id|>",
                   "The moon has no air, and its day lasts about a month.<|eot_id|>"],
    "tool_use": ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                 "It is 21 degrees and clear in Paris.<|eot_id|>", "You are welcome.<|eot_id|>"],
}
THINKING = [
    {"role": "user", "content": "Is Paris in France?"},
    {"role": "assistant", "content": "<think>\nParis is the capital of France.\n</think>\n\nYes, it is."},
    {"role": "user", "content": "And Rome?"},
    {"role": "assistant", "content": "Rome is in Italy.", "reasoning_content": "Rome is the capital of Italy."},
]
THINKING_TARGETS = ["Yes, it is.<|im_end|>",
                    "<think>\nRome is the capital of Italy.\n</think>\n\nRome is in Italy.<|im_end|>"]
THINKING_TOOLS = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "I need the weather tool.", "tool_calls": WEATHER_CALL},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny in Paris."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "<think>\nPolite.\n</think>\n\nYou are welcome."},
]
THINKING_TOOLS_TARGETS = [CALL_TEXT + "<|im_end|>", "It is sunny in Paris.<|im_end|>",
                          "<think>\nPolite.\n</think>\n\nYou are welcome.<|im_end|>"]
# The last assistant turn (after the last user message) always gets a think block, empty or not.
QWEN3_MULTI_TURN_TARGETS = ["Hello! How can I help you today?<|im_end|>",
                            "<think>\n\n</think>\n\nThe moon has no air, and its day lasts about a month.<|im_end|>"]

# ------------------------------------------------------------------ tokenizers

_WORD_TEXT = ("the a is in of and to you it what how capital France Paris Rome Italy moon air day month weather "
          "city sunny clear degrees hello there help today fact tell me please thanks welcome check let need "
          "tool think polite yes no system user assistant function name arguments parameters type string "
          "object properties required description cutting knowledge date environment given following respond "
          "format json call prompt variables")
_WORDS = _WORD_TEXT.split()


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(400):
        words = rng.choices(_WORDS, k=rng.randint(4, 12))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":", '{"x": 1}', "\n"]))
    return lines


CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
PLAIN_ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>"]  # added, not special (as in Qwen)


def _save(folder, specials, template, **roles):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_tokens(PLAIN_ADDED)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **roles)
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    chatml = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    llama = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    return {
        "qwen2": _save(root / "qwen2", CHATML_SPECIALS, QWEN2, **chatml),
        "qwen2_marked": _save(root / "qwen2_marked", CHATML_SPECIALS, QWEN2_MARKED, **chatml),
        "llama3": _save(root / "llama3", LLAMA_SPECIALS, LLAMA3, **llama),
        "qwen3": _save(root / "qwen3", CHATML_SPECIALS, QWEN3, **chatml),
    }


_loaded: dict = {}


def _ours(folder):
    if folder not in _loaded:
        _loaded[folder] = (load_tokenizer(folder), ChatTemplate.from_folder(folder),
                           transformers.AutoTokenizer.from_pretrained(str(folder)))
    return _loaded[folder]


def _hf_ids(hf, messages, tools=None):
    out = hf.apply_chat_template(messages, tools=tools, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _target_runs(tokenizer, ids, mask) -> list[str]:
    """The text of each run of consecutive target tokens, special tokens spelled out."""
    runs, run = [], []
    for token, target in zip(ids, mask, strict=True):
        if target:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tokenizer._tok.decode(r, skip_special_tokens=False) for r in runs]


# ------------------------------------------------------------------ equality with transformers

@pytest.mark.parametrize("name", ["qwen2", "qwen2_marked", "llama3", "qwen3"])
@pytest.mark.parametrize("conversation", ["simple", "multi_turn", "tool_use", "tool_call_with_text", "thinking",
                                          "thinking_tools"])
def test_ids_equal_transformers(folders, name, conversation):
    messages = {**CONVERSATIONS, "thinking": THINKING, "thinking_tools": THINKING_TOOLS}[conversation]
    tokenizer, template, hf = _ours(folders[name])
    for tools in (None, TOOLS):
        ids, mask = encode_conversation(tokenizer, template, messages, tools=tools)
        assert ids == _hf_ids(hf, messages, tools), (name, conversation, tools)
        assert len(mask) == len(ids) and any(mask)
        text, _ = template.render(messages, tools)
        assert text == hf.apply_chat_template(messages, tools=tools, tokenize=False)
        prompt, _ = template.render(messages[:-1], tools, add_generation_prompt=True)
        assert prompt == hf.apply_chat_template(messages[:-1], tools=tools, add_generation_prompt=True, tokenize=False)
    ids, mask = encode_conversation(tokenizer, template, messages, train_on="all")
    assert all(mask) and len(mask) == len(ids)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_marked_mask_equals_transformers_and_unmarked_rule(folders, conversation):
    messages = CONVERSATIONS[conversation]
    tokenizer, marked, hf = _ours(folders["qwen2_marked"])
    _, plain, _ = _ours(folders["qwen2"])
    for tools in (None, TOOLS):
        ids, mask = encode_conversation(tokenizer, marked, messages, tools=tools)
        out = hf.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert ids == list(out["input_ids"])
        assert [int(m) for m in mask] == list(out["assistant_masks"])
        # Both templates render the same text, so the turn-by-turn rule must give the same mask.
        text, spans = marked.render(messages, tools)
        assert plain.render(messages, tools)[0] == text
        assert encode_conversation(tokenizer, plain, messages, tools=tools) == (ids, mask)
        assert [text[a:b] for a, b in spans] == CHATML_TARGETS[conversation]
    assert _target_runs(tokenizer, ids, mask) == CHATML_TARGETS[conversation]


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_unmarked_targets_are_assistant_turns(folders, conversation):
    messages = CONVERSATIONS[conversation]
    tokenizer, template, _ = _ours(folders["qwen2"])
    ids, mask = encode_conversation(tokenizer, template, messages)
    assert _target_runs(tokenizer, ids, mask) == CHATML_TARGETS[conversation]
    if conversation in LLAMA_TARGETS:
        tokenizer, template, _ = _ours(folders["llama3"])
        ids, mask = encode_conversation(tokenizer, template, messages)
        assert _target_runs(tokenizer, ids, mask) == LLAMA_TARGETS[conversation]
        assert template.end_of_turn == "<|eot_id|>"


@pytest.mark.parametrize("messages, targets", [(THINKING, THINKING_TARGETS), (THINKING_TOOLS, THINKING_TOOLS_TARGETS),
                                               (MULTI_TURN, QWEN3_MULTI_TURN_TARGETS)])
def test_rewriting_template_targets_each_turn_as_rendered(folders, messages, targets):
    tokenizer, template, hf = _ours(folders["qwen3"])
    ids, mask = encode_conversation(tokenizer, template, messages)
    assert ids == _hf_ids(hf, messages)
    assert _target_runs(tokenizer, ids, mask) == targets
    text, _ = template.render(messages)
    if messages is THINKING:
        assert "Paris is the capital" not in text  # the earlier turn's reasoning really is dropped


def test_template_rewriting_content_beyond_recognition_is_an_error(folders):
    hiding = QWEN2.replace("+ message.content + '<|im_end|>' + '\\n' }}",
                           "+ (message.content if loop.last or message.role != 'assistant' else 'hidden')"
                           " + '<|im_end|>' + '\\n' }}")
    assert hiding != QWEN2
    tokenizer, template, _ = _ours(folders["qwen2"])
    with pytest.raises(ConversationError) as e:
        encode_conversation(tokenizer, ChatTemplate(hiding, template.special), MULTI_TURN)
    assert e.value.reason == "template" and "message 2" in str(e.value)


# ------------------------------------------------------------------ loading

# How transformers 4 wrote a special token into tokenizer_config.json (transformers 5 wants "__type").
OLD_STYLE_EOS = {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
                 "rstrip": False, "single_word": False, "special": True}


def test_load_chat_template_forms(folders, tmp_path):
    folder = folders["qwen2"]
    assert (folder / "chat_template.jinja").is_file()
    assert load_chat_template(folder) == QWEN2
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert special_tokens(folder) == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    for form in (QWEN2, [{"name": "tool_use", "template": "x"}, {"name": "default", "template": QWEN2}]):
        copy = tmp_path / ("list" if isinstance(form, list) else "string")
        copy.mkdir()
        (copy / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
        (copy / "tokenizer_config.json").write_text(json.dumps({
            **config, "chat_template": form, "eos_token": OLD_STYLE_EOS}))
        assert load_chat_template(copy) == QWEN2
        assert special_tokens(copy)["eos_token"] == "<|im_end|>"
        hf = transformers.AutoTokenizer.from_pretrained(str(copy))
        assert encode_conversation(load_tokenizer(copy), ChatTemplate.from_folder(copy), SIMPLE)[0] == \
            _hf_ids(hf, SIMPLE)
    (tmp_path / "none").mkdir()
    assert load_chat_template(tmp_path / "none") is None and special_tokens(tmp_path / "none") == {}


def test_special_tokens_reach_the_template(folders):
    tokenizer, template, _ = _ours(folders["llama3"])
    assert template.special["bos_token"] == "<|begin_of_text|>"
    text, _ = template.render(SIMPLE)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system")
    assert encode_conversation(tokenizer, template, SIMPLE)[0][0] == tokenizer._tok.token_to_id("<|begin_of_text|>")


def test_text_parts_and_sandbox(folders):
    tokenizer, template, hf = _ours(folders["qwen3"])  # Qwen3 renders list content as ''
    parts = [SIMPLE[0], {"role": "assistant", "content": [{"type": "text", "text": "Paris."}]}]
    assert encode_conversation(tokenizer, template, parts, train_on="all")[0] == _hf_ids(hf, parts)
    rendered, _ = ChatTemplate("{{ {'b': '<é>'} | tojson }}{{ strftime_now('%Y') | length }}").render([])
    assert rendered == '{"b": "<é>"}4'
    with pytest.raises(ConversationError) as e:
        ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}").render([])
    assert e.value.reason == "template"


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("messages, reason, where", [
    ([], "no_messages", "non-empty list"),
    ("hello", "no_messages", "non-empty list"),
    ([SIMPLE[0], "hi"], "no_messages", "non-empty list"),
    ([{"role": "robot", "content": "hi"}] + SIMPLE, "unknown_role", "message 0"),
    ([SIMPLE[0], {"role": "assistant", "content": 7}], "bad_content", "message 1"),
    ([SIMPLE[0], {"role": "assistant", "content": [{"type": "image"}]}], "media_without_part", "message 1"),
    ([SIMPLE[0], {"role": "assistant", "content": [{"type": "table"}]}], "bad_content", "message 1"),
    ([{"role": "user"}, SIMPLE[1]], "bad_content", "message 0"),
    ([SIMPLE[0], {"role": "assistant", "content": "  "}], "empty_assistant", "message 1"),
    ([SIMPLE[0], {"role": "assistant", "content": None}], "empty_assistant", "message 1"),
    ([SIMPLE[0]], "no_target", "train_on='all'"),
    ([SIMPLE[0], {"role": "assistant", "content": "", "tool_calls": WEATHER_CALL * 2}], "template",
     "single tool-calls"),
])
def test_conversation_errors(folders, messages, reason, where):
    tokenizer, template, _ = _ours(folders["llama3"])
    with pytest.raises(ConversationError) as e:
        encode_conversation(tokenizer, template, messages)
    assert e.value.reason == reason
    assert where in str(e.value) and "\n" not in str(e.value)
    copy = pickle.loads(pickle.dumps(e.value))
    assert (copy.reason, str(copy)) == (reason, str(e.value))


def test_bad_template_and_train_on(folders):
    with pytest.raises(ConversationError) as e:
        ChatTemplate("{% if %}")
    assert e.value.reason == "template" and "\n" not in str(e.value)
    tokenizer, template, _ = _ours(folders["qwen2"])
    with pytest.raises(ValueError, match="train_on"):
        encode_conversation(tokenizer, template, SIMPLE, train_on="user")
    assert encode_conversation(tokenizer, template, [SIMPLE[0]], train_on="all")[1] != []
