// Host check of offer_scores_first's float compare (csrc/cuda/knn_scan.cuh), built and run by
// tests/test_cuda_build.py: "score not above threshold_score(t)" must hold for every key the
// default compare takes ("key < t"), over random and edge-case scores (equal, -0, denormals,
// NaN, the empty key). Exits 1 when a key would be dropped.
#include <cmath>
#include <cstdio>
#include <random>

#include "cuda/knn_scan.cuh"

using namespace latentspace::cuda;

int main(int argc, char** argv) {
  const long pairs = argc > 1 ? std::atol(argv[1]) : 2000000;
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<float> uniform(-3.0f, 3.0f);
  const float special[] = {0.0f, -0.0f, 1.0f, -1.0f, 1e-38f, -1e-38f, 1e-45f, -1e-45f, 3.4e38f, -3.4e38f, NAN};
  const int specials = sizeof special / sizeof special[0];
  long wrong = 0, taken = 0;
  for (long i = 0; i < pairs; ++i) {
    const float score = i % 7 == 0 ? special[rng() % specials] : uniform(rng);
    float at = i % 5 == 0 ? score : (i % 11 == 0 ? special[rng() % (specials - 1)] : uniform(rng));
    if (i % 13 == 0) at = -score;
    if (std::isnan(at)) at = 0.0f;  // a threshold comes from a list's key: never NaN
    const uint64_t threshold = i % 1000 == 0 ? kEmptyKey : make_key(at, rng() % 0x7FFFFFFF);
    const uint64_t key = make_key(score, rng() % 0x7FFFFFFF);
    const bool exact = key < threshold, passes = !(score > threshold_score(threshold));
    wrong += exact && !passes;  // a key the default takes, which the float compare would drop
    taken += exact;
  }
  std::printf("pairs %ld, taken %ld, dropped wrongly %ld\n", pairs, taken, wrong);
  return wrong != 0;
}
