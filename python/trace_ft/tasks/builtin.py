"""The built-in synthetic suite: text skills in one format, ``"<kw>:<input>="`` → answer,
generated from a seed, no download.

`BASE` is the broad mixture the built-in model is pretrained on (eleven keyword-conditioned
string and number operations: copy, length, next/previous letter, upper case,
increment/decrement, first/last character, drop the first character, the first two); its
retention is reported as task 0. `SKILLS` are the continual tasks: each is a fine-tune of
primitives the base knows (reverse ~ copy, substitution ~ next letter, add ~ increment,
count ~ length), not learning from scratch.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable, Sequence

from .base import Example, Task
from .instruct import INSTRUCT_SUITE
from .real import REAL_SUITE


LETTERS = string.ascii_lowercase
DIGITS = string.digits
# A fixed letter substitution (the "sub" skill), the same for every run and seed.
_CIPHER_RNG = random.Random(20260514)
CIPHER = dict(zip(LETTERS, _CIPHER_RNG.sample(LETTERS, len(LETTERS))))


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _gen_copy(rng):
    s = _word(rng, 2, 7, LETTERS + DIGITS)
    return f"cp:{s}=", s


def _gen_len(rng):
    s = _word(rng, 1, 9, LETTERS + DIGITS)
    return f"len:{s}=", str(len(s))


def _gen_next(rng):
    s = _word(rng, 2, 6)
    return f"nx:{s}=", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)


def _gen_inc(rng):
    n = rng.randint(0, 998)
    return f"inc:{n}=", str(n + 1)


def _gen_last(rng):
    s = _word(rng, 2, 8, LETTERS + DIGITS)
    return f"lst:{s}=", s[-1]


def _gen_rev(rng):
    s = _word(rng, 3, 7)
    return f"rev:{s}=", s[::-1]


def _gen_sort(rng):
    s = _word(rng, 2, 5, DIGITS)
    return f"sort:{s}=", "".join(sorted(s))


def _gen_dup(rng):
    s = _word(rng, 2, 5)
    return f"dup:{s}=", "".join(c + c for c in s)


def _gen_rot(rng):
    s = _word(rng, 3, 7)
    return f"rot:{s}=", s[1:] + s[0]


def _gen_add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add:{a}+{b}=", str(a + b)


def _gen_sub(rng):
    s = _word(rng, 3, 6)
    return f"sub:{s}=", "".join(CIPHER[c] for c in s)


def _gen_count(rng):
    c = rng.choice("abcde")
    s = _word(rng, 4, 9, "abcde")
    return f"cnt:{c}|{s}=", str(s.count(c))


def _gen_first(rng):
    s = _word(rng, 2, 8, LETTERS + DIGITS)
    return f"fst:{s}=", s[0]


def _gen_prev(rng):
    s = _word(rng, 2, 6)
    return f"pv:{s}=", "".join(LETTERS[(LETTERS.index(c) - 1) % 26] for c in s)


def _gen_upper(rng):
    s = _word(rng, 2, 6)
    return f"up:{s}=", s.upper()


def _gen_dec(rng):
    n = rng.randint(1, 999)
    return f"dec:{n}=", str(n - 1)


def _gen_drop(rng):
    s = _word(rng, 3, 7, LETTERS + DIGITS)
    return f"drp:{s}=", s[1:]


def _gen_pair(rng):
    s = _word(rng, 3, 8, LETTERS + DIGITS)
    return f"two:{s}=", s[:2]


BASE_OPS: dict[str, Callable] = {
    "copy": _gen_copy, "len": _gen_len, "next": _gen_next, "prev": _gen_prev, "upper": _gen_upper,
    "inc": _gen_inc, "dec": _gen_dec, "first": _gen_first, "last": _gen_last, "drop": _gen_drop,
    "pair": _gen_pair,
}
SKILLS: dict[str, Callable] = {
    "rev": _gen_rev, "sub": _gen_sub, "dup": _gen_dup, "sort": _gen_sort, "count": _gen_count,
    "rot": _gen_rot, "add": _gen_add,
}
# The "formats" suite: what instruction tuning of an LLM asks of it. Each task is a base
# skill under a new keyword or in a new output format, or two base skills composed, so it
# needs little new capacity (the "skills" suite asks for skills the base never had).
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _gen_echo(rng):  # copy, under a new keyword
    s = _word(rng, 2, 7, LETTERS + DIGITS)
    return f"echo:{s}=", s


def _gen_len_word(rng):  # length, written as a word
    s = _word(rng, 1, 9, LETTERS + DIGITS)
    return f"lenw:{s}=", NUMBER_WORDS[len(s)]


def _gen_upper_next(rng):  # next letter, then upper case
    s = _word(rng, 2, 6)
    return f"upnx:{s}=", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s).upper()


def _gen_spaced(rng):  # copy, one space between characters
    s = _word(rng, 2, 6, LETTERS + DIGITS)
    return f"spc:{s}=", " ".join(s)


def _gen_first_last(rng):  # first and last character
    s = _word(rng, 2, 8, LETTERS + DIGITS)
    return f"fl:{s}=", s[0] + s[-1]


FORMATS: dict[str, Callable] = {
    "echo": _gen_echo, "lenw": _gen_len_word, "upnx": _gen_upper_next, "spc": _gen_spaced,
    "fl": _gen_first_last,
}
BASE = "base"
DEFAULT_ORDER: tuple[str, ...] = ("rev", "sub", "dup", "sort", "count")
# "instruct" and "real" are for a real pretrained chat model (tasks.instruct, tasks.real),
# not the built-in one
SUITES: dict[str, tuple[str, ...]] = {"skills": DEFAULT_ORDER,
                                      "formats": ("echo", "lenw", "upnx", "spc", "fl"),
                                      "instruct": INSTRUCT_SUITE, "real": REAL_SUITE}
PRETRAINED_SUITES = ("instruct", "real")


def _sample(gens: Sequence[Callable], n: int, rng: random.Random, avoid: set[str]) -> list[Example]:
    """`n` examples, round-robin over the generators, prompts distinct and not in `avoid`.
    A generator that keeps repeating itself (its space is used up) drops out."""
    out, seen, live = [], set(avoid), list(gens)
    misses: dict[int, int] = {}
    turn = 0
    while len(out) < n:
        if not live:
            raise ValueError(f"could not draw {n} distinct examples (got {len(out)})")
        k = turn % len(live)
        prompt, answer = live[k](rng)
        if prompt in seen:
            misses[id(live[k])] = misses.get(id(live[k]), 0) + 1
            if misses[id(live[k])] > 200:
                live.pop(k)
            continue
        misses[id(live[k])] = 0
        turn += 1
        seen.add(prompt)
        out.append(Example(prompt, answer))
    return out


def builtin_task(name: str, seed: int = 0, n_train: int = 2000, n_test: int = 200) -> Task:
    """One built-in task (`BASE`, or a name in `SKILLS` or `FORMATS`); test prompts never
    occur in the training set."""
    if name == BASE:
        gens = list(BASE_OPS.values())
    elif name in SKILLS or name in FORMATS:
        gens = [SKILLS.get(name) or FORMATS[name]]
    else:
        raise ValueError(f"unknown built-in task {name!r}; choose from {[BASE, *SKILLS, *FORMATS]}")
    rng = random.Random((seed << 32) ^ zlib.crc32(name.encode()))
    test = _sample(gens, n_test, rng, set())
    train = _sample(gens, n_train, rng, {e.prompt for e in test})
    return Task(name, train, test, meta={"source": "builtin", "seed": seed})


def builtin_suite(names: Sequence[str] = DEFAULT_ORDER, seed: int = 0, n_train: int = 2000,
                  n_test: int = 200) -> list[Task]:
    return [builtin_task(n, seed, n_train, n_test) for n in names]
