"""models.class_tokens: class ids → context tokens, the null class, and label dropping for CFG."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.class_tokens import ClassTokens, drop_labels


def test_shapes_rows_and_null_class():
  tokens = ClassTokens(10, 4, 32, rngs=nnx.Rngs(0))
  assert tokens.embedding.shape == (11, 4, 32) and tokens.null_id == 10
  out = tokens(jnp.array([0, 3, 10, 3]))
  assert out.shape == (4, 4, 32) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out[1], out[3])  # same class, same tokens
  np.testing.assert_array_equal(out[2], tokens.embedding[10])
  assert not np.allclose(out[0], out[1])
  null = tokens.null(3)
  assert null.shape == (3, 4, 32)
  np.testing.assert_array_equal(null, np.broadcast_to(tokens.embedding[10], (3, 4, 32)))


def test_dtype_and_jit():
  tokens = ClassTokens(5, 2, 8, rngs=nnx.Rngs(1), dtype=jnp.bfloat16)
  out = nnx.jit(lambda m, labels: m(labels))(tokens, jnp.arange(6))
  assert out.dtype == jnp.bfloat16 and out.shape == (6, 2, 8)


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_tokens"):
    ClassTokens(10, 0, 8, rngs=nnx.Rngs(0))
  tokens = ClassTokens(3, 1, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\(B,\) int"):
    tokens(jnp.zeros((2, 2), jnp.int32))
  with pytest.raises(ValueError, match=r"\(B,\) int"):
    tokens(jnp.zeros((2,), jnp.float32))


def test_drop_labels():
  labels = jnp.arange(4000) % 10
  dropped = drop_labels(labels, jax.random.key(0), 10, 0.1)
  is_null = np.asarray(dropped == 10)
  assert 0.07 < is_null.mean() < 0.13
  np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(labels)[~is_null])
  np.testing.assert_array_equal(drop_labels(labels, jax.random.key(0), 10, 0.0), labels)
  assert (drop_labels(labels, jax.random.key(0), 10, 1.0) == 10).all()
  with pytest.raises(ValueError, match="drop rate"):
    drop_labels(labels, jax.random.key(0), 10, 1.5)
