"""The sorting networks the tile kernels of `stacker._fast` apply, in plain numpy: a run
that only needs the kernels compiled at install (`stacker.compiled`) plans its network
without importing numba.
"""

from __future__ import annotations

import numpy as np

#: Rows of a tile sorted or merged in registers at a time (`stacker._registers`): 16 rows
#: of 32 uint16 or 16 int32 lanes are 16 of the 32 AVX-512 registers.
GROUP = 16


def network_rows(n: int) -> int:
    """Rows of a tile sorted by `network(n)`: n rounded up to whole groups; the rows past n
    hold +inf of the tile's type (`stacker._fast._new_tile`), which sort last and stay there."""
    return -(-n // GROUP) * GROUP


def network(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorting network of n values as applied to a tile: (pairs (K, 2), levels).

    Every group of GROUP rows is sorted in registers; then for each merge level, blocks of
    2G, 4G, ... rows, the comparators ``pairs[levels[L]:levels[L + 1]]`` run row by row
    (the first stage of a bitonic merge, which pairs row i of a block with its mirror, and
    the half-cleaners of distance G and more), followed by the last half-cleaners of the
    level in registers, group by group (`stacker._fast.GROUP_MERGE`). All comparators put
    the smaller value first, so those meeting only rows past `network_rows(n)` (virtual
    +inf) are left out. Compared with Batcher's network applied row by row (one load and
    store of two rows per comparator), 3/4 of the comparators then never leave the
    registers: N=200 sorts in 137 instead of 242 ns a pixel (uint16, one thread).
    """
    rows = network_rows(n)
    size = GROUP
    while size < rows:
        size *= 2
    pairs: list[tuple[int, int]] = []
    levels = [0]
    block = 2 * GROUP
    while block <= size:
        for b0 in range(0, size, block):
            pairs += [(b0 + i, b0 + block - 1 - i) for i in range(block // 2)
                      if b0 + block - 1 - i < rows]
        d = block // 4
        while d >= GROUP:
            pairs += [(b0 + i, b0 + i + d) for b0 in range(0, size, 2 * d) for i in range(d)
                      if b0 + i + d < rows]
            d //= 2
        levels.append(len(pairs))
        block *= 2
    return np.array(pairs, np.int64).reshape(-1, 2), np.array(levels, np.int64)
