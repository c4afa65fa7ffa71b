"""Exact memory of a phase of work, for tests and the bench: `TensorPeak`."""

from __future__ import annotations

import weakref

import torch


class TensorPeak:
    """Peak bytes of live tensor storages made inside the `with` (forward and backward), op by op: exact on
    any device, blind to what the allocator caches. A TorchDispatchMode: slow, for one phase at a time."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer._track(out, (args, kwargs))
                return out

        self.mode, self.live, self.peak, self.refs = Mode(), 0, 0, {}

    def _track(self, out, inputs):
        from torch.utils._pytree import tree_flatten

        # views and in-place results share an input's storage: not a new allocation (e.g. a weight's transpose)
        shared = {t.untyped_storage().data_ptr() for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if id(st) not in self.refs and st.data_ptr() not in shared:
                    n = st.nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    self.refs[id(st)] = weakref.ref(st, lambda _, k=id(st), n=n: self._free(k, n))

    def _free(self, key, n):
        self.refs.pop(key, None)
        self.live -= n

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)
