"""The largest per-device batch that trains within a memory cap, in as few compiled training runs as possible.

Every probe is a fresh model, compiled again for its batch, so on a GPU a probe costs a minute or more. Peak
memory is close to affine in the batch (weights, optimiser state, EMAs, target and teacher, plus activations
per image), so two measured batches predict the answer and one or two probes around it confirm it, where
doubling and bisection take six or seven.
"""

import math

import torch


def out_of_memory(error: BaseException | None) -> bool:
    """Whether ``error`` (or what it was raised from: Dynamo wraps errors raised while it compiles) is the
    allocator, cuBLAS or cuDNN running out of device memory, which means the batch does not fit."""
    while error is not None:
        if isinstance(error, torch.OutOfMemoryError):
            return True
        if isinstance(error, RuntimeError) and ("out of memory" in str(error) or "ALLOC_FAILED" in str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def largest_batch(peak_at, start: int, start_peak: float, cap: float, multiple: int = 8) -> int:
    """The largest multiple of ``multiple`` (``start`` itself if nothing larger fits) whose training run's peak
    memory ``peak_at(batch)`` (GiB; None when it ran out of memory) is within ``cap`` GiB; ``start`` is known to
    fit with ``start_peak``. ``peak_at`` is called at most once per batch."""
    peaks = {start: start_peak}

    def fits(batch: int) -> bool:
        if batch not in peaks:
            peaks[batch] = peak_at(batch)
        return peaks[batch] is not None and peaks[batch] <= cap

    rounded = start // multiple * multiple
    second = rounded + max(multiple, rounded)  # about twice the start, a multiple of ``multiple``
    if not fits(second):
        return bisect(fits, start, second, multiple)
    slope = (peaks[second] - start_peak) / (second - start)
    guess = int((second + (cap - peaks[second]) / slope) // multiple * multiple) if slope > 0 else second
    return gallop(fits, max(second, guess), second, multiple)


def gallop(fits, guess: int, floor: int, multiple: int) -> int:
    """From ``guess``, steps doubling upwards while it fits or downwards while it does not (``floor`` fits),
    then bisection of the last step: a handful of probes when the guess is close, as the affine fit's is."""
    step = multiple
    if fits(guess):
        while fits(guess + step):
            guess, step = guess + step, step * 2
        return bisect(fits, guess, guess + step, multiple)
    while guess - step > floor and not fits(guess - step):
        guess, step = guess - step, step * 2
    return bisect(fits, max(floor, guess - step), guess, multiple)


def bisect(fits, good: int, bad: int, multiple: int) -> int:
    """The largest multiple of ``multiple`` in [good, bad) that fits, given that ``good`` fits and ``bad`` does not."""
    while True:
        lo = math.ceil((good + 1) / multiple) * multiple
        if lo >= bad:
            return good
        mid = max(lo, (good + bad) // 2 // multiple * multiple)
        good, bad = (mid, bad) if fits(mid) else (good, mid)
