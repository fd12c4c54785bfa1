"""Regenerate the sample: 200 product reviews to label (reviews.csv and reviews.parquet).

Each review carries a ``human_label`` (positive, negative or neutral), as an annotator gave it:
mostly what the rating says, with the disagreements real annotation has (a few reviewers rate
what they wrote about differently); ``batchllm eval --gold human_label`` scores a run against it.

Deterministic (fixed seed). Some reviews carry what real exports carry: commas, quotes, line
breaks inside a cell, non-ASCII text and emoji, a very long review and an empty one.
"""

import csv
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent
PRODUCTS = [
    ("kitchen", "Blender Pro 900"),
    ("kitchen", 'Cast-iron skillet, 12"'),
    ("electronics", "Noise-cancelling headphones"),
    ("electronics", "USB-C charger 65W"),
    ("home", "Memory foam pillow"),
    ("home", "LED desk lamp"),
    ("outdoors", "Two-person tent"),
    ("outdoors", "Insulated water bottle"),
]
OPENINGS = {
    5: [
        "Absolutely love it.",
        "Best purchase this year!",
        "Exceeded my expectations.",
        "Five stars, no question.",
    ],
    4: ["Really good overall.", "Works well, with one small gripe.", "Solid value for the price."],
    3: ["It's okay.", "Mixed feelings about this one.", "Does the job, nothing more."],
    2: ["Disappointed, honestly.", "Not what I hoped for.", "Had problems from day one."],
    1: ["Broke after a week.", "Do not buy.", "Returned it immediately."],
}
DETAILS = [
    "Shipping was fast and the box arrived intact",
    "the build quality feels sturdy",
    "customer service answered within a day",
    "the instructions were confusing",
    "it is louder than advertised",
    "battery life is shorter than the listing claims",
    "it looks great on my desk",
    "the price went up a week after I bought it",
    "my kids use it every day",
    "it arrived with a scratch on the side",
]
SPECIAL = [
    'Great "value", but the lid, sadly, leaks.',
    "Line one of my review.\nLine two: still happy.\nLine three, with a comma.",
    "Très bien, je recommande ! Qualité supérieure.",
    "Sehr gut verarbeitet, schnelle Lieferung. Würde wieder kaufen.",
    "とても良い製品です。また買いたいです。",
    "Love it 😍🔥 would buy again 👍",
    "",
    "Works. " + "I used it every morning for three months and kept notes on every use. " * 40,
]


def main() -> None:
    rng = random.Random(20261126)
    annotator = random.Random(7)  # its own stream: the reviews stay as they were
    rows = []
    for i in range(200):
        category, product = PRODUCTS[rng.randrange(len(PRODUCTS))]
        rating = rng.choices([5, 4, 3, 2, 1], weights=[35, 25, 15, 12, 13])[0]
        if i % 25 == 7:
            text = SPECIAL[(i // 25) % len(SPECIAL)]
        else:
            details = rng.sample(DETAILS, rng.randint(1, 3))
            text = f"{rng.choice(OPENINGS[rating])} {', '.join(details).capitalize()}."
        label = "positive" if rating >= 4 else "neutral" if rating == 3 else "negative"
        if annotator.random() < 0.08:  # annotators disagree with the stars now and then
            label = annotator.choice([x for x in ("positive", "negative", "neutral") if x != label])
        rows.append(
            {
                "review_id": f"R{1000 + i}",
                "product": product,
                "category": category,
                "rating": rating,
                "review": text,
                "human_label": label,
            }
        )
    with open(HERE / "reviews.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, HERE / "reviews.parquet")


if __name__ == "__main__":
    main()
