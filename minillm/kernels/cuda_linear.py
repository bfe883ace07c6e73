"""numba.cuda kernels for ``linear``: a shared-memory tiled matmul and a quantized matvec.

Which one runs depends on the shape of the work:

- **prefill / batched tokens on fp32 weights** (T > 1): every weight is used by T tokens, so
  the win is *reuse*. The tiled matmul stages a tile of x and a tile of W in shared memory and
  lets every thread of the block read them many times, cutting global-memory traffic by the
  tile size.
- **decode** (T = 1) and **quantized weights**: every weight is used once per token, so the
  kernel is bound by how fast it can *stream* W from memory (the decode roofline). The matvec
  gives each output row a group of lanes (a warp of 32 on a GPU) that sweep the row's blocks
  side by side, so each 128-byte line fetched from memory is fully used (coalescing), and the
  bytes stay quantized until they are in registers.

Kernels are made by small factories whose arguments are compile-time constants (tile size,
lanes); each factory is cached, so a configuration compiles once. The kernel bodies read the
module-global ``cuda``: on a GPU that is numba.cuda; under ``NUMBA_ENABLE_CUDASIM=1`` the
simulator swaps in its fake module for the duration of each launch, so the same source runs in
both (GPU-Puzzles passes ``cuda`` in as an argument for the same reason).

Every kernel uses a grid-stride loop over its work items, so any grid size is correct: on a GPU
the backend launches one block per item, in the simulator a couple of blocks loop over them.
"""

from __future__ import annotations

import functools

from numba import cuda, float32

from minillm.kernels.cuda_quant import KERNEL_FORMATS, ROW_DOT
from minillm.kernels.cuda_simulator import make_shared_arrays_thread_safe

# every kernel module imports this one: under the simulator, shared memory must be race-free
make_shared_arrays_thread_safe()


def check_power_of_two(name: str, value: int) -> None:
    """Launch sizes that feed a tree reduction (halving strides) must be powers of two;
    shared by every kernel factory, so a bad size fails at build time with its name."""
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two for the tree reduction, got {value}")


@functools.cache
def make_tiled_matmul(cols: int, rows: int, depth: int):  # noqa: ANN201 - a numba.cuda kernel
    """out (T, N) = x (T, K) @ w (N, K).T (+ bias); launch with `cols` threads per block.

    A block computes one output tile out[t0:t0+rows, n0:n0+cols]; thread c owns output column
    n0 + c (one weight row) for all `rows` tokens of the tile, in registers (acc[rows]).
    Per step of `depth` along K, the block copies x[t0:t0+rows, k0:k0+depth] and
    w[n0:n0+cols, k0:k0+depth] into shared memory (element e of a tile goes to thread
    e mod cols, so neighbouring threads read neighbouring k: coalesced), waits at a barrier,
    and each thread does rows * depth multiply-adds from shared memory.

    The reuse is the point: each x element fetched from global memory serves `cols` weight
    rows (all threads read the same x_tile entry: a broadcast), and each weight serves `rows`
    tokens from a register. Global reads per output: K / rows + K / cols instead of 2K.
    The W tile is padded to depth + 1 columns so that the threads of a warp, reading
    w_tile[c, kk] down a column, hit different shared-memory banks.
    """
    if min(cols, rows, depth) < 1:
        raise ValueError(f"cols, rows and depth must be >= 1, got {cols}, {rows}, {depth}")
    padded = depth + 1  # shared array shapes must be compile-time constants

    def tiled_matmul(x, w, bias, use_bias, out):
        c = cuda.threadIdx.x
        x_tile = cuda.shared.array((rows, depth), float32)
        w_tile = cuda.shared.array((cols, padded), float32)
        acc = cuda.local.array(rows, float32)
        n_tok, k_dim = x.shape
        n_out = w.shape[0]
        tiles_n = (n_out + cols - 1) // cols
        num_tiles = tiles_n * ((n_tok + rows - 1) // rows)
        for tile_id in range(cuda.blockIdx.x, num_tiles, cuda.gridDim.x):
            t0 = (tile_id // tiles_n) * rows
            n0 = (tile_id % tiles_n) * cols
            n_rows = min(rows, n_tok - t0)  # the same for every thread of the block
            for r in range(rows):
                acc[r] = float32(0.0)
            for k0 in range(0, k_dim, depth):
                for e in range(c, rows * depth, cols):  # cooperative loads, zero-padded
                    k = k0 + e % depth
                    ok = k < k_dim and e // depth < n_rows
                    x_tile[e // depth, e % depth] = x[t0 + e // depth, k] if ok else float32(0)
                for e in range(c, cols * depth, cols):
                    k = k0 + e % depth
                    ok = k < k_dim and n0 + e // depth < n_out
                    w_tile[e // depth, e % depth] = w[n0 + e // depth, k] if ok else float32(0)
                cuda.syncthreads()  # the tiles are complete
                for kk in range(depth):
                    w_val = w_tile[c, kk]  # one register, used by every token of the tile
                    for r in range(n_rows):
                        acc[r] += x_tile[r, kk] * w_val
                cuda.syncthreads()  # everyone is done reading before the next load
            n = n0 + c
            if n < n_out:
                for r in range(n_rows):
                    out[t0 + r, n] = acc[r] + bias[n] if use_bias else acc[r]

    return cuda.jit(tiled_matmul)


@cuda.jit(device=True, inline=True)
def lane_sum(acc, partial, slot, lane, lanes):
    """The sum of `acc` over the lanes of row slot `slot`, valid in lane 0 (every lane calls):
    the partial sums meet in partial[slot, :] and a tree halves them in log2(lanes) barrier
    steps. One lane per row (a compile-time constant) needs no reduction."""
    if lanes == 1:
        return acc
    partial[slot, lane] = acc
    cuda.syncthreads()
    half = lanes // 2
    while half > 0:  # tree: lanes -> lanes/2 -> ... -> 1 partial sums
        if lane < half:
            partial[slot, lane] += partial[slot, lane + half]
        cuda.syncthreads()
        half //= 2
    total = partial[slot, 0]
    cuda.syncthreads()  # read before the next row's partial sums overwrite it
    return total


@functools.cache
def make_matvec(fmt: str, lanes: int, rows_per_block: int, accumulate: bool = False):  # noqa: ANN201
    """out (T, N) = x (T, K) @ W.T (+ bias) with W (N, K) in block format `fmt`; with
    `accumulate`, out += x @ W.T instead (the resident path adds the o and down projections
    into the residual stream in place: each element has one writer, and x is another buffer).

    Launch with block (lanes, rows_per_block) and grid (row groups, tokens). Lane `lane` of row
    slot `slot` sums the dots of blocks lane, lane + lanes, ... of its row; the partial sums
    meet in shared memory and a tree halves them in log2(lanes) barrier steps (``lane_sum``).

    On a GPU lanes = 32 makes each row one warp; adjacent lanes read adjacent blocks, so the
    warp streams the row's bytes front to back. A production kernel would finish the sum with
    warp shuffles (`cuda.shfl_down_sync`, registers only, no barriers); numba's simulator does
    not implement shuffles, so the tree goes through shared memory and the same source runs in
    both. With several row slots per block (rows_per_block warps) one block keeps more memory
    requests in flight, which is what a memory-bound kernel needs (occupancy).
    """
    if fmt not in KERNEL_FORMATS:
        raise ValueError(f"no matvec kernel for format {fmt!r}; have {sorted(KERNEL_FORMATS)}")
    check_power_of_two("lanes", lanes)
    if rows_per_block < 1:
        raise ValueError(f"rows_per_block must be >= 1, got {rows_per_block}")
    row_dot = ROW_DOT[fmt]

    def matvec(w, x, bias, use_bias, out):
        lane = cuda.threadIdx.x
        slot = cuda.threadIdx.y
        partial = cuda.shared.array((rows_per_block, lanes), float32)
        n_tok = x.shape[0]
        n_rows = out.shape[1]
        for t in range(cuda.blockIdx.y, n_tok, cuda.gridDim.y):
            step_rows = cuda.gridDim.x * rows_per_block
            for first in range(cuda.blockIdx.x * rows_per_block, n_rows, step_rows):
                row = first + slot
                acc = float32(0.0)
                if row < n_rows:
                    acc = row_dot(w, row, lane, lanes, x, t)
                total = lane_sum(acc, partial, slot, lane, lanes)
                if lane == 0 and row < n_rows:
                    if use_bias:
                        total += bias[row]
                    if accumulate:  # a compile-time constant
                        total += out[t, row]
                    out[t, row] = total

    return cuda.jit(matvec)
