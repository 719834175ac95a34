"""Writes train.jsonl / eval.jsonl for the JSON-extraction example (seeded; the committed files came from this).

    python examples/json-extraction/make_data.py

Each example asks to pull a contact out of a short message and answer with JSON only; schema.json is the contract
the eval's json_schema metric checks. Eval messages use first names, companies and templates not in training.
"""

import json
import random
from pathlib import Path

SYSTEM = "Extract the contact from the message. Answer with JSON only: name, email, company, and phone or null."
FIRST = ["Ana", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gia", "Hal", "Ida", "Jon", "Kai", "Lea", "Max", "Nia", "Oto",
         "Pia", "Raf", "Sue", "Tom", "Uma", "Vic", "Wes", "Xia", "Yan", "Zed"]
LAST = ["Stone", "Reyes", "Okafor", "Lind", "Marsh", "Quinn", "Pratt", "Voss", "Kaur", "Nunez", "Ibsen", "Duarte"]
COMPANIES = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark Labs", "Wayne Foods", "Tyrell",
             "Cyberdyne", "Soylent", "Wonka"]
TRAIN_TEMPLATES = [
    "Hi, this is {name} from {company}. Reach me at {email}{phone_text}.",
    "Please add {name} ({company}) to the list: {email}{phone_text}.",
    "New lead: {name}, works at {company}, email {email}{phone_text}.",
    "{name} of {company} asked for a demo. Contact: {email}{phone_text}.",
]
EVAL_TEMPLATES = [
    "Met {name} at the fair; they run sales at {company}. Mail: {email}{phone_text}.",
    "Forwarding from {company}: {name} wants a quote, write to {email}{phone_text}.",
]


def example(rng: random.Random, firsts: list[str], companies: list[str], templates: list[str]) -> dict:
    name = f"{rng.choice(firsts)} {rng.choice(LAST)}"
    company = rng.choice(companies)
    email = f"{name.split()[0].lower()}.{name.split()[1].lower()}@{company.split()[0].lower()}.example"
    phone = f"+1-555-{rng.randint(1000, 9999)}" if rng.random() < 0.6 else None
    text = rng.choice(templates).format(name=name, company=company, email=email,
                                        phone_text=f", phone {phone}" if phone else "")
    answer = {"name": name, "email": email, "company": company, "phone": phone}
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                         {"role": "assistant", "content": json.dumps(answer)}]}


def main() -> None:
    rng = random.Random(0)
    here = Path(__file__).parent
    train = [example(rng, FIRST[:20], COMPANIES[:9], TRAIN_TEMPLATES) for _ in range(400)]
    evals = [example(rng, FIRST[20:], COMPANIES[9:], EVAL_TEMPLATES) for _ in range(50)]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
