#include "ops/norms.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "core/interrupt.h"
#include "core/threads.h"
#include "cpu/simd/knn_kernels.h"

namespace latentspace {

int64_t sq_norms_cpu(const float* x, int64_t rows, int64_t dim, float* out) {
  return sq_norms_cpu(cpu::knn_kernels(active_simd_level()), x, rows, dim, out);
}

int64_t sq_norms_cpu(const cpu::KnnKernels& kernels, const float* x, int64_t rows, int64_t dim, float* out) {
  // The norms come from the search kernels' own packing routine so that they match, bit
  // for bit, the norms the search computes on the fly.
  const int64_t width = kernels.panel_width;
  const int64_t groups = (rows + width - 1) / width;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads(), groups)));
  std::vector<std::vector<float>> scratch(threads, std::vector<float>(static_cast<size_t>(width * dim)));
  std::atomic<int64_t> first_bad{rows};
  // Ctrl-C: the check of a database of many GB (read from disk when mapped) stops early.
  Interruption interruption;

  // Checked for Ctrl-C once per kGroupsPerCheck groups: a group of narrow rows is a few
  // nanoseconds of work, and a check per group cost 6% at D = 8.
  constexpr int64_t kGroupsPerCheck = 64;
  const int64_t chunks = (groups + kGroupsPerCheck - 1) / kGroupsPerCheck;

#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    if (interruption.requested()) continue;  // a worksharing loop cannot break: the rest is skipped
    const int64_t last_group = std::min(groups, (c + 1) * kGroupsPerCheck);
    for (int64_t g = c * kGroupsPerCheck; g < last_group; ++g) {
      const int64_t first = g * width;
      const int64_t count = std::min(width, rows - first);
      kernels.pack_rows(x + first * dim, count, dim, scratch[omp_get_thread_num()].data(), out + first);
      const int64_t bad = first_unusable_norm(out + first, count);
      if (bad >= 0) {
        int64_t seen = first_bad.load();
        while (first + bad < seen && !first_bad.compare_exchange_weak(seen, first + bad)) {
        }
      }
    }
  }
  interruption.throw_if_requested();
  const int64_t bad = first_bad.load();
  return bad < rows ? bad : -1;
}

}  // namespace latentspace
