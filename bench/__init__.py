"""Benchmarks: Verifily Train against the scripts users would otherwise write, and against the machine.

``python -m bench`` runs every suite and prints a markdown table; docs/benchmarks.md explains it.
"""
