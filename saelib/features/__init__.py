"""Features: per-latent statistics of a trained SAE, static feature cards and the live explorer."""
