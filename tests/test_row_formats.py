"""The SFT row formats people have (TRL's dataset formats): prompt/completion rows, plain text rows (continued
pre-training, every token supervised), and a column mapping for a user's own field names (``data_paths.columns``,
``dataset create --columns``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_user_error, run_cli
from verifily_train.config.schema import PromptSection
from verifily_train.errors import ConfigError, DataError
from verifily_train.fixtures.data import make_rows, write_jsonl
from verifily_train.model.loading import KIND_CAUSAL, KIND_SEQ2SEQ, ModelSpec


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from verifily_train.fixtures.models import CHAT_KIND, build_model

    return build_model(CHAT_KIND, tmp_path_factory.mktemp("chat") / "tiny-llama-chat")


def _renderer(model: Path, kind: str = KIND_CAUSAL, max_len: int = 128, **prompt):
    from transformers import AutoTokenizer

    from verifily_train.model.render import RowRenderer

    tok = AutoTokenizer.from_pretrained(model)
    return RowRenderer(ModelSpec(str(model), kind, "llama", True), tok, PromptSection(**prompt), max_len), tok


def _supervised(enc) -> list:
    return [t for t, label in zip(enc.input_ids, enc.labels) if label != -100]


@pytest.mark.parametrize("which", ["chat", "template"])
def test_prompt_completion_is_trained_as_written_with_the_completion_and_eos_supervised(which, chat_model, models):
    """No template around a prompt/completion row (TRL's standard format), whatever prompt.format resolves to."""
    renderer, tok = _renderer(chat_model if which == "chat" else models["llama"])
    row = {"prompt": "The opposite of hot is", "completion": " cold"}
    _, fitted = renderer.fit(row, "pc.jsonl:1")
    enc = fitted.encoded
    prompt_ids = tok(row["prompt"], add_special_tokens=True)["input_ids"]
    target = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.input_ids == prompt_ids + target and _supervised(enc) == target
    assert enc.input_ids[:enc.prompt_len] == prompt_ids and enc.prompt_text == row["prompt"]
    assert "<|im_start|>" not in tok.decode(enc.input_ids)

    from verifily_train.model.render import final_answer

    assert final_answer(row) == " cold"


def test_text_rows_supervise_every_token_but_the_first_and_end_with_eos(chat_model):
    renderer, tok = _renderer(chat_model, max_len=16)
    text = "red blue green red blue green"
    _, fitted = renderer.fit({"text": text}, "t.jsonl:1")
    enc = fitted.encoded
    ids = tok(text, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    assert enc.input_ids == ids and enc.labels == [-100] + ids[1:]  # position 0 has nothing before it to predict
    long = " ".join(["red blue green"] * 40)
    _, fitted = renderer.fit({"text": long}, "t.jsonl:2")
    assert fitted.truncated and len(fitted.encoded.input_ids) <= 16
    assert fitted.encoded.labels[-1] == tok.eos_token_id  # the document's beginning kept, its end token too
    seq2seq, _ = _renderer(chat_model, kind=KIND_SEQ2SEQ, format="template")
    with pytest.raises(DataError, match="t.jsonl:3: text: plain text rows .* train a CausalLM"):
        seq2seq.fit({"text": text}, "t.jsonl:3")


@pytest.mark.parametrize("row, key, fragment", [
    ({"prompt": "p", "completion": "c", "output": "o"}, "prompt", "it has output and prompt"),
    ({"text": "t", "instruction": "i", "output": "o"}, "text", "a row holds one format"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "output": "o"},
     "output", "either messages or instruction/output, not both"),
    ({"prompt": "p", "completion": "  "}, "completion", "must not be empty"),
    ({"prompt": "p"}, "completion", "missing required field for task sft"),
    ({"prompt": 3, "completion": "c"}, "prompt", "must be a string"),
    ({"text": ""}, "text", "must not be empty"),
    ({"text": "t", "system": "s"}, "system", "applies to instruction and messages rows"),
])
def test_a_row_in_two_formats_or_with_a_bad_field_names_its_line_and_field(row, key, fragment):
    from verifily_train.dataset.rows import validate_row

    with pytest.raises(DataError) as info:
        validate_row(row, "sft", {}, {}, "rows.jsonl:7")
    assert str(info.value).startswith(f"rows.jsonl:7: {key}: ") and fragment in str(info.value)


def test_a_store_version_records_its_format_and_refuses_another(tmp_path, verifily_home):
    from verifily_train.dataset import create_version
    from verifily_train.dataset.rows import validate_row

    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)])
    assert create_version("ds_pc", "v1", "sft", str(pc)).row_schema == {"sft": ["prompt", "completion"]}
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"document {i}"} for i in range(3)])
    assert create_version("ds_text", "v1", "sft", str(text)).row_schema == {"sft": ["text"]}
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a document"}] + make_rows("sft", 2, 1))
    assert create_version("ds_mixed", "v1", "sft", str(mixed)).row_schema == {"sft": ["instruction", "input", "output"]}
    with pytest.raises(DataError, match="m.jsonl:2: prompt: missing required field: the manifest's row_schema says "
                                        "rows are prompt / completion rows"):
        validate_row(make_rows("sft", 1, 0)[0], "sft", {"sft": ["prompt", "completion"]}, {}, "m.jsonl:2")


def test_csv_prompt_completion_columns_are_accepted(tmp_path, verifily_home):
    from verifily_train.dataset import create_version

    source = tmp_path / "train.csv"
    source.write_text("prompt,completion,tags.source\nhot is,cold,human\nup is,down,web\n")
    dv = create_version("ds_csv", "v1", "sft", str(source))
    rows = [json.loads(line) for line in Path(dv.files[0].abs_path).read_text().splitlines()]
    assert rows[0] == {"completion": "cold", "prompt": "hot is", "tags": {"source": "human"}}


def test_dataset_create_columns_renames_the_users_fields_and_records_the_mapping(tmp_path, verifily_home):
    from verifily_train.dataset import create_version

    rows = [{"question": f"q{i}", "answer": f"a{i}", "tags": {"source": "human"}} for i in range(3)]
    source = write_jsonl(tmp_path / "mine.jsonl", rows)
    with pytest.raises(DataError, match="instruction: missing required field"):
        create_version("ds_mine", "v0", "sft", str(source))
    dv = create_version("ds_mine", "v1", "sft", str(source), columns={"instruction": "question", "output": "answer"})
    stored = [json.loads(line) for line in Path(dv.files[0].abs_path).read_text().splitlines()]
    assert stored[0] == {"instruction": "q0", "output": "a0", "tags": {"source": "human"}}
    manifest = json.loads(Path(dv.manifest_path).read_text())
    assert manifest["columns"] == {"instruction": "question", "output": "answer"}
    # the same rows written with the tool's own names are the same content
    plain = write_jsonl(tmp_path / "plain.jsonl", stored)
    assert create_version("ds_plain", "v1", "sft", str(plain)).content_hash == dv.content_hash
    parquet = tmp_path / "mine.parquet"
    import pandas as pd

    pd.DataFrame({"q": ["hot is"], "a": ["cold"]}).to_parquet(parquet, index=False)
    pq = create_version("ds_pq", "v1", "sft", str(parquet), columns={"prompt": "q", "completion": "a"})
    assert pq.row_schema == {"sft": ["prompt", "completion"]}
    result = run_cli("dataset", "create", "--id", "ds_cli", "--version", "v1", "--task", "sft", "--train", str(source),
                     "--columns", "instruction=question,output=answer", cwd=tmp_path,
                     env={**__import__("os").environ, "VERIFILY_HOME": str(verifily_home)})
    assert result.returncode == 0, result.stderr
    assert_user_error(run_cli("dataset", "create", "--id", "ds_cli", "--version", "v2", "--task", "sft", "--train",
                              str(source), "--columns", "instruction", cwd=tmp_path),
                      "--columns: must be FIELD=YOUR_COLUMN pairs")


def test_a_row_holding_both_its_own_field_and_a_mapped_column_is_an_error(tmp_path, verifily_home):
    from verifily_train.dataset import create_version

    source = write_jsonl(tmp_path / "mine.jsonl", [{"question": "q", "instruction": "i", "answer": "a"}])
    with pytest.raises(DataError, match=r"mine.jsonl:1: instruction: given twice"):
        create_version("ds_twice", "v1", "sft", str(source), columns={"instruction": "question", "output": "answer"})


def test_data_paths_columns_in_train_yaml_feed_every_stage_the_renamed_rows(tmp_path, verifily_home):
    from verifily_train.config import load_config
    from verifily_train.dataset.store import dataset_fingerprint, load_for_config

    write_jsonl(tmp_path / "train.jsonl", [{"q": f"q{i}", "a": f"a{i}"} for i in range(4)])
    config = tmp_path / "train.yaml"
    config.write_text("task: sft\nbase_model: org/model\ndata_paths:\n  train: train.jsonl\n"
                      "  columns: {instruction: q, output: a}\n")
    cfg = load_config(config)
    dv = load_for_config(cfg.dataset_version, cfg.data_paths, cfg.task)
    rows = [json.loads(line) for line in Path(dv.files[0].abs_path).read_text().splitlines()]
    assert rows[0] == {"instruction": "q0", "output": "a0"} and dv.num_rows == 4
    assert dataset_fingerprint(cfg.dataset_version, cfg.data_paths, cfg.task)["data_hash"] == dv.content_hash
    again = load_for_config(cfg.dataset_version, cfg.data_paths, cfg.task)  # made once, then reused
    assert again.files[0].abs_path == dv.files[0].abs_path and again.content_hash == dv.content_hash
    for text, key, fragment in (("{instrucion: q}", "data_paths.columns.instrucion", "is not a row field of task sft"),
                                ("{instruction: q, output: q}", "data_paths.columns", "column 'q' is mapped to two")):
        config.write_text(f"task: sft\nbase_model: org/model\ndata_paths:\n  train: train.jsonl\n  columns: {text}\n")
        with pytest.raises(ConfigError, match=fragment) as info:
            load_config(config)
        assert info.value.key == key


def _format_rows(kind: str, n: int, offset: int) -> list:
    pairs = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("light", "dark"), ("wet", "dry")]
    rows = []
    for i in range(offset, offset + n):
        word, opposite = pairs[i % len(pairs)]
        tags = {"source": "human" if i % 3 else "synthetic"}
        if kind == "prompt_completion":
            rows.append({"prompt": f"The opposite of {word} is", "completion": f" {opposite}", "tags": tags})
        else:
            rows.append({"text": f"{word} and {opposite} are opposites, like {word} and {opposite}.", "tags": tags})
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["prompt_completion", "text"])
def test_a_tiny_model_trains_end_to_end_on_prompt_completion_and_text_rows(kind, tmp_path, models, prefect_api):
    """The new row formats through `verifily train` on the tiny offline Llama: a complete, verifiable Run whose
    hard examples show the row's own field (the prompt, the text), never a rendered template."""
    from conftest import run_cli, train, write_config

    splits = {split: write_jsonl(tmp_path / "data" / f"{split}.jsonl", _format_rows(kind, n, offset))
              for split, n, offset in (("train", 24, 0), ("val", 6, 100), ("test", 12, 200))}
    write_config(tmp_path, "sft", models["llama"], splits, training={"num_epochs": 1},
                 eval={"max_new_tokens": 4, "hard_examples": 5})
    result, run = train(tmp_path, prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["evaluation"]["split"] == "test"
    assert record["metrics"]["loss"] > 0 and record["metrics"]["train_steps"] > 0
    slices = json.loads((run / "slices.json").read_text())["slices"]["source"]["values"]
    assert {s["value"] for s in slices} == {"human", "synthetic"}
    hard = [json.loads(line) for line in (run / "hard_examples.jsonl").read_text().splitlines()]
    assert hard and all(set(h["fields"]) == ({"prompt"} if kind == "prompt_completion" else {"text"}) for h in hard)
    assert all("The opposite of" in h["fields"]["prompt"] for h in hard) if kind == "prompt_completion" else True
    verified = run_cli("runs", "verify", run.name, cwd=tmp_path)
    assert verified.returncode == 0 and "match checksums" in verified.stdout
