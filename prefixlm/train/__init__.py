"""Training: config, loop, checkpoints, FSDP2, the built-in synthetic task, generate/eval/export.

Imports stay lazy here so that `import prefixlm.train.config` does not pull in the data layer.
"""
