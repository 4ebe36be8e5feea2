// Pieces of mkfast::topk_dedup_native shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>
#include <limits>

namespace mkfast {

// The largest fp32 value not above `threshold`. For any fp32 score s,
// s <= threshold  <=>  s <= threshold_as_fp32(threshold), so fp32 comparisons
// give the answer of the reference's exact (double) comparison; a plain cast
// would round 0.1 up and keep a score equal to fp32(0.1) that is above 0.1.
inline float threshold_as_fp32(double threshold) {
  float rounded = static_cast<float>(threshold);
  if (static_cast<double>(rounded) > threshold) {
    rounded = std::nextafter(rounded, -std::numeric_limits<float>::infinity());
  }
  return rounded;
}

}  // namespace mkfast
