"""Run the decoder so that its pixels do not depend on the machine's thread count.

torch's CPU convolutions (oneDNN) split their work by the number of intra-op threads and by
the batch, and the split changes the order of float sums: the same codes decoded with 1, 2 or
3 threads, or with a tile alone against in a batch of four, differ by ~1e-7, enough to flip the
rounding of a rare pixel. One intra-op thread and a batch of one fix the order; parallelism
comes back by decoding several tiles at once, each on its own Python thread (torch releases
the GIL inside its kernels), as many as torch had threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")

# torch's thread count is process-wide: decoders running at once in one process (zarr reading
# chunks on threads, say) take turns, or one would restore the count under another.
_THREAD_COUNT_LOCK = threading.RLock()


@contextmanager
def one_intra_op_thread() -> Iterator[int]:
    """torch on one intra-op thread inside; yields the thread count it had before."""
    with _THREAD_COUNT_LOCK:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield threads
        finally:
            torch.set_num_threads(threads)


def map_tiles(work: Callable[[int], T], tiles: Sequence[int]) -> list[T]:
    """``work`` of each tile, tiles decoded side by side on torch's thread count of workers,
    each single-threaded; results in the order of ``tiles``."""
    with one_intra_op_thread() as threads:
        if threads <= 1 or len(tiles) <= 1:
            return [work(tile) for tile in tiles]
        with ThreadPoolExecutor(min(threads, len(tiles)), "radiarc-decode") as pool:
            return list(pool.map(work, tiles))
