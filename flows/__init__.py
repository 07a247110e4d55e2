"""Prefect flows composing the stage tasks. Installed as ``verifily_train.flows``."""
