"""Reading and validating JSONL rows against the manifest's row and tag schemas."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from verifily_train import jsonsafe
from verifily_train.errors import DataError

DEFAULT_ROW_SCHEMA = {
    "sft": ["instruction", "input", "output"],
    "classification": ["text", "label"],
}
# Fields of a row schema that a row may leave out (spec §4.1: `input` is optional).
OPTIONAL_FIELDS = {"input"}
# An SFT row may instead hold a conversation (TRL's and Axolotl's conversational format): the manifest's
# row_schema then names this field, and the instruction fields are not required of such a row.
MESSAGES_FIELD = "messages"
CONVERSATION_SCHEMA = [MESSAGES_FIELD]
INSTRUCTION_FIELDS = ("instruction", "input", "output")
# The SFT row formats (TRL's dataset formats, docs/datasets.md): a row holds the fields of exactly one.
# prompt/completion: the completion is supervised after the prompt as written (no template); text: continued
# pre-training, every token supervised.
SFT_INSTRUCTION, SFT_CONVERSATION, SFT_PROMPT_COMPLETION, SFT_TEXT = "instruction", "conversation", "prompt_completion", "text"
SFT_FORMAT_FIELDS = {
    SFT_INSTRUCTION: INSTRUCTION_FIELDS,
    SFT_CONVERSATION: (MESSAGES_FIELD,),
    SFT_PROMPT_COMPLETION: ("prompt", "completion"),
    SFT_TEXT: ("text",),
}
SFT_REQUIRED = {SFT_INSTRUCTION: ("instruction", "output"), SFT_CONVERSATION: (MESSAGES_FIELD,),
                SFT_PROMPT_COMPLETION: ("prompt", "completion"), SFT_TEXT: ("text",)}
ROLES = ("system", "user", "assistant")
# The longest row (one JSONL line) accepted: tokenizing text costs ~130 bytes of memory per byte, and a
# row this long is far past any max_seq_length (2,048 tokens is ~10 KB of text). Longer lines are refused
# while being read, without reading the rest of them.
MAX_ROW_BYTES = 4 * 1024 * 1024
# The most turns a conversation may hold: each assistant turn's span is found by rendering the conversation up
# to it (a template may render a last turn differently, so a prefix is rendered as a conversation of its own),
# so rendering a row grows with the square of its turns (~0.5 s at 256); tokenizing is linear (model/chat.py).
MAX_TURNS = 256
# What a turn may hold: anything else (tool_calls, images, a per-turn weight) would be dropped without a word.
TURN_KEYS = ("role", "content")


def iter_jsonl(path: Path, display: Optional[str] = None) -> Iterator[Tuple[int, dict]]:
    """Yield (line number, row) for each non-blank line; malformed lines raise ``DataError``."""
    display = display or str(path)
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise DataError(display, None, f"cannot read: {err.strerror or err}") from None
    with handle:
        for lineno, raw in enumerate(iter(lambda: handle.readline(MAX_ROW_BYTES + 1), b""), start=1):
            if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
                raise DataError(f"{display}:{lineno}", None, f"row is longer than {MAX_ROW_BYTES // 2 ** 20} MiB, the "
                                                             "most a row may hold (docs/reliability.md)")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{display}:{lineno}", None, f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not text.strip():
                continue
            try:
                row = jsonsafe.loads(text, allow_nan=False)  # NaN / Infinity: not JSON, never stored
            except jsonsafe.BadJson as err:
                raise DataError(f"{display}:{lineno}", err.key, err.problem) from None
            if not isinstance(row, dict):
                raise DataError(f"{display}:{lineno}", None, f"each line must be a JSON object, got {type(row).__name__}")
            yield lineno, row


def copy_jsonl(source: Path, dest: Path, display: Optional[str] = None) -> None:
    """Copy a JSONL split line by line, each line bounded by ``MAX_ROW_BYTES``: ``/dev/zero`` or a file of one
    endless line is refused after 4 MiB, not copied into the store until the disk is full. The rows are
    validated from ``dest`` afterwards."""
    display = display or str(source)
    try:
        reader = open(source, "rb")
    except OSError as err:
        raise DataError(display, None, f"cannot read: {err.strerror or err}") from None
    with reader, open(dest, "wb") as writer:
        for lineno, raw in enumerate(iter(lambda: reader.readline(MAX_ROW_BYTES + 1), b""), start=1):
            if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
                raise DataError(f"{display}:{lineno}", None, f"row is longer than {MAX_ROW_BYTES // 2 ** 20} MiB, the "
                                                             "most a row may hold (docs/reliability.md)")
            writer.write(raw)


def validate_row(
    row: dict,
    task: str,
    row_schema: Dict[str, List[str]],
    tag_schema: Dict[str, dict],
    where: str,
) -> None:
    """Check one row's fields and tags; raises ``DataError`` naming file:line and field."""
    fields = list(row_schema.get(task) or DEFAULT_ROW_SCHEMA[task])
    kind = sft_format(row, where) if task == "sft" else None
    if kind == SFT_CONVERSATION:
        validate_messages(row[MESSAGES_FIELD], where)
    elif task == "sft" and MESSAGES_FIELD in fields:
        raise DataError(where, MESSAGES_FIELD, "missing required field: the manifest's row_schema says rows are conversations")
    if kind is not None:
        said = next((k for k in (SFT_PROMPT_COMPLETION, SFT_TEXT) if SFT_REQUIRED[k][0] in fields), None)
        if said is not None and kind != said:
            raise DataError(where, SFT_REQUIRED[said][0], f"missing required field: the manifest's row_schema says rows "
                                                          f"are {' / '.join(SFT_REQUIRED[said])} rows")
        if kind in (SFT_PROMPT_COMPLETION, SFT_TEXT) and row.get("system") is not None:
            raise DataError(where, "system", f"applies to instruction and messages rows; a {' / '.join(SFT_REQUIRED[kind])} "
                                             "row is trained on as written")
        # the row's own format's fields, and any other field the schema names (a platform's extras)
        format_fields = {f for names in SFT_FORMAT_FIELDS.values() for f in names}
        own = () if kind == SFT_CONVERSATION else SFT_FORMAT_FIELDS[kind]
        fields = list(own) + [name for name in fields if name not in format_fields]
    for name in fields:
        if name not in row or row[name] is None:
            if name in OPTIONAL_FIELDS:
                continue
            raise DataError(where, name, f"missing required field for task {task}")
        value = row[name]
        if task == "classification" and name == "label":
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise DataError(where, name, f"must be a string or integer label, got {type(value).__name__}")
            if isinstance(value, str) and not value.strip():
                raise DataError(where, name, "must not be empty")
        elif not isinstance(value, str):
            raise DataError(where, name, f"must be a string, got {type(value).__name__}")
    if kind in (SFT_INSTRUCTION, SFT_PROMPT_COMPLETION, SFT_TEXT):
        answer = {SFT_INSTRUCTION: "output", SFT_PROMPT_COMPLETION: "completion", SFT_TEXT: "text"}[kind]
        if not str(row.get(answer, "")).strip():
            raise DataError(where, answer, "must not be empty")
    if task == "sft" and row.get("system") is not None and not isinstance(row["system"], str):
        raise DataError(where, "system", f"must be a string, got {type(row['system']).__name__}")
    if task == "classification" and not str(row.get("text", "")).strip():
        raise DataError(where, "text", "must not be empty")
    tags = row.get("tags")
    if tags is None:
        return
    if not isinstance(tags, dict):
        raise DataError(where, "tags", f"must be an object of tag key -> value, got {type(tags).__name__}")
    for key, value in tags.items():
        if not isinstance(value, (str, int, float, bool)) or value is None:
            raise DataError(where, f"tags.{key}", f"must be a scalar value, got {type(value).__name__}")
        spec = tag_schema.get(key) if tag_schema else None
        if tag_schema and spec is None:
            raise DataError(where, f"tags.{key}", f"tag key not declared in the manifest's tag_schema ({', '.join(sorted(tag_schema))})")
        if spec and spec.get("type", "categorical") == "categorical" and "values" in spec:
            if str(value) not in [str(v) for v in spec["values"]]:
                raise DataError(where, f"tags.{key}", f"value {value!r} is not one of the tag_schema values {spec['values']}")


def sft_format(row: dict, where: str) -> str:
    """Which SFT format a row is in (instruction, conversation, prompt_completion, text), from the fields it holds;
    a row holding the fields of two formats is an error (one would be trained on, the other silently ignored)."""
    held = [kind for kind, names in SFT_FORMAT_FIELDS.items() if any(row.get(n) is not None for n in names)]
    if len(held) > 1:
        if set(held[:2]) == {SFT_INSTRUCTION, SFT_CONVERSATION}:
            field = next(n for n in ("instruction", "output", "input") if row.get(n) is not None)
            raise DataError(where, field, "a row holds either messages or instruction/output, not both")
        first, second = (next(n for n in SFT_FORMAT_FIELDS[k] if row.get(n) is not None) for k in held[:2])
        raise DataError(where, second, f"a row holds one format ({' / '.join(SFT_REQUIRED[held[0]])} or "
                                       f"{' / '.join(SFT_REQUIRED[held[1]])}), not both: it has {first} and {second} "
                                       "(map your own field names with data_paths.columns or dataset create --columns)")
    return held[0] if held else SFT_INSTRUCTION


def shown_fields(row: dict, limit: int = 400) -> Dict[str, str]:
    """What a reader needs to see of an SFT row besides its reference: its own fields (instruction and input; the
    last user turn of a conversation; the prompt; the start of a text), never the rendered template."""
    kind = sft_format(row, "")
    if kind == SFT_CONVERSATION:
        user = [t["content"] for t in row[MESSAGES_FIELD] if t.get("role") == "user"]
        fields = {"user": user[-1] if user else ""}
    elif kind == SFT_PROMPT_COMPLETION:
        fields = {"prompt": row.get("prompt") or ""}
    elif kind == SFT_TEXT:
        fields = {"text": row.get("text") or ""}
    else:
        fields = {"instruction": row.get("instruction") or ""}
        if str(row.get("input") or "").strip():
            fields["input"] = row["input"]
    return {k: (str(v) if len(str(v)) <= limit else str(v)[:limit] + "...") for k, v in fields.items()}


def is_conversation(row: dict) -> bool:
    """An SFT row in the conversational format (``messages``) rather than instruction/input/output."""
    return row.get(MESSAGES_FIELD) is not None


def validate_messages(messages, where: str) -> None:
    """A conversation: role/content turns, an optional leading system turn, ending with an assistant reply."""
    if not isinstance(messages, list) or not messages:
        raise DataError(where, MESSAGES_FIELD, "must be a non-empty list of {\"role\", \"content\"} turns")
    if len(messages) > MAX_TURNS:
        raise DataError(where, MESSAGES_FIELD, f"has {len(messages):,} turns; at most {MAX_TURNS} are accepted "
                                               "(split the conversation into several rows)")
    for i, turn in enumerate(messages):
        key = f"{MESSAGES_FIELD}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(where, key, f"must be an object with role and content, got {type(turn).__name__}")
        extra = [k for k in turn if k not in TURN_KEYS]
        if extra:
            raise DataError(where, f"{key}.{extra[0]}", "is not supported: a turn holds role and content only "
                                                        "(tool calls, images and per-turn weights are not trained on)")
        role = turn.get("role")
        if role not in ROLES:
            raise DataError(where, f"{key}.role", f"must be one of {', '.join(ROLES)}; got {role!r}")
        if not isinstance(turn.get("content"), str):
            raise DataError(where, f"{key}.content", f"must be a string, got {type(turn.get('content')).__name__}")
        if role == "system" and i != 0:
            raise DataError(where, f"{key}.role", "a system turn may only come first")
    roles = [turn["role"] for turn in messages]
    if "user" not in roles:
        raise DataError(where, MESSAGES_FIELD, "has no user turn")
    first = 1 if roles[0] == "system" else 0
    if roles[first] != "user":
        raise DataError(where, f"{MESSAGES_FIELD}[{first}].role", "a conversation opens with the user's turn (after an "
                                                                  f"optional system turn); got {roles[first]!r}")
    last = len(messages) - 1
    if roles[-1] != "assistant":
        raise DataError(where, f"{MESSAGES_FIELD}[{last}].role", "the last turn must be the assistant's reply (what is trained and evaluated)")
    if not messages[-1]["content"].strip():
        raise DataError(where, f"{MESSAGES_FIELD}[{last}].content", "must not be empty")


def tag_text(value) -> str:
    """A tag value as slices, derivations and targets compare it: its text in Unicode NFC, so the composed and
    decomposed spellings of one value (``é`` as one code point or as ``e`` and an accent) are one value."""
    return unicodedata.normalize("NFC", str(value))


def label_of(row: dict) -> str:
    """Labels are compared as strings, so 1 and "1" are one class."""
    return str(row["label"])
