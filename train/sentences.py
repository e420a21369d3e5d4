"""Sentence splitting for the training programs: ``longformer_jax.sentences`` (the library serves text too)."""

from longformer_jax.sentences import LANGUAGE, split_sentences

__all__ = ["LANGUAGE", "split_sentences"]
