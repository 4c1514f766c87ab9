"""A key/value cache for generation in which each layer call may run a subset of the batch.

transformers' attention modules only ever call ``cache.update(keys, values, layer_idx, ...)``
and attend over what it returns. :class:`RowCache` answers that call for the rows that are
running the layer right now (:meth:`RowCache.at`): when some rows of a batch have exited at
an earlier layer, the others run on without them, and each row's keys and values still land
in its own slots. Slots are preallocated for the whole generation; a slot index is the same
for every row (left padding aligns the rows), so the attention mask, not the cache, says
which slots hold real tokens.
"""

from __future__ import annotations

import torch


class RowCache:
    def __init__(self, num_layers: int, batch_size: int, capacity: int):
        self.batch_size = batch_size
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.start = 0
        self.rows: torch.Tensor | None = None  # None: every row of the batch

    def at(self, start: int, rows: torch.Tensor | None = None) -> "RowCache":
        """Route the next updates to slots ``start``.. of batch rows ``rows`` (sorted; None: all)."""
        self.start = start
        self.rows = None if rows is None or rows.numel() == self.batch_size else rows
        return self

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store [rows, heads, q, dim] keys/values; return the rows' keys/values of all slots so far."""
        if self.keys[layer_idx] is None:
            shape = (self.batch_size, keys.shape[1], self.capacity, keys.shape[3])
            self.keys[layer_idx] = keys.new_zeros(shape)
            self.values[layer_idx] = values.new_zeros((*shape[:3], values.shape[3]))
        all_keys, all_values = self.keys[layer_idx], self.values[layer_idx]
        end = self.start + keys.shape[2]
        if self.rows is None:  # slices: views, no copies
            all_keys[:, :, self.start : end] = keys
            all_values[:, :, self.start : end] = values
            return all_keys[:, :, :end], all_values[:, :, :end]
        all_keys[self.rows, :, self.start : end] = keys.to(all_keys.dtype)
        all_values[self.rows, :, self.start : end] = values.to(all_values.dtype)
        return all_keys[self.rows, :, :end], all_values[self.rows, :, :end]
