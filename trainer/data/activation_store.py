"""``TensorActivationStore``: a preallocated ``[item, component, neuron]`` tensor as a torch Dataset.

The same API as sparse_autoencoder's store; the streaming loader (``trainer.data.stream``) is what the
trainer uses for datasets larger than memory, and this store is for holding a sample in memory.

>>> import torch
>>> store = TensorActivationStore(max_items=1000, n_neurons=100, n_components=2)
>>> store.append(torch.randn(100), component_idx=0)
>>> store.append(torch.randn(100), component_idx=1)
>>> len(store)
1
>>> store.empty()
>>> batch = torch.randn(10, 100)
>>> store.extend(batch, component_idx=0)
>>> store.extend(batch, component_idx=1)
>>> len(store)
10
>>> store.shuffle()
>>> loader = torch.utils.data.DataLoader(store, shuffle=False, batch_size=2)
>>> next(iter(loader)).shape
torch.Size([2, 2, 100])
"""

import torch
from jaxtyping import Float
from torch import Tensor
from torch.utils.data import Dataset


class TensorActivationStore(Dataset):
    def __init__(self, max_items: int, n_neurons: int, n_components: int, device: torch.device | None = None):
        if min(max_items, n_neurons, n_components) <= 0:
            raise ValueError("max_items, n_neurons and n_components must be positive")
        self.max_items = max_items
        self._data = torch.empty((max_items, n_components, n_neurons), device=device)
        self._items_stored = [0] * n_components

    @property
    def n_components(self) -> int:
        return self._data.shape[1]

    @property
    def current_activations_stored_per_component(self) -> list[int]:
        return list(self._items_stored)

    def __len__(self) -> int:
        """Activation vectors stored per component (the fewest, if components differ).

        >>> store = TensorActivationStore(max_items=10_000_000, n_neurons=100, n_components=1)
        >>> store.append(torch.randn(100), component_idx=0)
        >>> store.append(torch.randn(100), component_idx=0)
        >>> len(store)
        2
        """
        return min(self._items_stored)

    def __sizeof__(self) -> int:
        """Bytes of the preallocated tensor.

        >>> TensorActivationStore(max_items=2, n_neurons=100, n_components=1).__sizeof__()
        800
        """
        return self._data.element_size() * self._data.nelement()

    def __getitem__(self, index) -> Float[Tensor, "..."]:
        """
        >>> store = TensorActivationStore(max_items=2, n_neurons=5, n_components=1)
        >>> store.append(torch.zeros(5), component_idx=0)
        >>> store.append(torch.ones(5), component_idx=0)
        >>> store[1, 0]
        tensor([1., 1., 1., 1., 1.])
        """
        return self._data[index]

    def shuffle(self) -> None:
        """Shuffle the stored items in place (faster than a DataLoader's shuffle).

        >>> _seed = torch.manual_seed(42)
        >>> store = TensorActivationStore(max_items=10, n_neurons=1, n_components=1)
        >>> for value in (0., 1., 2.):
        ...     store.append(torch.tensor([value]), component_idx=0)
        >>> store.shuffle()
        >>> [store[i, 0].item() for i in range(3)]
        [0.0, 2.0, 1.0]
        """
        n = len(self)
        self._data[:n] = self._data[torch.randperm(n, device=self._data.device)]

    def append(self, item: Float[Tensor, " neuron"], component_idx: int) -> None:
        """
        >>> store = TensorActivationStore(max_items=1, n_neurons=2, n_components=1)
        >>> store.append(torch.zeros(2), component_idx=0)
        >>> store.append(torch.zeros(2), component_idx=0)
        Traceback (most recent call last):
        ...
        IndexError: the store is full: 1 of 1 items of component 0 are stored
        """
        self.extend(item.unsqueeze(0), component_idx)

    def extend(self, batch: Float[Tensor, "batch neuron"], component_idx: int) -> None:
        """
        >>> store = TensorActivationStore(max_items=10, n_neurons=5, n_components=1)
        >>> store.extend(torch.zeros(2, 5), component_idx=0)
        >>> len(store)
        2
        """
        start = self._items_stored[component_idx]
        if start + batch.shape[0] > self.max_items:
            raise IndexError(f"the store is full: {start} of {self.max_items} items of component "
                             f"{component_idx} are stored")
        self._data[start : start + batch.shape[0], component_idx] = batch.to(self._data.device)
        self._items_stored[component_idx] = start + batch.shape[0]

    def empty(self) -> None:
        """
        >>> store = TensorActivationStore(max_items=10, n_neurons=5, n_components=1)
        >>> store.extend(torch.zeros(2, 5), component_idx=0)
        >>> store.empty()
        >>> len(store)
        0
        """
        self._items_stored = [0] * self.n_components
