"""One SFT row to token ids and loss labels, the same way for training, evaluation and generation.

``prompt.format`` picks the rendering: the tokenizer's chat template (``chat``) or the Alpaca-style
``prompt.template`` (``template``); ``auto`` is chat when the tokenizer has a template. Rows longer
than the window are fitted by ``truncation.fit_row``; every result passes a render check (its end
token is supervised) before it is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Set, Tuple

from verifily_train.config.schema import PromptSection
from verifily_train.dataset.rows import (MESSAGES_FIELD, SFT_CONVERSATION, SFT_PROMPT_COMPLETION, SFT_TEXT, is_conversation,
                                         sft_format)
from verifily_train.errors import DataError, ModelError
from verifily_train.model.chat import (Encoded, encode_conversation, instruction_messages, special_ids,
                                          template_of, template_sha256, with_system)
from verifily_train.model.loading import KIND_CAUSAL, KIND_SEQ2SEQ, ModelSpec
from verifily_train.model.truncation import Cut, Fitted, TextCut, causal_limits, fit_row, seq2seq_limits

FORMAT_CHAT, FORMAT_TEMPLATE = "chat", "template"


@dataclass(frozen=True)
class RowParts:
    """The pieces of an SFT row that truncation may cut, and the rest of its conversation."""

    user: str  # instruction rows: the instruction; conversations: the last user turn's content
    answer: str  # the final assistant reply (what is evaluated)
    input: str = ""  # instruction rows only
    has_input: bool = False  # instruction rows: the template with the input section (fixed before cutting)
    system: Optional[str] = None
    history: Tuple[Tuple[dict, ...], ...] = ()  # conversations: the earlier exchanges, oldest first
    between: Tuple[dict, ...] = ()  # conversations: turns between the last user turn and the final reply
    conversation: bool = False
    raw: str = ""  # prompt_completion or text rows: tokenized as written, no template (rows.SFT_FORMAT_FIELDS)


def render_prompt(row: dict, prompt: PromptSection) -> str:
    """The Alpaca-style prompt: ``template`` when the row has a non-empty input, else ``template_no_input``."""
    inp = row.get("input") or ""
    if str(inp).strip():
        return prompt.template.format(instruction=row["instruction"], input=inp)
    return prompt.template_no_input.format(instruction=row["instruction"], input="")


def final_answer(row: dict) -> str:
    """The reply an SFT row is evaluated on: ``output``, or a conversation's last (assistant) turn."""
    kind = sft_format(row, "")
    if kind == SFT_CONVERSATION:
        return row[MESSAGES_FIELD][-1]["content"]
    return row[{SFT_PROMPT_COMPLETION: "completion", SFT_TEXT: "text"}.get(kind, "output")]


def resolve_format(prompt: PromptSection, tok, spec: ModelSpec) -> str:
    """``chat`` or ``template`` for this tokenizer and model kind; ``chat`` without a template is an error."""
    has_template = template_of(tok) is not None
    if prompt.format == FORMAT_CHAT:
        if not has_template:
            raise ModelError(spec.source, "prompt.format", "is chat but the tokenizer has no chat_template; "
                                                           "use prompt.format: template (or auto)")
        if spec.kind != KIND_CAUSAL:
            raise ModelError(spec.source, "prompt.format", "chat templates are rendered for CausalLMs only; "
                                                           "use prompt.format: template for an encoder-decoder")
        return FORMAT_CHAT
    if prompt.format == "auto" and has_template and spec.kind == KIND_CAUSAL:
        return FORMAT_CHAT
    return FORMAT_TEMPLATE


def _exchanges(turns: List[dict]) -> List[List[dict]]:
    """Turns grouped into exchanges, each starting at a user turn (anything before the first joins it)."""
    groups: List[List[dict]] = []
    for turn in turns:
        if turn["role"] == "user" or not groups:
            groups.append([])
        groups[-1].append(turn)
    return groups


class RowRenderer:
    """Renders, fits and checks the SFT rows of one run (one tokenizer, one prompt section, one window)."""

    def __init__(self, spec: ModelSpec, tok, prompt: PromptSection, max_len: int):
        if tok.eos_token_id is None:
            raise ModelError(spec.source, "base_model", "tokenizer has no eos token, needed to end SFT targets")
        self.spec, self.tok, self.prompt, self.max_len = spec, tok, prompt, max_len
        self.format = resolve_format(prompt, tok, spec)
        self.end_ids: Set[int] = special_ids(tok) if self.format == FORMAT_CHAT else {tok.eos_token_id}
        self.fits, self.answer_share = (causal_limits if spec.kind == KIND_CAUSAL else seq2seq_limits)(max_len)

    def describe(self) -> dict:
        """What the Run records about the rendering (the example row is added by the caller)."""
        return {"format": self.format, "requested": self.prompt.format,
                "chat_template_sha256": template_sha256(self.tok) if self.format == FORMAT_CHAT else None,
                "system": self.prompt.system if self.format == FORMAT_CHAT else None,
                "truncation": self.prompt.truncation}

    def parts_of(self, row: dict, where: str) -> RowParts:
        system = row.get("system") or self.prompt.system
        kind = sft_format(row, where)
        if kind == SFT_TEXT and self.spec.kind != KIND_CAUSAL:
            raise DataError(where, "text", f"plain text rows (continued pre-training) train a CausalLM; "
                                           f"{self.spec.source} is an encoder-decoder (give prompt/completion rows)")
        if kind in (SFT_PROMPT_COMPLETION, SFT_TEXT):  # as written: the prompt, then the supervised completion
            return RowParts(user=row["prompt"] if kind == SFT_PROMPT_COMPLETION else "",
                            answer=row["completion" if kind == SFT_PROMPT_COMPLETION else "text"], raw=kind)
        if not is_conversation(row):
            inp = str(row.get("input") or "")
            return RowParts(user=row["instruction"], answer=row["output"], input=inp, has_input=bool(inp.strip()),
                            system=system)
        if self.format != FORMAT_CHAT:
            raise DataError(where, MESSAGES_FIELD, f"conversational rows need a chat template, and prompt.format resolved "
                                                   f"to template (the tokenizer of {self.spec.source} has none, or "
                                                   "prompt.format says template)")
        turns = with_system(row[MESSAGES_FIELD], None)
        if turns[0]["role"] == "system":
            system, turns = turns[0]["content"], turns[1:]
        groups = _exchanges(turns)
        final = groups[-1]
        user_at = next((i for i, t in enumerate(final) if t["role"] == "user"), None)
        if user_at is None:  # validation guarantees a user turn somewhere; without one in the final exchange
            raise DataError(where, MESSAGES_FIELD, "the final assistant reply follows no user turn")
        return RowParts(user=final[user_at]["content"], answer=final[-1]["content"], system=system,
                        history=tuple(tuple(g) for g in groups[:-1]), between=tuple(final[user_at + 1:-1]),
                        conversation=True)

    def messages(self, parts: RowParts) -> List[dict]:
        if not parts.conversation:
            return instruction_messages(parts.user, parts.input, parts.answer, parts.system)
        head = [{"role": "system", "content": parts.system}] if parts.system else []
        earlier = [turn for group in parts.history for turn in group]
        return head + earlier + [{"role": "user", "content": parts.user}, *parts.between,
                                 {"role": "assistant", "content": parts.answer}]

    def encode(self, parts: RowParts, where: str) -> Encoded:
        """Token ids and labels of ``parts`` as they stand (no fitting)."""
        if parts.raw:
            return self._encode_raw(parts)
        if self.format == FORMAT_CHAT:
            return encode_conversation(self.tok, self.messages(parts), self.end_ids, where)
        tpl = self.prompt.template if parts.has_input else self.prompt.template_no_input
        prompt_text = tpl.format(instruction=parts.user, input=parts.input)
        prompt_ids = self.tok(prompt_text, add_special_tokens=True)["input_ids"]
        target = self.tok(parts.answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        if self.spec.kind == KIND_SEQ2SEQ:
            return Encoded(prompt_ids, target, len(prompt_ids), len(target), prompt_text)
        # loss only on the response: prompt positions are masked with -100
        return Encoded(prompt_ids + target, [-100] * len(prompt_ids) + target, len(prompt_ids), len(target), prompt_text)

    def _encode_raw(self, parts: RowParts) -> Encoded:
        """prompt/completion (TRL's standard format): the prompt as written, the completion and EOS supervised; text:
        every token supervised but the first (a causal LM predicts from position 1), EOS ending the document."""
        eos = self.tok.eos_token_id
        if parts.raw == SFT_TEXT:
            ids = self.tok(parts.answer, add_special_tokens=True)["input_ids"] + [eos]
            first = ids[:1]
            return Encoded(ids, [-100] + ids[1:], len(first), len(ids) - 1, self.tok.decode(first))
        prompt_ids = self.tok(parts.user, add_special_tokens=True)["input_ids"]
        target = self.tok(parts.answer, add_special_tokens=False)["input_ids"] + [eos]
        if self.spec.kind == KIND_SEQ2SEQ:
            return Encoded(prompt_ids, target, len(prompt_ids), len(target), parts.user)
        return Encoded(prompt_ids + target, [-100] * len(prompt_ids) + target, len(prompt_ids), len(target), parts.user)

    def _user_cuts(self, parts: RowParts):
        mode = self.prompt.truncation

        def text_cut(field: str):
            def make(p: RowParts) -> Cut:
                cut = TextCut(self.tok, getattr(p, field), mode)
                return Cut(field, cut.n, lambda k: replace(p, **{field: cut.keep(k)}))
            return make

        def history_cut(p: RowParts) -> Cut:
            n = len(p.history)
            return Cut("history", n, lambda k: replace(p, history=p.history[n - k:] if k else ()))

        if parts.conversation:
            return [history_cut, text_cut("user")]
        if parts.raw:
            return [text_cut("user")] if parts.raw == SFT_PROMPT_COMPLETION else []
        return [text_cut("input"), text_cut("user")]

    def _answer_cut(self, parts: RowParts) -> Cut:
        cut = TextCut(self.tok, parts.answer, "end")  # an answer keeps its beginning; the template adds its end
        return Cut("answer", cut.n, lambda k: replace(parts, answer=cut.keep(k)))

    def fit(self, row: dict, where: str) -> Tuple[RowParts, Fitted]:
        """The row's parts as cut, and its fitted rendering (``Fitted.encoded`` None: nothing could be supervised)."""
        parts = self.parts_of(row, where)
        fitted = fit_row(parts, lambda p: self.encode(p, where), self._user_cuts(parts), self._answer_cut,
                         self.fits, self.answer_share)
        if fitted.encoded is not None:
            self.check(fitted.encoded, where)
        return fitted.parts, fitted

    def check(self, enc: Encoded, where: str) -> None:
        """The render check: something is supervised, and every supervised run ends with an end token."""
        labels = enc.labels
        runs, start = [], None
        for i, label in enumerate(labels + [-100]):
            if label != -100 and start is None:
                start = i
            elif label == -100 and start is not None:
                runs.append((start, i))
                start = None
        if not runs:
            raise ModelError(where, None, "render check: the row supervises no token")
        for a, b in runs:
            if labels[b - 1] not in self.end_ids:
                raise ModelError(where, None, f"render check: a supervised span ends with token {labels[b - 1]}, not an "
                                              "end-of-turn token (the model would not learn to stop)")

    def unsupervised_problem(self, fitted: Fitted) -> str:
        """The one-line reason a row was left with nothing to train on."""
        return (f"its answer is truncated away: the prompt needs {fitted.min_prompt_len} tokens even with its user "
                f"content cut, leaving no room within training.max_seq_length={self.max_len} for one answer token and "
                "its end token; raise training.max_seq_length, shorten the row, or set prompt.unsupervised_rows: drop")
