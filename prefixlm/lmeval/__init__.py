"""lm-evaluation-harness interop: `adapter` registers the `prefixlm` model with lm-eval when
imported (needs the `[lmeval]` extra); `prefixlm lm-eval ...` runs lm-eval's CLI with it."""
