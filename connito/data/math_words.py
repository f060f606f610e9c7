"""Words and helpers shared by the math templates: the problem record, names, objects, annotations.

Every pool is a tuple in a fixed order, so ``rng.choice`` picks the same word on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = [
    "MathProblem",
    "Person",
    "person",
    "annotate",
    "cap",
    "FEMALE",
    "MALE",
    "ITEMS",
    "SALE_ITEMS",
    "GOALS",
    "VEHICLES",
    "BAKED",
    "COLLECTIBLES",
    "INSTRUMENTS",
    "SUBJECTS",
    "JOBS",
    "GROUPS",
    "CONTAINERS",
    "CROPS",
    "ROOMS",
    "RELATIVES",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class MathProblem:
    """One word problem: its template, question, worked steps and integer answer."""

    kind: str
    question: str
    steps: tuple[str, ...]
    answer: int

    def to_document(self) -> str:
        """GSM8K layout: question, worked answer, then ``#### answer``."""
        return f"Question: {self.question}\nAnswer: " + "\n".join(self.steps) + f"\n#### {self.answer}"


@dataclass(frozen=True, slots=True)
class Person:
    """A problem's character: a name and the pronouns the sentences need."""

    name: str
    subj: str  # she / he
    obj: str  # her / him
    poss: str  # her / his


FEMALE = (
    "Janet Natalia Maria Aisha Mei Sofia Priya Emma Olivia Fatima Chloe Hannah Yuki Lucia Zara Grace "
    "Amara Elena Nadia Ruth Ingrid Leila Rosa Ana Kiara"
).split()
MALE = (
    "James Tom Carlos Ahmed Kenji Liam Noah Ravi Omar Lucas Mateo David Samuel Ethan Kwame Ivan Hiro "
    "Diego Ben Marco Tariq Pablo Felix Arjun Jonah"
).split()

# (plural noun, min price, max price) in whole dollars
ITEMS = (
    ("notebooks", 2, 6),
    ("pens", 1, 3),
    ("books", 8, 20),
    ("shirts", 10, 30),
    ("toy cars", 3, 9),
    ("candles", 4, 12),
    ("plant pots", 5, 15),
    ("packs of stickers", 2, 5),
    ("bottles of juice", 2, 4),
    ("sandwiches", 4, 9),
    ("movie tickets", 8, 15),
    ("pairs of socks", 3, 8),
    ("comic books", 3, 10),
    ("cupcakes", 2, 5),
    ("baseball caps", 12, 25),
    ("puzzles", 6, 18),
)
SALE_ITEMS = ("jacket", "bicycle", "lamp", "backpack", "pair of shoes", "board game", "watch", "guitar")
GOALS = ("bike", "video game console", "tablet", "telescope", "skateboard", "camera", "keyboard")
VEHICLES = ("car", "bus", "train", "truck", "motorcycle")
BAKED = ("muffins", "cookies", "rolls", "croissants", "bagels", "cupcakes")
COLLECTIBLES = ("marbles", "stickers", "stamps", "trading cards", "seashells", "coins")
INSTRUMENTS = ("piano", "violin", "guitar", "drums", "flute", "cello")
SUBJECTS = ("math", "science", "history", "spelling", "geography")
JOBS = (  # (verb, unit)
    ("pack", "boxes"),
    ("paint", "fence boards"),
    ("sort", "letters"),
    ("assemble", "chairs"),
    ("knit", "rows"),
    ("label", "jars"),
)
GROUPS = (  # (first group, second group, place, everyone)
    ("boys", "girls", "class", "students"),
    ("cats", "dogs", "shelter", "animals"),
    ("red marbles", "blue marbles", "jar", "marbles"),
    ("adults", "children", "theater", "people"),
    ("apple trees", "pear trees", "orchard", "trees"),
    ("cars", "vans", "parking lot", "vehicles"),
    ("roses", "tulips", "garden", "flowers"),
    ("teachers", "parents", "meeting", "people"),
)
CONTAINERS = ("tank", "barrel", "pool", "water tower", "bathtub")
CROPS = (("tomato plants", "tomatoes"), ("pepper plants", "peppers"), ("bean plants", "beans"))
ROOMS = ("kitchen", "hallway", "bathroom", "office", "living room", "basement", "bedroom")
RELATIVES = ("grandmother", "aunt", "uncle", "cousin", "grandfather")


def person(rng: random.Random, *, exclude: tuple[str, ...] = ()) -> Person:
    """A random named person with matching pronouns, not one of ``exclude`` (problems with several)."""
    while True:
        if rng.random() < 0.5:
            chosen = Person(rng.choice(FEMALE), "she", "her", "her")
        else:
            chosen = Person(rng.choice(MALE), "he", "him", "his")
        if chosen.name not in exclude:
            return chosen


def annotate(expr: str, value: int) -> str:
    """``expr = <<expr=value>>value``: GSM8K's calculator annotation."""
    return f"{expr} = <<{expr}={value}>>{value}"


def cap(text: str) -> str:
    """Capitalize the first letter only (``str.capitalize`` would lower-case names)."""
    return text[:1].upper() + text[1:]
