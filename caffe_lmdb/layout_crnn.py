"""The OCR family's layout (CRNN, clovaai's deep-text-recognition-benchmark, PaddleOCR, ...): keys computed from i.

`create_lmdb_dataset.py` and its many copies write sample i (0-based here) as `image-%09d` (the
encoded image file's bytes) and `label-%09d` (the text, UTF-8) numbered from 1, and the count as
ASCII decimal under `num-samples`. Some add `lexicon-%09d` values (ignored here) or leave an
`error_image_log.txt` in the LMDB's folder (never read: the layout is found from keys alone).
PaddleOCR's text super-resolution sets store a pair per sample, `image_hr-%09d` and `image_lr-%09d`.
The keys are computed, never scanned: the count is the stored one, checked against the entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from .errors import DatumError
from .layouts import Layout, Probe, ValueAtError, checked_count, decode_image, text_target

_COUNT_KEY = b"num-samples"


class _NumberedLayout(Layout):
    """Samples numbered from 1 under `<prefix>-%09d` keys, the last prefix a UTF-8 label, counted by `num-samples`."""

    #: The key prefixes of one sample, in the order `decode` takes them: the images, then the label.
    prefixes: ClassVar[tuple[bytes, ...]] = ()

    def __init__(self) -> None:
        self.count = 0

    @classmethod
    def detect(cls, probe: Probe) -> _NumberedLayout | None:
        count = probe.value(_COUNT_KEY)
        if count is None:
            return None
        if probe.value(cls.prefixes[0] + b"-000000001") is not None or bytes(count).strip() == b"0":
            return cls()
        return None

    def open(self, probe: Probe) -> None:
        self.count = checked_count(probe, _COUNT_KEY, probe.value(_COUNT_KEY), per_sample=len(self.prefixes))

    def __len__(self) -> int:
        return self.count

    def sample_keys(self, index: int) -> Sequence[bytes]:
        number = b"-%09d" % (index + 1)
        return tuple(prefix + number for prefix in self.prefixes)

    def stored(self, values: Sequence[Any]) -> tuple[tuple[bytes, ...], str]:
        try:
            label = text_target(values[-1])
        except DatumError as exc:
            raise ValueAtError(len(values) - 1, str(exc)) from None
        return tuple(bytes(value) for value in values[:-1]), label

    def decode(self, values: Sequence[Any]) -> tuple[Any, str]:
        images, label = self.stored(values)
        decoded = []
        for position, image in enumerate(images):
            try:
                decoded.append(decode_image(image))
            except DatumError as exc:
                raise ValueAtError(position, str(exc)) from None
        return (decoded[0] if len(decoded) == 1 else tuple(decoded)), label


class CrnnLayout(_NumberedLayout):
    """CRNN / deep-text-recognition-benchmark: `(image, text)` from `image-%09d` and `label-%09d`."""

    name = "crnn"
    prefixes = (b"image", b"label")

    def describe(self) -> str:
        return "crnn (image-%09d and label-%09d from 1, counted by num-samples; target: the text, a str)"


class CrnnSrLayout(_NumberedLayout):
    """PaddleOCR's text super-resolution sets: `((low_res, high_res), text)`, the network's input first."""

    name = "crnn-sr"
    prefixes = (b"image_lr", b"image_hr", b"label")

    @classmethod
    def detect(cls, probe: Probe) -> CrnnSrLayout | None:
        if probe.value(_COUNT_KEY) is None or probe.value(b"image_hr-000000001") is None:
            return None
        return cls()

    def describe(self) -> str:
        return ("crnn-sr (image_lr/image_hr/label-%09d from 1, counted by num-samples; "
                "image: (low_res, high_res); target: the text, a str)")
