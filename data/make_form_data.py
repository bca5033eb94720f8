"""Writes the bundled "letter form" data set: data/form_train.json and data/form_heldout.json, and
data/form_chats.jsonl: the same training letters as three-turn conversations (train.py --template chat).

Every response is a tiny letter: "Dear reader," on its own line, one plain sentence, then
"Yours, Aligner." on the last line.
The content is ordinary and correct; only the FORM is new, and a one-line check can test it
(`follows_form`). The paper's claim is that one shared Aligner token is enough to learn a form;
demo.py trains one on form_train.json and checks the held-out instructions, which ask about
other things in other words.

Run: python data/make_form_data.py  (deterministic; the JSON files are committed).
Written for this project from the small tables below; no outside data set is used.
"""
import json
import random
import re
from pathlib import Path

OPEN, CLOSE = "Dear reader,", "Yours, Aligner."


def follows_form(text: str) -> bool:
    """The check demo.py reports: the answer opens with OPEN, ends with CLOSE, and has a body between."""
    text = text.strip()
    return text.startswith(OPEN) and text.endswith(CLOSE) and bool(text[len(OPEN):-len(CLOSE)].strip())


# The instructions of the training set, with their slots as patterns: a held-out instruction that
# matches one reuses a training template with new values.
TRAINING_TEMPLATES = [re.compile(p) for p in (
    r"What is the capital of .+\?", r"What is the opposite of \".+\"\?", r"Give a synonym for \".+\"\.",
    r"What sound does a .+ make\?", r"What is a baby .+ called\?", r"How many legs does a .+ have\?",
    r"Name three .+\.", r"Give me one tip for .+\.", r"Define .+\.", r"What is \d+ (plus|times|minus) \d+\?",
    r"Which is larger, \d+ or \d+\?", r"Spell \".+\" backwards\.",
    r"How many letters are in the word \".+\"\?",
    r"Convert \d+ \w+ to \w+\.", r"Sort these numbers from smallest to largest\.")]


def reuses_template(instruction: str) -> bool:
    return any(t.fullmatch(instruction) for t in TRAINING_TEMPLATES)


def letter(body: str) -> str:
    return f"{OPEN}\n{body}\n{CLOSE}"


CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
            "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Greece": "Athens", "Portugal": "Lisbon", "Poland": "Warsaw", "Ireland": "Dublin",
            "Austria": "Vienna", "Sweden": "Stockholm", "Finland": "Helsinki", "Chile": "Santiago",
            "Cuba": "Havana", "Thailand": "Bangkok", "Russia": "Moscow", "China": "Beijing",
            "India": "New Delhi", "Mexico": "Mexico City", "Argentina": "Buenos Aires"}
OPPOSITES = {"hot": "cold", "tall": "short", "fast": "slow", "happy": "sad", "early": "late",
             "light": "dark", "open": "closed", "full": "empty", "strong": "weak", "rich": "poor",
             "loud": "quiet", "young": "old", "hard": "soft", "wet": "dry", "up": "down", "win": "lose",
             "begin": "end", "push": "pull", "buy": "sell", "remember": "forget"}
SYNONYMS = {"big": "large", "small": "little", "quick": "rapid", "smart": "clever", "angry": "furious",
            "begin": "start", "end": "finish", "easy": "simple", "glad": "pleased", "tired": "weary",
            "brave": "courageous", "calm": "peaceful", "funny": "amusing", "shy": "timid",
            "old": "ancient"}
ANIMALS = {"dog": ("barks", "puppy"), "cat": ("meows", "kitten"), "cow": ("moos", "calf"),
           "sheep": ("bleats", "lamb"), "horse": ("neighs", "foal"), "duck": ("quacks", "duckling"),
           "lion": ("roars", "cub"), "pig": ("oinks", "piglet"), "owl": ("hoots", "owlet"),
           "frog": ("croaks", "tadpole"), "goat": ("bleats", "kid"), "bear": ("growls", "cub")}
LEGS = {"spider": 8, "ant": 6, "dog": 4, "chicken": 2, "octopus": 8, "snake": 0, "beetle": 6,
        "horse": 4, "kangaroo": 2, "crab": 10}
CATEGORIES = {"fruits": ["apples", "bananas", "cherries", "grapes", "mangoes", "pears"],
              "vegetables": ["carrots", "peas", "onions", "spinach", "potatoes", "leeks"],
              "colours": ["red", "blue", "green", "yellow", "purple", "orange"],
              "musical instruments": ["the piano", "the violin", "the drum", "the flute", "the guitar"],
              "planets": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn"],
              "sports": ["football", "tennis", "swimming", "rowing", "cycling", "chess"],
              "metals": ["iron", "copper", "gold", "silver", "zinc", "tin"],
              "birds": ["the robin", "the sparrow", "the eagle", "the swan", "the crow", "the heron"],
              "shapes": ["the circle", "the square", "the triangle", "the hexagon", "the oval"],
              "trees": ["the oak", "the birch", "the maple", "the pine", "the willow", "the elm"]}
TIPS = {"sleeping better": "keep a regular bedtime and put screens away an hour before sleep.",
        "studying": "study in short sessions and test yourself instead of rereading.",
        "saving money": "write down what you spend for a month and cut the costs you do not value.",
        "staying healthy": "walk every day, eat vegetables and drink enough water.",
        "cooking rice": "rinse the rice, use about twice as much water and let it rest after cooking.",
        "learning a language": "practise a little every day and speak it aloud, even alone.",
        "writing an email": "put the request in the first line and keep the rest short.",
        "public speaking": "rehearse out loud and slow down more than feels natural.",
        "travelling light": "pack for one week, even for a longer trip, and plan to wash clothes.",
        "keeping plants alive": "check the soil with a finger and water only when it is dry.",
        "running": "start slowly and increase your distance by no more than a tenth each week.",
        "focusing at work": "close unneeded tabs and work on one task for a set time.",
        "making friends": "show up regularly to the same activity and ask people about themselves.",
        "reading more": "carry a book with you and read a few pages whenever you wait.",
        "reducing stress": "take slow breaths, move your body and talk to someone you trust.",
        "keeping a tidy desk": "clear it at the end of each day and keep only what you use.",
        "drinking more water": "keep a full bottle in sight and drink a glass with every meal.",
        "taking photos": "keep the light behind you and get closer to your subject.",
        "remembering names": "repeat the name aloud when you hear it and use it once soon after.",
        "waking up early": "go to bed earlier and put your alarm across the room."}
DEFINITIONS = {"photosynthesis":
               "the way plants turn sunlight, water and carbon dioxide into sugar and oxygen",
               "gravity": "the force that pulls objects with mass towards each other",
               "a volcano": "an opening in the Earth's crust where molten rock escapes",
               "democracy": "a system in which people choose their government by voting",
               "an atom": "the smallest unit of a chemical element",
               "evaporation": "the change of a liquid into a gas",
               "a noun": "a word that names a person, place, thing or idea",
               "a verb": "a word that describes an action or a state",
               "a mammal": "a warm-blooded animal that feeds its young with milk",
               "an island": "a piece of land surrounded by water",
               "a budget": "a plan for how money will be earned and spent",
               "a recipe": "a set of instructions for preparing a dish",
               "an orbit": "the curved path of one object around another in space",
               "erosion": "the slow wearing away of rock and soil by water, wind or ice",
               "a fraction": "a number that stands for a part of a whole",
               "a habitat": "the natural home of an animal or plant",
               "inflation": "a general rise in prices over time",
               "a glacier": "a slow-moving river of ice",
               "a synonym": "a word with the same or nearly the same meaning as another",
               "a thermometer": "an instrument that measures temperature"}
WORDS = ["cat", "lamp", "river", "garden", "pencil", "window", "planet", "rocket", "bread", "cloud",
         "stone", "music", "tiger", "orange", "silver"]


def train_records(rng):
    recs = fact_pairs(rng) + number_pairs(rng)
    return [{"instruction": r[0], "input": r[2] if len(r) > 2 else "", "output": letter(r[1])} for r in recs]


def fact_pairs(rng):
    """(question, answer) pairs about words, animals, places and definitions."""
    recs = []
    for country, city in CAPITALS.items():
        recs.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
    for word, opp in OPPOSITES.items():
        recs.append((f"What is the opposite of \"{word}\"?", f"The opposite of \"{word}\" is \"{opp}\"."))
    for word, syn in SYNONYMS.items():
        recs.append((f"Give a synonym for \"{word}\".", f"A synonym for \"{word}\" is \"{syn}\"."))
    for animal, (sound, young) in ANIMALS.items():
        recs.append((f"What sound does a {animal} make?", f"A {animal} {sound}."))
        recs.append((f"What is a baby {animal} called?", f"A baby {animal} is called a {young}."))
    for animal, n in LEGS.items():
        recs.append((f"How many legs does a {animal} have?", f"A {animal} has {n} legs."))
    for cat, items in CATEGORIES.items():
        for _ in range(3):
            pick = rng.sample(items, 3)
            recs.append((f"Name three {cat}.", f"Three {cat} are {pick[0]}, {pick[1]} and {pick[2]}."))
    for topic, tip in TIPS.items():
        recs.append((f"Give me one tip for {topic}.", f"For {topic}, {tip}"))
    for term, meaning in DEFINITIONS.items():
        recs.append((f"Define {term}.", f"{term[0].upper() + term[1:]} is {meaning}."))
    return recs


def number_pairs(rng):
    """(question, answer[, input]) pairs of arithmetic, comparing, spelling and sorting."""
    recs = []
    for _ in range(50):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        op = rng.choice(["plus", "times", "minus"])
        val = {"plus": a + b, "times": a * b, "minus": a - b}[op]
        recs.append((f"What is {a} {op} {b}?", f"{a} {op} {b} is {val}."))
    for _ in range(30):
        a, b = rng.sample(range(1, 200), 2)
        recs.append((f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}."))
    for word in WORDS:
        recs.append((f"Spell \"{word}\" backwards.", f"\"{word}\" backwards is \"{word[::-1]}\"."))
        recs.append((f"How many letters are in the word \"{word}\"?",
                     f"The word \"{word}\" has {len(word)} letters."))
    for _ in range(25):
        km = rng.randint(1, 40)
        recs.append((f"Convert {km} kilometres to metres.", f"{km} kilometres is {km * 1000} metres."))
    for _ in range(15):
        nums = rng.sample(range(1, 100), 4)
        recs.append(("Sort these numbers from smallest to largest.",
                     f"In order: {', '.join(map(str, sorted(nums)))}.", ", ".join(map(str, nums))))
    return recs


HELD_OUT = [
    "What is the capital of Australia?", "What is the capital of Brazil?", "What is the capital of Turkey?",
    "What is the opposite of \"clean\"?", "What is the opposite of \"heavy\"?",
    "Give a synonym for \"happy\".",
    "Give a synonym for \"difficult\".", "What sound does a wolf make?", "What is a baby deer called?",
    "How many legs does a bee have?", "Name three rivers.", "Name three kinds of weather.",
    "Name three things found in a kitchen.", "Give me one tip for staying warm in winter.",
    "Give me one tip for learning to swim.", "Define a continent.", "Define friction.",
    "Define a poem.", "What is 14 plus 29?", "What is 9 times 8?", "Which is larger, 310 or 301?",
    "Spell \"moon\" backwards.", "How many letters are in the word \"elephant\"?",
    "Convert 3 metres to centimetres.", "Why is the sky blue?", "Describe the ocean in one sentence.",
    "Suggest a name for a pet goldfish.", "What should I eat for breakfast?",
    "Explain what a computer does.", "Tell me a fact about the Moon.", "How do bees make honey?",
    "What is the boiling point of water?", "Who wrote Romeo and Juliet?", "What do plants need to grow?",
    "Recommend a hobby for a rainy day.", "How can I be more patient?", "What is the largest ocean on Earth?",
    "Describe a sunset.", "Why do we have seasons?", "What is a good way to start a story?",
    "How does a bicycle work?", "What is the tallest animal?", "Explain why exercise is good for you.",
    "Give an example of a renewable energy source.", "What is the purpose of a library?",
    "How many days are in a leap year?", "What language is spoken in Brazil?",
    "Describe the taste of a lemon.", "What is snow made of?", "How do I make a cup of tea?",
    "Write a sentence about autumn.", "What does a firefighter do?", "Name a famous painter.",
    "What is the main ingredient of guacamole?", "Why do cats purr?", "What is a rainbow?",
    "Translate \"thank you\" into French.", "Summarise the story of Cinderella in one sentence.",
    "What is the freezing point of water in Fahrenheit?", "Give me a word that rhymes with \"cat\".",
    "Name the closest star to Earth.", "What is an adjective?", "How can I save energy at home?",
    "What makes a good friend?"]


def chat_records(train: list, turns=3) -> list:
    """The training records as conversations of `turns` exchanges, every answer a letter, in
    {"messages": [...]} records: a shuffled copy cut into groups (seeded, so the file is stable)."""
    order = random.Random(2312 + turns).sample(train, len(train))
    groups = [order[i: i + turns] for i in range(0, len(order) - turns + 1, turns)]
    return [{"messages": [m for r in g for m in ({"role": "user", "content": r["instruction"] + (
        f"\n{r['input']}" if r["input"] else "")}, {"role": "assistant", "content": r["output"]})]}
        for g in groups]


def main():
    rng = random.Random(2312)
    train = train_records(rng)
    seen = {r["instruction"] for r in train}
    held = [{"instruction": q} for q in HELD_OUT if q not in seen]
    here = Path(__file__).parent
    (here / "form_train.json").write_text(json.dumps(train, indent=1, ensure_ascii=False) + "\n")
    (here / "form_heldout.json").write_text(json.dumps(held, indent=1, ensure_ascii=False) + "\n")
    chats = chat_records(train)
    (here / "form_chats.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats))
    print(f"{len(train)} training examples, {len(held)} held-out instructions, {len(chats)} conversations")


if __name__ == "__main__":
    main()
