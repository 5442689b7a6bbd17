// Host check of the pipelined tile's l2 fast reject (csrc/cuda/knn_pipelined_tile.cuh,
// l2_score_above), built and run by tests/test_cuda_build.py: it must reject no key that the deep
// tile's epilogue takes, i.e. key(score) < threshold must imply !l2_score_above(...), where score
// is score_of's clamped l2 score max(|q|^2 + |x|^2 - 2 dot, 0), formed as the device forms it
// (the sum, then 2 dot subtracted; the fused form rounds the same, 2 dot being exact), over random
// and edge-case products and norms (norms within the row check's FLT_MAX / 8, products up to
// |q| |x|; -0, denormals, NaN products, equal scores, the empty key). Exits 1 when a key would
// be dropped; prints how many keys were taken and how many the reject let through.
#include <cmath>
#include <cstdio>
#include <random>

#include "cuda/knn_pipelined_tile.cuh"

using namespace latentspace::cuda;

namespace {

float unfused_l2_score(float dot, float query_norm, float database_norm) {
  volatile float sum = query_norm + database_norm;  // (volatile: no contraction into an fma here)
  volatile float twice = 2.0f * dot;
  return std::fmax(sum - twice, 0.0f);
}

}  // namespace

int main(int argc, char** argv) {
  const long cases = argc > 1 ? std::atol(argv[1]) : 2000000;
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  const float largest_norm = 3.4028234e38f / 8.0f;  // ops/norms.h, kMaxSquaredNorm
  const float special_norms[] = {0.0f, 1e-45f, 1e-38f, 1.0f, 2.0f, 1e20f, largest_norm};
  const int norms_count = sizeof special_norms / sizeof special_norms[0];
  long wrong = 0, taken = 0, passed = 0;
  for (long i = 0; i < cases; ++i) {
    // Norms: random scales (squared norms of rows) or edge values; the product within |q| |x|.
    auto norm = [&]() {
      if (i % 7 == 0) return special_norms[rng() % norms_count];
      return std::ldexp(unit(rng), static_cast<int>(rng() % 200) - 100);
    };
    const float query_norm = norm(), database_norm = norm();
    const float most = std::sqrt(query_norm) * std::sqrt(database_norm);
    float dot = (2.0f * unit(rng) - 1.0f) * most;
    if (i % 17 == 0) dot = most;                  // a row equal to the query (up to rounding)
    if (i % 19 == 0) dot = -0.0f;
    if (i % 23 == 0) dot = (query_norm + database_norm) / 2.0f;  // the score 0, or rounding below it
    if (i % 101 == 0) dot = NAN;                  // a NaN product: score_of clamps it to 0
    const float score = unfused_l2_score(dot, query_norm, database_norm);
    // The threshold: the key of another score near this one, equal to it, or the empty key.
    float at = i % 5 == 0 ? score : score * (0.5f + unit(rng));
    if (i % 29 == 0) at = 0.0f;
    const uint64_t threshold = i % 1000 == 0 ? kEmptyKey : make_key(at, rng() % 0x7FFFFFFF);
    const uint64_t key = make_key(score, rng() % 0x7FFFFFFF);
    const bool takes = key < threshold;
    const bool rejected = l2_score_above(dot, query_norm, database_norm, threshold_score(threshold));
    wrong += takes && rejected;
    taken += takes;
    passed += !rejected;
  }
  std::printf("cases %ld, taken %ld, passed by the reject %ld, dropped wrongly %ld\n", cases, taken, passed, wrong);
  return wrong != 0;
}
