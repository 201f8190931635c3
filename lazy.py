"""torch, imported where a run first uses it.

The compiled CPU loop on one process trains numpy tables (tables.py) and never needs torch, whose
import takes longer than training a small corpus. The modules it shares with the other loops
(trainer, engines, data, distributed) name torch through these handles: the first attribute read
imports the real module, and every read goes on to it.
"""
import importlib


class LazyModule:
    """A module imported at the first use of one of its attributes. Reads, writes and deletions
    of its attributes go to the module (a test's monkeypatch through the handle patches the module)."""

    def __init__(self, name):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_module", None)

    def _loaded(self):
        if self._module is None:
            object.__setattr__(self, "_module", importlib.import_module(self._name))
        return self._module

    def __getattr__(self, attr):  # the loops' steps read torch through here: one call, once loaded
        return getattr(self._module or self._loaded(), attr)

    def __setattr__(self, attr, value):
        setattr(self._loaded(), attr, value)

    def __delattr__(self, attr):
        delattr(self._loaded(), attr)

    def __repr__(self):
        return f"<lazily imported module {self._name!r}>"


torch = LazyModule("torch")
dist = LazyModule("torch.distributed")
