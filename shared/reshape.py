"""Reshape hook activations to rows of ``[item, neuron]`` before they are stored.

Same contract as sparse_autoencoder's reshape functions: every leading axis (batch, position, ...)
becomes one item axis, and the neuron axis is the last one (or the last ``concat_dims`` axes
concatenated, e.g. attention heads of ``attn.hook_z``).
"""

from collections.abc import Callable
from typing import TypeAlias

import torch  # noqa: F401  (the doctests use it)
from jaxtyping import Float
from torch import Tensor

ReshapeActivationsFunction: TypeAlias = Callable[[Tensor], Float[Tensor, "item neuron"]]


def reshape_to_last_dimension(batch_activations: Tensor) -> Float[Tensor, "item neuron"]:
    """Flatten all axes but the last into the item axis.

    >>> reshape_to_last_dimension(torch.rand(3, 100)).shape
    torch.Size([3, 100])
    >>> reshape_to_last_dimension(torch.randn(3, 3, 100)).shape
    torch.Size([9, 100])
    >>> reshape_to_last_dimension(torch.rand(3, 3, 3, 100)).shape
    torch.Size([27, 100])
    """
    return batch_activations.reshape(-1, batch_activations.shape[-1])


def reshape_concat_last_dimensions(
    batch_activations: Tensor, concat_dims: int
) -> Float[Tensor, "item neuron"]:
    """Concatenate the last ``concat_dims`` axes into the neuron axis, flatten the rest into items.

    >>> reshape_concat_last_dimensions(torch.randn(3, 4, 5), 2).shape
    torch.Size([3, 20])
    >>> reshape_concat_last_dimensions(torch.rand(2, 3, 4, 5), 3).shape
    torch.Size([2, 60])
    >>> reshape_concat_last_dimensions(torch.rand(2, 3), 2)
    Traceback (most recent call last):
    ...
    ValueError: concat_dims=2 needs at least 3 axes (one item axis), got shape (2, 3)
    """
    shape = tuple(batch_activations.shape)
    if not 1 <= concat_dims < len(shape):
        raise ValueError(
            f"concat_dims={concat_dims} needs at least {concat_dims + 1} axes (one item axis), "
            f"got shape {shape}"
        )
    n_neurons = 1
    for size in shape[-concat_dims:]:
        n_neurons *= size
    return batch_activations.reshape(-1, n_neurons)


def reshape_hook(batch_activations: Tensor, concat_dims: int) -> Float[Tensor, "item neuron"]:
    """The reshape a stored hook names: 1 means last dimension, more means concatenate."""
    if concat_dims == 1:
        return reshape_to_last_dimension(batch_activations)
    return reshape_concat_last_dimensions(batch_activations, concat_dims)
