"""docs/config.md is generated from the schema; this fails when they drift apart."""

from pathlib import Path

from verifily_train.config.docs import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_config_doc_matches_schema():
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/config.md is stale: run `python -m verifily_train.config.docs docs/config.md`")


def test_config_doc_lists_every_key():
    from verifily_train.config.load import known_keys

    text = DOC.read_text(encoding="utf-8")
    for key in known_keys():
        assert f"`{key}`" in text, key
