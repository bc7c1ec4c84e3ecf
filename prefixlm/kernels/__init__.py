"""Triton kernels. Each file starts with the math it computes; the backends in
`prefixlm.attention` only validate inputs, pick a configuration and launch."""
