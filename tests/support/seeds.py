"""Seeds for randomised tests: printed, and replayable from the environment.

``seeded_random("chaos", 20261129)`` returns a ``random.Random`` whose seed comes
from LINECHAT_TEST_SEED_CHAOS, else LINECHAT_TEST_SEED, else the default; the
value ``random`` picks a fresh one. The seed is printed, so a failing run's
output says how to replay it (pytest shows a failed test's output).
"""

from __future__ import annotations

import os
import random
import secrets

__all__ = ["SEED_ENV", "seed_for", "seeded_random"]

SEED_ENV = "LINECHAT_TEST_SEED"


def seed_for(name: str, default: int, *, aliases: tuple[str, ...] = ()) -> int:
    """The seed of the test called ``name`` (its own variable, ``aliases``, then the common one)."""
    own = f"{SEED_ENV}_{name.upper()}"
    for variable in (own, *aliases, SEED_ENV):
        value = os.environ.get(variable)
        if not value:
            continue
        if value == "random":
            seed = secrets.randbits(32)
        else:
            try:
                seed = int(value)
            except ValueError:
                raise ValueError(f"{variable}={value!r}: an integer or 'random'") from None
        source = variable
        break
    else:
        seed, source = default, "default"
    print(f"seed {name}: {seed} ({source}; replay with {own}={seed})")
    return seed


def seeded_random(name: str, default: int, *, aliases: tuple[str, ...] = ()) -> random.Random:
    return random.Random(seed_for(name, default, aliases=aliases))
