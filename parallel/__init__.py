"""Sequence-parallel attention and the collectives it is built on; see parallel/README.md."""
