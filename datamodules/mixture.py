"""A deterministic weighted mixture of sources whose state is a few integers (docs/ARCHITECTURE.md, "Data").

Sample i of the run (the *global* index, over all ranks) comes from the source that is
furthest behind its share: argmax_s  w_s * (i - since + 1) - picks_s  (ties go to the name that
sorts first), where `picks_s` counts the picks since the weights last changed at index `since`.
This tracks the weights exactly at every prefix (never more than one sample off per source),
unlike i.i.d. draws. Within a source, `cursor_s` counts the windows taken; epoch e of a source
visits its windows in a permutation seeded by (seed, source, e).

Rank r of W takes the global samples r, r + W, ..., so the state does not depend on the world
size and a run resumes exactly on any number of devices.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from dataclasses import dataclass, field

import numpy as np


@dataclass
class MixtureState:
    index: int = 0
    """The next global sample index."""
    since: int = 0
    """Global index at which the current weights took effect."""
    picks: dict[str, int] = field(default_factory=dict)
    """Samples drawn from each source since `since`."""
    cursors: dict[str, int] = field(default_factory=dict)
    """Windows drawn from each source over the whole run."""
    weights: dict[str, float] = field(default_factory=dict)
    """The weights in force, to notice a change on resume."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Mixture:
    def __init__(self, weights: dict[str, float], sizes: dict[str, int], seed: int = 0,
                 state: dict | None = None, skip: list[tuple[int, int]] = ()):
        """weights and sizes (windows per source) by source name; `skip`: [start, end) ranges
        of global indices drawn but never handed out (the data before a loss spike that `live`
        rolled back from)."""
        self.names = sorted(weights)
        self.skip = [tuple(w) for w in skip]
        total = sum(weights.values())
        self.shares = np.array([weights[n] / total for n in self.names])
        self.sizes = sizes
        self.seed = seed
        self._perms: dict[tuple[str, int], np.ndarray] = {}
        self.state = MixtureState(**copy.deepcopy(state)) if state else MixtureState()
        s = self.state
        if s.weights != weights:  # new or changed weights: continue from the cursors
            s.since, s.picks, s.weights = s.index, {n: 0 for n in self.names}, dict(weights)
        for n in self.names:
            s.cursors.setdefault(n, 0)
            s.picks.setdefault(n, 0)

    def next(self) -> tuple[str, int]:
        """(source, window index) of the next global sample that is not skipped; advances the state."""
        while any(start <= self.state.index < end for start, end in self.skip):
            self._draw()
        return self._draw()

    def _draw(self) -> tuple[str, int]:
        s = self.state
        picks = np.array([s.picks[n] for n in self.names])
        name = self.names[int(np.argmax(self.shares * (s.index - s.since + 1) - picks))]
        cursor = s.cursors[name]
        s.index += 1
        s.picks[name] += 1
        s.cursors[name] = cursor + 1
        epoch, pos = divmod(cursor, self.sizes[name])
        return name, int(self._perm(name, epoch)[pos])

    def _perm(self, name: str, epoch: int) -> np.ndarray:
        key = (name, epoch)
        if key not in self._perms:
            digest = hashlib.sha256(f"{self.seed}/{name}/{epoch}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            self._perms = {k: v for k, v in self._perms.items() if k[0] != name}  # one epoch each
            self._perms[key] = rng.permutation(self.sizes[name])
        return self._perms[key]
