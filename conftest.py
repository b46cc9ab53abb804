"""Strict settings for every test and docstring example.

Strict dtype promotion and rank-promotion errors turn silent broadcasting and up-casting bugs in
layers into failures; warnings are errors (see pyproject.toml).

Hypothesis draws the same examples in every run (``derandomize``), so that a run of the suite,
CI's included, passes or fails the same way each time; ``HYPOTHESIS_EXPLORE=1`` draws new ones
(with the example database), to search for bugs on purpose.
"""

import importlib.util
import os

import jax
import pytest
from hypothesis import settings

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile("reproducible", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile("explore" if os.environ.get("HYPOTHESIS_EXPLORE") else "reproducible")


@pytest.fixture
def getkey():
    """Hands out a fresh, deterministic key per call: ``k = getkey()``."""
    base = jax.random.key(1234)
    counter = iter(range(1 << 30))
    return lambda: jax.random.fold_in(base, next(counter))


@pytest.fixture
def torch():
    """PyTorch on CPU in float32, deterministic and seeded per test; skips without torch."""
    torch = pytest.importorskip("torch")
    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # tiny tensors: worker threads would only spin
    torch.manual_seed(0)
    return torch


def _uses_torch(item: pytest.Item) -> bool:
    return item.name.startswith("metoryx.interop.torch.") or item.name == "pytorch.md"


def pytest_collection_modifyitems(config, items):
    """The examples of metoryx.interop.torch and docs/pytorch.md use PyTorch: skipped without
    it, as the parity tests are (it is installed for Python 3.11 only, see pyproject.toml)."""
    if importlib.util.find_spec("torch") is not None:
        return
    for item in items:
        if isinstance(item, pytest.DoctestItem) and _uses_torch(item):
            item.add_marker(pytest.mark.skip(reason="PyTorch is not installed"))
