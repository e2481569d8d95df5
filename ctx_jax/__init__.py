"""ctx_jax: CrossTransformers in JAX/Flax.

Importing the package applies the project's default XLA settings
(`xla_config.default_xla_flags`) before JAX starts its backends.
"""

from ctx_jax import xla_config

xla_config.default_xla_flags()
