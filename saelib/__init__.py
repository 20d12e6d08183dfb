"""saelib: sparse autoencoders for language-model interpretability."""

__version__ = "0.1.0"
