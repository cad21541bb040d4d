"""Word lists for the text-bearing mini benchmarks (signs, charts, forms). Plain, unambiguous words only:
each must survive OCR-style reading at 12 px and VQA answer normalisation unchanged (no articles, no
punctuation, no number words)."""

from __future__ import annotations

SIGN_WORDS: tuple[str, ...] = (
    "apple", "river", "garden", "coffee", "market", "bakery", "hotel", "school", "museum", "station",
    "pizza", "library", "bridge", "forest", "planet", "rocket", "candle", "silver", "window", "summer",
    "winter", "orange", "banana", "lemon", "tiger", "zebra", "eagle", "dolphin", "castle", "harbor",
    "island", "valley", "desert", "meadow", "canyon", "violin", "guitar", "piano", "camera", "pencil",
    "ticket", "cinema", "theater", "pharmacy", "airport", "parking", "exit", "open", "closed", "sale",
    "fresh", "organic", "vintage", "studio", "gallery", "office", "police", "taxi", "metro", "bus",
    "stop", "yield", "north", "south", "east", "west", "welcome", "danger", "quiet", "books",
    "music", "dance", "sport", "tennis", "soccer", "golf", "bike", "boat", "train", "truck",
    "cookie", "muffin", "bagel", "noodle", "sushi", "tacos", "burger", "salad", "juice", "milk",
    "honey", "butter", "cheese", "pepper", "tomato", "carrot", "potato", "onion", "garlic", "mango",
)  # fmt: skip

BRANDS: tuple[str, ...] = (
    "Zentro", "Valora", "Kimbo", "Norvik", "Lumina", "Aquila", "Brisa", "Corvo", "Delmar", "Ezra",
    "Fiora", "Galen", "Helix", "Iberis", "Jovan", "Kestrel", "Larkin", "Merida", "Nimbus", "Orion",
)  # fmt: skip

FIRST_NAMES: tuple[str, ...] = (
    "James", "Mary", "Robert", "Linda", "David", "Susan", "Thomas", "Karen", "Daniel", "Nancy",
    "Paul", "Laura", "Mark", "Sarah", "Steven", "Emily", "Kevin", "Helen", "Brian", "Anna",
)  # fmt: skip

LAST_NAMES: tuple[str, ...] = (
    "Smith", "Johnson", "Brown", "Miller", "Davis", "Wilson", "Moore", "Taylor", "Clark", "Lewis",
    "Walker", "Hall", "Young", "King", "Wright", "Scott", "Green", "Baker", "Adams", "Nelson",
)  # fmt: skip

COMPANIES: tuple[str, ...] = (
    "Acme Foods", "Blue Lake Inc", "Cedar Labs", "Delta Print", "Echo Motors", "Falcon Tools",
    "Granite Bank", "Harbor Mills", "Iris Media", "Juniper Co", "Keystone Ltd", "Lotus Cafe",
    "Maple Store", "Nova Energy", "Oak Pharmacy", "Pine Books",
)  # fmt: skip

CITIES: tuple[str, ...] = (
    "Boston", "Denver", "Austin", "Seattle", "Chicago", "Portland", "Atlanta", "Phoenix", "Dallas",
    "Madison", "Raleigh", "Tucson",
)  # fmt: skip

ITEMS: tuple[str, ...] = (
    "Coffee", "Tea", "Bagel", "Muffin", "Sandwich", "Salad", "Soup", "Juice", "Cookie", "Water",
    "Pasta", "Pizza", "Toast", "Yogurt",
)  # fmt: skip

CHART_CATEGORIES: tuple[tuple[str, ...], ...] = (
    ("Apples", "Pears", "Grapes", "Plums", "Kiwis", "Limes"),
    ("Spain", "Italy", "France", "Japan", "Brazil", "Canada"),
    ("Cars", "Buses", "Bikes", "Trains", "Boats", "Planes"),
    ("Rent", "Food", "Travel", "Health", "Energy", "Media"),
)  # fmt: skip

CHART_TOPICS: tuple[str, ...] = (
    "Sales (units)",
    "Visitors (thousands)",
    "Share of users (%)",
    "Revenue (million $)",
    "Exports (tons)",
)
YEARS: tuple[str, ...] = tuple(str(y) for y in range(2012, 2024))
