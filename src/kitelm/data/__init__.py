"""Corpora, tokenizers and memory-mapped token datasets."""
