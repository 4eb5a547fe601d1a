"""The embedded task: a small, seeded, fully offline chat preference task with a transparent gold judge.

Rows
----
A user asks about one *topic* (a concrete noun such as ``garden`` or ``river``) with one of a few
prompt templates, e.g. ``"Tell me about the garden."``; answers are one short sentence that
describes a topic with a few adjectives, e.g. ``"The garden is calm, old and lovely."``.
``generate_split(split, n_rows, seed)`` returns the rows (columns ``prompt``, ``chosen``,
``rejected``; see ``docs/design.md``). The random stream is derived from ``(seed, split)``, so
train and test differ and each split is reproducible.

Gold function
-------------
``gold_score(prompt, answer)`` lies in ``[-1, 1]`` and is the weighted sum of three parts, each in
``[-1, 1]``::

    gold = 0.25 * topic + 0.50 * sentiment + 0.25 * form

* ``topic``: ``+1`` when the answer names the topic asked about and no other known topic;
  ``0`` when it names the asked topic and another one, or no known topic at all;
  ``-1`` when it names only other topics (off-topic).
* ``sentiment``: the mean polarity of the *distinct* lexicon adjectives in the answer
  (``POSITIVE`` = +1, ``NEUTRAL`` = 0, ``NEGATIVE`` = -1; ``0`` when there is none). A mean over
  distinct words cannot be raised by repeating a word or by writing more words.
* ``form``: ``2 * passed / 4 - 1`` over four checks: starts with an upper-case letter; ends with
  ``.`` or ``!``; has ``MIN_WORDS`` to ``MAX_WORDS`` words; repeats no content word.

The optimum (``1.0``) is a well-formed, on-topic sentence that uses only positive adjectives, e.g.
``"The garden is lovely and bright."``. ``gold_prefers(prompt, a, b)`` returns ``0`` when ``a`` is
better: higher gold score, then (tie) the shorter answer, then the lexicographically smaller one.

Data design
-----------
``chosen`` answers are always on topic and well formed, but draw their adjectives from a *mixed*
distribution (``CHOSEN_MIX``: mostly positive and neutral, some negative), so supervised fine-tuning
on them gives a policy in the upper middle of the range (about 0.55 on average in the data) that RL can push towards 1.
``rejected`` answers are clearly worse (by at least ``MIN_GAP`` gold points, so no ties): more
negative adjectives, off-topic, or malformed (lower-case, no final stop, repeated words).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pandas as pd

TOPICS = (
    "garden",
    "river",
    "city",
    "forest",
    "ocean",
    "book",
    "song",
    "movie",
    "house",
    "train",
    "mountain",
    "cat",
    "dog",
    "lake",
    "market",
    "school",
    "bridge",
    "village",
    "painting",
    "island",
)
POSITIVE = (
    "lovely",
    "bright",
    "calm",
    "kind",
    "great",
    "warm",
    "happy",
    "fresh",
    "gentle",
    "pleasant",
    "clean",
    "friendly",
)
NEUTRAL = ("big", "old", "small", "long", "round", "tall", "quiet", "busy", "plain", "new")
NEGATIVE = ("dull", "ugly", "sad", "cold", "awful", "dirty", "noisy", "broken", "boring", "grim", "harsh", "gloomy")
POLARITY = {**{w: 1.0 for w in POSITIVE}, **{w: 0.0 for w in NEUTRAL}, **{w: -1.0 for w in NEGATIVE}}

PROMPT_TEMPLATES = (
    "Tell me about the {topic}.",
    "What is the {topic} like?",
    "Describe the {topic}.",
    "How would you describe the {topic}?",
    "What do you think of the {topic}?",
    "Say something about the {topic}.",
)
# {a}, {b}, {c}: adjectives; {t}: topic.
ANSWER_TEMPLATES = (
    "The {t} is {a} and {b}.",
    "The {t} is {a}, {b} and {c}.",
    "I think the {t} is {a} and {b}.",
    "I find the {t} {a} and {b}.",
    "It is a {a} and {b} {t}.",
    "This {t} seems {a}, {b} and {c}.",
    "The {t} is {a}.",
)

WEIGHTS = {"topic": 0.25, "sentiment": 0.50, "form": 0.25}
MIN_WORDS, MAX_WORDS = 3, 14
MIN_GAP = 0.2  # chosen beats rejected by at least this many gold points
CHOSEN_MIX = (0.40, 0.30, 0.30)  # P(positive, neutral, negative) of a chosen adjective
REJECTED_MIX = (0.10, 0.30, 0.60)  # same for rejected answers of the "negative" kind
REJECTED_KINDS = ("negative", "off_topic", "malformed")
REJECTED_KIND_P = (0.5, 0.25, 0.25)
STOPWORDS = frozenset({"the", "is", "and", "a", "i", "it", "this", "think", "find", "seems", "very", "but", "of"})
_WORD = re.compile(r"[a-z]+")


# --------------------------------------------------------------------------------------- gold
def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def topic_of(prompt: str) -> str | None:
    """The known topic a prompt asks about (the first one it names), or ``None``."""
    for word in _words(prompt):
        if word in TOPICS:
            return word
    return None


def gold_parts(prompt: str, answer: str) -> dict[str, float]:
    """The three parts of :func:`gold_score`, each in ``[-1, 1]`` (see the module docstring)."""
    words = _words(answer)
    asked = topic_of(prompt)
    named = {w for w in words if w in TOPICS}
    if asked is not None and asked in named:
        topic = 1.0 if named == {asked} else 0.0
    else:
        topic = -1.0 if named else 0.0

    adjectives = {w for w in words if w in POLARITY}
    sentiment = float(np.mean([POLARITY[w] for w in sorted(adjectives)])) if adjectives else 0.0

    stripped = answer.strip()
    content = [w for w in words if w not in STOPWORDS]
    checks = (
        bool(stripped) and stripped[0].isupper(),
        stripped.endswith((".", "!")),
        MIN_WORDS <= len(words) <= MAX_WORDS,
        len(content) == len(set(content)),
    )
    form = 2.0 * sum(checks) / len(checks) - 1.0
    return {"topic": topic, "sentiment": sentiment, "form": form}


def gold_score(prompt: str, answer: str) -> float:
    """Gold quality of ``answer`` to the user message ``prompt``, in ``[-1, 1]`` (higher is better)."""
    parts = gold_parts(prompt, answer)
    return round(sum(WEIGHTS[k] * v for k, v in parts.items()), 6)


def gold_prefers(prompt: str, a: str, b: str) -> int:
    """``0`` when answer ``a`` is better than ``b`` (ties: shorter, then lexicographically smaller), else ``1``."""
    key_a = (-gold_score(prompt, a), len(a), a)
    key_b = (-gold_score(prompt, b), len(b), b)
    return 0 if key_a <= key_b else 1


def best_score() -> float:
    """The highest gold score any answer can reach."""
    return 1.0


# ---------------------------------------------------------------------------------- generator
def _rng(seed: int, split: str) -> np.random.Generator:
    digest = hashlib.sha256(f"embedded:{int(seed)}:{split}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _adjectives(rng: np.random.Generator, mix: tuple[float, float, float], n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        pool = (POSITIVE, NEUTRAL, NEGATIVE)[rng.choice(3, p=mix)]
        word = pool[rng.integers(len(pool))]
        if word not in out:
            out.append(word)
    return out


def _answer(rng: np.random.Generator, topic: str, mix: tuple[float, float, float]) -> str:
    template = ANSWER_TEMPLATES[rng.integers(len(ANSWER_TEMPLATES))]
    a, b, c = _adjectives(rng, mix, 3)
    return template.format(t=topic, a=a, b=b, c=c)


def _malform(rng: np.random.Generator, answer: str) -> str:
    """Break the form of an answer: two of lower-case start, missing stop, repeated word."""
    flaws = rng.choice(3, size=2, replace=False)
    words = answer.rstrip(".!").split()
    if 2 in flaws:  # repeat the last word a few times
        words += [words[-1].strip(",")] * int(rng.integers(1, 4))
    text = " ".join(words)
    if 0 in flaws:
        text = text[0].lower() + text[1:]
    if 1 not in flaws:
        text += "."
    return text


def _rejected(rng: np.random.Generator, topic: str) -> str:
    kind = REJECTED_KINDS[rng.choice(len(REJECTED_KINDS), p=REJECTED_KIND_P)]
    if kind == "negative":
        return _answer(rng, topic, REJECTED_MIX)
    if kind == "off_topic":
        others = [t for t in TOPICS if t != topic]
        return _answer(rng, others[rng.integers(len(others))], CHOSEN_MIX)
    return _malform(rng, _answer(rng, topic, CHOSEN_MIX))


def _message(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


def generate_split(split: str, n_rows: int, seed: int) -> pd.DataFrame:
    """``n_rows`` preference rows of ``split``; deterministic for ``(split, seed)``.

    Every row's chosen answer beats its rejected answer by at least ``MIN_GAP`` gold points.
    """
    rng = _rng(seed, split)
    rows = []
    while len(rows) < n_rows:
        topic = TOPICS[rng.integers(len(TOPICS))]
        prompt = PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))].format(topic=topic)
        chosen = _answer(rng, topic, CHOSEN_MIX)
        good = gold_score(prompt, chosen)
        for _ in range(20):
            rejected = _rejected(rng, topic)
            if good - gold_score(prompt, rejected) >= MIN_GAP:
                break
        else:
            continue  # chosen too weak to be beaten clearly: draw a new row
        rows.append(
            {
                "prompt": _message("user", prompt),
                "chosen": _message("assistant", chosen),
                "rejected": _message("assistant", rejected),
            }
        )
    return pd.DataFrame(rows, columns=["prompt", "chosen", "rejected"])
