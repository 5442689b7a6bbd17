// Host check of DeepMmaTile's layout (csrc/cuda/knn_deep_tile.cuh, deep_tile_layout), built
// and run by tests/test_cuda_build.py where there is no GPU:
//   - a step's 16-byte chunks (4 float32 or 8 16-bit elements) cover its 128 rows x 32
//     dimensions exactly once, and chunk c + kTileThreads (a thread's next chunk) is the same
//     column kTileThreads / chunks-a-row rows on (the stepping of DeepMmaTile::Copies);
//   - ldmatrix.x4, emulated as the PTX ISA describes it (lane l gives the 16-byte row address
//     of row l % 8 of matrix l / 8; lane l receives in register i the two elements of matrix
//     i at row l / 4, columns 2 (l % 4) and the next), hands each lane the A and B fragment
//     registers of mma.m16n8k16 (PTX ISA "Matrix Fragments for mma"; knn_mma_tile.cuh), for
//     every query block and vector pair of every warp, at both k0 of a step;
//   - those ldmatrix row addresses fall on distinct shared-memory banks within each matrix (8
//     rows x 16 bytes = all 32 banks once), and the tf32 word loads' likewise.
// Prints what it checked; exits 1 at the first mismatch.
#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda/knn_deep_tile.cuh"

using namespace latentspace::cuda;
using Tile = DeepMmaTile<latentspace::KnnPrecision::kBf16>;
using TileTf32 = DeepMmaTile<latentspace::KnnPrecision::kTf32>;

namespace {

int failures = 0;

void expect(bool ok, const char* what, int a = 0, int b = 0, int c = 0) {
  if (!ok && failures++ < 10) std::printf("MISMATCH %s (%d, %d, %d)\n", what, a, b, c);
}

// Chunks of `per_chunk` elements over one step: each element once; the per-thread stepping.
void check_chunks(int per_chunk) {
  constexpr int kDepth = deep_tile_layout::kDepth;
  const int chunks = Tile::kQueries * kDepth / per_chunk;
  std::vector<int> seen(Tile::kQueries * kDepth, 0);
  for (int c = 0; c < chunks; ++c) {
    const int row = deep_tile_layout::chunk_row(c, per_chunk), column = deep_tile_layout::chunk_column(c, per_chunk);
    expect(row >= 0 && row < Tile::kQueries && column >= 0 && column + per_chunk <= kDepth, "chunk inside the step", c,
           row, column);
    expect(column % per_chunk == 0, "chunk aligned to its size", c, column);
    for (int e = 0; e < per_chunk && row < Tile::kQueries && column + e < kDepth; ++e) {
      ++seen[row * kDepth + column + e];
    }
    if (c + kTileThreads < chunks) {
      const int rows_on = kTileThreads / (kDepth / per_chunk);
      expect(deep_tile_layout::chunk_row(c + kTileThreads, per_chunk) == row + rows_on &&
                 deep_tile_layout::chunk_column(c + kTileThreads, per_chunk) == column,
             "a thread's next chunk: same column, kTileThreads / chunks-a-row rows on", c);
    }
  }
  for (int i = 0; i < Tile::kQueries * kDepth; ++i) expect(seen[i] == 1, "every element copied once", i, seen[i]);
  expect(chunks % kTileThreads == 0, "whole chunks per thread", chunks);
}

// An element id standing for (row, column) of a staged [row][dimension] tile.
int id(int row, int column) { return row * 1000 + column; }

// ldmatrix.x4 from a [row][dimension] tile of ids, each lane giving the address of row
// first_row + row_of(lane), column k0 + column_of(lane) (deep_tile_layout's a_ or b_
// functions); returns what lane `lane` receives in register i, as the pair's two ids.
struct Pair {
  int low, high;
};
Pair ldmatrix_receives(int (*row_of)(int), int (*column_of)(int), int first_row, int k0, int lane, int i) {
  const int provider = 8 * i + lane / 4;  // the lane that gave this matrix row's address
  const int row = first_row + row_of(provider), column = k0 + column_of(provider) + 2 * (lane % 4);
  return {id(row, column), id(row, column + 1)};
}

void check_a_fragments() {
  // Warp w's query block m at depth k0: rows warp_query + 16 m + (0..15), as the kernel forms
  // them; expected register r of lane (g, t): row g + 8 (r % 2), depth k0 + 2 t + 8 (r / 2).
  for (int warp = 0; warp < 8; ++warp) {
    const int warp_query = (warp / 4) * Tile::kWarpQueries;
    for (int m = 0; m < Tile::kBlocksM; ++m) {
      for (int k0 = 0; k0 < deep_tile_layout::kDepth; k0 += 16) {
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane / 4, t = lane % 4;
          for (int r = 0; r < 4; ++r) {
            const Pair got = ldmatrix_receives(deep_tile_layout::a_row, deep_tile_layout::a_column, warp_query + m * 16,
                                               k0, lane, r);
            const int row = warp_query + m * 16 + g + 8 * (r % 2), column = k0 + 2 * t + 8 * (r / 2);
            expect(got.low == id(row, column) && got.high == id(row, column + 1), "A fragment register", warp * 100 + m,
                   lane, r);
          }
        }
      }
    }
  }
}

void check_b_fragments() {
  // Warp w's vector blocks 2p and 2p + 1 at depth k0, from [vector][dimension]: expected
  // b[n][r] of lane (g, t): vector warp_vector + 8 n + g, depth k0 + 2 t + 8 r (the "col" B).
  for (int warp = 0; warp < 8; ++warp) {
    const int warp_vector = (warp % 4) * Tile::kWarpVectors;
    for (int p = 0; p < Tile::kBlocksN / 2; ++p) {
      for (int k0 = 0; k0 < deep_tile_layout::kDepth; k0 += 16) {
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane / 4, t = lane % 4;
          for (int i = 0; i < 4; ++i) {  // r[i] -> b[2p + i / 2][i % 2]
            const int n = 2 * p + i / 2, r = i % 2;
            const Pair got = ldmatrix_receives(deep_tile_layout::b_row, deep_tile_layout::b_column, warp_vector + p * 16,
                                               k0, lane, i);
            const int vector = warp_vector + 8 * n + g, column = k0 + 2 * t + 8 * r;
            expect(got.low == id(vector, column) && got.high == id(vector, column + 1), "B fragment register",
                   warp * 100 + p, lane, i);
          }
        }
      }
    }
  }
}

// Bank (4-byte word mod 32) of a byte offset.
int bank(int byte) { return (byte / 4) % 32; }

void check_banks() {
  // ldmatrix: within each matrix, 8 row addresses of 16 bytes should cover the 32 banks once.
  const int stride_bytes = Tile::kStride * 2;
  for (int lane0 = 0; lane0 < 32; lane0 += 8) {
    for (int which = 0; which < 2; ++which) {
      bool used[32] = {};
      for (int lane = lane0; lane < lane0 + 8; ++lane) {
        const int row = which == 0 ? deep_tile_layout::a_row(lane) : deep_tile_layout::b_row(lane);
        const int column = which == 0 ? deep_tile_layout::a_column(lane) : deep_tile_layout::b_column(lane);
        for (int word = 0; word < 4; ++word) {
          const int b = bank(row * stride_bytes + column * 2 + 4 * word);
          expect(!used[b], "ldmatrix rows on distinct banks", which, lane, b);
          used[b] = true;
        }
      }
    }
  }
  // tf32 word loads: lane (g, t) reads row g, word t (+ constant offsets): 32 distinct banks.
  bool used[32] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int b = bank((lane / 4) * TileTf32::kStride * 4 + (lane % 4) * 4);
    expect(!used[b], "tf32 word loads on distinct banks", lane, b);
    used[b] = true;
  }
}

}  // namespace

int main() {
  check_chunks(4);
  check_chunks(8);
  check_a_fragments();
  check_b_fragments();
  check_banks();
  std::printf("deep tile layout: chunks of 4 and 8, A and B fragments of 8 warps, banks: %d mismatches\n", failures);
  return failures != 0;
}
