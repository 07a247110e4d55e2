"""Generate docs/config.md from the schema's fields and their trailing comments, so docs can't drift."""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import tokenize as pytokenize
import re
from typing import Dict, List

from omegaconf import MISSING

from verifily_train.config import schema
from verifily_train.config.load import section_type

_FIELD_LINE = re.compile(r"^\s+(\w+):")

HEADER = """# train.yaml reference

Generated from `verifily_train/config/schema.py` by `python -m verifily_train.config.docs`;
`tests/test_config_docs.py` fails when this file and the schema differ. Do not edit by hand.

Relative paths (`data_paths.*`, a `dataset_version` that is a manifest path, `eval.gold_set`) are
resolved against the folder holding train.yaml. Any key can be overridden on the command line in
dotted form: `verifily train -c train.yaml training.num_epochs=1 lora.r=8`.

`config_hash` is the SHA-256 of the canonical JSON (sorted keys, numbers parsed, so `2e-4` and
`0.0002` are the same) of the resolved config without these keys, which cannot change the trained
weights or the metrics: {unhashed}.
"""


def _comments(cls: type) -> Dict[str, str]:
    """Each field's trailing comment, found by Python's tokenizer: a ``#`` inside a default string is no comment."""
    out: Dict[str, str] = {}
    field_at: Dict[int, str] = {}
    for line_no, line in enumerate(inspect.getsource(cls).splitlines(), start=1):
        match = _FIELD_LINE.match(line)
        if match:
            field_at[line_no] = match.group(1)
            out[match.group(1)] = ""
    source = io.StringIO(inspect.getsource(cls)).readline
    for token in pytokenize.generate_tokens(source):
        if token.type == pytokenize.COMMENT and token.start[0] in field_at:
            out[field_at[token.start[0]]] = token.string.lstrip("#").strip()
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    if value is MISSING or value == "???":
        return "required"
    return "`" + json.dumps(value) + "`"


def _rows(cls: type, prefix: str, sections: List[tuple]) -> List[str]:
    rows = []
    notes = _comments(cls)
    for f in dataclasses.fields(cls):
        sub = section_type(cls, f.name)
        if sub is not None:
            sections.append((prefix + f.name, sub, notes.get(f.name, "")))
            continue
        text = notes.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | {_default(f)} | {text} |")
    return rows


def render() -> str:
    """The full markdown text of docs/config.md."""
    unhashed = ", ".join(f"`{k}`" for k in schema.UNHASHED_KEYS)
    parts = [HEADER.format(unhashed=unhashed)]
    sections: List[tuple] = []
    top = _rows(schema.TrainConfig, "", sections)
    parts.append("## Top level\n\n| key | default | meaning |\n|---|---|---|\n" + "\n".join(top) + "\n")
    i = 0
    while i < len(sections):
        name, cls, note = sections[i]
        rows = _rows(cls, name + ".", sections)
        intro = f"{note}\n\n" if note else ""
        parts.append(f"## `{name}`\n\n{intro}| key | default | meaning |\n|---|---|---|\n" + "\n".join(rows) + "\n")
        i += 1
    return "\n".join(parts)


if __name__ == "__main__":
    import pathlib
    import sys

    target = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "docs/config.md")
    target.write_text(render(), encoding="utf-8")
    print(f"wrote {target}")
