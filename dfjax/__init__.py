"""dfjax: diffusion inference in JAX over a device mesh."""
