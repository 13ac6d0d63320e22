"""General ability of a pretrained model, what sequential fine-tuning destroys first:

- `knowledge_task`: a fixed probe of knowledge and instruction following (questions with
  short reference answers, none from any task), scored by whether the answer is given
  (scorer "mentions") and by the reference answer's log-likelihood;
- `general_text`: natural English prose that ships with Python (the documentation topics
  of `pydoc_data`, code and grammar lines left out), one part for perplexity and another,
  disjoint part for the Fisher of `--protect-base`.
"""

from __future__ import annotations

import hashlib
import re

from .base import Example, Task

GENERAL = "general"

# (question, reference answer). Knowledge a small chat model has, and instructions it
# follows; each answer is a word or two (never a word of its question), so "mentions" can
# score a full sentence.
KNOWLEDGE: tuple[tuple[str, str], ...] = (
    # capitals
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of the United Kingdom?", "London"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of China?", "Beijing"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Greece?", "Athens"),
    ("What is the capital of Portugal?", "Lisbon"),
    ("What is the capital of Ireland?", "Dublin"),
    # nature and colours
    ("What color is the sky on a clear day?", "blue"),
    ("What color is grass?", "green"),
    ("What color is a ripe banana?", "yellow"),
    ("What color is snow?", "white"),
    ("What color is coal?", "black"),
    ("What color do you get by mixing blue and yellow?", "green"),
    ("What falls from clouds when it rains?", "water"),
    ("What do bees make?", "honey"),
    ("What gas do plants take in from the air?", "carbon dioxide"),
    ("What do we call frozen water?", "ice"),
    # animals
    ("What is a baby cat called?", "kitten"),
    ("What is a baby dog called?", "puppy"),
    ("What is the largest animal on Earth?", "blue whale"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("How many legs does a spider have?", "eight"),
    ("How many legs does a dog have?", "four"),
    ("What animal says moo?", "cow"),
    ("What does a caterpillar turn into?", "butterfly"),
    ("Which bird is a symbol of peace?", "dove"),
    ("What is the fastest land animal?", "cheetah"),
    # opposites
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("What is the opposite of big?", "small"),
    ("What is the opposite of day?", "night"),
    ("What is the opposite of happy?", "sad"),
    ("What is the opposite of fast?", "slow"),
    ("What is the opposite of light?", "dark"),
    ("What is the opposite of left?", "right"),
    ("What is the opposite of old?", "young"),
    ("What is the opposite of wet?", "dry"),
    # arithmetic
    ("What is 2 plus 2?", "4"),
    ("What is 3 plus 5?", "8"),
    ("What is 10 minus 3?", "7"),
    ("What is 6 times 7?", "42"),
    ("What is 9 plus 1?", "10"),
    ("What is 5 times 5?", "25"),
    ("What is 20 divided by 4?", "5"),
    ("What is 12 minus 4?", "8"),
    ("What is half of 50?", "25"),
    ("What is 7 plus 8?", "15"),
    # calendar and time
    ("What day comes after Monday?", "Tuesday"),
    ("What day comes after Friday?", "Saturday"),
    ("What month comes after January?", "February"),
    ("What month comes after June?", "July"),
    ("How many days are in a week?", "seven"),
    ("How many months are in a year?", "twelve"),
    ("How many hours are in a day?", "24"),
    ("How many minutes are in an hour?", "60"),
    ("Which season comes after winter?", "spring"),
    ("Which season is the hottest?", "summer"),
    # science and geography
    ("What planet do we live on?", "Earth"),
    ("What is the closest star to Earth?", "Sun"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("What is the chemical formula of water?", "H2O"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("On which continent is Egypt?", "Africa"),
    ("On which continent is France?", "Europe"),
    ("What is the longest river in Africa?", "Nile"),
    ("What organ pumps blood through the body?", "heart"),
    ("What do we breathe in to stay alive?", "oxygen"),
    ("What force pulls objects toward the Earth?", "gravity"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
    ("What natural satellite orbits the Earth?", "Moon"),
    ("What is the tallest mountain in the world?", "Everest"),
    # language
    ("What is the plural of child?", "children"),
    ("What is the plural of mouse?", "mice"),
    ("What is the plural of foot?", "feet"),
    ("What is the past tense of go?", "went"),
    ("What is the past tense of eat?", "ate"),
    ("What language is spoken in Spain?", "Spanish"),
    ("What language is spoken in France?", "French"),
    ("How do you say hello in Spanish?", "hola"),
    ("How do you say thank you in French?", "merci"),
    ("What is the opposite of early?", "late"),
    # instruction following
    ("What letter comes after A in the alphabet?", "B"),
    ("What is the next number: 2, 4, 6, ...?", "8"),
    ("What is the third letter of the word cat?", "t"),
    ("What is the first letter of the word dog?", "d"),
    ("What is the last letter of the word sun?", "n"),
    ("Spell the word cat backwards.", "tac"),
    ("Answer with one word: what color is a ripe tomato?", "red"),
    ("Answer with a number: how many sides does a triangle have?", "3"),
    ("Answer with a number: how many sides does a square have?", "4"),
    ("Name the number that comes after nine.", "ten"),
    ("Complete the sentence: The cat sat on the ...", "mat"),
    ("Fill in the blank: Twinkle, twinkle, little ...", "star"),
    ("Complete the saying: An apple a day keeps the ... away.", "doctor"),
    ("What letter does the word zebra start with?", "z"),
    ("Which animal has a long trunk?", "elephant"),
    # everyday knowledge
    ("What do you use to write on paper?", "pen"),
    ("What do people use umbrellas for?", "rain"),
    ("What meal do people eat in the morning?", "breakfast"),
    ("Where do fish live?", "water"),
    ("What do cows drink?", "water"),
    ("What do you call a person who flies an airplane?", "pilot"),
    ("What do you call a person who teaches students?", "teacher"),
    ("What is the main ingredient of bread?", "flour"),
    ("What shape has three sides?", "triangle"),
    ("How many wheels does a bicycle have?", "two"),
)


def knowledge_task(n_train: int = 0) -> Task:
    """The built-in probe of knowledge and instruction following (every item is a test
    item: nothing of it is ever trained on)."""
    test = [Example(q, a) for q, a in KNOWLEDGE]
    return Task(GENERAL, train=[], test=test, scorer="mentions", meta={"source": "builtin-knowledge",
                                                                       "max_new_tokens": 32})


def _prose(text: str) -> list[str]:
    """The paragraphs of a documentation topic that are prose: no indented (code, grammar)
    or table lines, no heading underlines, at least a sentence long."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        if any(ln.startswith((" ", "\t", "+", "|")) for ln in lines) or re.fullmatch(r"[*=\-~^]+", lines[-1].strip()):
            continue
        flat = " ".join(ln.strip() for ln in lines).strip()
        if len(flat) >= 80 and flat.count(" ") >= 10:
            out.append(flat)
    return out


def general_text(part: str = "eval", chars: int = 90_000) -> str:
    """A fixed stretch of English prose from Python's own documentation topics
    (`pydoc_data`, shipped with every CPython): "eval", the first `chars` characters of
    whole paragraphs in topic order, for perplexity; "guard", the next `chars`, for the
    Fisher that `--protect-base` guards. The two share no paragraph."""
    from pydoc_data.topics import topics

    if part not in ("eval", "guard"):
        raise ValueError(f"part must be 'eval' or 'guard', got {part!r}")
    # topics repeat some paragraphs: each once, where it first appears
    paras = list(dict.fromkeys(p for key in sorted(topics) for p in _prose(topics[key])))
    parts: list[list[str]] = [[], []]
    k, size = 0, 0
    for p in paras:
        if size >= chars:
            k, size = k + 1, 0
            if k == 2:
                break
        parts[k].append(p)
        size += len(p) + 2
    text = "\n\n".join(parts[0 if part == "eval" else 1])
    if len(text) < chars // 2:
        raise ValueError(f"this Python's pydoc_data has too little prose for the {part!r} text")
    return text


def text_digest(text: str) -> str:
    """Short digest of a text, so reports say which text a perplexity was measured on."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def general_text_task(part: str = "guard", max_tokens: int = 128) -> Task:
    """Prose of `general_text(part)` as a text task (language modelling on whole
    paragraphs, each cut to `max_tokens`): what `--protect-base` measures a real model's
    general ability's Fisher on. Never scored."""
    paras = [Example("", p) for p in general_text(part).split("\n\n")]
    return Task(f"{GENERAL}-text", train=paras, test=paras[:1],
                meta={"source": "pydoc_data", "kind": "text", "max_len": max_tokens})
