"""The "instruct" suite, for a real pretrained chat model: instruction tasks over one pool of
inputs (a sentence about a person), each asking for the same facts in a different output
format. A small chat model fails each format at the start and learns it in about a hundred
steps at a fine-tuning lr; learning one disturbs the others, since they read the same
inputs and write the same facts in conflicting layouts. Answers are short, so a task costs
minutes on a CPU. Generated from a seed, no download.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable

from .base import Example, Task

NAMES = ("Maria", "John", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Liam", "Chen", "Sofia",
         "Omar", "Emma", "Ravi", "Nina", "Lucas", "Hana", "Ivan", "Grace", "Mateo", "Zara",
         "Noah", "Leila", "Tom", "Yuki", "Anna", "Diego", "Mei", "Samuel", "Elena", "Kofi",
         "Lena", "Hugo", "Amara", "Felix", "Ines", "Jonas", "Priya", "Marco", "Sara", "Ali")
CITIES = ("Lisbon", "Paris", "Tokyo", "Cairo", "Berlin", "Madrid", "Rome", "Oslo", "Dublin", "Vienna",
          "Prague", "Athens", "Lima", "Seoul", "Delhi", "Nairobi", "Toronto", "Sydney", "Boston",
          "Chicago", "Denver", "Warsaw", "Munich", "Milan", "Porto", "Kyoto", "Dubai", "Manila",
          "Bogota", "Quito", "Helsinki", "Zurich", "Geneva", "Lagos", "Accra", "Hanoi", "Bangkok",
          "Austin", "Seattle", "Dallas")
JOBS = ("teacher", "nurse", "baker", "pilot", "farmer", "lawyer", "painter", "chef", "doctor",
        "engineer", "writer", "driver", "singer", "dentist", "plumber", "tailor")
SENTENCES = ("{name} lives in {city}, works as a {job} and is {age} years old.",
             "{name} is a {age}-year-old {job} from {city}.",
             "Meet {name}: {age} years old, a {job}, living in {city}.",
             "{name}, a {job} aged {age}, is based in {city}.")


def _person(rng: random.Random) -> tuple[dict, str]:
    p = {"name": rng.choice(NAMES), "city": rng.choice(CITIES), "job": rng.choice(JOBS),
         "age": rng.randint(19, 79)}
    return p, rng.choice(SENTENCES).format(**p)


def _json(p: dict) -> tuple[str, str]:
    return ("Give the person's name, city and age as JSON.",
            f'{{"name": "{p["name"]}", "city": "{p["city"]}", "age": {p["age"]}}}')


def _keyval(p: dict) -> tuple[str, str]:
    return ("List the person's job, name and age as key=value pairs.",
            f"job={p['job']}; name={p['name']}; age={p['age']}")


def _intro(p: dict) -> tuple[str, str]:
    return ("Introduce the person in one short sentence in the first person.",
            f"I am {p['name']}, a {p['job']} from {p['city']}.")


def _hashtags(p: dict) -> tuple[str, str]:
    return ("Write hashtags for the person's city and job.",
            f"#{p['city']} #{p['job'].capitalize()}")


def _card(p: dict) -> tuple[str, str]:
    return ("Write the person's name and city in capital letters, separated by a slash.",
            f"{p['name'].upper()} / {p['city'].upper()}")


INSTRUCT: dict[str, Callable[[dict], tuple[str, str]]] = {
    "json": _json, "keyval": _keyval, "intro": _intro, "card": _card, "hashtags": _hashtags,
}
# the suite's order (--suite instruct); "hashtags" is there to be named with --tasks
INSTRUCT_SUITE: tuple[str, ...] = ("json", "keyval", "intro", "card")


def instruct_task(name: str, seed: int = 0, n_train: int = 2000, n_test: int = 200) -> Task:
    """One task of the suite: the instruction, a blank line and a sentence about a person
    as the prompt; the facts in the task's format as the answer. Test prompts never occur
    in the training set."""
    if name not in INSTRUCT:
        raise ValueError(f"unknown instruct task {name!r}; choose from {list(INSTRUCT)}")
    rng = random.Random((seed << 32) ^ zlib.crc32(b"instruct:" + name.encode()))

    def draw(n: int, avoid: set[str]) -> list[Example]:
        out, seen, misses = [], set(avoid), 0
        while len(out) < n:
            p, sentence = _person(rng)
            instruction, answer = INSTRUCT[name](p)
            prompt = f"{instruction}\n\n{sentence}"
            if prompt in seen:
                misses += 1
                if misses > 10_000:
                    raise ValueError(f"could not draw {n} distinct {name} examples")
                continue
            seen.add(prompt)
            out.append(Example(prompt, answer))
        return out

    test = draw(n_test, set())
    train = draw(n_train, {e.prompt for e in test})
    return Task(name, train, test, meta={"source": "instruct", "seed": seed})
