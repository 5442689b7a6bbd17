"""How a GPU search is cut into native calls: pure functions of sizes, no GPU needed.

The native kernel (csrc/cuda/knn.cu) takes fewer than 2^31 database rows and Q * k < 2^31 a
call, in a workspace its caller allocates (its size: _native.knn_cuda_workspace_bytes, which
does not grow monotonically with the queries). These functions split a search into calls that
hold within both and within the caller's workspace_bytes (plan_query_chunks, its calls
sized to scan few query tiles: even_chunk; rows_per_call, check_one_query_fits,
plan_database_chunks; the bound of a search given none: default_workspace_bytes), and a
database in host memory into chunks that fit a GPU memory budget, smaller ones first
(plan_host_stream, plan_stream_chunks, first_stream_rows).
_cuda_search runs the plans; tests/test_cuda_search.py checks them without a GPU.
"""

from __future__ import annotations

import functools
from typing import Callable

__all__ = [
    "DEFAULT_GPU_MEMORY_BYTES",
    "DEFAULT_WORKSPACE_BYTES",
    "FREE_MEMORY_SHARE",
    "MOST_DEFAULT_WORKSPACE_BYTES",
    "check_one_query_fits",
    "default_workspace_bytes",
    "even_chunk",
    "first_stream_rows",
    "plan_database_chunks",
    "plan_host_stream",
    "plan_query_chunks",
    "plan_stream_chunks",
    "rows_per_call",
]

DEFAULT_WORKSPACE_BYTES = 1 << 30  # per native call; a search takes as many calls as needed
# A resident search given no workspace_bytes may take more, up to what its plan of all its
# queries in one call needs, within MOST_DEFAULT_WORKSPACE_BYTES and 1 / FREE_MEMORY_SHARE of
# the memory free on its GPU (default_workspace_bytes).
MOST_DEFAULT_WORKSPACE_BYTES = 8 << 30
FREE_MEMORY_SHARE = 8
DEFAULT_GPU_MEMORY_BYTES = 2 << 30  # host streaming: chunks + queries + results (see above)
HOST_CHUNK_BYTES = 256 << 20  # largest database chunk streamed at once (x2 pinned, x2 device)
# A streamed database starts with smaller chunks (plan_stream_chunks): only the first chunk's
# host copy and upload wait with the GPU idle, every later one overlaps the previous search.
STREAM_RAMP_STEPS = 3  # the first chunk is 1/8 of the largest, then 1/4, 1/2, whole chunks
STREAM_FIRST_CHUNK_MIN_BYTES = 8 << 20  # below this a smaller first chunk saves next to nothing
MAX_ITEMS_PER_CALL = (1 << 31) - 1  # num_queries * k per native call (knn.cu: int counts)
# Queries one block of the kNN scan takes (knn_plan.cuh counts query tiles of SimtTile::kQueries;
# tests/test_cuda_search.py checks this against the native plan): even_chunk's unit.
QUERY_TILE = 128
# Database rows per native call. knn.cu takes < 2^31 rows and k < 2^29 (its candidate lists
# hold k + max(k, 256) keys, counted in an int); with k capped at the rows of the call (k > N
# is padded here), rows < 2^29 keep every call within both.
MAX_ROWS_PER_CALL = (1 << 29) - 1
# Device bytes per query and neighbour while a host database streams: the running top-k,
# one chunk's top-k, and the merge's concatenation, sort and gather (float32 + int64 each).
RESULT_BYTES_PER_NEIGHBOUR = 7 * 12


def plan_query_chunks(num_queries: int, k: int, workspace_of: Callable[[int], int],
                      workspace_bytes: int) -> list[tuple[int, int, int]]:
    """Splits queries [0, num_queries) into consecutive native calls.

    Each call's chunk of c queries satisfies c * k <= MAX_ITEMS_PER_CALL and needs at most
    `workspace_bytes` of workspace, workspace_of(c). The workspace does not grow
    monotonically with c (knn.cu splits the database more finely for fewer queries), so
    every chunk, the last included, is sized by itself. Where the queries take several calls,
    each is sized to scan the fewest query tiles in as many calls (even_chunk).
    Returns [(start, stop, workspace bytes)]. Raises ValueError naming workspace_bytes when
    one query alone needs more.
    """
    workspace_of = functools.lru_cache(maxsize=None)(workspace_of)  # even_chunk asks again for sizes seen
    chunks: list[tuple[int, int, int]] = []
    size = max(1, min(num_queries, MAX_ITEMS_PER_CALL // k))
    start = 0
    while start < num_queries:
        count = min(size, num_queries - start)
        need = workspace_of(count)
        while need > workspace_bytes and count > 1:
            count = max(1, min(count // 2, count * workspace_bytes // need))
            need = workspace_of(count)
        if need > workspace_bytes:
            raise ValueError(
                f"workspace_bytes: one query with k={k} needs {need} bytes of GPU workspace against this "
                f"database, more than the bound of {workspace_bytes}; pass workspace_bytes={need} or more, "
                "or use a smaller k"
            )
        if count < num_queries - start:
            count, need = even_chunk(count, need, num_queries - start, workspace_of, workspace_bytes)
        chunks.append((start, start + count, need))
        start += count
        size = count
    return chunks


def even_chunk(count: int, need: int, remaining: int, workspace_of: Callable[[int], int],
               workspace_bytes: int) -> tuple[int, int]:
    """(size, need) of the next call of a search with `remaining` queries left, of which
    `count` fit a call (needing `need` bytes): among the sizes that take no more calls than
    `count` does (count itself, count cut to whole query tiles, remaining / calls and that
    rounded up to whole tiles), the one whose calls scan the fewest query tiles, the larger on
    a tie, counting only sizes that fit the bound and leave a last call that fits it too (the
    workspace is not monotonic in the queries). None such: `count`.

    Why: the scan's blocks each take QUERY_TILE queries (knn_plan.cuh, SimtTile::kQueries;
    the tensor-core tiles take as many or half), and a tile with one query in it costs a
    block as much as a full one: 1,000 queries in calls of at most 300 scan 10 tiles as 300,
    300, 300 and 100, 8 as 256, 256, 256 and 232. And a short last call can need more
    workspace than the long ones (fewer query tiles, so more splits, or the large-k plan):
    100,000 queries at k = 4,096 over 1M rows under a 1 GiB bound took 30 calls of 3,275
    and then, the last 1,750 not fitting, 17 calls of 107 or fewer; now 31 calls of 3,226
    (host arithmetic with the native plan, knn_cuda_plan_for, 132 multiprocessors)."""
    calls = -(-remaining // count)
    even = -(-remaining // calls)
    sizes = [count, count // QUERY_TILE * QUERY_TILE, -(-even // QUERY_TILE) * QUERY_TILE, even]

    def tiles(size: int) -> int:
        last = remaining - (calls - 1) * size
        return (calls - 1) * -(-size // QUERY_TILE) + -(-last // QUERY_TILE)

    best = None
    for size in sizes:
        if not 0 < size <= count or -(-remaining // size) != calls or (best is not None and tiles(size) >= tiles(best[0])):
            continue
        size_need = need if size == count else workspace_of(size)
        if size_need <= workspace_bytes and workspace_of(remaining - (calls - 1) * size) <= workspace_bytes:
            best = (size, size_need)
    return best if best is not None else (count, need)


def default_workspace_bytes(one_call_need: Callable[[], int], free_bytes: Callable[[], int]) -> int:
    """The workspace bound of a resident search given no workspace_bytes: DEFAULT_WORKSPACE_BYTES
    (1 GiB) where the plan of all its queries in one call, its splits chosen to fill the GPU
    (one_call_need(): bytes), needs no more; else that need, but at most
    MOST_DEFAULT_WORKSPACE_BYTES (8 GiB) and 1 / FREE_MEMORY_SHARE of the device memory free
    (free_bytes(), asked only then), and never below 1 GiB.

    Why: under 1 GiB a large k over a thousand queries, or k = 1,024 over ten thousand, is cut
    into calls that each read the database again, or fitted into fewer splits (less of the
    GPU busy). GPU run 10's plan sweep (H200, float32, N = 1M, D = 128): 1,000 queries at
    k = 16,384 took 36.4 ms in one call under 8 GiB (7.9 GiB needed) against 69.0 ms in 8
    calls under 1 GiB; 10,000 queries at k = 1,024 94.1 ms under 2 GiB (1.8 GiB needed, 10
    splits) against 100.7 ms fitted to 1 GiB (5 splits). Searches whose one call fits 1 GiB
    (k = 10 or 100 over those 10,000 queries: 0.4-0.5 GiB) are unchanged, and so is a
    search given workspace_bytes."""
    need = one_call_need()
    if need <= DEFAULT_WORKSPACE_BYTES:
        return DEFAULT_WORKSPACE_BYTES
    return max(DEFAULT_WORKSPACE_BYTES, min(need, MOST_DEFAULT_WORKSPACE_BYTES, free_bytes() // FREE_MEMORY_SHARE))


def rows_per_call(workspace_bytes: int) -> int:
    """Database rows one native call takes: below 2^29 (see MAX_ROWS_PER_CALL), and few
    enough that their norms (4 bytes a row, in the workspace) take at most half of it."""
    return max(1, min(MAX_ROWS_PER_CALL, workspace_bytes // 8))


def check_one_query_fits(workspace_of: Callable[[int, int, int, int], int], num_database: int, k: int,
                         workspace_bytes: int) -> None:
    """Raises ValueError naming workspace_bytes, the asked k and a bound that works, when
    one query cannot be searched within workspace_bytes. workspace_of(queries, rows, k, bound)
    is the native call's need; a database is cut into rows_per_call(bound) pieces, each
    searched for min(k, its rows), so the bound to suggest is the fixed point of bound -> need."""

    def need(bound: int) -> int:
        rows = min(num_database, rows_per_call(bound))
        return workspace_of(1, rows, min(k, rows), bound)

    if need(workspace_bytes) <= workspace_bytes:
        return
    bound = need(workspace_bytes)
    for _ in range(64):  # need grows about half as fast as the bound (norms take half): converges
        more = need(bound)
        if more <= bound:
            break
        bound = more
    raise ValueError(
        f"workspace_bytes: one query with k={k} needs {bound} bytes of GPU workspace against this database "
        f"({num_database} rows), more than the bound of {workspace_bytes}; pass workspace_bytes={bound} or more, "
        "or use a smaller k"
    )


def plan_database_chunks(num_database: int, rows: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most `rows` rows covering [0, num_database)."""
    return [(start, min(start + rows, num_database)) for start in range(0, num_database, rows)]


def plan_stream_chunks(num_database: int, rows: int, first_rows: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges covering [0, num_database) for a streamed search: the first
    chunk of `first_rows` rows (at most `rows`), each next one twice the size of the one
    before it, up to `rows`.

    Why: the first chunk's host copy and upload run while the GPU has nothing to search; every
    later chunk's overlap the search of the chunk before it. A small first chunk shortens that
    idle start, and doubling keeps each copy about as long as the search it hides behind (a
    search takes at least as long per row as a copy whenever the queries are many enough for
    the GPU to be the bottleneck). The cost: a few more native calls and top-k merges.
    """
    pieces: list[tuple[int, int]] = []
    start, size = 0, max(1, min(rows, first_rows))
    while start < num_database:
        stop = min(num_database, start + size)
        pieces.append((start, stop))
        start, size = stop, min(rows, 2 * size)
    return pieces


def first_stream_rows(rows: int, dim: int) -> int:
    """The first chunk of a streamed search (plan_stream_chunks): 1 / 2^STREAM_RAMP_STEPS of
    the largest chunk, but not below STREAM_FIRST_CHUNK_MIN_BYTES (nor above `rows`)."""
    return min(rows, max(rows >> STREAM_RAMP_STEPS, STREAM_FIRST_CHUNK_MIN_BYTES // (dim * 4), 1))


def plan_host_stream(num_queries: int, num_database: int, dim: int, k: int, memory_bytes: int,
                     workspace_bytes: int) -> tuple[int, int]:
    """(query rows per block, database rows per chunk) for streaming a host database.

    Device memory, about memory_bytes in all (the workspace comes on top): a block of queries
    with their results and merge temporaries takes at most half (all the queries when they fit),
    two database chunks the rest. A chunk is also at most HOST_CHUNK_BYTES (it is pinned
    twice on the host) and rows_per_call(workspace_bytes) rows. Never below one row of each:
    a budget smaller than one query and one database row is exceeded, not refused.
    """
    k = min(k, num_database)
    per_query = dim * 4 + RESULT_BYTES_PER_NEIGHBOUR * k
    query_rows = max(1, min(num_queries, (memory_bytes // 2) // per_query))
    left = max(0, memory_bytes - query_rows * per_query)
    database_rows = min(num_database, left // (2 * dim * 4), HOST_CHUNK_BYTES // (dim * 4),
                        rows_per_call(workspace_bytes))
    return query_rows, max(1, database_rows)
