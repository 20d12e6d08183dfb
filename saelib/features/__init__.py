"""Features: per-latent statistics of a trained SAE, static feature cards and the live explorer.

- ``stats``: :class:`FeatureStats` and ``compute_feature_stats``, built from ``codes`` (the one
  encoder pass), ``sweeps`` (activation statistics, top examples, quantile samples),
  ``windows`` (example contexts), ``decoder`` and ``coactivation`` (logit effects, neighbours)
  and ``tokens`` (readable token texts).
- ``store``: saving and loading statistics, cached beside each checkpoint, and the activations
  a checkpoint was trained on.
- ``text``: running an SAE on any text.
- ``cards``: static HTML feature cards; ``explorer``: the ipywidgets explorer.
"""
