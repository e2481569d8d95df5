"""Launchers (single host, Cloud TPU pod slice, SLURM) and sweeps.

See `launch/README.md`. Every launcher runs an unchanged `ctx-train` /
`ctx-eval` command; multi-process start-up happens inside the program
(`ctx_jax/distributed.py`), driven by `CTX_JAX_*` environment variables or by
cluster auto-detection.
"""
