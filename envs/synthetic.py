"""Seeded arithmetic tasks that a small model cannot do in its head but can with a Python tool.

The default task set of the main job and of the tests: no download, infinite, exactly gradable (integer or tuple
answers), and with a difficulty knob. Task `i` depends only on (seed, level, i), so GRPO groups and reruns see the same
problem. Levels:

* 0 - very easy: two-digit sums and products (a tiny RL run can show learning here, even without the tool);
* 1 - three-digit products, sums of several 3-4 digit numbers;
* 2 - five-digit products, modular powers ``a^b mod m``;
* 3 - digit sums of large powers, counting primes in a range, 2x2 linear systems;
* 4 - 3x3 linear systems, sums of primes below N, modular powers with large moduli.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence

from envs.task import Task

MAX_LEVEL = 4


@functools.lru_cache(maxsize=1)
def _sieve(limit: int = 200_000) -> bytearray:
    is_prime = bytearray([1]) * (limit + 1)
    is_prime[0:2] = b"\x00\x00"
    for p in range(2, int(limit**0.5) + 1):
        if is_prime[p]:
            is_prime[p * p :: p] = bytearray(len(is_prime[p * p :: p]))
    return is_prime


def _digit_sum(n: int) -> int:
    return sum(map(int, str(n)))


def _add2(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(10, 99), r.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def _mul2(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(11, 99), r.randint(11, 99)
    return f"What is {a} * {b}?", str(a * b)


def _mul3(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(101, 999), r.randint(101, 999)
    return f"Compute {a} * {b}.", str(a * b)


def _sum_many(r: random.Random) -> tuple[str, str]:
    xs = [r.randint(100, 9999) for _ in range(r.randint(4, 6))]
    return f"Compute {' + '.join(map(str, xs))}.", str(sum(xs))


def _mul5(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(10_001, 99_999), r.randint(10_001, 99_999)
    return f"Compute {a} * {b}.", str(a * b)


def _modpow(r: random.Random) -> tuple[str, str]:
    a, b, m = r.randint(2, 99), r.randint(100, 9999), r.choice([97, 101, 1000, 1009, 9973, 10007])
    return f"What is the remainder when {a}^{b} is divided by {m}?", str(pow(a, b, m))


def _digit_sum_pow(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(2, 99), r.randint(50, 300)
    return f"What is the sum of the digits of {a}^{b}?", str(_digit_sum(a**b))


def _count_primes(r: random.Random) -> tuple[str, str]:
    lo = r.randint(1, 90_000)
    hi = lo + r.randint(500, 10_000)
    n = sum(_sieve()[lo : hi + 1])
    return f"How many prime numbers are there between {lo} and {hi}, inclusive?", str(n)


def _linear(coeffs: Sequence[int], names: str, rhs: int) -> str:
    """'3x - y + 2z = 7' (no '1x', no '+ -')."""
    out = ""
    for c, v in zip(coeffs, names):
        mag = "" if abs(c) == 1 else str(abs(c))
        if not out:
            out = ("-" if c < 0 else "") + mag + v
        else:
            out += (" - " if c < 0 else " + ") + mag + v
    return f"{out} = {rhs}"


def _nonzero(r: random.Random, k: int) -> int:
    return r.choice([i for i in range(-k, k + 1) if i])


def _system2(r: random.Random) -> tuple[str, str]:
    while True:
        x, y = r.randint(-20, 20), r.randint(-20, 20)
        a, b, c, d = (_nonzero(r, 12) for _ in range(4))
        if a * d - b * c != 0:
            break
    e, f = a * x + b * y, c * x + d * y
    eqs = f"{_linear((a, b), 'xy', e)}, {_linear((c, d), 'xy', f)}"
    return f"Solve the system {eqs}. Give the answer as an ordered pair (x, y).", f"({x}, {y})"


def _system3(r: random.Random) -> tuple[str, str]:
    while True:
        sol = [r.randint(-15, 15) for _ in range(3)]
        m = [[_nonzero(r, 9) for _ in range(3)] for _ in range(3)]
        det = (
            m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
        )
        if det != 0:
            break
    rows = []
    for row in m:
        rhs = sum(c * v for c, v in zip(row, sol))
        rows.append(_linear(row, "xyz", rhs))
    q = f"Solve the system {'; '.join(rows)}. Give the answer as an ordered triple (x, y, z)."
    return q, f"({sol[0]}, {sol[1]}, {sol[2]})"


def _sum_primes(r: random.Random) -> tuple[str, str]:
    n = r.randint(10_000, 200_000)
    s = _sieve()
    return f"What is the sum of all prime numbers less than {n}?", str(sum(i for i in range(n) if s[i]))


def _modpow_big(r: random.Random) -> tuple[str, str]:
    a, b, m = r.randint(10**5, 10**7), r.randint(10**5, 10**7), r.randint(10**8, 10**9)
    return f"What is {a}^{b} mod {m}?", str(pow(a, b, m))


GENERATORS: dict[int, list[Callable[[random.Random], tuple[str, str]]]] = {
    0: [_add2, _mul2],
    1: [_mul3, _sum_many],
    2: [_mul5, _modpow],
    3: [_digit_sum_pow, _count_primes, _system2],
    4: [_system3, _sum_primes, _modpow_big],
}


def make_task(index: int, level: int, seed: int = 0) -> Task:
    """Task `index` of `level`; the same (index, level, seed) always gives the same task."""
    if level not in GENERATORS:
        raise ValueError(f"synthetic level must be 0..{MAX_LEVEL}, got {level}")
    r = random.Random(f"alp-synthetic:{seed}:{level}:{index}")
    gen = r.choice(GENERATORS[level])
    question, answer = gen(r)
    return Task(
        question,
        answer,
        id=f"synthetic-L{level}-{seed}-{index}",
        source="synthetic",
        meta={"level": level, "kind": gen.__name__.lstrip("_")},
    )


class SyntheticTasks(Sequence[Task]):
    """A lazy, indexable task list: `levels` are interleaved (task i has level levels[i % len(levels)])."""

    def __init__(self, num_tasks: int = 1000, levels: int | Sequence[int] = 1, seed: int = 0):
        self.levels = [levels] if isinstance(levels, int) else list(levels)
        if not self.levels or any(lv not in GENERATORS for lv in self.levels):
            raise ValueError(f"synthetic levels must be in 0..{MAX_LEVEL}, got {levels}")
        self.num_tasks, self.seed = int(num_tasks), int(seed)

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return make_task(index, self.levels[index % len(self.levels)], self.seed)
