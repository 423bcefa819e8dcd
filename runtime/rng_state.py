"""RNG states as tensors and plain types, so a checkpoint's rank file loads with weights_only=True.

torch's state is already a ByteTensor; Python's ``random.getstate()`` (version, 625 ints, gauss)
and NumPy's legacy global state ('MT19937', 624 uint32 keys, pos, has_gauss, gauss) become int64
tensors and numbers. Round trips are exact.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["capture", "restore"]


def capture() -> dict:
    """This process's torch, Python and NumPy global RNG states, weights-only serialisable."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": {"version": int(version), "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(cached),
        },
    }


def restore(state: dict) -> None:
    """Set the states :func:`capture` returned (a state without python/numpy keys sets torch only)."""
    torch.set_rng_state(state["torch"])
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss"]))
    if "numpy" in state:
        npy = state["numpy"]
        keys = npy["keys"].numpy().astype(np.uint32)
        np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["gauss"]))
