"""The last decoder layer of a packed forward computed at label positions alone (model/last_layer.py).

fp32 only: under bf16 autocast the products it saves are the cheap part and each new row count costs a kernel
build. For the families whose registry entry says their decoder layer has the structure it assumes. Applied
after the dropout swap: it checks that the layer's dropouts follow the rows computed, and stays off otherwise.
"""

from __future__ import annotations

from verifily_train.model import last_layer
from verifily_train.training.speed.plan import Decision, Run, SpeedPlan

NAME = "last_layer_at_labels"
NEEDS = ("pack_rows",)


def eligible(run: Run, on: Decision) -> bool:
    return not run.low_precision and last_layer.supports(run.model)


def on_adapter(model, plan: SpeedPlan) -> int:
    return last_layer.use_label_rows_last_layer(model)


def keeps(model, count: int) -> bool:
    return bool(count)
