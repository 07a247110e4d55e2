"""The pipeline: one module per stage (its key inputs beside its run function), the stage cache, replay, claims and the runner the flow and replay share."""
