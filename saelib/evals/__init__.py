"""Evaluations of trained SAEs, one module per eval, each with a config and an output dataclass.

Every eval works on any SAE that :func:`saelib.saes.load_sae` can load, whatever its code
(fixed-k TopK, variable-k ReLU, binary: it reads the output's active entries or dense view),
and writes JSON.
"""
