"""The decode-attention benchmark runs, and its before/now comparison holds (the script asserts that the engine's
grouped, block-level attention equals the old whole-batch gather), on a small case and with many groups."""

from __future__ import annotations

import sys

import pytest

from benchmarks import decode_attention_bench


@pytest.mark.parametrize("group_bytes", ["1", "4194304"])  # one sequence per group; the engine's default
def test_bench_runs_and_compares_equal(
    group_bytes: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["decode_attention_bench", "--sequences", "6", "--min-context", "5", "--max-context", "70",
            "--repeats", "1", "--trials", "1", "--group-bytes", group_bytes]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    decode_attention_bench.main()
    out = capsys.readouterr().out
    assert "6 sequences, context 5..70" in out
    assert "(a)/(b)" in out
