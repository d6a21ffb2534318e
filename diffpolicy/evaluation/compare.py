"""Two policies' evaluations compared seed by seed: McNemar's exact test on the seeds both played.

`diffpolicy eval` plays episode i of a run on seed `seed + i`, and a seed fixes the task's initial
state, so two policies evaluated on the same seeds form pairs. A seed that one policy solves and the
other does not is a discordant pair; under "no difference" each discordant pair goes either way with
probability 1/2, so the number the second policy gained is Binomial(gained + lost, 1/2) given their
sum. McNemar's exact test is that binomial test (two-sided). Unlike comparing the two Wilson
intervals, it uses the pairing: two policies that fail on the same hard seeds differ less than
their rates' spread suggests.

    a = load_outcomes(["runs/x/checkpoints/step_52/eval_seed100000_n100"])
    b = load_outcomes(["runs/y/checkpoints/step_123/eval_seed100000_n100"])
    print(compare(a, b))     # each rate with its Wilson interval; gained, lost, McNemar p on the shared seeds
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from diffpolicy.errors import InvalidTypeError, InvalidValueError, MissingFileError
from diffpolicy.evaluation.stats import SuccessRate, success_rate


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value of `gained` and `lost` discordant pairs:
    min(1, 2 P(X <= min(gained, lost))) for X ~ Binomial(gained + lost, 1/2); 1 without discordant pairs."""
    for name, value in (("gained", gained), ("lost", lost)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidValueError(f"mcnemar_exact: {name} must be an integer >= 0, got {value!r}")
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1))
    return min(1.0, 2.0 * tail / 2**n)


def load_outcomes(paths: Iterable[str | Path]) -> dict[int, bool]:
    """Seed -> success of one policy, from `diffpolicy eval` outputs: evaluation directories (their
    `episodes.json`) or `episodes.json` files, on disjoint seeds. A seed in two of them is refused."""
    paths = [Path(path) for path in paths]
    outcomes: dict[int, bool] = {}
    source: dict[int, Path] = {}
    for path in paths:
        file = path / "episodes.json" if path.is_dir() else path
        if not file.is_file():
            raise MissingFileError(f"{path}: expected an evaluation directory holding episodes.json "
                                   f"(`diffpolicy eval` writes one) or an episodes.json file")
        try:
            episodes = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise InvalidValueError(f"{file}: not JSON ({err})") from None
        if not isinstance(episodes, list):
            raise InvalidTypeError(f"{file}: expected a list of episodes, got {type(episodes).__name__}")
        for i, episode in enumerate(episodes):
            seed = episode.get("seed") if isinstance(episode, dict) else None
            success = episode.get("success") if isinstance(episode, dict) else None
            if isinstance(seed, bool) or not isinstance(seed, int) or not isinstance(success, bool):
                raise InvalidValueError(f"{file}: episode {i}: expected an object with an integer 'seed' and a "
                                        f"boolean 'success', got {episode!r}")
            if seed in outcomes:
                raise InvalidValueError(f"seed {seed} appears twice: in {source[seed]} and in {file} "
                                        f"(each seed counts once per policy)")
            outcomes[seed], source[seed] = success, file
    if not outcomes:
        raise InvalidValueError(f"no episodes in {[str(path) for path in paths]}")
    return outcomes


@dataclass(frozen=True)
class Comparison:
    """Policy A against policy B. `a`, `b`: each one's success over all its episodes; `shared`: the
    seeds both played; `a_shared`, `b_shared`: their successes there; `gained` / `lost`: shared seeds
    only B / only A solved; `p`: McNemar's exact p of (gained, lost)."""

    a: SuccessRate
    b: SuccessRate
    shared: int
    a_shared: int
    b_shared: int
    gained: int
    lost: int
    p: float

    def __str__(self) -> str:
        lines = [f"A: {self.a}", f"B: {self.b}"]
        if self.shared:
            lines.append(f"on the {self.shared} seeds both played: A {self.a_shared}, B {self.b_shared}; "
                         f"B gained {self.gained}, lost {self.lost}; McNemar exact p = {self.p:.3g}")
        else:
            lines.append("no seed in common: no paired test (evaluate both on the same seeds)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"a": self.a.to_dict(), "b": self.b.to_dict(), "shared_seeds": self.shared,
                "a_shared_successes": self.a_shared, "b_shared_successes": self.b_shared,
                "gained": self.gained, "lost": self.lost, "mcnemar_p": self.p}


def compare(a: Mapping[int, bool], b: Mapping[int, bool]) -> Comparison:
    """Compare two policies' seed -> success outcomes (`load_outcomes`)."""
    shared = sorted(a.keys() & b.keys())
    gained = sum(1 for s in shared if b[s] and not a[s])
    lost = sum(1 for s in shared if a[s] and not b[s])
    return Comparison(a=success_rate(list(a.values())), b=success_rate(list(b.values())), shared=len(shared),
                      a_shared=sum(a[s] for s in shared), b_shared=sum(b[s] for s in shared),
                      gained=gained, lost=lost, p=mcnemar_exact(gained, lost))
