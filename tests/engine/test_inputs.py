"""Locating image tokens: an image may come in several runs (Idefics3's tiles between row/column tags)."""

from __future__ import annotations

from generator_service.engine.request import ImageSpan
from generator_service.inputs import _runs_of, _spans

IMG = 7


def test_runs_of_image_tokens() -> None:
    tokens = [1, IMG, IMG, 2, IMG, 3, 3, IMG, IMG, IMG]
    assert _runs_of(tokens, IMG) == [(1, 3), (4, 5), (7, 10)]
    assert _runs_of([1, 2], IMG) == []


def test_images_take_their_rows_in_order_across_and_within_runs() -> None:
    #  runs:   [ooo]  [oooooo]   [oooo]      image a: 5 rows, image b: 8 rows
    runs = [(0, 3), (5, 11), (13, 17)]
    spans = _spans(runs, ["a", "b"], [5, 8])
    assert spans == (
        ImageSpan("a", offset=0, length=3, row_offset=0),
        ImageSpan("a", offset=5, length=2, row_offset=3),
        ImageSpan("b", offset=7, length=4, row_offset=0),
        ImageSpan("b", offset=13, length=4, row_offset=4),
    )
    one_run_each = _spans([(2, 6), (8, 10)], ["a", "b"], [4, 2])  # the LLaVA case: one span per image
    assert [(s.key, s.offset, s.length, s.row_offset) for s in one_run_each] == [("a", 2, 4, 0), ("b", 8, 2, 0)]
