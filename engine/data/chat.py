"""Chat conversations rendered with the tokenizer's own chat template, exactly as Hugging Face
transformers renders them, and which of their tokens are training targets.

`ChatTemplate` compiles a template in the jinja2 environment transformers uses for chat
templates (`transformers.utils.chat_template_utils`): an ``ImmutableSandboxedEnvironment`` with
``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a ``{% generation %}`` tag that records the
character spans of the assistant text inside it, transformers' ``tojson`` (``json.dumps``, no
HTML escaping), the ``raise_exception`` and ``strftime_now`` globals, and its restricted ``dict``
and ``namespace``. Messages are prepared as ``apply_chat_template`` prepares them: keys whose value
is None are dropped, and a message's reasoning (``reasoning_content``, ``thinking`` or
``reasoning``) is given under both ``reasoning_content`` and ``thinking``. The template sees the
special tokens of ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ...) as globals, and
``documents=None``. `encode_conversation` tokenises the rendered text with special tokens parsed
and none added, so its ids equal ``tokenizer.apply_chat_template(messages, tokenize=True)``.

Content is text: a string, or a list of ``{"type": "text", "text": ...}`` parts, which is passed to
the template unchanged, as transformers passes it (templates that iterate over parts render them;
a template that does not renders the list's Python repr, in transformers too).

Which tokens are targets (``train_on="assistant"``); a token is a target when its character offsets
overlap a target span, the rule of transformers' ``return_assistant_tokens_mask``:

- A template with ``{% generation %}`` markers: the spans it marks, so the mask equals transformers'
  ``assistant_masks``.
- A template without markers, turn by turn: for assistant message i, with
  ``before = render(messages[:i], add_generation_prompt=True)`` and ``upto = render(messages[:i+1])``,
  when ``before`` is a prefix of ``upto`` and ``upto`` a prefix of the full rendering, the span is
  ``upto[len(before):]`` without trailing whitespace: the content (tool calls included) and the
  end-of-turn text the template writes after it (``<|im_end|>``, Llama 3's ``<|eot_id|>``), not
  the newline that follows.
- Templates that rewrite earlier turns once later ones exist (Qwen3 drops the reasoning of
  assistant turns before the last user message), where ``upto`` is no prefix of the full text: the
  span starts where the generation prompt ends when ``before`` is still a prefix of the full text,
  else where the assistant's content is first found at or after the previous span's end (the
  content as given, stripped, or its part after ``</think>``), and it ends after the first
  end-of-turn text that follows. The end-of-turn text is learnt once per template from a probe
  conversation (the text after the content of ``[user, assistant]`` with the assistant turn last).
  Each assistant message is matched on its own, so a conversation can mix both rules. When the span
  cannot be found, or does not hold the content, `ConversationError` ("template") is raised.
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.data.errors import DataError
from engine.data.tokenizer import TokenizerError

__all__ = ["ROLES", "ChatTemplate", "ConversationError", "encode_conversation", "load_chat_template",
           "special_tokens"]

ROLES = ("system", "user", "assistant", "tool")
MEDIA_TYPES = ("image", "video", "audio")  # content parts read by a model part (engine/data/conversation_media.py)
TRAIN_ON = ("assistant", "all")
# The names transformers passes to the template (`SPECIAL_TOKENS_ATTRIBUTES`), when the tokenizer has them.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # how transformers spots marker templates
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_PROBE_USER, _PROBE_ANSWER = "Zq7 probe question", "Zq7 probe answer"


class ConversationError(DataError):
    """A conversation that cannot become training tokens. `reason` is a short key for skip counters:
    no_messages, unknown_role, bad_content, empty_assistant, no_target or template."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keeps both arguments across pickling (data-loader workers)
        return type(self), (self.reason, str(self))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}): restore the file transformers saved") from None
    return data if isinstance(data, dict) else {}


def load_chat_template(folder: str | Path) -> str | None:
    """The chat template of a transformers-saved tokenizer folder: ``chat_template.jinja`` (what
    transformers 5 writes) if present, else ``tokenizer_config.json``'s ``chat_template`` (a string,
    or a list of ``{name, template}`` of which the one named "default" is taken). None without one."""
    folder = Path(folder)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def special_tokens(folder: str | Path) -> dict[str, str]:
    """The special-token strings transformers passes to a chat template (``bos_token``,
    ``eos_token``, ``unk_token``, ``pad_token``, ... that the tokenizer has), from
    ``tokenizer_config.json``, else the legacy ``special_tokens_map.json``. A value may be a string
    or a dict with "content"."""
    folder = Path(folder)
    config, legacy = _read_json(folder / "tokenizer_config.json"), _read_json(folder / "special_tokens_map.json")
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name) if config.get(name) is not None else legacy.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


class _Tracker:
    """Output length so far and the generation spans of the render in progress."""

    def __init__(self):
        self.length = 0
        self.spans: list[tuple[int, int]] = []


_tracker: ContextVar[_Tracker | None] = ContextVar("chat_generation_tracker", default=None)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body unchanged and records the
    character span of that body in the output (the output streamed so far gives its start)."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generated", []), [], [], body).set_lineno(lineno)

    def _generated(self, caller) -> str:
        text = caller()
        tracker = _tracker.get()
        if tracker is not None:
            tracker.spans.append((tracker.length, tracker.length + len(text)))
        return text


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: plain json.dumps, without jinja's HTML escaping
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` without the type itself (no attribute tricks)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja's ``namespace`` that refuses underscore-prefixed attributes, as transformers' does."""

    def __init__(*args, **kwargs):  # jinja's own signature trick, so that namespace(self=...) works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


class ChatTemplate:
    """A chat template compiled as transformers compiles it, with the tokenizer's special tokens."""

    def __init__(self, template: str, special: dict[str, str] | None = None):
        self.source = template
        self.special = dict(special or {})
        self.has_generation_markers = bool(_GENERATION_TAG.search(template))
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                           namespace=_Namespace)
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateError as e:
            raise ConversationError("template", f"the chat template does not compile ({_one_line(e)}): fix "
                                                "chat_template.jinja or tokenizer_config.json's chat_template"
                                    ) from None

    @classmethod
    def from_folder(cls, folder: str | Path) -> ChatTemplate:
        """The template and special tokens of a transformers-saved tokenizer folder."""
        template = load_chat_template(folder)
        if template is None:
            raise TokenizerError(f"{folder} has no chat template (chat_template.jinja or tokenizer_config.json's "
                                 "chat_template): use the tokenizer of an instruct/chat model")
        return cls(template, special_tokens(folder))

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text, equal to transformers' ``apply_chat_template(messages, tools=tools,
        add_generation_prompt=..., tokenize=False)``, and the character spans of its
        ``{% generation %}`` blocks (empty for templates without them). Raises `ConversationError`
        ("template") when the template fails."""
        tracker, blocks = _Tracker(), []
        token = _tracker.set(tracker)
        messages = [_normalized(m) for m in messages]
        try:
            for block in self._template.generate(messages=messages, tools=tools, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **self.special):
                blocks.append(block)
                tracker.length += len(block)
        except Exception as e:  # noqa: BLE001 - raise_exception, undefined values, type errors in the template
            raise ConversationError("template", f"the chat template fails on this conversation ({_one_line(e)}): "
                                                "fix the messages to suit the template, or skip them") from None
        finally:
            _tracker.reset(token)
        return "".join(blocks), tracker.spans

    def _try_render(self, messages, tools, add_generation_prompt) -> str | None:
        try:
            return self.render(messages, tools, add_generation_prompt)[0]
        except ConversationError:
            return None

    @cached_property
    def end_of_turn(self) -> str | None:
        """The text the template writes after an assistant message's content (``<|im_end|>``,
        ``<|eot_id|>``), from a probe [user, assistant] conversation; None when that cannot be told."""
        user = {"role": "user", "content": _PROBE_USER}
        before = self._try_render([user], None, True)
        upto = self._try_render([user, {"role": "assistant", "content": _PROBE_ANSWER}], None, False)
        if before is None or upto is None or not upto.startswith(before):
            return None
        turn = upto[len(before):].rstrip()
        at = turn.rfind(_PROBE_ANSWER)
        if at < 0:
            return None
        return turn[at + len(_PROBE_ANSWER):] or None


def _text(content) -> str | None:
    """The text of a message's content (a string, or a list of text and media parts); None if it is
    neither."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and (p.get("type") in MEDIA_TYPES or (
            p.get("type") == "text" and isinstance(p.get("text"), str))) for p in content):
        return "".join(p["text"] for p in content if p["type"] == "text")
    return None


def _has_media(content) -> bool:
    return isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in MEDIA_TYPES for p in content)


def _normalized(message):
    """A message as ``apply_chat_template`` hands it to the template: keys valued None dropped, the
    reasoning under both ``reasoning_content`` and ``thinking``."""
    if not isinstance(message, dict):
        return message
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _prepared(messages, train_on: str, media: bool = False) -> list[dict]:
    """Checked and normalized messages."""
    if not isinstance(messages, (list, tuple)) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ConversationError("no_messages", "a conversation must be a non-empty list of message dicts, got "
                                               f"{type(messages).__name__}: give messages=[{{'role': ..., "
                                               "'content': ...}, ...]")
    prepared = []
    for i, message in enumerate(messages):
        message = _normalized(message)
        role = message.get("role")
        if role not in ROLES:
            raise ConversationError("unknown_role", f"message {i} has role {role!r}: use one of {', '.join(ROLES)}")
        text = _text(message.get("content"))
        if text is None and not (role == "assistant" and "content" not in message):
            raise ConversationError("bad_content", f"message {i} ({role}) has content of type "
                                                   f"{type(message.get('content')).__name__}: give a string, or a "
                                                   "list of {'type': 'text', 'text': ...} and media parts")
        if not media and _has_media(message.get("content")):
            kinds = sorted({p["type"] for p in message["content"] if isinstance(p, dict) and p.get("type") in MEDIA_TYPES})
            raise ConversationError("media_without_part", f"message {i} ({role}) holds {'/'.join(kinds)} parts but "
                                                          "the model has no part to read them: add a vision / audio "
                                                          "encoder to model.encoders, or drop the media")
        if role == "assistant" and not (text or "").strip() and not message.get("tool_calls"):
            raise ConversationError("empty_assistant", f"message {i} (assistant) has empty content and no "
                                                       "tool_calls: fill it in or drop the turn")
        prepared.append(message)
    if train_on == "assistant" and not any(m["role"] == "assistant" for m in prepared):
        raise ConversationError("no_target", "the conversation has no assistant message to train on: add one, "
                                             "or set train_on='all'")
    return prepared


def _content_variants(message: dict) -> list[str]:
    """How an assistant's content may appear in a rendering: as given, stripped, after ``</think>``."""
    text = _text(message.get("content")) or ""
    variants = []
    for variant in (text, text.strip(), text.rsplit("</think>", 1)[-1].strip()):
        if variant and variant not in variants:
            variants.append(variant)
    return variants


def _assistant_spans(template: ChatTemplate, messages: list[dict], tools, full: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in ``full`` for a template without generation markers
    (the rules are in the module docstring)."""
    spans: list[tuple[int, int]] = []
    previous_end = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template._try_render(messages[:i], tools, True) if i else None
        upto = template._try_render(messages[:i + 1], tools, False)
        if before is not None and upto is not None and upto.startswith(before) and full.startswith(upto) \
                and len(before) >= previous_end:
            start, end = len(before), len(upto.rstrip())
        else:
            start, end = _located_turn(template, message, i, full, before, previous_end)
        if end <= start:
            raise ConversationError("template", f"message {i} (assistant) renders to no text with this chat "
                                                "template: check its content, or skip the conversation")
        spans.append((start, end))
        previous_end = end
    return spans


def _located_turn(template: ChatTemplate, message: dict, i: int, full: str, before: str | None,
                  previous_end: int) -> tuple[int, int]:
    """The span of assistant message ``i`` in a rendering that rewrites earlier turns."""
    def fail(why: str) -> ConversationError:
        return ConversationError("template", f"message {i} (assistant): {why}, so its target tokens cannot be found; "
                                             "use train_on='all' or a template with {% generation %} markers")

    variants = _content_variants(message)
    if before is not None and full.startswith(before) and len(before) >= previous_end:
        start = search_from = len(before)
    else:
        found = [(full.find(v, previous_end), v) for v in variants]
        at, variant = next(((at, v) for at, v in found if at >= 0), (-1, ""))
        if at < 0:
            raise fail("its content is not in the chat template's rendering")
        start, search_from = at, at + len(variant)
    end_of_turn = template.end_of_turn
    if end_of_turn is None:
        raise fail("the chat template's end-of-turn text cannot be told")
    at = full.find(end_of_turn, search_from)
    if at < 0:
        raise fail(f"no {end_of_turn!r} follows it in the rendering")
    end = at + len(end_of_turn)
    if variants and not any(v in full[start:end] for v in variants):
        raise fail("its content is not in the chat template's rendering of its turn")
    return start, end


def _overlap_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """True for tokens whose offsets overlap a span; one pass, as transformers' assistant mask."""
    mask = [False] * len(offsets)
    span = 0
    for i, (token_start, token_end) in enumerate(offsets):
        while span < len(spans) and token_start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if token_end > spans[span][0]:
            mask[i] = True
    return mask


def encode_conversation(tokenizer, template: ChatTemplate, messages: list[dict], train_on: str = "assistant",
                        tools: list[dict] | None = None, *, media: bool = False, encode=None,
                        add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation rendered with `template` (equal to transformers'
    ``apply_chat_template(messages, tools=tools, tokenize=True)``) and, per token, whether it is
    a training target: every token for ``train_on="all"``, else the assistant turns' tokens (rules
    in the module docstring). `tokenizer` needs ``encode_with_offsets`` (a `JsonTokenizer` from
    `load_tokenizer`, which parses special tokens spelled in the text). Raises `ConversationError`.

    `media`: media content parts are allowed (engine/data/conversation_media.py expands them);
    `encode`: text -> (ids, offsets) in place of the tokenizer's; `add_generation_prompt`: end
    with the assistant's header (a prompt to generate from; use train_on="all")."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}: use one of {', '.join(TRAIN_ON)}")
    encode = encode or getattr(tokenizer, "encode_with_offsets", None)
    if encode is None:
        raise TokenizerError(f"{tokenizer!r} gives no token offsets: chat data needs a tokenizer.json tokenizer "
                             "(the folder transformers saved)")
    messages = _prepared(messages, train_on, media)
    text, spans = template.render(messages, tools, add_generation_prompt)
    ids, offsets = encode(text)
    if train_on == "all":
        return list(ids), [True] * len(ids)
    if not template.has_generation_markers:
        spans = _assistant_spans(template, messages, tools, text)
    mask = _overlap_mask(offsets, spans)
    if not any(mask):
        raise ConversationError("no_target", "no token of the conversation is an assistant target with this chat "
                                             "template: check its {% generation %} blocks, or skip the conversation")
    return list(ids), mask
