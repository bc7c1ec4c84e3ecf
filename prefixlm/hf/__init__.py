"""Interoperability with Hugging Face: exported checkpoints (`export`)."""
