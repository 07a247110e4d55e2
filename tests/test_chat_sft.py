"""SFT through the tokenizer's chat template: conversational rows, assistant-only loss, the render check,
truncation that keeps the answer, and the tokenize key following the template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import assert_user_error, run_cli, train, write_config
from verifily_train.config.schema import PromptSection
from verifily_train.errors import ConfigError, DataError, ModelError
from verifily_train.fixtures.data import make_conversations, make_rows, write_jsonl, write_splits
from verifily_train.model.loading import KIND_CAUSAL, KIND_SEQ2SEQ, ModelSpec

CONVERSATION = [
    {"role": "user", "content": "Give the opposite of the word. hot"},
    {"role": "assistant", "content": "cold"},
    {"role": "user", "content": "Write the animal twice. cat"},
    {"role": "assistant", "content": "cat cat"},
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Llama whose tokenizer has a ChatML template (end of turn <|im_end|>, EOS </s>)."""
    from verifily_train.fixtures.models import CHAT_KIND, build_model

    return build_model(CHAT_KIND, tmp_path_factory.mktemp("chat") / "tiny-llama-chat")


def _renderer(model: Path, kind: str = KIND_CAUSAL, max_len: int = 128, **prompt):
    from transformers import AutoTokenizer

    from verifily_train.model.render import RowRenderer

    tok = AutoTokenizer.from_pretrained(model)
    spec = ModelSpec(str(model), kind, "llama", True)
    return RowRenderer(spec, tok, PromptSection(**prompt), max_len), tok


def _supervised(enc) -> list:
    return [t for t, label in zip(enc.input_ids, enc.labels) if label != -100]


def _tokens(tok, ids) -> list:
    return tok.convert_ids_to_tokens(list(ids))


def test_conversation_supervises_each_assistant_turn_and_its_end_token_only(chat_model):
    renderer, tok = _renderer(chat_model)
    assert renderer.format == "chat"
    _, fitted = renderer.fit({"messages": CONVERSATION}, "rows.jsonl:1")
    enc = fitted.encoded
    labels = enc.labels
    assert len(labels) == len(enc.input_ids)
    # exactly the two replies, each closed by its end-of-turn token; no system, user or header token
    assert _tokens(tok, _supervised(enc)) == ["cold", "<|im_end|>", "cat", "cat", "<|im_end|>"]
    for i, (token, label) in enumerate(zip(_tokens(tok, enc.input_ids), labels)):
        if label != -100:
            assert label == enc.input_ids[i]
            assert token not in ("<|im_start|>", "assistant", "user", "system", "</s>")
    # the generation prompt is the conversation before the final reply, with the template's assistant header
    expected = tok.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert enc.input_ids[:enc.prompt_len] == tok(expected, add_special_tokens=False)["input_ids"]
    assert _tokens(tok, enc.input_ids[enc.prompt_len - 2:enc.prompt_len]) == ["<|im_start|>", "assistant"]
    assert enc.answer_len == 3 and not fitted.truncated


def test_auto_picks_the_chat_template_when_there_is_one_else_the_alpaca_template(chat_model, models):
    assert _renderer(chat_model)[0].format == "chat"
    assert _renderer(models["llama"])[0].format == "template"
    assert _renderer(chat_model, format="template")[0].format == "template"
    with pytest.raises(ModelError, match="prompt.format: is chat but the tokenizer has no chat_template"):
        _renderer(models["llama"], format="chat")
    renderer, _ = _renderer(models["llama"])
    with pytest.raises(DataError, match=r"rows.jsonl:4: messages: conversational rows need a chat template"):
        renderer.fit({"messages": CONVERSATION}, "rows.jsonl:4")


def test_instruction_row_is_a_user_turn_and_the_system_prompt_comes_from_config_or_row(chat_model):
    row = {"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"}
    renderer, tok = _renderer(chat_model, system="Answer briefly .")
    enc = renderer.fit(row, "x:1")[1].encoded
    text = tok.decode(enc.input_ids)
    assert "Answer briefly ." in text and "helpful" not in text  # the template's default system turn is replaced
    assert "user Give the opposite of the word . hot" in text
    assert _tokens(tok, _supervised(enc)) == ["cold", "<|im_end|>"]
    own = renderer.fit(dict(row, system="Summarize"), "x:2")[1].encoded
    assert "Summarize" in tok.decode(own.input_ids) and "Answer briefly" not in tok.decode(own.input_ids)
    default = _renderer(chat_model)[0].fit(row, "x:3")[1].encoded
    assert "You are a helpful assistant ." in tok.decode(default.input_ids)


@pytest.mark.parametrize("fmt", ["chat", "template"])
@pytest.mark.parametrize("mode", ["end", "middle"])
def test_long_input_is_cut_without_losing_the_assistant_header_or_the_answer(chat_model, fmt, mode):
    colors = " ".join(["red", "green", "blue", "black", "white"] * 12)
    row = {"instruction": "Repeat the colors exactly.", "input": colors + " orange", "output": "purple yellow"}
    renderer, tok = _renderer(chat_model, max_len=40, format=fmt, truncation=mode)
    parts, fitted = renderer.fit(row, "x:1")
    enc = fitted.encoded
    assert fitted.truncated and not fitted.answer_cut and len(enc.input_ids) <= 40
    end = "<|im_end|>" if fmt == "chat" else "</s>"
    assert _tokens(tok, _supervised(enc)) == ["purple", "yellow", end]
    header = ["<|im_start|>", "assistant"] if fmt == "chat" else ["###", "Response", ":"]
    assert _tokens(tok, enc.input_ids[enc.prompt_len - len(header):enc.prompt_len]) == header
    assert parts.user == "Repeat the colors exactly."  # the input is cut first, the instruction kept
    assert parts.input.startswith("red green blue")
    assert parts.input.endswith("orange") == (mode == "middle")  # middle keeps the input's end too


def test_long_answer_is_shortened_to_half_the_window_and_keeps_its_end_token(chat_model):
    row = {"instruction": "Repeat the colors exactly.", "input": "red", "output": " ".join(["blue"] * 60)}
    renderer, tok = _renderer(chat_model, max_len=40)
    _, fitted = renderer.fit(row, "x:1")
    supervised = _tokens(tok, _supervised(fitted.encoded))
    assert fitted.answer_cut and len(fitted.encoded.input_ids) <= 40
    assert supervised[-1] == "<|im_end|>" and len(supervised) >= 20 and set(supervised[:-1]) == {"blue"}


def test_long_conversation_drops_its_oldest_exchanges_first(chat_model):
    earlier = []
    for i in range(8):
        earlier += [{"role": "user", "content": "Repeat the colors exactly. red blue green"},
                    {"role": "assistant", "content": "red blue green"}]
    messages = [{"role": "system", "content": "Answer briefly ."}] + earlier + CONVERSATION[2:]
    renderer, tok = _renderer(chat_model, max_len=48)
    parts, fitted = renderer.fit({"messages": messages}, "x:1")
    text = tok.decode(fitted.encoded.input_ids)
    assert fitted.truncated and len(fitted.encoded.input_ids) <= 48
    assert text.count("Repeat the colors") < 8 and "Answer briefly ." in text
    assert parts.user == "Write the animal twice. cat" and _tokens(tok, _supervised(fitted.encoded))[-3:] == [
        "cat", "cat", "<|im_end|>"]


def test_row_whose_answer_would_be_truncated_away_is_reported_or_dropped_and_counted(chat_model, tmp_path):
    from transformers import AutoTokenizer

    from verifily_train.dataset.manifest import dataset_from_paths
    from verifily_train.model.tokenize import tokenize_dataset

    rows = make_rows("sft", 6, 3)
    rows[3] = dict(rows[3], system=" ".join(["Answer briefly ."] * 20))  # a system prompt longer than the window
    train_path = write_jsonl(tmp_path / "train.jsonl", rows)
    dv = dataset_from_paths("sft", str(train_path))
    tok = AutoTokenizer.from_pretrained(chat_model)
    spec = ModelSpec(str(chat_model), KIND_CAUSAL, "llama", True)
    with pytest.raises(DataError) as info:
        tokenize_dataset(dv, spec, tok, "sft", PromptSection(), 40, tmp_path / "tok")
    message = str(info.value)
    assert message.startswith(f"{train_path.resolve()}:4: its answer is truncated away") and "max_seq_length=40" in message
    manifest = tokenize_dataset(dv, spec, tok, "sft", PromptSection(unsupervised_rows="drop"), 40, tmp_path / "tok2")
    assert manifest["splits"]["train"]["rows"] == 5 and manifest["splits"]["train"]["dropped"] == 1
    assert manifest["render_check"] == {"rows": 5, "end_token_supervised": 5, "dropped": 1, "answer_cut": 0,
                                        "unsupervised_rows": "drop"}
    assert any("1 rows dropped (train 1)" in w for w in manifest["warnings"])
    table = pd.read_parquet(tmp_path / "tok2" / "train.parquet")
    assert list(table["line"]) == [1, 2, 3, 5, 6]


def test_tokenize_manifest_records_the_rendering_and_counts_truncation_per_split(chat_model, tmp_path):
    from transformers import AutoTokenizer

    from verifily_train.dataset.manifest import dataset_from_paths
    from verifily_train.model.chat import template_sha256
    from verifily_train.model.tokenize import tokenize_dataset

    splits = write_splits(tmp_path, "sft", {"train": 12, "test": 6}, seed=4)
    long_row = {"instruction": "Repeat the colors exactly.", "input": " ".join(["red"] * 80), "output": "red"}
    write_jsonl(splits["test"], make_rows("sft", 5, 9) + [long_row])
    dv = dataset_from_paths("sft", str(splits["train"]), test=str(splits["test"]))
    tok = AutoTokenizer.from_pretrained(chat_model)
    spec = ModelSpec(str(chat_model), KIND_CAUSAL, "llama", True)
    manifest = tokenize_dataset(dv, spec, tok, "sft", PromptSection(), 48, tmp_path / "tok")
    prompt = manifest["prompt"]
    assert prompt["format"] == "chat" and prompt["chat_template_sha256"] == template_sha256(tok)
    assert prompt["end_of_turn"] == ["<|im_end|>"] and prompt["example"]["example_id"] == "train:1"
    assert prompt["example"]["supervised"].endswith("<|im_end|>")
    assert manifest["splits"]["test"]["truncated"] == 1 and manifest["splits"]["train"]["truncated"] == 0
    assert manifest["warnings"] == ["1 rows longer than training.max_seq_length=48 were cut (test 1 of 6): user "
                                    "content at its end, the assistant header and the answer's end token kept; "
                                    "0 answers shortened"]
    # generation stops at the end-of-turn token as well as at EOS
    assert manifest["stop_token_ids"] == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})


def test_seq2seq_target_cut_to_the_window_keeps_its_eos(models):
    row = {"instruction": "Repeat the colors exactly.", "input": "red", "output": " ".join(["blue"] * 30)}
    renderer, tok = _renderer(models["t5"], kind=KIND_SEQ2SEQ, max_len=12)
    assert renderer.format == "template"
    _, fitted = renderer.fit(row, "x:1")
    enc = fitted.encoded
    assert fitted.answer_cut and len(enc.labels) <= 12 and enc.labels[-1] == tok.eos_token_id
    assert len(enc.input_ids) <= 12 and _tokens(tok, enc.input_ids)[-4:] == ["###", "Response", ":", "</s>"]


def test_template_that_rewrites_earlier_turns_is_an_error_naming_the_row(chat_model, tmp_path):
    from transformers import AutoTokenizer

    from verifily_train.model.chat import encode_conversation, special_ids

    tok = AutoTokenizer.from_pretrained(chat_model)
    # like templates that strip earlier replies' reasoning: an assistant turn renders empty unless it is last
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ModelError, match=r"rows.jsonl:7: messages\[1\]: the chat template does not render"):
        encode_conversation(tok, CONVERSATION, special_ids(tok), "rows.jsonl:7")


def test_template_without_an_end_of_turn_token_is_an_error(chat_model):
    from transformers import AutoTokenizer

    from verifily_train.model.chat import encode_conversation, special_ids

    tok = AutoTokenizer.from_pretrained(chat_model)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% endif %}")
    with pytest.raises(ModelError, match="no special end-of-turn token"):
        encode_conversation(tok, CONVERSATION[:2], special_ids(tok), "rows.jsonl:1")


@pytest.mark.parametrize("messages, fragment", [
    ([], ":1: messages: must be a non-empty list"),
    ([{"role": "user", "content": "hi"}], ":1: messages[0].role: the last turn must be the assistant's reply"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], ":1: messages[1].role: must be one of"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}], ":1: messages[1].content: must be a string"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}],
     ":1: messages[1].role: a system turn may only come first"),
    ([{"role": "assistant", "content": "y"}], ":1: messages: has no user turn"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], ":1: messages[1].content: must not be empty"),
])
def test_bad_conversation_names_file_line_and_field(tmp_path, messages, fragment):
    from verifily_train.dataset.manifest import dataset_from_paths

    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": messages}])
    with pytest.raises(DataError) as info:
        dataset_from_paths("sft", str(path))
    assert str(info.value).startswith(str(path)) and fragment in str(info.value), str(info.value)


def test_messages_dataset_records_its_row_schema_and_instruction_rows_do_not_need_it(tmp_path, verifily_home):
    from verifily_train.dataset import create_version, load_manifest
    from verifily_train.dataset.rows import validate_row

    conv = write_jsonl(tmp_path / "conv.jsonl", make_conversations(5, 1))
    dv = create_version("ds_chat", "v1", "sft", str(conv))
    assert dv.row_schema == {"sft": ["messages"]}
    manifest = json.loads(Path(dv.manifest_path).read_text())
    assert manifest["row_schema"]["sft"] == ["messages"]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", make_conversations(2, 1) + make_rows("sft", 2, 1))
    assert create_version("ds_chat", "v2", "sft", str(mixed)).row_schema == {"sft": ["instruction", "input", "output"]}
    assert load_manifest(dv.manifest_path).num_rows == 5
    # a manifest that says rows are conversations rejects an instruction row, naming it
    with pytest.raises(DataError, match="m.jsonl:3: messages: missing required field"):
        validate_row(make_rows("sft", 1, 0)[0], "sft", {"sft": ["messages"]}, {}, "m.jsonl:3")


@pytest.mark.parametrize("override, key", [("prompt.format=chatml", "prompt.format"),
                                           ("prompt.truncation=start", "prompt.truncation"),
                                           ("prompt.unsupervised_rows=skip", "prompt.unsupervised_rows")])
def test_bad_prompt_setting_names_its_key(tmp_path, override, key):
    from verifily_train.config import load_config

    (tmp_path / "train.jsonl").write_text(json.dumps(make_rows("sft", 1, 0)[0]) + "\n")
    (tmp_path / "train.yaml").write_text("task: sft\nbase_model: org/model\ndata_paths:\n  train: train.jsonl\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ": must be one of"):
        load_config(tmp_path / "train.yaml", [override])


def test_chat_template_identity_follows_the_template_text(chat_model, tmp_path):
    from verifily_train.model.identity import chat_template_identity

    copy = tmp_path / "copy"
    shutil.copytree(chat_model, copy)
    before = chat_template_identity(str(copy), True)
    assert before is not None and before == chat_template_identity(str(chat_model), True)
    jinja = copy / "chat_template.jinja"
    jinja.write_text(jinja.read_text().replace("helpful", "brief"))
    assert chat_template_identity(str(copy), True) != before
    assert chat_template_identity("org/model", False) is None


@pytest.mark.slow
def test_multi_turn_dataset_trains_and_evaluates_end_to_end_and_a_template_change_retokenizes(
        tmp_path, chat_model, prefect_api):
    data = tmp_path / "chat-data"
    paths = {split: write_jsonl(data / f"{split}.jsonl", make_conversations(n, seed))
             for split, n, seed in (("train", 40, 1), ("val", 8, 2), ("test", 24, 3))}
    created = run_cli("dataset", "create", "--id", "ds_chat", "--version", "v1", "--task", "sft",
                      *[arg for split, p in paths.items() for arg in (f"--{split}", str(p))], cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    model = tmp_path / "model"
    shutil.copytree(chat_model, model)
    write_config(tmp_path, "sft", model, eval={"slice_by_tags": ["source"], "hard_examples": 5})
    result, run = train(tmp_path, prefect_api, "--dataset", "ds_chat@v1")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "run.json").read_text())
    assert record["prompt"]["format"] == "chat" and record["prompt"]["end_of_turn"] == ["<|im_end|>"]
    assert record["render_check"]["rows"] == 72 and record["render_check"]["dropped"] == 0
    assert "render check: 72 rows" in result.stdout and "chat template" in result.stdout
    predictions = pd.read_parquet(run / "predictions.parquet")
    assert len(predictions) == 24 and "prediction" in predictions and predictions["loss"].notna().all()
    finals = [json.loads(line)["messages"][-1]["content"] for line in paths["test"].read_text().splitlines()]
    assert sorted(predictions["reference"]) == sorted(finals)  # scored against each conversation's final reply
    slices = json.loads((run / "slices.json").read_text())["slices"]["source"]["values"]
    assert {s["value"] for s in slices} == {"human", "synthetic", "ai_contaminated"}
    assert len((run / "hard_examples.jsonl").read_text().splitlines()) == 5

    jinja = model / "chat_template.jinja"
    jinja.write_text(jinja.read_text().replace("You are a helpful assistant .", "Answer briefly ."))
    again, rerun = train(tmp_path, prefect_api, "--dataset", "ds_chat@v1")
    assert again.returncode == 0, again.stderr[-3000:]
    stages = json.loads((rerun / "run.json").read_text())["stages"]
    assert not stages["tokenize"]["cache_hit"]
    second = json.loads((rerun / "run.json").read_text())["prompt"]
    assert second["chat_template_sha256"] != record["prompt"]["chat_template_sha256"]
    assert "Answer briefly ." in second["example"]["text"]


@pytest.mark.slow
def test_chat_format_on_a_model_without_a_template_fails_before_training(tmp_path, models, sft_splits, prefect_api):
    write_config(tmp_path, "sft", models["llama"], sft_splits, prompt={"format": "chat"})
    result, run = train(tmp_path, prefect_api)
    assert_user_error(result, "prompt.format", "has no chat_template")
    assert run is None or not (run / "adapter").exists()
