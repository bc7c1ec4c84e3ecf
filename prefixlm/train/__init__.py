"""Training: run config, the loop, checkpoints, FSDP2, metrics, and a run end to end (`run`).

Modules are imported by name (`prefixlm.train.config`, ...): reading a config needs no torch.
"""
