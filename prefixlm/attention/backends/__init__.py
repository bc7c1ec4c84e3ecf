"""Attention backends; `..registry` lists them and their protocol."""
