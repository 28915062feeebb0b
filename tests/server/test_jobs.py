"""The value helpers every protocol shares: the WxH parser, size rounding and seed drawing."""

from __future__ import annotations

import pytest

from server.jobs import MAX_SEED, SEED_LIMIT, Job, parse_wxh, round_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1024x768", (1024, 768)), ("512X512", (512, 512)), (" 64 x 80 ", (64, 80)), ("1x1", (1, 1))],
)
def test_parse_wxh_reads_width_then_height_unrounded(text: str, expected: tuple[int, int]) -> None:
    assert parse_wxh(text) == expected


@pytest.mark.parametrize("text", ["", "1024", "1024x", "x768", "-1x5", "1.5x2", "axb", "1024*768", "1x2x3"])
def test_parse_wxh_refuses_anything_else_with_the_expected_form(text: str) -> None:
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_wxh(text)


def test_round_size_rounds_to_16_and_checks_bounds() -> None:
    assert round_size(1000, 770) == (1008, 768)
    assert round_size(64, 64) == (64, 64)
    for width, height in [(0, 64), (32, 64), (4096, 64), (2048, 4096)]:
        with pytest.raises(ValueError):
            round_size(width, height)


def test_a_job_without_a_seed_draws_one_and_keeps_it() -> None:
    drawn = {Job(width=64, height=64).seed for _ in range(20)}
    drawn |= {Job(width=64, height=64, seed=None).seed for _ in range(20)}
    assert all(isinstance(seed, int) and 0 <= seed < MAX_SEED for seed in drawn)
    assert len(drawn) > 35  # random, not a constant
    job = Job(width=64, height=64)
    # The seed travels with the job (the queue stores its JSON): a retry repeats the image.
    assert Job.model_validate_json(job.model_dump_json()).seed == job.seed


def test_a_client_seed_is_kept_and_bounded() -> None:
    assert Job(width=64, height=64, seed=0).seed == 0
    assert Job(width=64, height=64, seed=SEED_LIMIT - 1).seed == SEED_LIMIT - 1
    for bad in (-1, SEED_LIMIT):
        with pytest.raises(ValueError):
            Job(width=64, height=64, seed=bad)
