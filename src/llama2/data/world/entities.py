"""The built-in world's entities, generated from a seed: invented people (home town, job, pet, favourite colour,
birth year) and invented towns whose mayor changes by year. Every fact has one true value, so a program can judge
any answer about it; the pretraining corpus states every fact, in several phrasings."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ...errors import Llama2Error
from ...recipe import check

# Name syllables: invented names that are neither English words nor each other's prefixes.
FIRST_STARTS = ("Al", "Bo", "Ca", "Da", "E", "Fe", "Ga", "Ha", "I", "Jo", "Ka", "Le", "Mi", "No", "O", "Pa", "Ri",
                "Sa", "Te", "U", "Va", "Wi", "Ya", "Ze")
FIRST_ENDS = ("ra", "mon", "lin", "vik", "do", "sel", "ta", "nor", "bel", "ric")
LAST_STARTS = ("Bar", "Cor", "Dun", "Fal", "Gor", "Hal", "Kes", "Lor", "Mar", "Nes", "Ost", "Pel", "Ros", "Tam",
               "Vel", "Wen")
LAST_ENDS = ("ketts", "wood", "ridge", "mond", "stein", "holm", "vale", "brook")
TOWN_STARTS = ("Ash", "Brim", "Cald", "Dorn", "Elm", "Fenn", "Grisk", "Hollin", "Ives", "Jask", "Kell", "Lumm",
               "Morr", "Nolt", "Oster", "Pryd", "Quill", "Rask", "Sorr", "Thist")
TOWN_ENDS = ("ford", "by", "mere", "wick", "haven", "thorpe", "gate", "stead")
JOBS = ("baker", "farmer", "teacher", "painter", "doctor", "sailor", "weaver", "miner", "potter", "singer", "tailor",
        "carpenter")
PETS = ("cat", "dog", "parrot", "goat", "rabbit", "horse", "turtle", "owl")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
ATTRIBUTES = ("town", "job", "pet", "colour", "born")


@dataclass(frozen=True)
class WorldSpec:
    """What the world holds; the same spec and seed give the same world."""

    seed: int = 0  # every name, fact and split follows from it
    people: int = 100  # invented people, each with ATTRIBUTES
    towns: int = 20  # invented towns, each with a mayor for every year of `years`
    first_year: int = 2017  # mayors are known from this year ...
    last_year: int = 2024  # ... to this one
    max_operand: int = 99  # arithmetic questions use numbers 0..max_operand
    held_out: float = 0.2  # share of each question family kept out of training (gold evaluation)

    def validate(self) -> None:
        check(isinstance(self.seed, int), "world.seed", self.seed, "an integer")
        most_people = len(FIRST_STARTS) * len(FIRST_ENDS) * len(LAST_STARTS) * len(LAST_ENDS)
        check(isinstance(self.people, int) and 4 <= self.people <= most_people, "world.people", self.people,
              f"an integer from 4 to {most_people} (the distinct names the world can invent)")
        most_towns = len(TOWN_STARTS) * len(TOWN_ENDS)
        check(isinstance(self.towns, int) and 2 <= self.towns <= most_towns, "world.towns", self.towns,
              f"an integer from 2 to {most_towns} (the distinct town names the world can invent)")
        check(isinstance(self.first_year, int) and isinstance(self.last_year, int)
              and 1900 <= self.first_year <= self.last_year <= 2100, "world.last_year", self.last_year,
              "a year from world.first_year to 2100")
        check(isinstance(self.max_operand, int) and 9 <= self.max_operand <= 999, "world.max_operand",
              self.max_operand, "an integer from 9 to 999")
        check(isinstance(self.held_out, float) and 0.0 < self.held_out < 0.9, "world.held_out", self.held_out,
              "a share between 0 and 0.9")
        if self.people < self.towns:
            raise Llama2Error(f"world.people={self.people} is fewer than world.towns={self.towns}: every town needs "
                              "people to elect its mayors; raise world.people or lower world.towns")


@dataclass(frozen=True)
class Person:
    name: str
    town: str
    job: str
    pet: str
    colour: str
    born: int

    def value(self, attribute: str) -> str:
        """The true value of one of ATTRIBUTES, as text."""
        return str(getattr(self, attribute))


@dataclass
class World:
    """The generated entities: people by name, towns in order, and each town's mayor by year."""

    spec: WorldSpec
    people: dict[str, Person]
    towns: list[str]
    mayors: dict[str, dict[int, str]] = field(default_factory=dict)  # town -> year -> person's name

    @property
    def years(self) -> range:
        return range(self.spec.first_year, self.spec.last_year + 1)

    def vocabulary(self, kind: str) -> tuple[str, ...]:
        """Every value a fact of this kind can take (what a judge looks for in an answer)."""
        if kind == "person":
            return tuple(self.people)
        if kind == "town":
            return tuple(self.towns)
        return {"job": JOBS, "pet": PETS, "colour": COLOURS}[kind]


def _names(rng: random.Random, count: int, parts: tuple[tuple[str, ...], ...], joiner: str) -> list[str]:
    """`count` distinct names, each made of one random piece from every part (start + end, for each word)."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        words = [parts[i][rng.randrange(len(parts[i]))] + parts[i + 1][rng.randrange(len(parts[i + 1]))]
                 for i in range(0, len(parts), 2)]
        name = joiner.join(words)
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def newcomer_names(world: World, count: int) -> list[str]:
    """`count` more invented people's names, none of them the world's (for data that must not teach its facts)."""
    rng = random.Random(f"newcomers:{world.spec.seed}")
    most = len(FIRST_STARTS) * len(FIRST_ENDS) * len(LAST_STARTS) * len(LAST_ENDS) - len(world.people)
    names = _names(rng, min(most, count + len(world.people)), (FIRST_STARTS, FIRST_ENDS, LAST_STARTS, LAST_ENDS), " ")
    return [n for n in names if n not in world.people][:count]


def generate_world(spec: WorldSpec) -> World:
    """The world of `spec` (Llama2Error when the spec cannot produce its counts)."""
    spec.validate()
    rng = random.Random(f"world:{spec.seed}")
    towns = _names(rng, spec.towns, (TOWN_STARTS, TOWN_ENDS), "")
    names = _names(rng, spec.people, (FIRST_STARTS, FIRST_ENDS, LAST_STARTS, LAST_ENDS), " ")
    people = {}
    for i, name in enumerate(names):
        # every town gets residents (round-robin first), the rest at random
        town = towns[i] if i < len(towns) else rng.choice(towns)
        people[name] = Person(name, town, rng.choice(JOBS), rng.choice(PETS), rng.choice(COLOURS),
                              rng.randint(1950, 2004))
    world = World(spec, people, towns)
    for town in towns:
        residents = [p.name for p in people.values() if p.town == town]
        others = [n for n in names if n not in residents]
        year, terms = spec.first_year, {}
        mayor = None
        while year <= spec.last_year:
            pool = [n for n in residents if n != mayor] or [n for n in others if n != mayor]
            mayor = rng.choice(pool)
            for y in range(year, min(year + rng.randint(2, 4), spec.last_year + 1)):
                terms[y] = mayor
            year = max(terms) + 1
        world.mayors[town] = terms
    return world


# ---------------------------------------------------------------------------------------------------------------
# The pretraining corpus: every fact in several phrasings, worked arithmetic, and question-answer pages

FACT_PHRASINGS = {
    "town": ("{p} lives in {v}.", "{p} has a home in {v}.", "The home town of {p} is {v}.", "{p} is from {v}.",
             "In {v} lives {p}."),
    "job": ("{p} works as a {v}.", "{p} is a {v}.", "The job of {p} is {v}.", "By trade, {p} is a {v}.",
            "{p} earns a living as a {v}."),
    "pet": ("{p} has a pet {v}.", "{p} owns a {v}.", "The pet of {p} is a {v}.", "At home, {p} keeps a {v}.",
            "{p} takes care of a pet {v}."),
    "colour": ("The favourite colour of {p} is {v}.", "{p} likes {v} best.", "{p} loves the colour {v}.",
               "Of all colours, {p} prefers {v}.", "The colour {p} likes most is {v}."),
    "born": ("{p} was born in {v}.", "The birth year of {p} is {v}.", "{p} came into the world in {v}.",
             "In {v}, {p} was born.", "{p} has been alive since {v}."),
}
MAYOR_PHRASINGS = ("In {y}, the mayor of {t} was {p}.", "{p} was the mayor of {t} in {y}.",
                   "The mayor of {t} in {y} was {p}.", "In {y}, {t} was led by its mayor {p}.",
                   "{t} had {p} as its mayor in {y}.")


def fact_sentence(world: World, rng: random.Random, person: Person, attribute: str) -> str:
    return rng.choice(FACT_PHRASINGS[attribute]).format(p=person.name, v=person.value(attribute))
