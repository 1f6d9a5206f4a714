"""A built-in instruction dataset that needs no download: small tasks with exactly one right answer.

Every answer follows from a fixed rule applied to a short input, so exact match is a fair score and a small model
can learn the rules in a few hundred LoRA steps, while an untuned chat model mostly misses the exact format
(it explains, adds quotes, or gets the rule wrong). The same seed always gives the same records.
"""
import json
import random

from lit_llama.errors import UserError

WORDS = (
    "apple bird blue boat book bread cake calm car cat chair cloud coat cold corn cup desk dog door dream duck "
    "earth egg farm fire fish flag frog game garden glass gold grape green grass hand hat hill horse house ice "
    "jam key king lake lamp leaf lemon light lion milk moon mouse music nest night ocean orange paper park pen "
    "pig plane plant queen rain red river road rock rose salt sand ship shoe silver sky snow song star stone "
    "storm sugar sun table tea tiger towel town train tree wall water whale wind window winter wolf wood yellow"
).split()
NAMES = (
    "Ann Ben Carl Dina Eva Finn Gina Hugo Ida Jack Kim Leo Mia Nora Omar Paul Rosa Sam Tina Uma Vera Will Zoe"
).split()
CITIES = "Oslo Paris Rome Lima Cairo Tokyo Berlin Madrid Dublin Vienna Prague Quito Delhi Seoul Accra Riga".split()
COLORS = "red blue green black white orange purple yellow brown pink gray".split()
PETS = "cat dog fish bird rabbit horse turtle hamster".split()


def some_words(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))  # distinct, so sorting and reversing are unambiguous


def reverse_words(rng):
    words = some_words(rng, 3, 5)
    return "Reverse the order of these words.", " ".join(words), " ".join(reversed(words))


def uppercase(rng):
    phrase = " ".join(some_words(rng, 2, 4))
    return "Rewrite this phrase in uppercase letters.", phrase, phrase.upper()


def sort_words(rng):
    words = some_words(rng, 3, 5)
    return "Sort these words alphabetically.", " ".join(words), " ".join(sorted(words))


def arithmetic(rng):
    a, b = rng.randrange(100), rng.randrange(100)
    if rng.random() < 0.5:
        return "Compute the result. Answer with the number only.", f"{a} + {b}", str(a + b)
    a, b = max(a, b), min(a, b)
    return "Compute the result. Answer with the number only.", f"{a} - {b}", str(a - b)


def person(rng) -> dict:
    fields = {"name": rng.choice(NAMES), "age": rng.randint(18, 90), "city": rng.choice(CITIES)}
    fields.update({"color": rng.choice(COLORS), "pet": rng.choice(PETS)})
    keys = ["name"] + rng.sample(["age", "city", "color", "pet"], rng.randint(1, 3))
    return {key: fields[key] for key in keys}


def extract_field(rng):
    record = person(rng)
    key = rng.choice(list(record))
    text = "; ".join(f"{k}: {v}" for k, v in record.items())
    return f"Give the value of the field '{key}' in this record.", text, str(record[key])


def to_json(rng):
    record = person(rng)
    text = " ".join(f"{k}={v}" for k, v in record.items())
    return "Convert these key=value pairs to a JSON object.", text, json.dumps(record)


def last_word(rng):
    words = some_words(rng, 4, 7)
    return "What is the last word of this text?", " ".join(words), words[-1]


def acronym(rng):
    words = some_words(rng, 3, 5)
    letters = "".join(word[0] for word in words).upper()
    return "Write the first letter of each word as one uppercase acronym.", " ".join(words), letters


TASKS = {
    "reverse_words": reverse_words,
    "uppercase": uppercase,
    "sort_words": sort_words,
    "arithmetic": arithmetic,
    "extract_field": extract_field,
    "to_json": to_json,
    "last_word": last_word,
    "acronym": acronym,
}


# far more than a finetune of these tasks needs, and still seconds to generate (beyond it: minutes and gigabytes)
MAX_RECORDS = 1_000_000
SOURCE = "builtin tasks"  # how meta.json names a dataset of these tasks


def generate(num_records: int, seed: int) -> list[dict]:
    """`num_records` distinct records (by instruction and input), tasks taking turns so each is equally common."""
    if not 1 <= num_records <= MAX_RECORDS:
        raise UserError(f"--num_records must be between 1 and {MAX_RECORDS:,}, got {num_records:,}")
    rng = random.Random(seed)
    names = list(TASKS)
    records, seen = [], set()
    for _ in range(20 * num_records):
        if len(records) == num_records:
            break
        task = names[len(records) % len(names)]
        instruction, input, output = TASKS[task](rng)
        if (instruction, input) not in seen:  # a duplicate could land in both train and test
            seen.add((instruction, input))
            records.append({"instruction": instruction, "input": input, "output": output, "task": task})
    if len(records) < num_records:
        raise UserError(f"--num_records {num_records} is more than the built-in tasks can make distinct records for")
    return records
