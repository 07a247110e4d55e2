"""SFT rows through the tokenizer's chat template: messages, and each assistant turn's supervised span.

Most community templates have no ``{% generation %}`` markers, so ``return_assistant_tokens_mask`` would
supervise nothing. The span of an assistant turn is taken instead as the token difference between the
conversation rendered up to that turn with the generation prompt and rendered with the turn itself. That
holds only when the first rendering is a prefix of the second (some templates rewrite earlier turns),
so it is checked for every turn of every row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import List, Optional, Sequence, Set

from verifily_train.errors import DataError, ModelError


@dataclass
class Encoded:
    """One row as token ids with its loss labels (-100 where no loss is taken)."""

    input_ids: List[int]
    labels: List[int]
    prompt_len: int  # leading tokens that form the generation prompt of the final answer
    answer_len: int  # supervised tokens of the final answer, its end token included
    prompt_text: str  # the rendered generation prompt: what evaluation continues


def template_of(tok) -> Optional[str]:
    """The tokenizer's chat template as one text (named templates as canonical JSON); None without one."""
    template = getattr(tok, "chat_template", None)
    if not template:
        return None
    return template if isinstance(template, str) else json.dumps(template, sort_keys=True)


def template_sha256(tok) -> Optional[str]:
    """SHA-256 of the chat template's text, as the Run records it."""
    text = template_of(tok)
    return hashlib.sha256(text.encode("utf-8")).hexdigest() if text is not None else None


def special_ids(tok) -> Set[int]:
    """Ids of every special token: what can end a turn (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ``<|end|>``)."""
    ids = set(tok.all_special_ids)
    ids.update(i for i, added in tok.added_tokens_decoder.items() if getattr(added, "special", False))
    # never a turn's end: the unknown token (content can hold it), and BOS / padding unless they are the EOS
    ids -= {i for i in (tok.unk_token_id, tok.bos_token_id, tok.pad_token_id) if i is not None and i != tok.eos_token_id}
    return ids


def render(tok, messages: Sequence[dict], generation_prompt: bool, where: str) -> str:
    """The template's text for ``messages``; a template that rejects the conversation names the row."""
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateSyntaxError as err:  # the template's fault, whatever the row: never blamed on the data
        raise ModelError(None, "chat_template", f"the tokenizer's chat template is not valid Jinja: {err.message} "
                                                f"(template line {err.lineno}); fix it, or use prompt.format: "
                                                "template") from None
    except TemplateError as err:  # raise_exception() in the template: it refuses this conversation
        raise DataError(where, "messages", f"the chat template rejects this conversation: {err}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as err:
        # the template's own code failed on this row (an operation on the wrong type): name both
        raise ModelError(where, "chat_template", f"the tokenizer's chat template fails on this row with "
                                                 f"{type(err).__name__}: {str(err)[:200]}; fix the template, or use "
                                                 "prompt.format: template") from None


def _ids(tok, text: str) -> List[int]:
    # the template writes its own BOS (Llama-3, Mistral) or none (ChatML): never add one
    return tok(text, add_special_tokens=False)["input_ids"]


def _check_prefix(tok, full_text: str, full_ids: List[int], part: str, where: str, turn: int) -> List[int]:
    ids = _ids(tok, part)
    if not full_text.startswith(part) or full_ids[:len(ids)] != ids:
        raise ModelError(where, f"messages[{turn}]",
                         "the chat template does not render the conversation up to this assistant turn as a prefix "
                         "of the whole conversation (it rewrites earlier turns), so the turn's tokens cannot be "
                         "found; use prompt.format: template or a template without that rewrite")
    return ids


def encode_conversation(tok, messages: Sequence[dict], end_ids: Set[int], where: str) -> Encoded:
    """Token ids of the whole conversation, with loss on each assistant turn up to its end-of-turn token."""
    full_text = render(tok, messages, False, where)
    full_ids = _ids(tok, full_text)
    labels = [-100] * len(full_ids)
    prompt_len, answer_len, prompt_text = 0, 0, ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render(tok, messages[:i], True, where)
        start = len(_check_prefix(tok, full_text, full_ids, before, where, i))
        end = len(_check_prefix(tok, full_text, full_ids, render(tok, messages[:i + 1], False, where), where, i))
        ends = [j for j in range(start, end) if full_ids[j] in end_ids]
        if not ends:
            raise ModelError(where, f"messages[{i}]", "the chat template ends this assistant turn with no special "
                             "end-of-turn token, so a tuned model would never learn to stop")
        stop = ends[-1] + 1  # whitespace the template writes after the end token belongs to no turn
        labels[start:stop] = full_ids[start:stop]
        prompt_len, answer_len, prompt_text = start, stop - start, before
    return Encoded(full_ids, labels, prompt_len, answer_len, prompt_text)


def instruction_messages(instruction: str, inp: str, output: str, system: Optional[str]) -> List[dict]:
    """An instruction row as a conversation: one user turn (instruction, then input) and the reply."""
    user = instruction if not str(inp or "").strip() else f"{instruction}\n\n{inp}"
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def with_system(messages: Sequence[dict], system: Optional[str]) -> List[dict]:
    """A conversation's own system turn wins; else ``system`` (the row's field, then prompt.system) leads."""
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system and (not turns or turns[0]["role"] != "system"):
        turns.insert(0, {"role": "system", "content": system})
    return turns
