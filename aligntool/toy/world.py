"""The toy world: a tiny review-writing task whose quality is a number.

Every prompt asks for a review of a thing ("Review of the quiet hotel in Paris:"); a completion is a few short
clauses about it. The **gold reward** of a completion is its sentiment-lexicon score:

    gold_reward(y) = #(positive words in y) - #(negative words in y)

counted on whole lower-cased words (see ``POSITIVE`` and ``NEGATIVE``). It is cheap, deterministic and impossible to
misread, so "did alignment work?" becomes "did the mean gold reward on held-out prompts go up?".

The corpus is generated from a small grammar with a per-review *mood* (positive, negative or mixed), so samples of
the pretrained tiny model have mixed gold reward, and preference pairs are labelled by the gold reward under a
Bradley-Terry model with a configurable temperature (label noise):

    P(a preferred over b) = sigmoid((gold_reward(a) - gold_reward(b)) / bt_temperature)

``bt_temperature = 0`` gives noiseless labels (ties are broken at random).
"""

from __future__ import annotations

import math
import random
import re
import zlib

POSITIVE = (
    "great", "lovely", "wonderful", "excellent", "delightful", "pleasant", "superb", "charming", "brilliant",
    "friendly", "amazing", "perfect", "fantastic", "cozy", "fresh",
)
NEGATIVE = (
    "awful", "terrible", "boring", "rude", "dirty", "bland", "dreadful", "horrible", "noisy", "disappointing",
    "broken", "stale", "cold", "slow", "ugly",
)
NEUTRAL = ("big", "small", "old", "new", "busy", "simple", "plain", "long", "short", "modern", "large", "typical")
POS_VERBS = ("loved", "enjoyed", "liked", "adored")
NEG_VERBS = ("hated", "disliked", "regretted", "endured")
NEUTRAL_VERBS = ("visited", "saw", "tried", "found")
ADVERBS = ("very", "quite", "really", "rather", "truly")
TOPICS = (
    "hotel", "restaurant", "movie", "book", "cafe", "museum", "park", "concert", "train", "beach", "bakery", "gym",
    "library", "theater", "market", "garden", "airport", "store", "bar", "zoo", "pool", "hostel", "show", "game",
    "album", "phone", "laptop", "camera", "bike", "car", "course", "class", "tour", "festival", "play", "dinner",
    "lunch", "breakfast", "pizza", "salad",
)
ASPECTS = (
    "staff", "food", "room", "service", "music", "view", "price", "seats", "menu", "story", "ending", "design",
    "coffee", "location", "crowd", "lighting",
)
PLACES = (
    "paris", "london", "tokyo", "berlin", "rome", "madrid", "oslo", "cairo", "lima", "seoul", "dublin", "vienna",
    "prague", "boston", "sydney", "toronto",
)
PROMPT_TEMPLATES = ("Review of the {q} {t} in {p}:", "Write about the {q} {t} in {p}:",
                    "Your opinion on the {q} {t} in {p}:")

_LEXICON = {**{w: 1.0 for w in POSITIVE}, **{w: -1.0 for w in NEGATIVE}}
_WORD = re.compile(r"[a-z]+")
_MOODS = {  # P(positive word), P(negative word) for each sentiment slot
    "positive": (0.8, 0.1),
    "negative": (0.1, 0.8),
    "mixed": (0.4, 0.4),
}


def gold_reward(text: str) -> float:
    """Sentiment-lexicon score: +1 per positive word, -1 per negative word (whole, lower-cased words)."""
    return float(sum(_LEXICON.get(w, 0.0) for w in _WORD.findall(text.lower())))


def all_prompts() -> list[str]:
    """Every prompt of the toy world, in a fixed order (topic x quality x place x template = 23,040)."""
    return [
        tpl.format(q=q, t=t, p=p) for t in TOPICS for q in NEUTRAL for p in PLACES for tpl in PROMPT_TEMPLATES
    ]


def is_eval_prompt(prompt: str) -> bool:
    """A fixed 1/8 of all prompts is held out for evaluation; training data never uses them."""
    return zlib.crc32(prompt.encode()) % 8 == 0


def prompts(split: str, n: int | None = None, seed: int = 0) -> list[str]:
    """``n`` prompts of ``split`` ("train" or "eval"), shuffled deterministically by ``seed``."""
    return split_of(all_prompts(), split, n, seed)


def split_of(items: list[str], split: str, n: int | None = None, seed: int = 0) -> list[str]:
    """``n`` of ``items`` in ``split`` ("train" or "eval": ``is_eval_prompt``), shuffled by ``seed`` (all: n=None).
    The toy tasks (reviews here, ``arith``) share this held-out rule."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    pool = [p for p in items if is_eval_prompt(p) == (split == "eval")]
    random.Random(seed).shuffle(pool)
    return pool if n is None else pool[:n]


def topic_of(prompt: str) -> str:
    words = _WORD.findall(prompt.lower())
    return next((w for w in words if w in TOPICS), "place")


def _sentiment_word(rng: random.Random, mood: str, pos: tuple, neg: tuple, neutral: tuple) -> str:
    p_pos, p_neg = _MOODS[mood]
    u = rng.random()
    return rng.choice(pos if u < p_pos else neg if u < p_pos + p_neg else neutral)


def completion(prompt: str, rng: random.Random, mood: str | None = None) -> str:
    """One review of the prompt's topic, 2-3 clauses, sentiment drawn from ``mood`` (random if None)."""
    mood = mood or rng.choice(tuple(_MOODS))
    topic = topic_of(prompt)

    def adj() -> str:
        word = _sentiment_word(rng, mood, POSITIVE, NEGATIVE, NEUTRAL)
        return f"{rng.choice(ADVERBS)} {word}" if rng.random() < 0.3 else word

    clauses = [f"the {topic} was {adj()}"]
    for _ in range(rng.randint(1, 2)):
        kind = rng.random()
        if kind < 0.5:
            clauses.append(f"the {rng.choice(ASPECTS)} was {adj()}")
        elif kind < 0.8:
            clauses.append(f"i {_sentiment_word(rng, mood, POS_VERBS, NEG_VERBS, NEUTRAL_VERBS)} "
                           f"the {rng.choice(ASPECTS)}")
        else:
            clauses.append(f"the {rng.choice(ASPECTS)} was {adj()} and {adj()}")
    return " " + " . ".join(clauses) + " ."


def corpus(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (prompt, completion) pairs on training prompts: the pretraining text of the tiny model."""
    rng = random.Random(seed)
    pool = prompts("train", seed=seed)
    return [(p, completion(p, rng)) for p in (rng.choice(pool) for _ in range(n))]


def bt_label(r_a: float, r_b: float, rng: random.Random, bt_temperature: float) -> bool:
    """True when a is preferred over b under Bradley-Terry with temperature ``bt_temperature`` (0 = noiseless)."""
    if bt_temperature <= 0:
        return r_a > r_b or (r_a == r_b and rng.random() < 0.5)
    z = max(-60.0, min(60.0, (r_a - r_b) / bt_temperature))
    return rng.random() < 1.0 / (1.0 + math.exp(-z))


def preference_pairs(
    n: int, seed: int = 0, split: str = "train", bt_temperature: float = 0.5, skip_ties: bool = True
) -> list[dict]:
    """``n`` rows {prompt, chosen, rejected, score_chosen, score_rejected}: two independent reviews of one prompt,
    ordered by a Bradley-Terry draw on their gold rewards. Pairs with equal gold reward are skipped by default
    (they carry no preference signal)."""
    rng = random.Random(seed)
    pool = prompts(split, seed=seed)
    rows: list[dict] = []
    while len(rows) < n:
        p = rng.choice(pool)
        a, b = completion(p, rng), completion(p, rng)
        ra, rb = gold_reward(a), gold_reward(b)
        if skip_ties and ra == rb:
            continue
        if not bt_label(ra, rb, rng, bt_temperature):
            a, b, ra, rb = b, a, rb, ra
        rows.append({"prompt": p, "chosen": a, "rejected": b, "score_chosen": ra, "score_rejected": rb})
    return rows


def sft_rows(n: int, seed: int = 0, split: str = "train", min_reward: float = 1.0) -> list[dict]:
    """``n`` rows {prompt, completion} of demonstrations whose gold reward is at least ``min_reward``."""
    rng = random.Random(seed)
    pool = prompts(split, seed=seed)
    rows: list[dict] = []
    while len(rows) < n:
        p = rng.choice(pool)
        c = completion(p, rng)
        if gold_reward(c) >= min_reward:
            rows.append({"prompt": p, "completion": c})
    return rows
