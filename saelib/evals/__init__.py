"""Evaluations of trained SAEs, one module per eval, each with a config and an output dataclass.

Every eval works on any SAE that :func:`saelib.saes.load_sae` can load and writes JSON.
"""
