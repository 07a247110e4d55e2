"""Shared by the suites: settings, medians and ratios, results files, held-out loss, machine description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class TrainSettings:
    """One set of hyper-parameters every contender of a throughput benchmark trains with."""

    rows: int = 160
    batch_size: int = 8
    max_len: int = 96
    epochs: int = 1
    learning_rate: float = 1e-3
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    seed: int = 42
    threads: int = 2
    eval_rows: int = 40


LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class StepClock:
    """When each optimizer step ended, for a warm-up-free rate (compilation happens in the first steps).

    Call it as ``clock(step, max_steps)`` after a step (our train stage's ``on_progress`` hook, at most
    once a second, and always at the last step; for the peers, :meth:`callback`). The steady rate
    counts the run's real tokens in proportion to the steps after the first mark at or beyond
    ``skip`` of the run: batches are random draws of one data set, so each step's share of the tokens
    is close to 1/steps (an estimate, the same for every contender on the same data and order).
    """

    def __init__(self):
        self.marks: List[tuple] = []

    def __call__(self, step: int, max_steps: int) -> None:
        self.marks.append((int(step), int(max_steps), time.perf_counter()))

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock(state.global_step, state.max_steps)

        return Clock()

    def steady_tokens_per_second(self, tokens: float, skip: float = 0.25) -> Optional[float]:
        if not self.marks:
            return None
        last_step, total, end = self.marks[-1]
        first = next(((s, t) for s, _, t in self.marks if s >= skip * total and s < last_step), None)
        if first is None or total <= 0:
            return None
        return tokens * (last_step - first[0]) / total / (end - first[1])


def median(values: List[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def alternate(contenders: Dict[str, Callable[[], dict]], reps: int, log=print,
              failed: Optional[Dict[str, str]] = None) -> Dict[str, List[dict]]:
    """Run every contender once per repetition, in turn, so machine noise hits them all alike.

    ``failed``: where given, a contender that raises is recorded there ({name: error}) and left out of
    the results whole (ratios pair repetitions), and the others go on; else the error propagates.
    """
    results: Dict[str, List[dict]] = {name: [] for name in contenders}
    keep_going = failed is not None
    failed = {} if failed is None else failed
    for rep in range(reps):
        for name, run in contenders.items():
            if name in failed:
                continue
            started = time.perf_counter()
            try:
                outcome = run()
            except Exception as err:  # noqa: BLE001 - one contender failing must not lose the others' figures
                if not keep_going:
                    raise
                failed[name] = f"{type(err).__name__}: {err}"
                results.pop(name)  # ratios pair repetitions: a contender with a gap is left out whole
                log(f"  rep {rep + 1}/{reps} {name}: FAILED ({failed[name]})")
                continue
            results[name].append(outcome)
            log(f"  rep {rep + 1}/{reps} {name}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in outcome.items()
                if k in ("tokens_per_second", "cpu_tokens_per_second", "steady_tokens_per_second", "eval_loss", "seconds",
                         "speedup")) + f" ({time.perf_counter() - started:.0f} s)")
    return results


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def quiet_libraries() -> None:
    """Offline, no progress bars, errors only: what every bench process (parent or contender) sets."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # the peers need it; our contenders do not
        pass


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    from verifily_train.model.device import cpu_supports_bf16

    cpu, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "torch_bf16_kernels": cpu_supports_bf16(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version()}


def write_result(name: str, payload: dict, out_dir: Path = RESULTS) -> Path:
    """``<out_dir>/<name>.json``, written whole (temp file, then rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_jsonable) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _jsonable(value):
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)


def heldout_loss(model, examples: List[dict], batch_size: int = 8) -> float:
    """Mean next-token loss over the response tokens of ``examples`` (fp32, no autocast): one yardstick for all."""
    import torch
    import torch.nn.functional as F

    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            width = max(len(e["input_ids"]) for e in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, e in enumerate(batch):
                n = len(e["input_ids"])
                ids[r, :n] = torch.tensor(e["input_ids"])
                labels[r, :n] = torch.tensor(e["labels"])
                mask[r, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
            targets = labels[:, 1:]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((targets != -100).sum())
    return total / max(count, 1)


def markdown_table(headers: List[str], rows: List[List]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def finished_trials(out: Path, settings: dict) -> list:
    """Resume: the trials ``out`` already holds when it was written with the same settings, else none."""
    if not out.is_file():
        return []
    previous = json.loads(out.read_text())
    return previous.get("trials", []) if previous.get("settings") == json.loads(json.dumps(settings)) else []
