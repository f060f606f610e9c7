"""Money word problems: shopping, wages, discounts, savings, bills, profit and fuel.

Part of the GSM8K-like generator (``math_problems``): each template draws from a seeded RNG, keeps
every amount a whole number of dollars and annotates each step (``annotate``).
"""

from __future__ import annotations

import random

from connito.data.math_words import (
    GOALS,
    ITEMS,
    RELATIVES,
    SALE_ITEMS,
    MathProblem,
    annotate,
    cap,
    person,
)

__all__ = [
    "shopping_total",
    "shopping_change",
    "egg_sales",
    "discount",
    "pay_raise",
    "savings_weeks",
    "split_bill",
    "profit",
    "fuel_cost",
    "weekly_pay",
]


def shopping_total(rng: random.Random) -> MathProblem:
    p = person(rng)
    (item1, lo1, hi1), (item2, lo2, hi2) = rng.sample(ITEMS, 2)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    price1, price2 = rng.randint(lo1, hi1), rng.randint(lo2, hi2)
    cost1, cost2 = a * price1, b * price2
    question = (
        f"{p.name} buys {a} {item1} for ${price1} each and {b} {item2} for ${price2} each. "
        f"How much money does {p.subj} spend in total?"
    )
    steps = (
        f"The {item1} cost {annotate(f'{a}*{price1}', cost1)} dollars.",
        f"The {item2} cost {annotate(f'{b}*{price2}', cost2)} dollars.",
        f"In total {p.subj} spends {annotate(f'{cost1}+{cost2}', cost1 + cost2)} dollars.",
    )
    return MathProblem(kind="shopping_total", question=question, steps=steps, answer=cost1 + cost2)


def shopping_change(rng: random.Random) -> MathProblem:
    p = person(rng)
    item, lo, hi = rng.choice(ITEMS)
    count, price = rng.randint(2, 8), rng.randint(lo, hi)
    cost = count * price
    money = cost + rng.randint(1, 40)
    question = (
        f"{p.name} has ${money}. {cap(p.subj)} buys {count} {item} that cost ${price} each. "
        f"How much money does {p.subj} have left?"
    )
    steps = (
        f"The {item} cost {annotate(f'{count}*{price}', cost)} dollars.",
        f"{cap(p.subj)} has {annotate(f'{money}-{cost}', money - cost)} dollars left.",
    )
    return MathProblem(kind="shopping_change", question=question, steps=steps, answer=money - cost)


def egg_sales(rng: random.Random) -> MathProblem:
    p = person(rng)
    laid, eaten, baked, price = rng.randint(12, 30), rng.randint(2, 4), rng.randint(2, 6), rng.randint(2, 5)
    used = eaten + baked
    left = laid - used
    question = (
        f"{p.name}'s hens lay {laid} eggs per day. {cap(p.subj)} eats {eaten} for breakfast every "
        f"morning and uses {baked} to bake muffins for {p.poss} friends. {cap(p.subj)} sells the rest "
        f"at the market for ${price} per egg. How much money does {p.subj} make every day?"
    )
    steps = (
        f"{cap(p.subj)} uses {annotate(f'{eaten}+{baked}', used)} eggs each day.",
        f"{cap(p.subj)} sells {annotate(f'{laid}-{used}', left)} eggs.",
        f"{cap(p.subj)} makes {annotate(f'{left}*{price}', left * price)} dollars every day.",
    )
    return MathProblem(kind="egg_sales", question=question, steps=steps, answer=left * price)


def discount(rng: random.Random) -> MathProblem:
    p = person(rng)
    item = rng.choice(SALE_ITEMS)
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
        f"The discount is {annotate(f'{price}*{percent}/100', discount)} dollars.",
        f"Each one costs {annotate(f'{price}-{discount}', sale)} dollars.",
        f"{cap(p.subj)} pays {annotate(f'{sale}*{count}', sale * count)} dollars.",
    )
    return MathProblem(kind="discount", question=question, steps=steps, answer=sale * count)


def pay_raise(rng: random.Random) -> MathProblem:
    p = person(rng)
    salary = 100 * rng.randint(3, 15)
    percent = rng.choice((5, 10, 15, 20, 25))
    weeks = rng.randint(2, 8)
    increase = salary * percent // 100  # salary is a multiple of 100: exact
    new_salary = salary + increase
    question = (
        f"{p.name} earns ${salary} per week. {cap(p.subj)} gets a {percent}% raise. "
        f"How much will {p.subj} earn over the next {weeks} weeks?"
    )
    steps = (
        f"The raise is {annotate(f'{salary}*{percent}/100', increase)} dollars per week.",
        f"{cap(p.subj)} will earn {annotate(f'{salary}+{increase}', new_salary)} dollars per week.",
        f"Over {weeks} weeks that is {annotate(f'{new_salary}*{weeks}', new_salary * weeks)} dollars.",
    )
    return MathProblem(kind="raise", question=question, steps=steps, answer=new_salary * weeks)


def savings_weeks(rng: random.Random) -> MathProblem:
    p = person(rng)
    goal = rng.choice(GOALS)
    saved, weekly, weeks = rng.randint(10, 120), rng.randint(5, 40), rng.randint(2, 20)
    need = weekly * weeks
    cost = saved + need
    question = (
        f"{p.name} wants to buy a {goal} that costs ${cost}. {cap(p.subj)} has already saved ${saved} "
        f"and saves ${weekly} each week. How many weeks will it take {p.obj} to have enough money?"
    )
    steps = (
        f"{cap(p.subj)} still needs {annotate(f'{cost}-{saved}', need)} dollars.",
        f"It will take {annotate(f'{need}/{weekly}', weeks)} weeks.",
    )
    return MathProblem(kind="savings_weeks", question=question, steps=steps, answer=weeks)


def split_bill(rng: random.Random) -> MathProblem:
    friends, share = rng.randint(2, 8), rng.randint(12, 60)
    total = friends * share
    tip = rng.randint(3, max(4, total // 5))
    meal = total - tip
    question = (
        f"{friends} friends go out to dinner. The meal costs ${meal} and they leave a ${tip} tip. If "
        f"they split the total equally, how much does each friend pay?"
    )
    steps = (
        f"The total is {annotate(f'{meal}+{tip}', total)} dollars.",
        f"Each friend pays {annotate(f'{total}/{friends}', share)} dollars.",
    )
    return MathProblem(kind="split_bill", question=question, steps=steps, answer=share)


def profit(rng: random.Random) -> MathProblem:
    p = person(rng)
    item, lo, hi = rng.choice(ITEMS)
    count, unit_cost = rng.randint(5, 40), rng.randint(lo, hi)
    price = unit_cost + rng.randint(1, 6)
    cost = count * unit_cost
    revenue = count * price
    question = (
        f"{p.name} buys {count} {item} for ${cost} in total and sells each one for ${price}. "
        f"How much profit does {p.subj} make?"
    )
    steps = (
        f"{cap(p.subj)} sells them for {annotate(f'{count}*{price}', revenue)} dollars.",
        f"The profit is {annotate(f'{revenue}-{cost}', revenue - cost)} dollars.",
    )
    return MathProblem(kind="profit", question=question, steps=steps, answer=revenue - cost)


def fuel_cost(rng: random.Random) -> MathProblem:
    p = person(rng)
    relative = rng.choice(RELATIVES)
    mpg, price = rng.randint(18, 40), rng.randint(3, 6)
    round_trip = rng.random() < 0.5
    gallons = 2 * rng.randint(1, 6) if round_trip else rng.randint(2, 12)
    miles = mpg * gallons
    steps: list[str] = []
    if round_trip:
        one_way = miles // 2  # gallons is even, so the one-way distance is whole
        trip = f"drives {one_way} miles to visit {p.poss} {relative} and the same distance back"
        steps.append(f"{cap(p.subj)} drives {annotate(f'2*{one_way}', miles)} miles.")
    else:
        trip = f"drives {miles} miles to visit {p.poss} {relative}"
    question = (
        f"{p.name}'s car goes {mpg} miles on one gallon of gas. {cap(p.subj)} {trip}. If gas costs "
        f"${price} per gallon, how much does {p.subj} spend on gas?"
    )
    steps.append(f"{cap(p.subj)} uses {annotate(f'{miles}/{mpg}', gallons)} gallons.")
    steps.append(f"The gas costs {annotate(f'{gallons}*{price}', gallons * price)} dollars.")
    return MathProblem(kind="fuel_cost", question=question, steps=tuple(steps), answer=gallons * price)


def weekly_pay(rng: random.Random) -> MathProblem:
    p = person(rng)
    hours, days, wage, weeks = rng.randint(3, 9), rng.randint(2, 6), rng.randint(9, 30), rng.randint(2, 6)
    per_week = hours * days
    pay = per_week * wage
    question = (
        f"{p.name} works {hours} hours a day, {days} days a week, and is paid ${wage} per hour. "
        f"How much does {p.subj} earn in {weeks} weeks?"
    )
    steps = (
        f"{cap(p.subj)} works {annotate(f'{hours}*{days}', per_week)} hours a week.",
        f"{cap(p.subj)} earns {annotate(f'{per_week}*{wage}', pay)} dollars a week.",
        f"In {weeks} weeks {p.subj} earns {annotate(f'{pay}*{weeks}', pay * weeks)} dollars.",
    )
    return MathProblem(kind="weekly_pay", question=question, steps=steps, answer=pay * weeks)
