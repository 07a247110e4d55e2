"""Hostile and odd input, round three (issue 40): what round two left open. A chat template that runs for
hours, a conversation whose cost grew with the square of its turns, ``--mode self_host`` with no worker,
two first runs at once on a fresh ``PREFECT_HOME``, and the concurrency and Ctrl-C cases of class 8.
Every budget is made small for the test; no test asserts a duration.
"""

from __future__ import annotations

import threading
import uuid
import time
from pathlib import Path

import pytest

from verifily_train.errors import ModelError

# class 4: a chat template's time, a conversation's tokens ---------------------------------------------------

NESTED = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
TURNS = [{"role": "user", "content": "hot"}, {"role": "assistant", "content": "cold"}]


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    """The fixture ChatML tokenizer (fast, word-level; <|im_start|>/<|im_end|> are special)."""
    from verifily_train.fixtures.models import CHAT_KIND, build_tokenizer

    return build_tokenizer(CHAT_KIND, tmp_path_factory.mktemp("chat-tok"))


@pytest.fixture
def small_budget(monkeypatch):
    import verifily_train.model.chat as chat

    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.3)
    return chat


def _with_template(tok, template: str):
    import copy

    other = copy.deepcopy(tok)
    other.chat_template = template
    return other


@pytest.mark.parametrize("template", [
    NESTED,  # the case: Jinja's sandbox bounds one range, not the loops nested in it
    "{% for i in range(100000) %}{% for j in range(100000) if j < 0 %}{% endfor %}{% endfor %}",  # no body runs
    "{% for i in range(100000) recursive %}{% if loop.depth < 3 %}{{ loop(range(100000)) }}{% endif %}{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for i in range(100000) %}{% for m in messages * 100000 %}"
    "{% set ns.n = ns.n + 1 %}{% endfor %}{% endfor %}{{ ns.n }}",
])
def test_a_chat_template_that_runs_for_hours_is_stopped_in_one_line(chat_tok, small_budget, template):
    tok = _with_template(chat_tok, template)
    with pytest.raises(ModelError) as caught:
        small_budget.render(tok, TURNS, False, "train.jsonl:7")
    text = str(caught.value)
    assert text.startswith("train.jsonl:7: chat_template: the tokenizer's chat template ran past its 0.3 s budget")
    assert "\n" not in text
    # the thread goes on rendering as before: nothing is left pending in it
    assert small_budget.render(chat_tok, TURNS, False, "train.jsonl:8").endswith("cold<|im_end|>\n")


def test_a_template_that_calls_itself_forever_is_one_line(chat_tok, small_budget):  # designed here
    tok = _with_template(chat_tok, "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    with pytest.raises(ModelError, match="chat_template: .* fails on this row with RecursionError"):
        small_budget.render(tok, TURNS, False, "train.jsonl:7")


def test_a_template_in_a_worker_thread_is_stopped_too(chat_tok, small_budget):  # designed here
    tok, caught = _with_template(chat_tok, NESTED), []

    def work():
        try:
            small_budget.render(tok, TURNS, False, "train.jsonl:7")
        except ModelError as err:
            caught.append(str(err))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(60)
    assert not worker.is_alive() and caught and "ran past its 0.3 s budget" in caught[0]


def test_a_render_that_returns_at_its_deadline_leaves_nothing_pending(small_budget):  # designed here
    """The watchdog fires while the call is in C (a sleep) and it returns: the exception is raised where it
    belongs or dropped, never later in the caller's code."""
    for _ in range(3):
        try:
            small_budget._within(0.05, lambda: time.sleep(0.2))
        except small_budget._OverBudget:
            pass
        total = 0
        for i in range(200_000):  # bytecode after the render: a stray pending exception would land here
            total += i
        assert total == sum(range(200_000))
    assert small_budget._within(5, lambda: 6 * 7) == 42


def _reference(tok, messages, end_ids):
    """The spans as round two computed them: each prefix rendered and tokenized whole."""
    from verifily_train.model.chat import _ids, render

    full = render(tok, messages, False, "x")
    full_ids = _ids(tok, full)
    labels = [-100] * len(full_ids)
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before, upto = render(tok, messages[:i], True, "x"), render(tok, messages[:i + 1], False, "x")
        start, end = len(_ids(tok, before)), len(_ids(tok, upto))
        assert full.startswith(before) and full_ids[:end][:start] == _ids(tok, before)
        stop = max(j for j in range(start, end) if full_ids[j] in end_ids) + 1
        labels[start:stop] = full_ids[start:stop]
    return full_ids, labels


# a template with no special token between turns: the whole prefix is tokenized, as before
PLAIN = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}{% if m['role'] == 'assistant' %}</s>"
         "{% endif %} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")


@pytest.mark.parametrize("template", [None, PLAIN])
def test_turn_spans_are_what_tokenizing_every_prefix_gives(chat_tok, template):
    from verifily_train.model.chat import encode_conversation, special_ids

    tok = chat_tok if template is None else _with_template(chat_tok, template)
    end_ids = special_ids(tok)
    words = "Give the opposite of the word . hot cold cat Summarize".split()
    for n in (1, 2, 5, 12):
        messages = [{"role": "system", "content": "You are a helpful assistant ."}] if n % 2 else []
        for i in range(n):
            messages += [{"role": "user", "content": " ".join(words[(i + k) % len(words)] for k in range(1 + i % 4))},
                         {"role": "assistant", "content": words[i % len(words)] + "  " + words[-1 - i % 3]}]
        enc = encode_conversation(tok, messages, end_ids, "x")
        assert (enc.input_ids, enc.labels) == _reference(tok, messages, end_ids)


def test_tokenizing_a_conversation_costs_its_length_not_its_square(chat_tok, monkeypatch):
    """Round two tokenized every prefix whole (256 turns: 1.9 s a row, 10,000: hours); each turn's check now
    tokenizes only the text after the last special token, so the characters tokenized stay within a small
    multiple of the conversation's length however many turns it has."""
    import verifily_train.model.chat as chat

    tokenized = []
    real = chat._ids
    monkeypatch.setattr(chat, "_ids", lambda tok, text: tokenized.append(len(text)) or real(tok, text))
    for turns in (8, 64, 256):
        messages = [{"role": ("user", "assistant")[i % 2], "content": "hot cold cat"} for i in range(turns)]
        tokenized.clear()
        enc = chat.encode_conversation(chat_tok, messages, chat.special_ids(chat_tok), "x")
        whole = len(chat.render(chat_tok, messages, False, "x"))
        assert sum(tokenized) <= 2 * whole and len(enc.input_ids) > turns


# class 7: two first runs at once on a fresh PREFECT_HOME ---------------------------------------------------

# A stand-in for Prefect's server with its first-use race: on a fresh home it "migrates" for a moment, and a
# second server that finds the migration half done exits 3, as uvicorn did on "database is locked".
FAKE_SERVER = r'''
import http.server, os, sys, time
db = os.path.join(os.environ["PREFECT_HOME"], "fake.db")
if not os.path.exists(db):
    try:
        os.close(os.open(db + ".migrating", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        sys.exit(3)
    time.sleep(1.5)
    os.rename(db + ".migrating", db)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"true")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
'''


def _fake_command(port: int) -> list:
    import sys

    return [sys.executable, "-c", FAKE_SERVER, str(port)]


def _boot_together(n: int) -> list:
    """``n`` temporary servers started at once from ``n`` threads (each its own lock file descriptor, as two
    processes would hold): what ``wait()`` said for each."""
    from verifily_train.cli.runtime import TemporaryServer
    from verifily_train.errors import VerifilyError

    results, servers, start = [None] * n, [], threading.Barrier(n)

    def boot(i):
        start.wait()
        server = TemporaryServer(command=_fake_command, health_timeout=30)
        servers.append(server)
        try:
            server.wait()
            results[i] = "ok"
        except VerifilyError as err:
            results[i] = str(err)

    threads = [threading.Thread(target=boot, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for server in servers:
        server.stop()
    return results


def test_two_first_runs_on_a_fresh_prefect_home_both_start(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "fresh"))  # not even created yet
    assert _boot_together(2) == ["ok", "ok"]
    assert (tmp_path / "fresh" / ".verifily-server-ready").is_file()


def test_without_the_lock_the_stand_in_shows_the_race(tmp_path, monkeypatch):  # designed here: the test's teeth
    import verifily_train.cli.runtime as runtime

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setattr(runtime, "first_use_lock", lambda wait=None: None)
    assert sorted(r == "ok" for r in _boot_together(2)) == [False, True]


def test_a_ready_home_takes_no_lock_and_an_upgrade_takes_it_again(tmp_path, monkeypatch):  # designed here
    import verifily_train.cli.runtime as runtime

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    first = runtime.first_use_lock()
    assert first is not None
    assert runtime.first_use_lock(wait=0.3) is None  # held elsewhere past the wait: start anyway, never hang
    runtime._ready_marker().write_text(runtime._ready_text())
    import os

    os.close(first)
    assert runtime.first_use_lock() is None  # ready: no lock, no wait
    monkeypatch.setattr(runtime, "_ready_text", lambda: "prefect 99.0\n\n")  # a new Prefect migrates again
    again = runtime.first_use_lock()
    assert again is not None
    os.close(again)


# class 7: --mode self_host with no worker serving the pool --------------------------------------------------

class _Worker:
    def __init__(self, name, seconds_ago, status="ONLINE"):
        from datetime import datetime, timedelta, timezone

        self.name, self.status, self.heartbeat_interval_seconds = name, status, 30
        self.last_heartbeat_time = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)


class _Client:
    """Prefect's sync client as ``submit_and_follow`` uses it: one deployment on pool self-host, one flow run
    whose states follow ``states`` (the last repeats), the pool's workers from ``workers()``."""

    def __init__(self, states, workers=lambda: []):
        from types import SimpleNamespace

        self.states, self.workers, self.set_states = list(states), workers, []
        self.run = SimpleNamespace(id=uuid.uuid4(), name="brave-otter", state=None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_deployment_by_name(self, name):
        from types import SimpleNamespace

        return SimpleNamespace(id="d1", work_pool_name="self-host")

    def create_flow_run_from_deployment(self, deployment_id, parameters):
        return self.run

    def read_flow_run(self, run_id):
        if self.set_states:
            self.run.state = self.set_states[-1]
        else:
            self.run.state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return self.run

    def read_workers_for_work_pool(self, pool):
        assert pool == "self-host"
        return self.workers()

    def read_logs(self, **kwargs):
        return []

    def read_artifacts(self, **kwargs):
        return []

    def set_flow_run_state(self, run_id, state, force=False):
        self.set_states.append(state)


def _submit(monkeypatch, client, wait=0.3):
    import io

    import prefect.client.orchestration as orchestration

    from verifily_train.flows.submit import submit_and_follow

    monkeypatch.setattr(orchestration, "get_client", lambda sync_client=True: client)
    out = io.StringIO()
    try:
        return submit_and_follow({}, poll=0.02, out=out, worker_wait=wait), out.getvalue()
    except Exception as err:  # noqa: BLE001 - the test reads what it was
        return err, out.getvalue()


def test_self_host_with_no_worker_says_so_then_cancels_the_run(monkeypatch):
    from prefect.states import Scheduled

    from verifily_train.errors import EnvironmentProblem

    client = _Client([Scheduled()])
    result, out = _submit(monkeypatch, client)
    assert "no worker serves work pool 'self-host'" in out and "prefect worker start --pool self-host" in out
    assert isinstance(result, EnvironmentProblem) and "\n" not in str(result)
    assert "no worker picked up flow run brave-otter within 0.3 s" in str(result) and "cancelled" in str(result)
    assert [s.type.value for s in client.set_states] == ["CANCELLED"]


def test_a_stale_or_offline_worker_serves_no_pool(monkeypatch):  # designed here
    from prefect.states import Scheduled

    client = _Client([Scheduled()], workers=lambda: [_Worker("gone", 600), _Worker("off", 1, status="OFFLINE")])
    result, out = _submit(monkeypatch, client)
    assert "no worker serves work pool" in out and client.set_states


def test_a_busy_worker_is_waited_for_and_a_late_worker_runs_it(monkeypatch):  # designed here
    from prefect.states import Completed, Pending, Running, Scheduled

    busy = _Client([Scheduled()] * 30 + [Pending(), Running(), Completed()], workers=lambda: [_Worker("w1", 2)])
    result, out = _submit(monkeypatch, busy, wait=0.1)  # past the wait while a worker polls: no cancel
    assert result == 0 and "no worker serves" not in out and not busy.set_states and "state: Completed" in out
    late = _Client([Scheduled()] * 3 + [Pending(), Running(), Completed()])  # picked up inside the wait
    result, out = _submit(monkeypatch, late, wait=30)
    assert result == 0 and "no worker serves work pool" in out and not late.set_states


def test_ctrl_c_before_a_worker_picked_the_run_up_cancels_it(monkeypatch):  # designed here
    import time as time_module

    from prefect.states import Scheduled

    client = _Client([Scheduled()])
    calls = []

    def interrupted(seconds):
        calls.append(seconds)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(time_module, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _submit(monkeypatch, client, wait=60)
    assert [s.type.value for s in client.set_states] == ["CANCELLED"]


# class 8: concurrency and Ctrl-C ---------------------------------------------------------------------------

def _entry(root: Path, stage: str, key: str) -> Path:
    from verifily_train.checksums import write_checksums

    folder = root / stage / key
    folder.mkdir(parents=True)
    (folder / "train.parquet").write_bytes(b"rows")
    (folder / "stage.json").write_text("{}")
    write_checksums(folder)
    return folder


def test_cache_clear_during_row_scoring_keeps_what_the_scoring_reads(tmp_path, capsys):
    """The flow holds its Run's tokenize and train entries (``hold_stages``) from before its plan until its
    folder is published; ``cache clear`` meanwhile removes the rest and says what it kept."""
    from verifily_train.cli.main import main
    from verifily_train.pipeline.cache import hold_stages, holding

    root = tmp_path / "cache"
    tok, trn, other = _entry(root, "tokenize", "a" * 64), _entry(root, "train", "b" * 64), _entry(root, "eval", "c" * 64)
    record = {"stages": {"tokenize": {"key": "a" * 64}, "train": {"key": "b" * 64}, "evaluate": {"key": "c" * 64}}}
    with holding():
        hold_stages(root, record, ("tokenize", "train"))
        assert main(["cache", "clear", "--dir", str(root)]) == 0
        assert "kept 2 in use by a running verifily command" in capsys.readouterr().out
        assert tok.is_dir() and trn.is_dir() and not other.exists()
    assert main(["cache", "clear", "--dir", str(root)]) == 0
    assert not tok.exists() and not trn.exists()


HOLDER = r'''
import sys, time
from pathlib import Path
from verifily_train.pipeline.cache import hold_exclusive, holding
root, folder = Path(sys.argv[1]), Path(sys.argv[2])
with holding():
    hold_exclusive(root, "row_attributions", "k")
    (root / "holding").write_text("1")
    while not (root / "go").exists():
        time.sleep(0.02)
    folder.mkdir()
    (folder / "attribution.json").write_text("{}")
'''


def test_a_second_identical_row_attribution_waits_then_reuses_the_first(tmp_path):
    """Two identical ``attribute --rows`` name one folder: the check for it and its publishing are one step
    under ``hold_exclusive`` (the second's staging folder deleted the first's: FileNotFoundError)."""
    import subprocess
    import sys

    from conftest import cli_env
    from verifily_train.pipeline.cache import hold_exclusive, holding

    root, folder = tmp_path / "cache", tmp_path / "attr"
    root.mkdir()
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(folder)], env=cli_env())
    try:
        for _ in range(1500):
            if (root / "holding").exists() or first.poll() is not None:
                break
            time.sleep(0.02)
        assert (root / "holding").exists()
        seen = []

        def second():
            with holding():
                hold_exclusive(root, "row_attributions", "k")
                seen.append(folder.is_dir())  # the flow's `existing(folder)`: reuse, never a second publish

        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive() and not seen  # waiting for the first
        (root / "go").write_text("1")
        waiter.join(60)
        assert seen == [True]
    finally:
        first.kill()
        first.wait()


SLEEPY_WORKER = "import os, sys, time\nopen(os.environ['SLEEPY_PID_FILE'], 'w').write(str(os.getpid()))\ntime.sleep(600)\n"


def test_sigint_ends_the_ablation_workers_at_once(tmp_path, monkeypatch):
    """SIGINT to the main process of ``attribute --by`` terminates its workers, so the task threads the flow's
    end waits for return at once (it waited 22-30 s for their training), and no retry starts another."""
    import os
    import signal

    import verifily_train.flows.attribute as flow
    from verifily_train.attribution.workers import stopping_workers_on_interrupt

    (tmp_path / "sleepy_worker.py").write_text(SLEEPY_WORKER)
    monkeypatch.setattr(flow, "ABLATION_WORKER", "sleepy_worker")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("SLEEPY_PID_FILE", str(tmp_path / "pid"))
    errors = []

    def task():
        try:
            flow.ablation_run.fn("full", 0, "train.yaml", [], str(tmp_path), "http://127.0.0.1:1/api")
        except RuntimeError as err:
            errors.append(str(err))

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal gives it
    try:
        with stopping_workers_on_interrupt():
            worker = threading.Thread(target=task)
            worker.start()
            for _ in range(1500):
                if (tmp_path / "pid").exists():
                    break
                time.sleep(0.02)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(60)  # interrupted by the handler's KeyboardInterrupt
            worker.join(60)
            assert not worker.is_alive() and errors == ["ablation full seed 0: interrupted"]
            with pytest.raises(ProcessLookupError):  # the worker process is gone (reaped by communicate)
                os.kill(int((tmp_path / "pid").read_text()), 0)
            with pytest.raises(RuntimeError, match="interrupted"):  # a retry in the same flow starts no worker
                flow.ablation_run.fn("full", 0, "train.yaml", [], str(tmp_path), "http://127.0.0.1:1/api")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert signal.getsignal(signal.SIGINT) is previous


# --- class 8: a staging folder's ownership lock holds for any number of writers ----------------------------

def test_a_third_writer_never_holds_a_staging_lock_beside_a_waiting_second(tmp_path):
    """release_staging unlinks its lock file; a second writer waiting on that file gets its lock. Before,
    a third writer then created a fresh file at the path and held its lock at the same time: two owners
    of one staging name. Now a lock counts only while its file is the one at the path."""
    from verifily_train.fsio import claim_staging, release_staging

    folder = tmp_path / ".staging-run"
    claim_staging(folder)
    second, third = threading.Event(), threading.Event()
    owners: list = []

    def writer(mark: threading.Event, name: str) -> None:
        claim_staging(folder)
        owners.append(name)
        mark.set()

    first_waiter = threading.Thread(target=writer, args=(second, "second"), daemon=True)
    first_waiter.start()
    time.sleep(0.3)  # let the second writer block on the first's lock file
    folder.rmdir()  # the first writer published (renamed) its folder
    release_staging(folder)
    assert second.wait(10), "the second writer never got the lock"
    late = threading.Thread(target=writer, args=(third, "third"), daemon=True)
    late.start()
    assert not third.wait(1.0), f"two writers hold one staging lock at once: {owners}"
    folder.rmdir()
    release_staging(folder)
    assert third.wait(10), "the third writer never got the lock after the second released it"
    assert owners == ["second", "third"]
    folder.rmdir()
    release_staging(folder)
    assert not Path(f"{folder}.lock").exists()
