"""Classification losses and metrics on logits and (soft or multi-hot) label vectors, in float32.

Losses return one value per example; the train step averages them, the eval step sums them with a mask.
"""
import jax
import jax.numpy as jnp


def softmax_xent(logits, labels):
  return -jnp.sum(labels * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def sigmoid_xent(logits, labels):
  """big_vision's multi-label loss: independent binary cross-entropies, summed over classes."""
  logits = logits.astype(jnp.float32)
  return -jnp.sum(labels * jax.nn.log_sigmoid(logits) + (1.0 - labels) * jax.nn.log_sigmoid(-logits), axis=-1)


LOSSES = {'softmax_xent': softmax_xent, 'sigmoid_xent': sigmoid_xent}


def loss_fn(name: str):
  if name not in LOSSES:
    raise ValueError(f'unknown loss {name!r}; choose one of {sorted(LOSSES)}')
  return LOSSES[name]


def smooth_labels(labels, smoothing: float):
  """timm's label smoothing: 1 - smoothing + smoothing/K on the true class, smoothing/K elsewhere."""
  return labels * (1.0 - smoothing) + smoothing / labels.shape[-1]


def topk_correct(logits, labels, k: int):
  """1.0 where a label at one of the k highest logits is positive (ImageNet-ReaL semantics for multi-hot)."""
  _, top = jax.lax.top_k(logits, k)
  return (jnp.take_along_axis(labels, top, axis=-1) > 0).any(axis=-1).astype(jnp.float32)
