"""GSM8K-like word problems with worked, step-by-step solutions, generated offline from templates.

No installed package ships grade-school word problems, so connito makes its own math domain: each
template draws names, objects and numbers from a seeded ``random.Random`` and computes the answer
in Python. Numbers are chosen so every intermediate value is an integer. Solution steps carry
GSM8K's calculator annotations (``48/2 = <<48/2=24>>24``) and the last annotation's result is the
final answer (``#### 24``); the tests re-evaluate every annotation, so a template that formats one
expression and computes another cannot pass.

Document ``i`` of seed ``s`` depends only on ``(s, i)`` (its own string-seeded RNG), so a shorter
run is a prefix of a longer one and the output is identical across runs and machines.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MathProblem", "MATH_TEMPLATES", "generate_math_problem", "generate_math_documents"]


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
class _Person:
    name: str
    subj: str  # she / he
    obj: str  # her / him
    poss: str  # her / his


_FEMALE = (
    "Janet Natalia Maria Aisha Mei Sofia Priya Emma Olivia Fatima Chloe Hannah Yuki Lucia Zara Grace "
    "Amara Elena Nadia Ruth Ingrid Leila Rosa Ana Kiara"
).split()
_MALE = (
    "James Tom Carlos Ahmed Kenji Liam Noah Ravi Omar Lucas Mateo David Samuel Ethan Kwame Ivan Hiro "
    "Diego Ben Marco Tariq Pablo Felix Arjun Jonah"
).split()

# (plural noun, min price, max price) in whole dollars
_ITEMS = (
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
_SALE_ITEMS = ("jacket", "bicycle", "lamp", "backpack", "pair of shoes", "board game", "watch", "guitar")
_GOALS = ("bike", "video game console", "tablet", "telescope", "skateboard", "camera", "keyboard")
_VEHICLES = ("car", "bus", "train", "truck", "motorcycle")
_BAKED = ("muffins", "cookies", "rolls", "croissants", "bagels", "cupcakes")
_COLLECTIBLES = ("marbles", "stickers", "stamps", "trading cards", "seashells", "coins")
_INSTRUMENTS = ("piano", "violin", "guitar", "drums", "flute", "cello")
_SUBJECTS = ("math", "science", "history", "spelling", "geography")
_JOBS = (  # (verb, unit)
    ("pack", "boxes"),
    ("paint", "fence boards"),
    ("sort", "letters"),
    ("assemble", "chairs"),
    ("knit", "rows"),
    ("label", "jars"),
)
_GROUPS = (  # (first group, second group, place, everyone)
    ("boys", "girls", "class", "students"),
    ("cats", "dogs", "shelter", "animals"),
    ("red marbles", "blue marbles", "jar", "marbles"),
    ("adults", "children", "theater", "people"),
    ("apple trees", "pear trees", "orchard", "trees"),
    ("cars", "vans", "parking lot", "vehicles"),
    ("roses", "tulips", "garden", "flowers"),
    ("teachers", "parents", "meeting", "people"),
)
_CONTAINERS = ("tank", "barrel", "pool", "water tower", "bathtub")
_CROPS = (("tomato plants", "tomatoes"), ("pepper plants", "peppers"), ("bean plants", "beans"))
_ROOMS = ("kitchen", "hallway", "bathroom", "office", "living room", "basement", "bedroom")
_RELATIVES = ("grandmother", "aunt", "uncle", "cousin", "grandfather")


def _person(rng: random.Random, *, exclude: tuple[str, ...] = ()) -> _Person:
    while True:
        if rng.random() < 0.5:
            person = _Person(rng.choice(_FEMALE), "she", "her", "her")
        else:
            person = _Person(rng.choice(_MALE), "he", "him", "his")
        if person.name not in exclude:
            return person


def _eq(expr: str, value: int) -> str:
    """``expr = <<expr=value>>value``: GSM8K's calculator annotation."""
    return f"{expr} = <<{expr}={value}>>{value}"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _shopping_total(rng: random.Random) -> MathProblem:
    p = _person(rng)
    (item1, lo1, hi1), (item2, lo2, hi2) = rng.sample(_ITEMS, 2)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    price1, price2 = rng.randint(lo1, hi1), rng.randint(lo2, hi2)
    cost1, cost2 = a * price1, b * price2
    question = (
        f"{p.name} buys {a} {item1} for ${price1} each and {b} {item2} for ${price2} each. "
        f"How much money does {p.subj} spend in total?"
    )
    steps = (
        f"The {item1} cost {_eq(f'{a}*{price1}', cost1)} dollars.",
        f"The {item2} cost {_eq(f'{b}*{price2}', cost2)} dollars.",
        f"In total {p.subj} spends {_eq(f'{cost1}+{cost2}', cost1 + cost2)} dollars.",
    )
    return MathProblem(kind="shopping_total", question=question, steps=steps, answer=cost1 + cost2)


def _shopping_change(rng: random.Random) -> MathProblem:
    p = _person(rng)
    item, lo, hi = rng.choice(_ITEMS)
    count, price = rng.randint(2, 8), rng.randint(lo, hi)
    cost = count * price
    money = cost + rng.randint(1, 40)
    question = (
        f"{p.name} has ${money}. {_cap(p.subj)} buys {count} {item} that cost ${price} each. "
        f"How much money does {p.subj} have left?"
    )
    steps = (
        f"The {item} cost {_eq(f'{count}*{price}', cost)} dollars.",
        f"{_cap(p.subj)} has {_eq(f'{money}-{cost}', money - cost)} dollars left.",
    )
    return MathProblem(kind="shopping_change", question=question, steps=steps, answer=money - cost)


def _egg_sales(rng: random.Random) -> MathProblem:
    p = _person(rng)
    laid, eaten, baked, price = rng.randint(12, 30), rng.randint(2, 4), rng.randint(2, 6), rng.randint(2, 5)
    used = eaten + baked
    left = laid - used
    question = (
        f"{p.name}'s hens lay {laid} eggs per day. {_cap(p.subj)} eats {eaten} for breakfast every "
        f"morning and uses {baked} to bake muffins for {p.poss} friends. {_cap(p.subj)} sells the rest "
        f"at the market for ${price} per egg. How much money does {p.subj} make every day?"
    )
    steps = (
        f"{_cap(p.subj)} uses {_eq(f'{eaten}+{baked}', used)} eggs each day.",
        f"{_cap(p.subj)} sells {_eq(f'{laid}-{used}', left)} eggs.",
        f"{_cap(p.subj)} makes {_eq(f'{left}*{price}', left * price)} dollars every day.",
    )
    return MathProblem(kind="egg_sales", question=question, steps=steps, answer=left * price)


def _distance(rng: random.Random) -> MathProblem:
    vehicle = rng.choice(_VEHICLES)
    speed1, hours1 = 5 * rng.randint(6, 14), rng.randint(1, 5)
    speed2, hours2 = 5 * rng.randint(6, 14), rng.randint(1, 4)
    leg1, leg2 = speed1 * hours1, speed2 * hours2
    question = (
        f"A {vehicle} travels at {speed1} miles per hour for {hours1} hours and then at {speed2} miles "
        f"per hour for {hours2} hours. How many miles does it travel in total?"
    )
    steps = (
        f"In the first part it travels {_eq(f'{speed1}*{hours1}', leg1)} miles.",
        f"In the second part it travels {_eq(f'{speed2}*{hours2}', leg2)} miles.",
        f"In total it travels {_eq(f'{leg1}+{leg2}', leg1 + leg2)} miles.",
    )
    return MathProblem(kind="distance", question=question, steps=steps, answer=leg1 + leg2)


def _work_rate(rng: random.Random) -> MathProblem:
    p = _person(rng)
    verb, unit = rng.choice(_JOBS)
    rate, hours_per_day, days = rng.randint(4, 30), rng.randint(2, 8), rng.randint(2, 9)
    hours = hours_per_day * days
    total = rate * hours
    question = (
        f"{p.name} can {verb} {rate} {unit} per hour. {_cap(p.subj)} works {hours_per_day} hours a day. "
        f"How many days will it take {p.obj} to {verb} {total} {unit}?"
    )
    steps = (
        f"It takes {_eq(f'{total}/{rate}', hours)} hours of work.",
        f"That is {_eq(f'{hours}/{hours_per_day}', days)} days.",
    )
    return MathProblem(kind="work_rate", question=question, steps=steps, answer=days)


def _ages(rng: random.Random) -> MathProblem:
    older = _person(rng)
    younger = _person(rng, exclude=(older.name,))
    age, factor, years = rng.randint(3, 15), rng.randint(2, 4), rng.randint(2, 10)
    older_now = factor * age
    older_then = older_now + years
    question = (
        f"{older.name} is {factor} times as old as {younger.name}. In {years} years, {older.name} will "
        f"be {older_then} years old. How old is {younger.name} now?"
    )
    steps = (
        f"{older.name} is now {_eq(f'{older_then}-{years}', older_now)} years old.",
        f"So {younger.name} is {_eq(f'{older_now}/{factor}', age)} years old.",
    )
    return MathProblem(kind="ages", question=question, steps=steps, answer=age)


def _fraction_giveaway(rng: random.Random) -> MathProblem:
    p = _person(rng)
    thing = rng.choice(_COLLECTIBLES)
    denominator = rng.choice((2, 3, 4, 5))
    total = denominator * rng.randint(4, 20)
    given = total // denominator
    kept = total - given
    to_sister = rng.randint(1, kept - 1)
    question = (
        f"{p.name} has {total} {thing}. {_cap(p.subj)} gives 1/{denominator} of them to {p.poss} friend "
        f"and then gives {to_sister} to {p.poss} sister. How many {thing} does {p.subj} have left?"
    )
    steps = (
        f"{_cap(p.subj)} gives {_eq(f'{total}/{denominator}', given)} {thing} to {p.poss} friend.",
        f"That leaves {_eq(f'{total}-{given}', kept)} {thing}.",
        f"After giving some to {p.poss} sister, {p.subj} has {_eq(f'{kept}-{to_sister}', kept - to_sister)} left.",
    )
    return MathProblem(kind="fraction_giveaway", question=question, steps=steps, answer=kept - to_sister)


def _discount(rng: random.Random) -> MathProblem:
    p = _person(rng)
    item = rng.choice(_SALE_ITEMS)
    price = 20 * rng.randint(1, 25)
    percent = rng.choice((10, 15, 20, 25, 30, 40, 50))
    count = rng.randint(1, 4)
    discount = price * percent // 100  # price is a multiple of 20 and percent of 5: exact
    sale = price - discount
    question = (
        f"A {item} normally costs ${price}. This week it is {percent}% off. {p.name} buys {count} of "
        f"them. How much does {p.subj} pay?"
    )
    steps = (
        f"The discount is {_eq(f'{price}*{percent}/100', discount)} dollars.",
        f"Each one costs {_eq(f'{price}-{discount}', sale)} dollars.",
        f"{_cap(p.subj)} pays {_eq(f'{sale}*{count}', sale * count)} dollars.",
    )
    return MathProblem(kind="discount", question=question, steps=steps, answer=sale * count)


def _raise(rng: random.Random) -> MathProblem:
    p = _person(rng)
    salary = 100 * rng.randint(3, 15)
    percent = rng.choice((5, 10, 15, 20, 25))
    weeks = rng.randint(2, 8)
    increase = salary * percent // 100  # salary is a multiple of 100: exact
    new_salary = salary + increase
    question = (
        f"{p.name} earns ${salary} per week. {_cap(p.subj)} gets a {percent}% raise. "
        f"How much will {p.subj} earn over the next {weeks} weeks?"
    )
    steps = (
        f"The raise is {_eq(f'{salary}*{percent}/100', increase)} dollars per week.",
        f"{_cap(p.subj)} will earn {_eq(f'{salary}+{increase}', new_salary)} dollars per week.",
        f"Over {weeks} weeks that is {_eq(f'{new_salary}*{weeks}', new_salary * weeks)} dollars.",
    )
    return MathProblem(kind="raise", question=question, steps=steps, answer=new_salary * weeks)


def _bakery_boxes(rng: random.Random) -> MathProblem:
    food = rng.choice(_BAKED)
    trays, per_tray, box = rng.randint(3, 12), rng.randint(6, 24), rng.choice((4, 6, 8, 10, 12))
    total = trays * per_tray
    boxes = rng.randint(1, max(1, (total - 1) // box))
    rest = boxes * box
    sold = total - rest
    question = (
        f"A bakery bakes {trays} trays of {food} with {per_tray} {food} on each tray. It sells {sold} "
        f"{food} in the morning and packs the rest into boxes of {box}. How many boxes does it fill?"
    )
    steps = (
        f"The bakery bakes {_eq(f'{trays}*{per_tray}', total)} {food}.",
        f"After the morning, {_eq(f'{total}-{sold}', rest)} {food} are left.",
        f"They fill {_eq(f'{rest}/{box}', boxes)} boxes.",
    )
    return MathProblem(kind="bakery_boxes", question=question, steps=steps, answer=boxes)


def _practice_hours(rng: random.Random) -> MathProblem:
    p = _person(rng)
    instrument = rng.choice(_INSTRUMENTS)
    minutes = rng.choice((15, 20, 30, 40, 45, 90))
    step = 60 // _gcd(minutes, 60)  # smallest day count giving whole hours
    days = step * rng.randint(1, max(1, 30 // step))
    total = minutes * days
    question = (
        f"{p.name} practices the {instrument} for {minutes} minutes every day. "
        f"How many hours does {p.subj} practice in {days} days?"
    )
    steps = (
        f"{_cap(p.subj)} practices {_eq(f'{minutes}*{days}', total)} minutes.",
        f"That is {_eq(f'{total}/60', total // 60)} hours.",
    )
    return MathProblem(kind="practice_hours", question=question, steps=steps, answer=total // 60)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _average_needed(rng: random.Random) -> MathProblem:
    p = _person(rng)
    subject = rng.choice(_SUBJECTS)
    scores = [rng.randint(60, 98) for _ in range(3)]
    needed = rng.randint(64, 100)
    needed -= (sum(scores) + needed) % 4  # make the target average a whole number
    average = (sum(scores) + needed) // 4
    have = sum(scores)
    question = (
        f"{p.name} scored {scores[0]}, {scores[1]} and {scores[2]} on {p.poss} first three {subject} "
        f"tests. What score does {p.subj} need on the fourth test to have an average of {average}?"
    )
    steps = (
        f"{_cap(p.subj)} needs {_eq(f'{average}*4', 4 * average)} points in total.",
        f"{_cap(p.subj)} has {_eq(f'{scores[0]}+{scores[1]}+{scores[2]}', have)} points so far.",
        f"{_cap(p.subj)} needs {_eq(f'{4 * average}-{have}', needed)} on the fourth test.",
    )
    return MathProblem(kind="average_needed", question=question, steps=steps, answer=needed)


def _ratio(rng: random.Random) -> MathProblem:
    first, second, place, everyone = rng.choice(_GROUPS)
    a, b = rng.sample(range(1, 8), 2)
    part = rng.randint(2, 30)
    parts = a + b
    total = parts * part
    question = (
        f"The ratio of {first} to {second} in a {place} is {a}:{b}. If there are {total} {everyone} "
        f"in total, how many {second} are there?"
    )
    steps = (
        f"There are {_eq(f'{a}+{b}', parts)} parts in total.",
        f"Each part is {_eq(f'{total}/{parts}', part)} {everyone}.",
        f"There are {_eq(f'{b}*{part}', b * part)} {second}.",
    )
    return MathProblem(kind="ratio", question=question, steps=steps, answer=b * part)


def _savings_weeks(rng: random.Random) -> MathProblem:
    p = _person(rng)
    goal = rng.choice(_GOALS)
    saved, weekly, weeks = rng.randint(10, 120), rng.randint(5, 40), rng.randint(2, 20)
    need = weekly * weeks
    cost = saved + need
    question = (
        f"{p.name} wants to buy a {goal} that costs ${cost}. {_cap(p.subj)} has already saved ${saved} "
        f"and saves ${weekly} each week. How many weeks will it take {p.obj} to have enough money?"
    )
    steps = (
        f"{_cap(p.subj)} still needs {_eq(f'{cost}-{saved}', need)} dollars.",
        f"It will take {_eq(f'{need}/{weekly}', weeks)} weeks.",
    )
    return MathProblem(kind="savings_weeks", question=question, steps=steps, answer=weeks)


def _split_bill(rng: random.Random) -> MathProblem:
    friends, share = rng.randint(2, 8), rng.randint(12, 60)
    total = friends * share
    tip = rng.randint(3, max(4, total // 5))
    meal = total - tip
    question = (
        f"{friends} friends go out to dinner. The meal costs ${meal} and they leave a ${tip} tip. If "
        f"they split the total equally, how much does each friend pay?"
    )
    steps = (
        f"The total is {_eq(f'{meal}+{tip}', total)} dollars.",
        f"Each friend pays {_eq(f'{total}/{friends}', share)} dollars.",
    )
    return MathProblem(kind="split_bill", question=question, steps=steps, answer=share)


def _fence_cost(rng: random.Random) -> MathProblem:
    length, width, price = rng.randint(8, 60), rng.randint(5, 40), rng.randint(2, 12)
    perimeter = 2 * (length + width)
    question = (
        f"A rectangular garden is {length} feet long and {width} feet wide. Fencing costs ${price} "
        f"per foot. How much will it cost to put a fence around the whole garden?"
    )
    steps = (
        f"The perimeter is {_eq(f'2*({length}+{width})', perimeter)} feet.",
        f"The fence costs {_eq(f'{perimeter}*{price}', perimeter * price)} dollars.",
    )
    return MathProblem(kind="fence_cost", question=question, steps=steps, answer=perimeter * price)


def _tiles(rng: random.Random) -> MathProblem:
    p = _person(rng)
    room = rng.choice(_ROOMS)
    per_box = rng.choice((8, 10, 12, 15, 16, 20, 24, 25))
    boxes = rng.randint(3, 40)
    area = per_box * boxes
    width = rng.choice([d for d in range(4, 31) if area % d == 0 and area // d >= 4] or [1])
    length = area // width
    question = (
        f"{p.name}'s {room} is {length} feet long and {width} feet wide. One box of tiles covers "
        f"{per_box} square feet. How many boxes of tiles does {p.subj} need to cover the floor?"
    )
    steps = (
        f"The floor is {_eq(f'{length}*{width}', area)} square feet.",
        f"It needs {_eq(f'{area}/{per_box}', boxes)} boxes.",
    )
    return MathProblem(kind="tiles", question=question, steps=steps, answer=boxes)


def _profit(rng: random.Random) -> MathProblem:
    p = _person(rng)
    item, lo, hi = rng.choice(_ITEMS)
    count, unit_cost = rng.randint(5, 40), rng.randint(lo, hi)
    price = unit_cost + rng.randint(1, 6)
    cost = count * unit_cost
    revenue = count * price
    question = (
        f"{p.name} buys {count} {item} for ${cost} in total and sells each one for ${price}. "
        f"How much profit does {p.subj} make?"
    )
    steps = (
        f"{_cap(p.subj)} sells them for {_eq(f'{count}*{price}', revenue)} dollars.",
        f"The profit is {_eq(f'{revenue}-{cost}', revenue - cost)} dollars.",
    )
    return MathProblem(kind="profit", question=question, steps=steps, answer=revenue - cost)


def _reading_series(rng: random.Random) -> MathProblem:
    p = _person(rng)
    first, more, days = rng.randint(5, 30), rng.randint(2, 10), rng.randint(3, 6)
    pages = [first]
    steps: list[str] = []
    for day in range(2, days + 1):
        pages.append(pages[-1] + more)
        steps.append(f"On day {day} {p.subj} reads {_eq(f'{pages[-2]}+{more}', pages[-1])} pages.")
    total = sum(pages)
    steps.append(f"In total {p.subj} reads {_eq('+'.join(map(str, pages)), total)} pages.")
    question = (
        f"{p.name} reads {first} pages of a book on the first day. Each day after that {p.subj} reads "
        f"{more} more pages than the day before. How many pages does {p.subj} read in {days} days?"
    )
    return MathProblem(kind="reading_series", question=question, steps=tuple(steps), answer=total)


def _fuel_cost(rng: random.Random) -> MathProblem:
    p = _person(rng)
    relative = rng.choice(_RELATIVES)
    mpg, price = rng.randint(18, 40), rng.randint(3, 6)
    round_trip = rng.random() < 0.5
    gallons = 2 * rng.randint(1, 6) if round_trip else rng.randint(2, 12)
    miles = mpg * gallons
    steps: list[str] = []
    if round_trip:
        one_way = miles // 2  # gallons is even, so the one-way distance is whole
        trip = f"drives {one_way} miles to visit {p.poss} {relative} and the same distance back"
        steps.append(f"{_cap(p.subj)} drives {_eq(f'2*{one_way}', miles)} miles.")
    else:
        trip = f"drives {miles} miles to visit {p.poss} {relative}"
    question = (
        f"{p.name}'s car goes {mpg} miles on one gallon of gas. {_cap(p.subj)} {trip}. If gas costs "
        f"${price} per gallon, how much does {p.subj} spend on gas?"
    )
    steps.append(f"{_cap(p.subj)} uses {_eq(f'{miles}/{mpg}', gallons)} gallons.")
    steps.append(f"The gas costs {_eq(f'{gallons}*{price}', gallons * price)} dollars.")
    return MathProblem(kind="fuel_cost", question=question, steps=tuple(steps), answer=gallons * price)


def _tank_fill(rng: random.Random) -> MathProblem:
    container = rng.choice(_CONTAINERS)
    denominator = rng.choice((3, 4, 5, 8, 10))
    numerator = rng.randint(1, denominator - 1)
    capacity = denominator * rng.randint(5, 60)
    current = capacity * numerator // denominator
    question = (
        f"A {container} holds {capacity} liters of water. It is {numerator}/{denominator} full. "
        f"How many more liters are needed to fill it?"
    )
    steps = (
        f"It has {_eq(f'{capacity}*{numerator}/{denominator}', current)} liters now.",
        f"It needs {_eq(f'{capacity}-{current}', capacity - current)} more liters.",
    )
    return MathProblem(kind="tank_fill", question=question, steps=steps, answer=capacity - current)


def _comparison_total(rng: random.Random) -> MathProblem:
    a = _person(rng)
    b = _person(rng, exclude=(a.name,))
    c = _person(rng, exclude=(a.name, b.name))
    thing = rng.choice(_COLLECTIBLES)
    base, factor = rng.randint(3, 25), rng.randint(2, 5)
    b_count = factor * base
    fewer = rng.randint(1, b_count - 1)
    c_count = b_count - fewer
    total = base + b_count + c_count
    question = (
        f"{a.name} has {base} {thing}. {b.name} has {factor} times as many {thing} as {a.name}, and "
        f"{c.name} has {fewer} fewer than {b.name}. How many {thing} do they have altogether?"
    )
    steps = (
        f"{b.name} has {_eq(f'{factor}*{base}', b_count)} {thing}.",
        f"{c.name} has {_eq(f'{b_count}-{fewer}', c_count)} {thing}.",
        f"Altogether they have {_eq(f'{base}+{b_count}+{c_count}', total)} {thing}.",
    )
    return MathProblem(kind="comparison_total", question=question, steps=steps, answer=total)


def _garden_yield(rng: random.Random) -> MathProblem:
    p = _person(rng)
    plants, produce = rng.choice(_CROPS)
    rows, per_row, per_plant = rng.randint(2, 10), rng.randint(3, 12), rng.randint(2, 15)
    total = rows * per_row
    died = rng.randint(1, total - 1)
    alive = total - died
    question = (
        f"{p.name} plants {rows} rows of {plants} with {per_row} plants in each row. {died} of the "
        f"plants die. Each remaining plant gives {per_plant} {produce}. How many {produce} does "
        f"{p.subj} harvest?"
    )
    steps = (
        f"{_cap(p.subj)} plants {_eq(f'{rows}*{per_row}', total)} plants.",
        f"{_eq(f'{total}-{died}', alive)} plants survive.",
        f"{_cap(p.subj)} harvests {_eq(f'{alive}*{per_plant}', alive * per_plant)} {produce}.",
    )
    return MathProblem(kind="garden_yield", question=question, steps=steps, answer=alive * per_plant)


def _weekly_pay(rng: random.Random) -> MathProblem:
    p = _person(rng)
    hours, days, wage, weeks = rng.randint(3, 9), rng.randint(2, 6), rng.randint(9, 30), rng.randint(2, 6)
    per_week = hours * days
    pay = per_week * wage
    question = (
        f"{p.name} works {hours} hours a day, {days} days a week, and is paid ${wage} per hour. "
        f"How much does {p.subj} earn in {weeks} weeks?"
    )
    steps = (
        f"{_cap(p.subj)} works {_eq(f'{hours}*{days}', per_week)} hours a week.",
        f"{_cap(p.subj)} earns {_eq(f'{per_week}*{wage}', pay)} dollars a week.",
        f"In {weeks} weeks {p.subj} earns {_eq(f'{pay}*{weeks}', pay * weeks)} dollars.",
    )
    return MathProblem(kind="weekly_pay", question=question, steps=steps, answer=pay * weeks)


def _pizza_slices(rng: random.Random) -> MathProblem:
    p = _person(rng)
    pizzas, slices = rng.randint(2, 6), rng.choice((6, 8, 10, 12))
    guests = rng.randint(2, 9)
    total = pizzas * slices
    each = rng.randint(1, max(1, (total - 1) // guests))
    eaten = guests * each
    question = (
        f"{p.name} orders {pizzas} pizzas for a party. Each pizza is cut into {slices} slices. "
        f"{guests} guests eat {each} slices each. How many slices are left?"
    )
    steps = (
        f"There are {_eq(f'{pizzas}*{slices}', total)} slices.",
        f"The guests eat {_eq(f'{guests}*{each}', eaten)} slices.",
        f"There are {_eq(f'{total}-{eaten}', total - eaten)} slices left.",
    )
    return MathProblem(kind="pizza_slices", question=question, steps=steps, answer=total - eaten)


MATH_TEMPLATES: tuple[Callable[[random.Random], MathProblem], ...] = (
    _shopping_total,
    _shopping_change,
    _egg_sales,
    _distance,
    _work_rate,
    _ages,
    _fraction_giveaway,
    _discount,
    _raise,
    _bakery_boxes,
    _practice_hours,
    _average_needed,
    _ratio,
    _savings_weeks,
    _split_bill,
    _fence_cost,
    _tiles,
    _profit,
    _reading_series,
    _fuel_cost,
    _tank_fill,
    _comparison_total,
    _garden_yield,
    _weekly_pay,
    _pizza_slices,
)


def generate_math_problem(seed: int, index: int) -> MathProblem:
    """Problem ``index`` of ``seed``: a pure function of the two (string-seeded RNG, stable everywhere)."""
    rng = random.Random(f"connito-math:{seed}:{index}")
    return rng.choice(MATH_TEMPLATES)(rng)


def generate_math_documents(count: int, *, seed: int = 0) -> list[str]:
    """``count`` problems as GSM8K-style documents; a shorter run is a prefix of a longer one."""
    return [generate_math_problem(seed, index).to_document() for index in range(count)]
