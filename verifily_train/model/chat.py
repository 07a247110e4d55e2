"""SFT rows through the tokenizer's chat template: messages, and each assistant turn's supervised span.

Most community templates have no ``{% generation %}`` markers, so ``return_assistant_tokens_mask`` would
supervise nothing. The span of an assistant turn is taken instead as the token difference between the
conversation rendered up to that turn with the generation prompt and rendered with the turn itself. That
holds only when the first rendering is a prefix of the second (some templates rewrite earlier turns),
so it is checked for every turn of every row. A template may render the last turn differently, so each
prefix is rendered as a conversation of its own; its tokens are checked against the whole conversation's
from the last special token before its end (the tokenizer splits text at special tokens and tokenizes the
pieces apart), so tokenizing costs what the row's length does, not its square.

A chat template is code from the Hub run on every row: transformers renders it in Jinja's sandbox, which
bounds one ``range`` but not loops nested in it, so each rendering runs under a wall-clock budget
(``RENDER_SECONDS``) and a template past it is one ``ModelError`` naming the template and the row.
"""

from __future__ import annotations

import bisect
import ctypes
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Set

from verifily_train.errors import DataError, ModelError

# The longest one rendering of a conversation may run: a real template renders 256 turns in milliseconds,
# while one with nested range(100000) loops runs for hours. Settings that cannot change results are not hashed.
RENDER_SECONDS = 10.0


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
        return _within(RENDER_SECONDS, lambda: tok.apply_chat_template(list(messages), tokenize=False,
                                                                        add_generation_prompt=generation_prompt))
    except _OverBudget:
        raise ModelError(where, "chat_template", f"the tokenizer's chat template ran past its {RENDER_SECONDS:g} s "
                                                 "budget on this row (a loop without a bound?); fix the template, "
                                                 "or use prompt.format: template") from None
    except (MemoryError, RecursionError) as err:  # a template that builds a huge value or calls itself forever
        raise ModelError(where, "chat_template", f"the tokenizer's chat template fails on this row with "
                                                 f"{type(err).__name__}; fix the template, or use prompt.format: "
                                                 "template") from None
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


class _OverBudget(BaseException):  # not an Exception: no handler in the template's path may swallow it
    """A template's code ran past ``RENDER_SECONDS``."""


def _within(seconds: float, call):
    """``call()``, stopped with ``_OverBudget`` where it runs past ``seconds`` of wall-clock time.

    A template is Python code Jinja compiled: one watchdog thread raises ``_OverBudget`` in the rendering
    thread at its deadline (``PyThreadState_SetAsyncExc``, taken at the thread's next bytecode), so every
    loop, macro and recursion is bounded and a render in time costs one lock and one dict entry. One C call
    on a huge value (``"x" * 10**9``) is bounded by memory, not by this clock.
    """
    ident = threading.get_ident()
    with _WATCH.wake:
        _WATCH.fired.discard(ident)
        _WATCH.deadlines[ident] = deadline = time.monotonic() + seconds
        if _WATCH.thread is None or not _WATCH.thread.is_alive():
            _WATCH.thread = threading.Thread(target=_watch, name="verifily-render-watchdog", daemon=True)
            _WATCH.thread.start()
        if deadline < _WATCH.wake_at:
            _WATCH.wake.notify()
    try:
        return call()
    finally:
        with _WATCH.wake:  # once fired, the deadline is gone: nothing below can be interrupted by it
            _WATCH.deadlines.pop(ident, None)
            fired = ident in _WATCH.fired
            _WATCH.fired.discard(ident)
        if fired:  # the render returned at its deadline: drop the exception still pending, if any
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)


class _Watch:
    def __init__(self):
        self.wake = threading.Condition(threading.Lock())
        self.deadlines: dict = {}  # thread ident -> monotonic deadline of the render it runs
        self.fired: set = set()
        self.wake_at = float("inf")
        self.thread: Optional[threading.Thread] = None


_WATCH = _Watch()
os.register_at_fork(after_in_child=lambda: globals().update(_WATCH=_Watch()))  # a fork copies no thread


def _watch() -> None:
    watch = _WATCH
    with watch.wake:
        while watch is _WATCH:
            now = time.monotonic()
            for ident, deadline in list(watch.deadlines.items()):
                if deadline <= now:
                    del watch.deadlines[ident]
                    watch.fired.add(ident)
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(_OverBudget))
            watch.wake_at = min(watch.deadlines.values(), default=float("inf"))
            watch.wake.wait(None if watch.wake_at == float("inf") else watch.wake_at - now)


def _ids(tok, text: str) -> List[int]:
    # the template writes its own BOS (Llama-3, Mistral) or none (ChatML): never add one
    return tok(text, add_special_tokens=False)["input_ids"]


class _Tokens:
    """The whole conversation's token ids, and where each special token the tokenizer splits text at starts."""

    def __init__(self, tok, text: str):
        self.text = text
        offsets = None
        if getattr(tok, "is_fast", False):
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            self.ids, offsets = enc["input_ids"], enc["offset_mapping"]
        else:
            self.ids = _ids(tok, text)
        # added tokens matched on the raw text (not normalized): the text on either side is tokenized apart
        splitting = {i for i, added in tok.added_tokens_decoder.items() if not getattr(added, "normalized", True)}
        self.split_ends: List[int] = []  # char offset where each splitting token ends, increasing
        self.split_at: List[tuple] = []  # (its char start, its token index)
        for k, token in enumerate(self.ids if offsets is not None else ()):
            if token in splitting and offsets[k][1] > offsets[k][0]:
                self.split_ends.append(offsets[k][1])
                self.split_at.append((offsets[k][0], k))

    def prefix_len(self, tok, part: str, where: str, turn: int) -> int:
        """How many of the whole conversation's tokens ``part`` is, checked to tokenize as their prefix.

        ``tokenize(part)`` is the whole's tokens up to the last splitting token that ends inside ``part``,
        then the tokens of the rest, so only that rest is tokenized: each turn costs its own length.
        """
        last = bisect.bisect_right(self.split_ends, len(part)) - 1
        begin, first = self.split_at[last] if last >= 0 else (0, 0)
        if self.text.startswith(part):
            rest = _ids(tok, part[begin:])
            if self.ids[first:first + len(rest)] == rest:
                return first + len(rest)
        raise ModelError(where, f"messages[{turn}]",
                         "the chat template does not render the conversation up to this assistant turn as a prefix "
                         "of the whole conversation (it rewrites earlier turns), so the turn's tokens cannot be "
                         "found; use prompt.format: template or a template without that rewrite")


def encode_conversation(tok, messages: Sequence[dict], end_ids: Set[int], where: str) -> Encoded:
    """Token ids of the whole conversation, with loss on each assistant turn up to its end-of-turn token."""
    whole = _Tokens(tok, render(tok, messages, False, where))
    full_ids = whole.ids
    labels = [-100] * len(full_ids)
    prompt_len, answer_len, prompt_text = 0, 0, ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render(tok, messages[:i], True, where)
        start = whole.prefix_len(tok, before, where, i)
        end = whole.prefix_len(tok, render(tok, messages[:i + 1], False, where), where, i)
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
