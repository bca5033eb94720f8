"""Writes data/prefs.json: a small preference set for DPO (train.py --dpo), made for this project.

Each record has an instruction, a "chosen" answer that is helpful and courteous, and a "rejected"
answer that carries the same facts but is curt and dismissive. Learning to prefer the first is a
small, harmless stand-in for the paper's value alignment (it used PKU-SafeRLHF, "Beaver").

Run: python data/make_pref_data.py  (deterministic; the JSON file is committed).
"""
import importlib.util
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
spec = importlib.util.spec_from_file_location("form", HERE / "make_form_data.py")
form = importlib.util.module_from_spec(spec)
spec.loader.exec_module(form)

KIND = ["Happy to help! ", "Good question. ", "Sure. ", "Of course. ", "Glad you asked. "]
KIND_END = [" I hope that helps.", " Let me know if you want more detail.", "", " Good luck!"]
RUDE = ["Obviously, ", "Everyone knows this: ", "Ugh, fine. ", "Look it up next time. ", "Seriously? "]
RUDE_END = [" Stop asking basic questions.", " Not that you will remember.", "", " Whatever."]


def main():
    rng = random.Random(7)
    facts = []
    for topic, tip in form.TIPS.items():
        facts.append((f"Give me one tip for {topic}.", f"for {topic}, {tip}"))
    for term, meaning in form.DEFINITIONS.items():
        facts.append((f"What is {term}?", f"{term} is {meaning}."))
    for country, city in form.CAPITALS.items():
        facts.append((f"What is the capital of {country}?", f"the capital of {country} is {city}."))
    for animal, (sound, young) in form.ANIMALS.items():
        facts.append((f"What is a baby {animal} called?", f"a baby {animal} is called a {young}."))
    for word, opp in form.OPPOSITES.items():
        facts.append((f"What is the opposite of \"{word}\"?", f"the opposite of \"{word}\" is \"{opp}\"."))
    for word, syn in form.SYNONYMS.items():
        facts.append((f"Give a synonym for \"{word}\".", f"a synonym for \"{word}\" is \"{syn}\"."))
    for animal, n in form.LEGS.items():
        facts.append((f"How many legs does a {animal} have?", f"a {animal} has {n} legs."))
    for word in form.WORDS:
        facts.append((f"How do you spell \"{word}\" backwards?",
                      f"\"{word}\" backwards is \"{word[::-1]}\"."))
    records = []
    for q, fact in facts:
        body = fact[0].upper() + fact[1:]
        records.append({"instruction": q, "input": "",
                        "chosen": rng.choice(KIND) + body + rng.choice(KIND_END),
                        "rejected": rng.choice(RUDE) + fact + rng.choice(RUDE_END)})
    rng.shuffle(records)
    (HERE / "prefs.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(records)} preference pairs")


if __name__ == "__main__":
    main()
