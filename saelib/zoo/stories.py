"""Seeded generator of short stories in which named people give, hand and tell things.

Real text rarely names two people and then has one of them give something to the other,
so a small model trained on it alone learns little name tracking. These stories supply
that pattern (two people introduced, one of them acts, the other receives) with many
sentence frames, mixed with ordinary narrative sentences. None of the frames, alone or
next to each other, reproduces an IOI evaluation template (``ioi_templates``): the model
is tested on wordings it has never seen.

Story ``i`` of seed ``s`` depends only on ``(s, i)`` and the name lists, so any prefix of
the stream is reproducible on its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Iterator

from .ioi_templates import contains_eval_template

FEMALE_POOL = [
    "Mary", "Anna", "Emma", "Sarah", "Lisa", "Kate", "Jane", "Amy", "Laura", "Alice", "Rose",
    "Lucy", "Ruth", "Helen", "Emily", "Julia", "Susan", "Linda", "Nancy", "Karen", "Ellen",
    "Grace",
]  # fmt: skip
MALE_POOL = [
    "John", "James", "David", "Mark", "Paul", "Tom", "Peter", "Jack", "Mike", "Daniel",
    "Kevin", "Eric", "Adam", "Ryan", "Steven", "Henry", "George", "Frank", "Robert", "Brian",
    "Joe", "Ben",
]  # fmt: skip
NAME_POOL: list[str] = FEMALE_POOL + MALE_POOL
"""Candidate IOI names: common, short, both genders. The tokenizer step keeps those that
are one token with a leading space (the final pool is saved next to the tokenizer)."""

# Used when the npm first-name lists are not available; the pool is always included.
FALLBACK_FEMALE = FEMALE_POOL + [
    "Olivia", "Sophie", "Hannah", "Chloe", "Megan", "Rachel", "Diana", "Martha", "Clara",
    "Irene", "Judith", "Molly", "Nora", "Paula", "Sylvia", "Tina", "Vera", "Wendy", "Zoe",
    "Beth", "Carol", "Daisy", "Edith", "Fiona", "Gwen", "Holly", "Iris", "Joan", "Leah",
]  # fmt: skip
FALLBACK_MALE = MALE_POOL + [
    "Oliver", "Samuel", "Thomas", "Arthur", "Victor", "Walter", "Hugo", "Felix", "Oscar",
    "Simon", "Martin", "Edward", "Philip", "Andrew", "Carl", "Dennis", "Gordon", "Harold",
    "Isaac", "Jason", "Leo", "Neil", "Owen", "Roger", "Stuart", "Trevor", "Vincent", "Wayne",
]  # fmt: skip

PLACES = [
    "market", "library", "harbour", "bakery", "park", "station", "school", "hospital",
    "office", "garden", "restaurant", "store", "museum", "beach", "farm", "kitchen",
    "workshop", "cafe", "theatre", "river", "forest", "village", "castle", "bridge",
    "post office", "train station", "bookshop", "playground", "swimming pool", "zoo",
    "church", "hotel", "island", "mountain hut", "bus stop", "fair", "factory", "barn",
    "lighthouse", "city hall", "house", "gym", "laboratory", "concert", "wedding",
]  # fmt: skip
OBJECTS = [
    "ring", "necklace", "book", "letter", "key", "ball", "basketball", "computer", "drink",
    "snack", "bone", "apple", "umbrella", "hat", "scarf", "map", "lamp", "camera", "guitar",
    "kite", "pencil", "notebook", "cup", "bottle", "coin", "watch", "flower", "basket",
    "blanket", "box", "candle", "card", "clock", "compass", "cookie", "doll", "drum",
    "envelope", "feather", "gift", "glove", "hammer", "jar", "kitten", "ladder", "mirror",
    "orange", "painting", "parcel", "pie", "plate", "puppy", "radio", "ribbon", "rope",
    "sandwich", "shell", "shirt", "spoon", "stamp", "stone", "sweater", "ticket", "toy",
    "violin", "wallet", "whistle", "ice cream", "photograph", "cake", "bicycle", "telescope",
]  # fmt: skip
ADJECTIVES = [
    "small", "old", "new", "shiny", "red", "blue", "green", "heavy", "strange", "beautiful",
    "tiny", "large", "broken", "golden", "wooden", "silver", "yellow", "warm", "soft",
    "dusty", "lovely", "little", "bright", "plain", "rare", "funny",
]  # fmt: skip
TIMES = [
    "morning", "afternoon", "evening", "Sunday", "Monday", "Friday", "day", "summer day",
    "winter evening", "rainy afternoon", "cold morning", "holiday",
]  # fmt: skip
FEELINGS = [
    "happy", "tired", "hungry", "worried", "excited", "bored", "curious", "sleepy", "cheerful",
    "nervous", "calm", "proud", "sad", "surprised", "thirsty", "busy",
]  # fmt: skip
TOPICS = [
    "the weather", "their families", "an old friend", "the news", "a book", "the holidays",
    "their work", "the garden", "a long trip", "the football match", "music", "the sea",
    "their plans for the summer", "a funny dream", "the price of bread", "school",
]  # fmt: skip
FOODS = [
    "soup", "bread", "apples", "cake", "pancakes", "rice", "fish", "cheese", "eggs",
    "sandwiches", "noodles", "cherries", "potatoes", "pie",
]  # fmt: skip
QUOTES = [
    "This is for you.", "Keep it safe.", "I found this for you.", "Happy birthday!",
    "You will need this.", "Take good care of it.", "I think you should have this.",
    "Here you are.", "I hope you like it.", "Do not lose it.", "It belonged to my mother.",
    "I saved this for you.", "Look what I found.", "You can keep it.", "Please take it.",
]  # fmt: skip

# Slots: {X} {Y} the two people in order of introduction, {S} the one who acts and {IO}
# the one who receives, {C} a third person; {S_he}/{S_his}/{IO_him}... their pronouns.
# Openings deliberately avoid the eval openers ("Then, ", "After ", "When ", "While ",
# "Afterwards, ", "Friends ", "The <place> ... went to") before a pair of names.
OPENINGS = [
    "{X} and {Y} were at the {PLACE}.",
    "One {TIME}, {X} met {Y} at the {PLACE}.",
    "{X} was visiting {Y} at the {PLACE}.",
    "It was a quiet {TIME}, and {X} and {Y} were sitting in the {PLACE}.",
    "Once upon a time, {X} and {Y} spent a whole {TIME} at the {PLACE}.",
    "{X} called {Y}, and they agreed to meet at the {PLACE}.",
    "At the {PLACE}, {X} ran into {Y}.",
    "{X} and {Y} had known each other since school.",
    "{X} lived next door to {Y}, not far from the {PLACE}.",
    "Every {TIME}, {X} and {Y} walked to the {PLACE} together.",
    "{X} and {Y} arrived at the {PLACE} early.",
    "{X} was waiting for {Y} outside the {PLACE}.",
    "Last {TIME}, {X} and {Y} visited the {PLACE}.",
    "{X} and {Y} both worked at the {PLACE}.",
    "{X} invited {Y} to the {PLACE}.",
    "Nobody else was at the {PLACE} except {X} and {Y}.",
    "{X} and {Y} sat on a bench near the {PLACE}.",
    "{X} showed {Y} the way to the {PLACE}.",
    "On a {TIME} like any other, {X} and {Y} were cleaning the {PLACE}.",
    "{X} and {Y} decided to spend the {TIME} at the {PLACE}.",
]  # fmt: skip
FILLERS = [
    "The {PLACE} was busy that {TIME}.",
    "The {PLACE} was very quiet.",
    "{P} was {FEELING}.",
    "{P_he} looked out of the window.",
    "{X} and {Y} talked about {TOPIC}.",
    "They talked about {TOPIC} for a while.",
    "They ate {FOOD} and laughed a lot.",
    "{P} told a joke, and everyone laughed.",
    "It started to rain.",
    "The sun was shining.",
    "{P} had not slept well the night before.",
    "{P} hummed a little song.",
    "A dog barked somewhere in the distance.",
    "{P} checked the time.",
    "{X} asked {Y} about {TOPIC}.",
    "{P} felt {FEELING} but said nothing.",
    "They walked slowly along the road.",
    "{P} opened the door.",
    "For a long time, nobody said a word.",
    "{P_he} was thinking about {TOPIC}.",
]  # fmt: skip
FINDINGS = [
    "{S} had brought {an_OBJECT} with {S_him}.",
    "{S} found {an_ADJ_OBJECT} under a table.",
    "There was {an_ADJ_OBJECT} on the shelf, and {S} picked it up.",
    "{S} had bought {an_OBJECT} the day before.",
    "{S} was holding {an_ADJ_OBJECT}.",
    "{S} noticed {an_OBJECT} lying on the ground.",
    "{S} took {an_OBJECT} out of {S_his} bag.",
    "In {S_his} pocket, {S} had {an_OBJECT}.",
    "{S} had made {an_OBJECT} by hand.",
    "{S} kept {an_ADJ_OBJECT} in a box.",
]  # fmt: skip
# The object has just been mentioned, so transfers mostly say "the {OBJECT}" or "it".
TRANSFERS = [
    "{S} gave the {OBJECT} to {IO}.",
    "{S} handed the {OBJECT} to {IO}.",
    "{S} passed the {OBJECT} to {IO}.",
    "{S} gave it to {IO}.",
    "{S} handed it over to {IO}.",
    "{S} slid the {OBJECT} across the table to {IO}.",
    "{S} tossed the {OBJECT} to {IO}.",
    "{S} brought the {OBJECT} to {IO}.",
    "{S} sold the {OBJECT} to {IO} for a few coins.",
    "{S} lent the {OBJECT} to {IO} for the weekend.",
    "{S} offered the {OBJECT} to {IO}.",
    "{S} returned the {OBJECT} to {IO}.",
    "{S} mailed the {OBJECT} to {IO}.",
    "{S} showed the {OBJECT} to {IO}.",
    "{S} gave {IO} the {OBJECT}.",
    "{S} handed {IO} the {OBJECT}.",
    "Without a word, {S} gave the {OBJECT} to {IO}.",
    "In the end, {S} let {IO} keep the {OBJECT}.",
    "{S} decided that the {OBJECT} should go to {IO}.",
    "{S} kept the {OBJECT} for a while and then gave it to {IO}.",
    "{S} wrapped the {OBJECT} in paper and gave it to {IO}.",
    "{S} put the {OBJECT} into the hands of {IO}.",
    "{S} threw the {OBJECT} over to {IO}.",
    "Smiling, {S} held out the {OBJECT} to {IO}.",
    "{S} did not need the {OBJECT}, so {S_he} gave it to {IO}.",
    "{S} left the {OBJECT} on the table for {IO}.",
    "{S} picked up the {OBJECT} and passed it to {IO}.",
    "{S} carried the {OBJECT} all the way to {IO}.",
]  # fmt: skip
TELLINGS = [
    '{S} said to {IO}, "{QUOTE}"',
    "{S} told {IO} a story about {TOPIC}.",
    "{S} whispered something to {IO}.",
    "{S} explained the plan to {IO}.",
    "{S} waved to {IO}.",
    "{S} smiled at {IO}.",
    "{S} wrote a short note to {IO}.",
    "{S} read a letter aloud to {IO}.",
    "{S} sang a song for {IO}.",
    "{S} told {IO} about {TOPIC}.",
    "{S} asked {IO} a question.",
    "{S} promised {IO} to come back soon.",
    '"{QUOTE}" {S} said to {IO}.',
    "{S} sent a message to {IO}.",
    "{S} made a cup of tea for {IO}.",
    "{S} cooked {FOOD} for {IO}.",
]  # fmt: skip
REACTIONS = [
    "{IO} thanked {S}.",
    '{IO} said, "Thank you, {S}."',
    "{IO} was very happy.",
    "{IO} put the {OBJECT} in {IO_his} bag.",
    "{IO} looked at the {OBJECT} for a long time.",
    '"It is wonderful," said {IO}.',
    "{IO} smiled.",
    "{IO} did not know what to say.",
    "{IO_he} promised to keep it forever.",
    "{IO} laughed and thanked {S} again.",
]  # fmt: skip
THIRD_ARRIVALS = [
    "Later, {C} came in.",
    "A little later, {C} joined them.",
    "Just then, {C} walked past.",
    "Soon {C} arrived as well.",
]  # fmt: skip
EXCHANGES = [
    "{S} gave {an_OBJECT} to {IO}, and {IO} gave {an_OBJECT2} to {S}.",
    "{S} traded {S_his} {OBJECT} with {IO} for {an_OBJECT2}.",
    "First {S} gave the {OBJECT} to {IO}; then {IO} gave the {OBJECT2} to {S}.",
]  # fmt: skip
CLOSINGS = [
    "It was a good day.",
    "They went home before dark.",
    "The next {TIME}, they met again.",
    "That was the end of the story.",
    "{X} and {Y} stayed friends for many years.",
    "Everyone went to bed early that night.",
    "Nobody ever forgot that {TIME}.",
]  # fmt: skip
TITLES = ["The {ADJ} {OBJECT}", "{X} and the {OBJECT}", "A {TIME} at the {PLACE}"]

ALL_FRAMES = {
    "openings": OPENINGS, "fillers": FILLERS, "findings": FINDINGS, "transfers": TRANSFERS,
    "tellings": TELLINGS, "reactions": REACTIONS, "third_arrivals": THIRD_ARRIVALS,
    "exchanges": EXCHANGES, "closings": CLOSINGS, "titles": TITLES,
}  # fmt: skip


@dataclass(frozen=True)
class Person:
    name: str
    gender: str  # "f", "m", or "x" when a name is used for both

    def pronouns(self, role: str) -> dict[str, str]:
        he, him, his = {"f": ("she", "her", "her"), "m": ("he", "him", "his")}.get(
            self.gender, (self.name, self.name, self.name + "'s")
        )
        return {role: self.name, f"{role}_he": he, f"{role}_him": him, f"{role}_his": his}


class NameSampler:
    """Draws people: mostly from ``NAME_POOL``, otherwise from the wider name lists."""

    def __init__(
        self,
        female: Iterable[str] | None = None,
        male: Iterable[str] | None = None,
        pool_share: float = 0.6,
    ):
        female_set = set(female or FALLBACK_FEMALE) | set(FEMALE_POOL)
        male_set = set(male or FALLBACK_MALE) | set(MALE_POOL)
        both = female_set & male_set
        self.pool = [Person(n, "f") for n in FEMALE_POOL] + [Person(n, "m") for n in MALE_POOL]
        pool_names = set(NAME_POOL)
        self.wide = sorted(
            (Person(n, "x" if n in both else ("f" if n in female_set else "m"))
             for n in (female_set | male_set) - pool_names
             if n.isalpha()),
            key=lambda p: p.name,
        )  # fmt: skip
        self.pool_share = pool_share

    def draw(self, rng: random.Random, k: int) -> list[Person]:
        people: list[Person] = []
        while len(people) < k:
            source = self.pool if rng.random() < self.pool_share or not self.wide else self.wide
            person = rng.choice(source)
            if person.name not in {p.name for p in people}:
                people.append(person)
        return people


def _an(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _render(frame: str, slots: dict[str, str]) -> str:
    text = frame.format_map(slots)
    return text[0].upper() + text[1:]


def generate_story(rng: random.Random, names: NameSampler) -> str:
    """One story: an opening with two people, one to four episodes, maybe a closing."""
    x, y, c = names.draw(rng, 3)
    slots = {
        **x.pronouns("X"), **y.pronouns("Y"), **c.pronouns("C"),
        "PLACE": rng.choice(PLACES), "TIME": rng.choice(TIMES),
    }  # fmt: skip
    used: set[str] = set()

    def new_objects() -> None:
        obj, obj2 = rng.sample(OBJECTS, 2)
        adjective = rng.choice(ADJECTIVES)
        slots.update(
            OBJECT=obj, OBJECT2=obj2, an_OBJECT=_an(obj), an_OBJECT2=_an(obj2),
            ADJ=adjective, an_ADJ_OBJECT=_an(f"{adjective} {obj}"),
        )  # fmt: skip

    def say(frames: list[str], **extra: str) -> str:
        # A frame is used once per story at most, so stories do not stutter.
        fresh = [f for f in frames if f not in used] or frames
        frame = rng.choice(fresh)
        used.add(frame)
        words = {
            "FEELING": rng.choice(FEELINGS), "TOPIC": rng.choice(TOPICS),
            "FOOD": rng.choice(FOODS), "QUOTE": rng.choice(QUOTES),
        }  # fmt: skip
        return _render(frame, {**slots, **words, **extra})

    def roles(giver: Person, receiver: Person) -> dict[str, str]:
        return {**giver.pronouns("S"), **receiver.pronouns("IO")}

    def someone() -> dict[str, str]:
        person = rng.choice([x, y])
        return {"P": person.name, "P_he": person.pronouns("P")["P_he"]}

    new_objects()
    sentences = [say(OPENINGS)]
    third_present = False
    for _ in range(rng.choice([1, 2, 2, 3, 3, 4])):
        new_objects()
        for _ in range(rng.choice([0, 1, 1, 2])):
            sentences.append(say(FILLERS, **someone()))
        giver, receiver = (x, y) if rng.random() < 0.5 else (y, x)
        kind = rng.choices(["give", "tell", "third", "exchange"], weights=[6, 3, 1, 1])[0]
        if kind == "third" and not third_present:
            sentences.append(say(THIRD_ARRIVALS))
            third_present = True
            # The newcomer, named once, receives: the recipient is still the name that
            # was not repeated as the subject.
            receiver = c
            kind = "give"
        if kind == "give":
            if rng.random() < 0.7:
                sentences.append(say(FINDINGS, **roles(giver, receiver)))
            sentences.append(say(TRANSFERS, **roles(giver, receiver)))
            if rng.random() < 0.6:
                sentences.append(say(REACTIONS, **roles(giver, receiver)))
        elif kind == "exchange":
            sentences.append(say(EXCHANGES, **roles(giver, receiver)))
        else:
            sentences.append(say(TELLINGS, **roles(giver, receiver)))
    if rng.random() < 0.5:
        sentences.append(say(CLOSINGS))
    body = " ".join(sentences)
    if rng.random() < 0.2:
        body = say(TITLES) + "\n\n" + body
    return body


def generate_stories(
    n_docs: int,
    seed: int = 0,
    female_names: Iterable[str] | None = None,
    male_names: Iterable[str] | None = None,
) -> Iterator[str]:
    """``n_docs`` stories; story ``i`` is a function of ``(seed, i)`` and the name lists.

    A story that happens to contain an IOI evaluation template is redrawn (in practice
    the frames never produce one; the check makes it a guarantee).
    """
    names = NameSampler(female_names, male_names)
    for index in range(n_docs):
        rng = random.Random(f"saelib-stories:{seed}:{index}")
        story = generate_story(rng, names)
        while contains_eval_template(story):
            story = generate_story(rng, names)
        yield story
