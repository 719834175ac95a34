"""The SQL-assistant demo: a seeded SQLite shop database and natural-language → SQL chat examples.

``write_demo(out_dir)`` writes ``shop.db`` (customers, products, orders, order_items), ``train.jsonl`` and
``eval.jsonl`` (OpenAI chat format). The held-out eval set is built to measure generalisation, not recall:

- its questions use phrasings that never occur in training (each intent has held-out phrasings), and
- its values (cities, customer names, product names, numeric thresholds, limits) never occur in training.

Every assistant answer is executed against the database while generating, so the eval's SQL-execution metric
compares a model's query against a query known to run — and eval questions are kept only when their answer is
non-empty, so a query with the right shape but a wrong value cannot pass by also returning nothing.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SYSTEM_PROMPT = "You are a helpful SQL assistant."
"""Short on purpose: the demo model learns the schema from the examples; a real assistant would include it."""

SCHEMA = """
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT, signup_year INTEGER);
CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, category TEXT, price INTEGER);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, year INTEGER, status TEXT);
CREATE TABLE order_items (order_id INTEGER, product_id INTEGER, quantity INTEGER);
"""

CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Dublin", "Oslo", "Lisbon", "Athens",
          "Warsaw", "Zurich", "Munich", "Milan", "Lyon", "Porto", "Seville", "Krakow", "Geneva", "Hamburg",
          "Naples", "Bergen", "Turin", "Malaga", "Leeds", "Bristol", "Boston", "Denver", "Austin", "Chicago",
          "Toronto", "Sydney", "Dallas", "Seattle", "Houston", "Phoenix", "Brighton", "Cardiff", "Glasgow", "Utrecht",
          "Antwerp", "Ghent", "Bologna", "Verona", "Nantes", "Lille", "Bremen", "Dresden", "Leipzig", "Gdansk",
          "Tallinn", "Riga", "Vilnius", "Bilbao", "Valencia", "Granada", "Orlando", "Tampa", "Miami", "Atlanta",
          "Oxford", "York", "Belfast", "Cork", "Galway", "Aarhus", "Malmo", "Uppsala", "Tampere", "Turku", "Bergamo",
          "Parma", "Genoa", "Nice", "Toulouse", "Bordeaux", "Marseille", "Cologne", "Bonn", "Mainz", "Basel", "Bern",
          "Graz", "Linz", "Salzburg", "Brno", "Ostrava", "Poznan", "Lodz", "Debrecen", "Szeged", "Split", "Zagreb",
          "Ljubljana", "Sofia", "Varna", "Cluj", "Iasi", "Boise", "Portland", "Detroit", "Memphis", "Omaha"]
FIRST = ["Alice", "Bruno", "Chloe", "David", "Emma", "Felix", "Grace", "Hugo", "Irene", "Jonas", "Karin", "Liam",
         "Maya", "Nils", "Olga", "Pablo", "Rosa", "Simon", "Tara", "Victor", "Wendy", "Yusuf", "Zoe", "Marta",
         "Oscar", "Lena", "Ivan", "Nora", "Omar", "Elena", "Paula", "Tomas", "Sara", "Hannah", "Leon", "Julia",
         "Mateo", "Anna", "Erik", "Clara", "Boris", "Carla", "Diego", "Edith", "Fabio", "Greta", "Hanna",
         "Igor", "Jana", "Kurt"]
LAST = ["Smith", "Meyer", "Garcia", "Rossi", "Novak", "Silva", "Berg", "Costa", "Weber", "Moreau", "Kowalski",
        "Jensen", "Fischer", "Lopez", "Brown", "Muller", "Dubois", "Ricci", "Horvat", "Nagy", "Keller", "Moretti",
        "Hansen", "Larsen", "Ortiz", "Petrov", "Varga", "Walsh", "Young", "Zeller", "Adler", "Bauer", "Conti",
        "Duval", "Engel", "Ferrari", "Gomez", "Haas"]
CATEGORIES = ["books", "games", "garden", "kitchen", "music", "sports", "toys", "tools"]
ADJECTIVES = ["red", "blue", "green", "silver", "golden", "tiny", "giant", "classic", "smart", "quiet", "rapid",
              "solar", "wooden", "steel", "lucky", "royal", "bright", "dark", "fresh", "happy"]
NOUNS = {"books": ["novel", "atlas", "diary"], "games": ["puzzle", "chess", "cards"],
         "garden": ["hose", "rake", "pot"], "kitchen": ["kettle", "pan", "knife"], "music": ["guitar", "drum", "flute"],
         "sports": ["ball", "racket", "helmet"], "toys": ["robot", "kite", "train"],
         "tools": ["hammer", "drill", "saw"]}
STATUSES = ["pending", "shipped", "delivered", "cancelled"]
YEARS = list(range(2016, 2025))


@dataclass(frozen=True)
class DemoFiles:
    database: Path
    train: Path
    eval: Path
    num_train: int
    num_eval: int


@dataclass(frozen=True)
class _Intent:
    name: str
    train_phrasings: tuple[str, ...]
    eval_phrasings: tuple[str, ...]
    sql: str


def write_demo(out_dir: str | Path, num_train: int = 6000, num_eval: int = 200, seed: int = 0) -> DemoFiles:
    """Build the database and the train / held-out eval chat files under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    db_path = out / "shop.db"
    world = _world(seed)
    _write_database(db_path, world)
    conn = sqlite3.connect(db_path)
    try:
        train = list(_examples(conn, world, num_train, held_out=False, seed=seed + 1))
        evals = list(_examples(conn, world, num_eval, held_out=True, seed=seed + 2))
    finally:
        conn.close()
    train_path, eval_path = out / "train.jsonl", out / "eval.jsonl"
    _write_jsonl(train_path, train)
    _write_jsonl(eval_path, evals)
    return DemoFiles(db_path, train_path, eval_path, len(train), len(evals))


def tokenizer_corpus() -> list[str]:
    """Text for the ``local:demo`` tokenizer: generic English, SQL, and the question and query templates with
    their slots left empty. No values (cities, names, numbers) are in it, so every name is split into short
    pieces — in training as in the held-out set — and the model learns to copy pieces, not to recall names."""
    lines = list(GENERIC_ENGLISH)
    for intent in INTENTS:
        for text in (*intent.train_phrasings, intent.sql):
            lines.append(re.sub(r"\{\w+\}", "", text))
    lines += [SYSTEM_PROMPT, SCHEMA, "system", "user", "assistant", *CATEGORIES, *STATUSES]
    # Frequencies matter to BPE: repeat so template words outrank the letter pairs of the English lines.
    return lines * 20


GENERIC_ENGLISH = (
    "You are a helpful assistant. Answer the question in one short sentence.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the weather like today? It is sunny and warm in the city.",
    "Please write a short summary of the report and list the main points.",
    "How many people live in this town? About ten thousand people live there.",
    "Show me the total, the average and the largest value for each group.",
    "Return JSON with the name, the age and the email address of the person.",
    "Which one is the cheapest, and which one is the most expensive?",
    "SELECT * FROM table WHERE column = 'value' GROUP BY column HAVING COUNT(*) > 1 ORDER BY column DESC LIMIT 10;",
    "INSERT INTO t (a, b) VALUES (1, 2); UPDATE t SET a = 3 WHERE b = 2; DELETE FROM t WHERE a IS NULL;",
    "0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 70 80 90 100 2016 2020 2024",
)


# --- the world: value pools split into training and held-out halves -------------------------------------------

@dataclass(frozen=True)
class _World:
    customers: list[tuple[int, str, str, int]]
    products: list[tuple[int, str, str, int]]
    orders: list[tuple[int, int, int, str]]
    items: list[tuple[int, int, int]]
    train_cities: list[str]
    eval_cities: list[str]
    train_customers: list[str]
    eval_customers: list[str]
    train_products: list[str]
    eval_products: list[str]


def _world(seed: int) -> _World:
    rng = random.Random(seed)
    cities = CITIES[:]
    rng.shuffle(cities)
    eval_cities, real_train_cities = cities[:15], cities[15:]
    # Training also asks about hundreds of made-up towns and surnames: with that many distinct values a model
    # cannot memorise them and must learn to copy the value from the question — which is what carries over to
    # the held-out cities and customers. (They are real rows of the database, so every training query answers.)
    towns = sorted({_made_up_name(rng) for _ in range(400)} - set(CITIES))
    surnames = sorted({_made_up_name(rng) for _ in range(400)} - set(LAST) - set(towns))
    real_names = sorted({f"{first} {last}" for first in FIRST for last in LAST})
    rng.shuffle(real_names)
    eval_customers = real_names[:150]
    made_up = [f"{rng.choice(FIRST)} {last}" for last in surnames]
    customer_names = list(dict.fromkeys(real_names[:700] + made_up))
    all_cities = cities + towns
    customers = [(i + 1, n, rng.choice(all_cities), rng.choice(YEARS)) for i, n in enumerate(customer_names)]
    product_names = sorted({f"{a} {n}" for a in ADJECTIVES for ns in NOUNS.values() for n in ns})
    rng.shuffle(product_names)
    product_names = product_names[:300]
    category_of = {n: c for c, ns in NOUNS.items() for n in ns}
    products = [(i + 1, p, category_of[p.split()[1]], rng.randint(3, 400)) for i, p in enumerate(product_names)]
    orders = [(i + 1, rng.randint(1, len(customers)), rng.choice(YEARS), rng.choice(STATUSES)) for i in range(5000)]
    items = [(o[0], rng.randint(1, len(products)), rng.randint(1, 5)) for o in orders for _ in range(rng.randint(1, 3))]
    # Held-out customers and products: never asked about in training (they are still rows of the database).
    held_out = set(eval_customers)
    train_customers = [n for n in customer_names if n not in held_out]
    return _World(customers, products, orders, items, real_train_cities + towns, eval_cities,
                  train_customers, eval_customers, product_names[40:], product_names[:40])


_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "tr", "v",
           "w", "z", "sh", "ch")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "y")
_CODAS = ("", "", "n", "r", "l", "s", "m", "k", "th", "nd")
_SUFFIXES = ("", "", "", "ford", "ton", "burg", "by", "wick", "holm", "stad", "ville", "mouth")


def _made_up_name(rng: random.Random) -> str:
    syllables = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                        for _ in range(rng.randint(1, 2)))
    return (syllables + rng.choice(_SUFFIXES)).capitalize()


def _write_database(path: Path, world: _World) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        _fill(conn, world)
        conn.commit()
    finally:
        conn.close()
    tmp.replace(path)


def _fill(conn: sqlite3.Connection, world: _World) -> None:
    conn.executescript(SCHEMA)
    conn.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)", world.customers)
    conn.executemany("INSERT INTO products VALUES (?, ?, ?, ?)", world.products)
    conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)", world.orders)
    conn.executemany("INSERT INTO order_items VALUES (?, ?, ?)", world.items)


# --- intents: phrasings (some held out) and the SQL they mean ---------------------------------------------------

# Numbers: the eval set asks about thresholds and limits that never occur in training (price ≡ 3 mod 7; limits
# 4, 7, 8, 14), while every digit still occurs in every position in training — an unseen number, not an unseen
# digit.
def _price(rng: random.Random, held_out: bool) -> int:
    while True:
        n = rng.randint(10, 399)
        if (n % 7 == 3) == held_out:
            return n


HELD_OUT_LIMITS = (4, 7, 8, 14)


def _limit(rng: random.Random, held_out: bool) -> int:
    if held_out:
        return rng.choice(HELD_OUT_LIMITS)
    return rng.choice([n for n in range(2, 31) if n not in HELD_OUT_LIMITS])


INTENTS: tuple[_Intent, ...] = (
    _Intent("customers_in_city",
            ("List the customers in {city}.", "Which customers live in {city}?", "Show all customers from {city}.",
             "Give me the names of customers located in {city}.", "Who are our customers that live in {city}?"),
            ("Find the customers who live in {city}.", "Show me all customers located in {city}."),
            "SELECT name FROM customers WHERE city = '{city}';"),
    _Intent("count_customers_in_city",
            ("How many customers live in {city}?", "Count the customers in {city}.",
             "What is the number of customers from {city}?", "Tell me how many customers we have in {city}."),
            ("Give me the number of customers located in {city}.", "Count all customers who live in {city}."),
            "SELECT COUNT(*) FROM customers WHERE city = '{city}';"),
    _Intent("customers_signup_year",
            ("Which customers signed up in {year}?", "List customers who joined in {year}.",
             "Show the customers with signup year {year}.", "Find the customers who signed up during {year}."),
            ("Give me all customers who joined in {year}.", "Who are the customers that signed up in {year}?"),
            "SELECT name FROM customers WHERE signup_year = {year};"),
    _Intent("products_in_category",
            ("List the products in the {category} category.", "Which products are in {category}?",
             "Show all {category} products.", "What do we sell in {category}?"),
            ("Find all products in the {category} category.", "Give me the names of the {category} products."),
            "SELECT name FROM products WHERE category = '{category}';"),
    _Intent("products_cheaper_than",
            ("Which products cost less than {price}?", "List products priced under {price}.",
             "Show the products cheaper than {price}.", "Find all products with a price below {price}."),
            ("Give me the products that cost less than {price}.", "What products are priced under {price}?"),
            "SELECT name FROM products WHERE price < {price};"),
    _Intent("products_pricier_than",
            ("Which products cost more than {price}?", "List products priced over {price}.",
             "Show the products more expensive than {price}.", "Find all products with a price above {price}."),
            ("Give me the products that cost more than {price}.", "What products are priced over {price}?"),
            "SELECT name, price FROM products WHERE price > {price} ORDER BY price;"),
    _Intent("category_cheaper_than",
            ("Which {category} products cost less than {price}?", "List {category} products priced under {price}.",
             "Show the {category} products cheaper than {price}."),
            ("Find all {category} products with a price below {price}.",
             "Give me the {category} products that cost less than {price}."),
            "SELECT name FROM products WHERE category = '{category}' AND price < {price};"),
    _Intent("average_price_category",
            ("What is the average price of {category} products?", "Show the average price in the {category} category.",
             "Compute the mean price of {category} products."),
            ("Tell me the average price of the {category} products.", "Give me the mean price in {category}."),
            "SELECT AVG(price) FROM products WHERE category = '{category}';"),
    _Intent("most_expensive",
            ("What are the {limit} most expensive products?", "List the top {limit} products by price.",
             "Show the {limit} products with the highest price."),
            ("Give me the {limit} most expensive products.", "Find the top {limit} products by price."),
            "SELECT name, price FROM products ORDER BY price DESC LIMIT {limit};"),
    _Intent("cheapest",
            ("What are the {limit} cheapest products?", "List the {limit} least expensive products.",
             "Show the {limit} products with the lowest price."),
            ("Give me the {limit} cheapest products.", "Find the {limit} least expensive products."),
            "SELECT name, price FROM products ORDER BY price ASC LIMIT {limit};"),
    _Intent("orders_with_status",
            ("How many orders are {status}?", "Count the {status} orders.", "What is the number of {status} orders?"),
            ("Tell me how many orders are {status}.", "Give me the number of {status} orders."),
            "SELECT COUNT(*) FROM orders WHERE status = '{status}';"),
    _Intent("orders_per_status",
            ("How many orders are there for each status?", "Count the orders by status.",
             "Show the number of orders for each status."),
            ("Give me the number of orders by status.", "Count all orders for each status."),
            "SELECT status, COUNT(*) FROM orders GROUP BY status;"),
    _Intent("orders_in_year",
            ("How many orders were placed in {year}?", "Count the orders from {year}.",
             "What is the number of orders in {year}?"),
            ("Tell me how many orders were placed during {year}.", "Give me the number of orders from {year}."),
            "SELECT COUNT(*) FROM orders WHERE year = {year};"),
    _Intent("orders_of_customer",
            ("List the orders of {customer}.", "Which orders did {customer} place?",
             "Show the orders placed by {customer}."),
            ("Find all orders of {customer}.", "Give me the orders that {customer} placed."),
            "SELECT orders.id FROM orders JOIN customers ON orders.customer_id = customers.id "
            "WHERE customers.name = '{customer}';"),
    _Intent("count_orders_of_customer",
            ("How many orders has {customer} placed?", "Count the orders of {customer}.",
             "What is the number of orders placed by {customer}?"),
            ("Tell me how many orders {customer} placed.", "Give me the number of orders of {customer}."),
            "SELECT COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.id "
            "WHERE customers.name = '{customer}';"),
    _Intent("quantity_of_product",
            ("How many units of {product} were sold?", "What is the total quantity sold of {product}?",
             "Count the units of {product} sold."),
            ("Tell me how many units of {product} were sold.", "Give me the total quantity of {product} sold."),
            "SELECT SUM(order_items.quantity) FROM order_items JOIN products ON order_items.product_id = products.id "
            "WHERE products.name = '{product}';"),
    _Intent("customers_per_city",
            ("Which {limit} cities have the most customers?", "List the top {limit} cities by number of customers.",
             "Show the {limit} cities with the most customers."),
            ("Give me the {limit} cities with the most customers.", "Find the top {limit} cities by customers."),
            "SELECT city, COUNT(*) AS n FROM customers GROUP BY city ORDER BY n DESC LIMIT {limit};"),
    _Intent("orders_from_city_in_year",
            ("How many orders came from {city} in {year}?", "Count the orders of customers in {city} in {year}.",
             "What is the number of orders from {city} during {year}?"),
            ("Tell me how many orders came from {city} during {year}.",
             "Give me the number of orders from customers in {city} in {year}."),
            "SELECT COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.id "
            "WHERE customers.city = '{city}' AND orders.year = {year};"),
)
"""Each intent: training phrasings, held-out phrasings (new sentences, every word of which occurs somewhere in the
training questions — a model trained from scratch cannot know a word it has never seen), and the SQL."""


def _slots(rng: random.Random, world: _World, held_out: bool) -> dict[str, object]:
    return {
        "city": rng.choice(world.eval_cities if held_out else world.train_cities),
        "customer": rng.choice(world.eval_customers if held_out else world.train_customers),
        "product": rng.choice(world.eval_products if held_out else world.train_products),
        "category": rng.choice(CATEGORIES),
        "status": rng.choice(STATUSES),
        "year": rng.choice(YEARS),
        "price": _price(rng, held_out),
        "limit": _limit(rng, held_out),
    }


def _examples(conn: sqlite3.Connection, world: _World, n: int, held_out: bool, seed: int) -> Iterator[dict]:
    rng = random.Random(seed)
    seen: set[str] = set()
    made = tries = 0
    while made < n:
        tries += 1
        if tries > n * 50:
            raise RuntimeError("could not generate enough distinct demo examples")
        intent = INTENTS[(made + tries) % len(INTENTS)] if held_out else rng.choice(INTENTS)
        phrasing = rng.choice(intent.eval_phrasings if held_out else intent.train_phrasings)
        slots = _slots(rng, world, held_out)
        question = phrasing.format(**slots)
        if question in seen:
            continue
        sql = intent.sql.format(**slots)
        rows = conn.execute(sql).fetchall()  # every answer runs; a broken template fails here, loudly
        if held_out and (not rows or rows == [(0,)] or rows == [(None,)]):
            continue
        seen.add(question)
        made += 1
        yield {"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question},
                            {"role": "assistant", "content": sql}]}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
