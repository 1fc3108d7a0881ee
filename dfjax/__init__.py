"""dfjax: diffusion inference in JAX over a device mesh."""

from dfjax.loading import load_model  # noqa: E402,F401
