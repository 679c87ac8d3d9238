"""Small deterministic data helpers: sentences and encoded random images."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

SENTENCES: list[str] = [
    "The quick brown fox jumps over the lazy dog.",
    "I love reading books on rainy afternoons.",
    "Where is the nearest train station?",
    "She sells sea shells by the sea shore.",
    "Can you explain how photosynthesis works?",
    "The weather today is sunny and warm.",
    "My favourite colour is a deep shade of blue.",
    "Please send the report before Friday at 5 pm.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The cat slept on the windowsill all morning.",
    "We are planning a trip to the mountains next summer.",
    "How many people live in this city?",
    "This movie was terrible and far too long.",
    "What a wonderful surprise, thank you so much!",
    "The package arrived late, but nothing was broken.",
    "Translate this sentence into French, please.",
    "A good engineer writes tests before shipping code.",
    "The stock market fell sharply on Monday.",
    "He plays the guitar in a small jazz band.",
    "Once upon a time, there lived a clever old king.",
    "Mix the flour, sugar and eggs in a large bowl.",
    "The museum opens at nine and closes at six.",
    "Our team won the match by three goals to one.",
    "Is it going to rain tomorrow afternoon?",
    "The new phone has a bright screen and a long battery life.",
    "Children were laughing and playing in the park.",
    "Summarize the main ideas of the article in two lines.",
    "The server returned an error after the update.",
    "I am not sure whether I agree with that opinion.",
    "Birds fly south when the days grow short and cold.",
    "Jack quickly vowed to fix the sixty broken zip lamps.",
    "Quiet evenings by the fire are the best part of winter.",
]


def _random_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """Return a seeded random RGB image of ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert("RGB")


def _encode(image: Image.Image, fmt: str) -> bytes:
    """Encode a PIL image into bytes of the given format."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png_bytes(seed: int, size: tuple[int, int] = (32, 32)) -> bytes:
    """Return a seeded random RGB image encoded as PNG."""
    return _encode(_random_image(seed, size), "PNG")


def jpeg_bytes(seed: int, size: tuple[int, int] = (32, 32)) -> bytes:
    """Return a seeded random RGB image encoded as JPEG."""
    return _encode(_random_image(seed, size), "JPEG")
