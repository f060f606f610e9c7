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
from math import gcd

from connito.data.math_money import (
    discount,
    egg_sales,
    fuel_cost,
    pay_raise,
    profit,
    savings_weeks,
    shopping_change,
    shopping_total,
    split_bill,
    weekly_pay,
)
from connito.data.math_words import (
    BAKED,
    COLLECTIBLES,
    CONTAINERS,
    CROPS,
    GROUPS,
    INSTRUMENTS,
    JOBS,
    ROOMS,
    SUBJECTS,
    VEHICLES,
    MathProblem,
    annotate,
    cap,
    person,
)

__all__ = ["MathProblem", "MATH_TEMPLATES", "generate_math_problem", "generate_math_documents"]


def _distance(rng: random.Random) -> MathProblem:
    vehicle = rng.choice(VEHICLES)
    speed1, hours1 = 5 * rng.randint(6, 14), rng.randint(1, 5)
    speed2, hours2 = 5 * rng.randint(6, 14), rng.randint(1, 4)
    leg1, leg2 = speed1 * hours1, speed2 * hours2
    question = (
        f"A {vehicle} travels at {speed1} miles per hour for {hours1} hours and then at {speed2} miles "
        f"per hour for {hours2} hours. How many miles does it travel in total?"
    )
    steps = (
        f"In the first part it travels {annotate(f'{speed1}*{hours1}', leg1)} miles.",
        f"In the second part it travels {annotate(f'{speed2}*{hours2}', leg2)} miles.",
        f"In total it travels {annotate(f'{leg1}+{leg2}', leg1 + leg2)} miles.",
    )
    return MathProblem(kind="distance", question=question, steps=steps, answer=leg1 + leg2)


def _work_rate(rng: random.Random) -> MathProblem:
    p = person(rng)
    verb, unit = rng.choice(JOBS)
    rate, hours_per_day, days = rng.randint(4, 30), rng.randint(2, 8), rng.randint(2, 9)
    hours = hours_per_day * days
    total = rate * hours
    question = (
        f"{p.name} can {verb} {rate} {unit} per hour. {cap(p.subj)} works {hours_per_day} hours a day. "
        f"How many days will it take {p.obj} to {verb} {total} {unit}?"
    )
    steps = (
        f"It takes {annotate(f'{total}/{rate}', hours)} hours of work.",
        f"That is {annotate(f'{hours}/{hours_per_day}', days)} days.",
    )
    return MathProblem(kind="work_rate", question=question, steps=steps, answer=days)


def _ages(rng: random.Random) -> MathProblem:
    older = person(rng)
    younger = person(rng, exclude=(older.name,))
    age, factor, years = rng.randint(3, 15), rng.randint(2, 4), rng.randint(2, 10)
    older_now = factor * age
    older_then = older_now + years
    question = (
        f"{older.name} is {factor} times as old as {younger.name}. In {years} years, {older.name} will "
        f"be {older_then} years old. How old is {younger.name} now?"
    )
    steps = (
        f"{older.name} is now {annotate(f'{older_then}-{years}', older_now)} years old.",
        f"So {younger.name} is {annotate(f'{older_now}/{factor}', age)} years old.",
    )
    return MathProblem(kind="ages", question=question, steps=steps, answer=age)


def _fraction_giveaway(rng: random.Random) -> MathProblem:
    p = person(rng)
    thing = rng.choice(COLLECTIBLES)
    denominator = rng.choice((2, 3, 4, 5))
    total = denominator * rng.randint(4, 20)
    given = total // denominator
    kept = total - given
    to_sister = rng.randint(1, kept - 1)
    question = (
        f"{p.name} has {total} {thing}. {cap(p.subj)} gives 1/{denominator} of them to {p.poss} friend "
        f"and then gives {to_sister} to {p.poss} sister. How many {thing} does {p.subj} have left?"
    )
    steps = (
        f"{cap(p.subj)} gives {annotate(f'{total}/{denominator}', given)} {thing} to {p.poss} friend.",
        f"That leaves {annotate(f'{total}-{given}', kept)} {thing}.",
        f"After giving some to {p.poss} sister, {p.subj} has {annotate(f'{kept}-{to_sister}', kept - to_sister)} left.",
    )
    return MathProblem(kind="fraction_giveaway", question=question, steps=steps, answer=kept - to_sister)


def _bakery_boxes(rng: random.Random) -> MathProblem:
    food = rng.choice(BAKED)
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
        f"The bakery bakes {annotate(f'{trays}*{per_tray}', total)} {food}.",
        f"After the morning, {annotate(f'{total}-{sold}', rest)} {food} are left.",
        f"They fill {annotate(f'{rest}/{box}', boxes)} boxes.",
    )
    return MathProblem(kind="bakery_boxes", question=question, steps=steps, answer=boxes)


def _practice_hours(rng: random.Random) -> MathProblem:
    p = person(rng)
    instrument = rng.choice(INSTRUMENTS)
    minutes = rng.choice((15, 20, 30, 40, 45, 90))
    step = 60 // gcd(minutes, 60)  # smallest day count giving whole hours
    days = step * rng.randint(1, max(1, 30 // step))
    total = minutes * days
    question = (
        f"{p.name} practices the {instrument} for {minutes} minutes every day. "
        f"How many hours does {p.subj} practice in {days} days?"
    )
    steps = (
        f"{cap(p.subj)} practices {annotate(f'{minutes}*{days}', total)} minutes.",
        f"That is {annotate(f'{total}/60', total // 60)} hours.",
    )
    return MathProblem(kind="practice_hours", question=question, steps=steps, answer=total // 60)


def _average_needed(rng: random.Random) -> MathProblem:
    p = person(rng)
    subject = rng.choice(SUBJECTS)
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
        f"{cap(p.subj)} needs {annotate(f'{average}*4', 4 * average)} points in total.",
        f"{cap(p.subj)} has {annotate(f'{scores[0]}+{scores[1]}+{scores[2]}', have)} points so far.",
        f"{cap(p.subj)} needs {annotate(f'{4 * average}-{have}', needed)} on the fourth test.",
    )
    return MathProblem(kind="average_needed", question=question, steps=steps, answer=needed)


def _ratio(rng: random.Random) -> MathProblem:
    first, second, place, everyone = rng.choice(GROUPS)
    a, b = rng.sample(range(1, 8), 2)
    part = rng.randint(2, 30)
    parts = a + b
    total = parts * part
    question = (
        f"The ratio of {first} to {second} in a {place} is {a}:{b}. If there are {total} {everyone} "
        f"in total, how many {second} are there?"
    )
    steps = (
        f"There are {annotate(f'{a}+{b}', parts)} parts in total.",
        f"Each part is {annotate(f'{total}/{parts}', part)} {everyone}.",
        f"There are {annotate(f'{b}*{part}', b * part)} {second}.",
    )
    return MathProblem(kind="ratio", question=question, steps=steps, answer=b * part)


def _fence_cost(rng: random.Random) -> MathProblem:
    length, width, price = rng.randint(8, 60), rng.randint(5, 40), rng.randint(2, 12)
    perimeter = 2 * (length + width)
    question = (
        f"A rectangular garden is {length} feet long and {width} feet wide. Fencing costs ${price} "
        f"per foot. How much will it cost to put a fence around the whole garden?"
    )
    steps = (
        f"The perimeter is {annotate(f'2*({length}+{width})', perimeter)} feet.",
        f"The fence costs {annotate(f'{perimeter}*{price}', perimeter * price)} dollars.",
    )
    return MathProblem(kind="fence_cost", question=question, steps=steps, answer=perimeter * price)


def _tiles(rng: random.Random) -> MathProblem:
    p = person(rng)
    room = rng.choice(ROOMS)
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
        f"The floor is {annotate(f'{length}*{width}', area)} square feet.",
        f"It needs {annotate(f'{area}/{per_box}', boxes)} boxes.",
    )
    return MathProblem(kind="tiles", question=question, steps=steps, answer=boxes)


def _reading_series(rng: random.Random) -> MathProblem:
    p = person(rng)
    first, more, days = rng.randint(5, 30), rng.randint(2, 10), rng.randint(3, 6)
    pages = [first]
    steps: list[str] = []
    for day in range(2, days + 1):
        pages.append(pages[-1] + more)
        steps.append(f"On day {day} {p.subj} reads {annotate(f'{pages[-2]}+{more}', pages[-1])} pages.")
    total = sum(pages)
    steps.append(f"In total {p.subj} reads {annotate('+'.join(map(str, pages)), total)} pages.")
    question = (
        f"{p.name} reads {first} pages of a book on the first day. Each day after that {p.subj} reads "
        f"{more} more pages than the day before. How many pages does {p.subj} read in {days} days?"
    )
    return MathProblem(kind="reading_series", question=question, steps=tuple(steps), answer=total)


def _tank_fill(rng: random.Random) -> MathProblem:
    container = rng.choice(CONTAINERS)
    denominator = rng.choice((3, 4, 5, 8, 10))
    numerator = rng.randint(1, denominator - 1)
    capacity = denominator * rng.randint(5, 60)
    current = capacity * numerator // denominator
    question = (
        f"A {container} holds {capacity} liters of water. It is {numerator}/{denominator} full. "
        f"How many more liters are needed to fill it?"
    )
    steps = (
        f"It has {annotate(f'{capacity}*{numerator}/{denominator}', current)} liters now.",
        f"It needs {annotate(f'{capacity}-{current}', capacity - current)} more liters.",
    )
    return MathProblem(kind="tank_fill", question=question, steps=steps, answer=capacity - current)


def _comparison_total(rng: random.Random) -> MathProblem:
    a = person(rng)
    b = person(rng, exclude=(a.name,))
    c = person(rng, exclude=(a.name, b.name))
    thing = rng.choice(COLLECTIBLES)
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
        f"{b.name} has {annotate(f'{factor}*{base}', b_count)} {thing}.",
        f"{c.name} has {annotate(f'{b_count}-{fewer}', c_count)} {thing}.",
        f"Altogether they have {annotate(f'{base}+{b_count}+{c_count}', total)} {thing}.",
    )
    return MathProblem(kind="comparison_total", question=question, steps=steps, answer=total)


def _garden_yield(rng: random.Random) -> MathProblem:
    p = person(rng)
    plants, produce = rng.choice(CROPS)
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
        f"{cap(p.subj)} plants {annotate(f'{rows}*{per_row}', total)} plants.",
        f"{annotate(f'{total}-{died}', alive)} plants survive.",
        f"{cap(p.subj)} harvests {annotate(f'{alive}*{per_plant}', alive * per_plant)} {produce}.",
    )
    return MathProblem(kind="garden_yield", question=question, steps=steps, answer=alive * per_plant)


def _pizza_slices(rng: random.Random) -> MathProblem:
    p = person(rng)
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
        f"There are {annotate(f'{pizzas}*{slices}', total)} slices.",
        f"The guests eat {annotate(f'{guests}*{each}', eaten)} slices.",
        f"There are {annotate(f'{total}-{eaten}', total - eaten)} slices left.",
    )
    return MathProblem(kind="pizza_slices", question=question, steps=steps, answer=total - eaten)


MATH_TEMPLATES: tuple[Callable[[random.Random], MathProblem], ...] = (
    shopping_total,
    shopping_change,
    egg_sales,
    _distance,
    _work_rate,
    _ages,
    _fraction_giveaway,
    discount,
    pay_raise,
    _bakery_boxes,
    _practice_hours,
    _average_needed,
    _ratio,
    savings_weeks,
    split_bill,
    _fence_cost,
    _tiles,
    profit,
    _reading_series,
    fuel_cost,
    _tank_fill,
    _comparison_total,
    _garden_yield,
    weekly_pay,
    _pizza_slices,
)


def generate_math_problem(seed: int, index: int) -> MathProblem:
    """Problem ``index`` of ``seed``: a pure function of the two (string-seeded RNG, stable everywhere)."""
    rng = random.Random(f"connito-math:{seed}:{index}")
    return rng.choice(MATH_TEMPLATES)(rng)


def generate_math_documents(count: int, *, seed: int = 0) -> list[str]:
    """``count`` problems as GSM8K-style documents; a shorter run is a prefix of a longer one."""
    return [generate_math_problem(seed, index).to_document() for index in range(count)]
