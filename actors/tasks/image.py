"""Image classification: PNG/JPEG bytes decoded with PIL, converted to RGB, given to the
model's AutoImageProcessor."""

from __future__ import annotations

import io
import struct
from typing import Any

import torch

from actors.config import INPUT_COLUMNS
from actors.tasks.base import Encoded, RowError, Task, is_missing
from actors.tasks.text import CLASSIFY_SCHEMA, label_rows, score_function


class ClassifyImageTask(Task):
    """label, label_id, scores per image (softmax, sigmoid or the logits, as ClassifyTask)."""

    name = "classify-image"
    input_column = INPUT_COLUMNS["classify-image"]
    auto_class = "AutoModelForImageClassification"
    output_schema = CLASSIFY_SCHEMA

    def __init__(self, model, processor, config) -> None:
        super().__init__(model, processor, config)
        self.score_function = score_function(model.config, config.scores)

    def encode(self, value: Any, params: dict) -> Encoded:
        from PIL import Image, UnidentifiedImageError

        if isinstance(value, dict):  # Ray's image dicts ({"bytes": ..., "path": ...})
            value = value.get("bytes")
        if is_missing(value):
            raise RowError("empty_input", "image is null or empty")
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise RowError("bad_image", f"image must be encoded PNG/JPEG bytes, got {type(value).__name__}")
        try:
            image = Image.open(io.BytesIO(bytes(value)))
            image = image.convert("RGB")
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError,
                struct.error) as e:  # what PIL's decoders raise for malformed or oversized files
            raise RowError("bad_image", f"cannot decode image: {e}") from e
        return Encoded(image, params)

    def forward(self, rows: list[Encoded]) -> torch.Tensor:
        pixels = self.processor(images=[r.inputs for r in rows], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(device=self.device, dtype=next(self.model.parameters()).dtype)
        return self.model(pixel_values=pixels).logits.float()  # [B, labels]

    def run(self, rows: list[Encoded]) -> list[dict]:
        return label_rows(self.forward(rows), self.model.config.id2label, self.score_function)

    def synthetic(self, n: int, seed: int) -> list[Encoded]:
        """`n` random RGB images."""
        from PIL import Image

        gen = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (n, 24, 24, 3), generator=gen, dtype=torch.uint8).numpy()
        return [Encoded(Image.fromarray(a, "RGB"), {}) for a in images]
