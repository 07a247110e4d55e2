"""``verifily train``: run the Prefect ``train`` flow in-process and print the run summary."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import List, Optional

CAVEAT = "Correlation, not causation: slices describe the model on those test rows. For causal attribution: verifily attribute RUN --by <tag>."


def _quiet_libraries() -> None:
    # Logs still reach the Prefect API (and UI); only the console copy is silenced. A user error is then
    # one line from the CLI, and a bug keeps the traceback Python prints.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # read by transformers at import: no per-weight loading bars, no advisory warnings in the summary
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)


def _preload_fingerprint_modules() -> None:
    """Import what the fingerprint stage needs (torch, transformers' config classes) while the server boots."""
    import torch  # noqa: F401
    from transformers import AutoConfig  # noqa: F401
    from transformers.models.auto import modeling_auto  # noqa: F401


# what the train and evaluate stages import, one or both of which run in every flow that is not a replay:
# 1.7 s, 1.3 s and 0.3 s here after the fingerprint modules
STAGE_MODULES = ("transformers.modeling_utils", "peft", "transformers.trainer")


def _preload_while_server_boots(server: "TemporaryServer") -> int:
    """Import :data:`STAGE_MODULES` while the temporary server is still booting; returns how many were imported.

    The server boots on the other core and this process would otherwise idle in ``server.wait()`` (about
    1.2 s on the 17 s bench job). Each module is imported only while the server is not up yet, so a flow
    that needs none of them (its train and evaluate stages cached) loses at most the one import that
    outlasts the boot.
    """
    import importlib

    count = 0
    for name in STAGE_MODULES:
        if server.healthy or server.proc.poll() is not None:
            break
        importlib.import_module(name)
        count += 1
    return count


HEARTBEAT_SETTINGS = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


@contextlib.contextmanager
def in_process_flow_settings():
    """Prefect settings for a flow run this process makes and watches: no flow-run heartbeats, unless configured.

    Heartbeats let a server mark a flow run whose process vanished as crashed (Prefect's zombie-flow
    automation); they matter for deployment runs, which a worker starts and nobody watches. Here the CLI
    is in the user's terminal. Prefect 3.9's heartbeat thread sleeps in whole seconds and is joined when the
    flow ends: measured on the 17 s bench job (configured server, three alternating pairs), a cold
    ``verifily train`` took 14.7 / 14.7 / 15.8 s with heartbeats and 14.2 / 14.2 / 14.6 s without.
    A heartbeat frequency set in the environment or in a Prefect profile/prefect.toml is kept.
    """
    if any(os.environ.get(name) for name in HEARTBEAT_SETTINGS) or any(
            _prefect_setting_elsewhere(name) for name in HEARTBEAT_SETTINGS):
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.4f}"
    return str(value)


def _ci(entry: dict, name: str) -> str:
    low_high = entry.get("ci95", {}).get(name)
    return f" [{_fmt(low_high[0])}, {_fmt(low_high[1])}]" if low_high else ""


def render_line(prompt: Optional[dict], check: Optional[dict]) -> Optional[str]:
    """One line on how SFT rows were rendered and what the render check found (None for classification)."""
    if not prompt or not check:
        return None
    how = (f"chat template {prompt['chat_template_sha256'][:12]}" if prompt["format"] == "chat"
           else "prompt.template")
    ends = "/".join(prompt.get("end_of_turn") or []) or "EOS"
    dropped = f", {check['dropped']} dropped" if check["dropped"] else ""
    return (f"prompt: {how}; render check: {check['rows']} rows, each supervises its answer and {ends}"
            f"{dropped}, {check['answer_cut']} answers shortened")


def print_summary(summary: dict, out=sys.stdout) -> None:
    """Overall metrics with intervals, slice table, hard-example headline, path and reproducibility hash."""
    record = summary["record"]
    metrics = record["metrics"]
    w = out.write
    w(f"\nRun {summary['run_id']} completed in {record['duration_seconds']:.1f}s "
      f"({record['job']['device']}, {record['precision']})\n")
    for warning in record.get("warnings", []):
        w(f"  warning: {warning}\n")
    w(f"  {record['evaluation']['note']}\n")
    stages = record.get("stages", {})
    if stages:
        w("  stages: " + "  ".join(f"{name} {'cached' if s['cache_hit'] else 'ran'} {s['seconds'] or 0:.1f}s"
                                   for name, s in stages.items()) + "\n")
    shown = [k for k in ("loss", "perplexity", "exact_match", "token_f1", "format_compliance", "accuracy", "macro_f1")
             if k in metrics]
    overall = summary["slices"].get("overall", {})
    w("  metrics: " + "  ".join(f"{k}={_fmt(metrics[k])}{_ci(overall, k)}" for k in shown) + "\n")
    w(f"  train_loss={_fmt(metrics.get('train_loss'))}  steps={metrics.get('train_steps')}"
      f"  truncated_rows={metrics.get('truncated_rows')}\n")
    line = render_line(record.get("prompt"), record.get("render_check"))
    if line:
        w(f"  {line}\n")
    if "baseline_loss" in metrics:
        w(f"  base model (untuned): loss={_fmt(metrics['baseline_loss'])}  "
          f"perplexity={_fmt(metrics.get('baseline_perplexity'))}  -> fine-tuned loss={_fmt(metrics.get('loss'))}\n")
    if "gold_exact_match" in metrics:
        w(f"  gold set: exact_match={_fmt(metrics['gold_exact_match'])}  token_f1={_fmt(metrics['gold_token_f1'])}"
          f"  ({metrics.get('gold_examples')} rows)\n")
    lead = shown[0] if shown else None
    for key, block in summary["slices"].get("slices", {}).items():
        w(f"\n  slices by {key} (95% bootstrap interval):\n")
        has_base = any("baseline" in e for e in block["values"])
        extra = [k for k in shown[1:] if k != "perplexity"]
        rows = [["value", "n", f"{lead} [95% CI]", f"Δ{lead}"] + extra + ([f"base {lead}"] if has_base else [])]
        for entry in block["values"]:
            m = entry["metrics"]
            flag = " (low n)" if entry["low_confidence"] else ""
            rows.append([f"{entry['value']}{flag}", str(entry["n"]), f"{_fmt(m.get(lead))}{_ci(entry, lead)}",
                         f"{entry['delta'].get(lead, float('nan')):+.4f}"] + [_fmt(m.get(k)) for k in extra] +
                        ([_fmt(entry.get("baseline", {}).get(lead))] if has_base else []))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            w("    " + "  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() + "\n")
    headline = summary["hard_examples"].get("headline")
    if headline:
        w(f"\n  hard examples: {headline} (hard_examples.jsonl)\n")
    if summary["slices"].get("slices"):
        w(f"  {CAVEAT}\n")
    w(f"\n  run: {summary['path']}\n  reproducibility_hash: {record['reproducibility_hash']}\n")
    if summary.get("integrity_root"):  # kept elsewhere, it verifies the Run anywhere: verifily runs verify RUN --root
        w(f"  integrity_root: {summary['integrity_root']}\n")
    if summary.get("pushed_to"):
        w(f"  adapter pushed to {summary['pushed_to']}\n")


def _prefect_setting_elsewhere(name: str) -> bool:
    """True when ``name`` may be set outside the environment (the active Prefect profile, or a prefect.toml
    or .env in this folder): then Prefect's own settings decide, and we do not start a server over them."""
    from pathlib import Path

    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    if (Path("prefect.toml").is_file() or Path(".env").is_file()
            or (Path("pyproject.toml").is_file() and "[tool.prefect" in Path("pyproject.toml").read_text(errors="ignore"))):
        return True
    if not profiles.is_file():
        return False
    try:
        import tomllib

        data = tomllib.loads(profiles.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    active = os.environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
    return name in (data.get("profiles", {}).get(active) or {})


class TemporaryServer:
    """Prefect's temporary local server, started by us as early as possible instead of by Prefect on first use.

    Prefect starts it (``SubprocessASGIServer``) when the first client call finds no ``PREFECT_API_URL``:
    after its own import (~0.7 s) and the server module's (~2.4 s) in this process, then ~5 s of boot.
    Started here right after the cheap preflight checks, without importing Prefect, it boots on the other
    core while this process imports transformers and torch. It is the same command Prefect runs
    (prefect/server/api/server.py), on a free loopback port, with the same settings (the child reads the
    same environment and profile), plus a death signal: a ``kill -9`` of verifily leaves no server.
    """

    def __init__(self):
        import atexit
        import importlib.util
        import subprocess
        import threading
        from pathlib import Path

        from verifily_train.procs import die_with_parent, free_port

        app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1"},
            # its own session: a terminal's Ctrl-C (SIGINT to the foreground group) must reach verifily alone,
            # which then reports the interrupted run to the server and stops it (a dead server hangs the exit)
            start_new_session=True, preexec_fn=die_with_parent)
        atexit.register(self.stop)
        self.healthy = False
        self._thread = threading.Thread(target=self._wait_healthy, name="prefect-server-health", daemon=True)
        self._thread.start()

    def _wait_healthy(self, timeout: float = 90.0) -> None:
        from verifily_train.procs import wait_healthy

        self.healthy = wait_healthy(self.url, lambda: self.proc.poll() is None, timeout)

    def wait(self) -> None:
        """Block until the server answers; a server that died or never answered is a one-line error."""
        from verifily_train.errors import VerifilyError

        self._thread.join()
        if not self.healthy:
            code = self.proc.poll()
            self.stop()
            raise VerifilyError(None, "PREFECT_API_URL", "Prefect's temporary server did not start"
                                + (f" (exit code {code}: is PREFECT_HOME's disk full, or a file size limit set?)"
                                   if code is not None else " within 90 s")
                                + ": set PREFECT_API_URL to a running server, or start one with verifily stack up")

    def stop(self) -> None:
        from verifily_train.procs import stop

        if self.proc.poll() is None:
            stop(self.proc, timeout=5)


_SERVER: Optional[TemporaryServer] = None


def start_quiet_server() -> None:
    """Preflight's callback once the cheap checks pass: quiet the libraries, then start the server."""
    _quiet_libraries()
    start_temporary_server()


def start_temporary_server() -> Optional[TemporaryServer]:
    """Start Prefect's temporary server now when a run would start one anyway; export its URL for Prefect.

    Nothing is started when a server is configured (``PREFECT_API_URL``, a running stack, a profile), when
    Prefect is already imported (its settings are read), when ephemeral mode is off, or off Linux.
    """
    global _SERVER
    if _SERVER is not None:
        return _SERVER
    if (os.environ.get("PREFECT_API_URL") or not sys.platform.startswith("linux") or "prefect" in sys.modules
            or os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "").lower() in ("0", "false")
            or _prefect_setting_elsewhere("PREFECT_API_URL")
            or _prefect_setting_elsewhere("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE")):
        return None
    _SERVER = TemporaryServer()
    os.environ["PREFECT_API_URL"] = _SERVER.url  # read when Prefect is imported; child processes inherit it
    return _SERVER


def replay_identical_run(cfg) -> bool:
    """Write and print a new Run from the cache when these exact inputs completed before (pipeline/replay.py).

    It finishes as a flow run does (pipeline/runner.py): the claim, the comparison with the previous dataset
    version's run, and the Prefect artifacts when a Prefect server is configured (none is started for it).
    """
    if not cfg.cache.enabled or cfg.output.push_to_hub:
        return False
    from pathlib import Path

    from verifily_train.pipeline.runner import replay_run

    from verifily_train.cli.prefect_rest import RestPublisher
    from verifily_train.pipeline.runner import Publisher, replay_run

    api = os.environ.get("PREFECT_API_URL")
    publisher = RestPublisher(api) if api else Publisher()  # no server configured: none is started for a replay
    summary = replay_run(cfg, Path(cfg.output.dir), publisher)
    if summary is None:
        return False
    print_summary(summary)
    print("  replayed: every stage was cached for these exact inputs, so no Prefect flow run was made "
          "(--flow makes one)" + ("; its artifacts are on the Prefect server" if api else ""))
    if getattr(publisher, "failed", None):
        print(f"  warning: the Prefect server did not take the Run's artifacts ({publisher.failed})", file=sys.stderr)
    return True


def run_train(config: Optional[str], overrides: List[str], dataset: Optional[str], refresh: bool = False) -> int:
    _quiet_libraries()
    server = start_temporary_server()  # already started by preflight's callback unless a server is configured
    from verifily_train.flows.train import train

    _preload_fingerprint_modules()
    if server is not None:
        _preload_while_server_boots(server)
        server.wait()  # a half-started server must not be handed to the flow
    import logging

    from verifily_train.artifacts import record
    from verifily_train.pipeline import runner

    logging.raiseExceptions = False  # a log record the API refused is not printed ("--- Error logging to API ---")
    runner.LAST_SUMMARY, record.LAST_PUBLISHED = None, None
    try:
        with in_process_flow_settings():
            summary = train(config=config, overrides=overrides, dataset=dataset, refresh=refresh)
    except BaseException as err:
        sys.stderr.write("\n")  # end any progress bar's line so the error stands on its own
        if not is_prefect_api_error(err):
            raise
        if runner.LAST_SUMMARY is None and record.LAST_PUBLISHED is None:
            raise prefect_api_problem(err) from err
        # the Run is complete and verifiable; only Prefect's record of it failed
        summary = runner.LAST_SUMMARY or summary_from_run(record.LAST_PUBLISHED)
        print_summary(summary)
        print(f"  warning: the Run is complete, but Prefect's server could not record it ({_first_line(err)})",
              file=sys.stderr)
        return 0
    print_summary(summary)
    return 0


def summary_from_run(path: str) -> dict:
    """What :func:`print_summary` needs, read back from a published Run's files."""
    import json
    from pathlib import Path

    from verifily_train.artifacts.run import integrity_root, load_run_json

    record = load_run_json(Path(path))
    slices = json.loads((Path(path) / "slices.json").read_text(encoding="utf-8"))
    return {"run_id": record["run_id"], "path": path, "record": record, "slices": slices,
            "hard_examples": {"headline": record.get("hard_examples_headline")},
            "integrity_root": integrity_root(Path(path) / "checksums.sha256")}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line.split(" for url ")[0][:200]  # "Server error '500 Internal Server Error'", not the URL and advice


def is_prefect_api_error(err: BaseException) -> bool:
    """A failure of the Prefect server's API (an HTTP error status, or no connection), not of our stages."""
    try:
        import httpx
        from prefect.exceptions import PrefectHTTPStatusError
    except ImportError:
        return False
    return isinstance(err, (PrefectHTTPStatusError, httpx.HTTPError))


def prefect_api_problem(err: BaseException):
    """One line for a Prefect API failure before the Run was written: the stages that finished stay cached."""
    from verifily_train.errors import EnvironmentProblem

    return EnvironmentProblem(None, "PREFECT_API_URL", f"Prefect's server failed ({_first_line(err)}); its database "
                                                       "may be out of space or past a file size limit. Finished "
                                                       "stages are cached: fix it and re-run")


def run_reproduce(original) -> int:
    """Re-run a completed Run from its recorded config with the cache off; print the comparison."""
    from pathlib import Path

    from verifily_train.artifacts.reproduce import compare_reproduction, render_reproduction
    from verifily_train.artifacts.run import load_run_json
    from verifily_train.errors import RunError

    record = load_run_json(original)
    if record.get("status") != "completed":
        raise RunError(original, None, f"status is {record.get('status')!r}; only completed runs can be reproduced")
    _quiet_libraries()
    server = start_temporary_server()
    from verifily_train.flows.train import train

    if server is not None:
        _preload_while_server_boots(server)  # the cache is off: the train stage runs
        server.wait()
    with in_process_flow_settings():
        summary = train(config=str(Path(original) / "config.yaml"), overrides=["cache.enabled=false"],
                        runs_dir=str(Path(original).parent))
    report = compare_reproduction(Path(original), Path(summary["path"]))
    print(render_reproduction(report))
    return 0 if report["reproduced_exactly"] else 1


def run_attribute(run: str, by: str, values, seeds: int, budget_steps, budget_fraction, concurrency: int,
                  out_dir, deployment, as_json: bool, alpha: float = 0.05, correction: str = "holm") -> int:
    """Run the ``attribute`` flow in this process (its ablation runs in child processes) and print the verdicts."""
    import json

    _quiet_libraries()
    server = start_temporary_server()
    from verifily_train.attribution import render
    from verifily_train.flows.attribute import attribute

    if server is not None:
        server.wait()
    with in_process_flow_settings():
        result = attribute(run=run, by=by, values=values, seeds=seeds, budget_steps=budget_steps,
                           budget_fraction=budget_fraction, concurrency=concurrency, out_dir=out_dir,
                           deployment=deployment, alpha=alpha, correction=correction)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
        print(f"\n  attribution: {result['path']}/attribution.json  (report: attribution.html)")
    return 0
