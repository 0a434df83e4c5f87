"""The CUDA-free parts of `engine.serving.graphs`: bucketing and how a failed capture is reported.

CPU twin of test_fast_path_gpu.py's capture tests: there a real capture fails (a host sync
inside it) and the log and `failed` must name that first error, not the one ending the capture
raises after it.
"""
from __future__ import annotations

import pytest

from engine.serving.graphs import bucket, failure_text, powers_of_two


@pytest.mark.parametrize("lo, hi, expected", [(1, 1, [1]), (1, 8, [1, 2, 4, 8]), (1, 12, [1, 2, 4, 8, 12]),
                                              (128, 2048, [128, 256, 512, 1024, 2048]), (128, 300, [128, 256, 300])])
def test_buckets_are_powers_of_two_up_to_the_limit(lo: int, hi: int, expected: list[int]) -> None:
    assert powers_of_two(lo, hi) == expected


def test_a_length_goes_to_the_smallest_bucket_that_holds_it() -> None:
    keys = powers_of_two(128, 512)
    assert [bucket(n, keys) for n in (1, 128, 129, 256, 257, 512, 900)] == [128, 128, 256, 256, 512, 512, 512]


def _capture_that_fails() -> None:
    """What torch does when a step syncs the host while capturing: the kernel's error, then
    ending the capture fails too, raised while the first is being handled."""
    try:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
    except RuntimeError:
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")


def test_a_failed_capture_is_reported_by_its_first_error() -> None:
    with pytest.raises(RuntimeError) as info:
        _capture_that_fails()
    text = failure_text(info.value)
    assert text.startswith("RuntimeError: CUDA error: operation not permitted when stream is capturing")
    assert "(then RuntimeError: CUDA error: operation failed due to a previous error" in text


def test_a_single_error_is_reported_as_it_is() -> None:
    assert failure_text(ValueError("bad shape")) == "ValueError: bad shape"
