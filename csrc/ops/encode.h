// Batched encoding through a multilayer perceptron: x -> act_L(... act_1(x W_1^T + b_1) ...),
// each layer optionally with a LayerNorm over its outputs, before or after its activation.
//
// The weights are exported once into an encoder object (packed for the kernel in use); encode()
// then carries each block of rows through all layers while the activations stay in cache, so
// no full-size intermediate array is ever allocated. One class per backend, same constructor:
// CpuMlpEncoder (cpu/encode.cpp) and CudaMlpEncoder (cuda/encode.cu).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace latentspace {

// Elementwise activation applied after a layer's bias. The formulas are torch's
// (torch.nn.ReLU, LeakyReLU(negative_slope), GELU(), GELU(approximate="tanh"), Tanh, Sigmoid,
// SiLU, ELU(alpha)).
enum class Activation : int {
  kIdentity = 0,
  kRelu = 1,
  kLeakyRelu = 2,  // parameter: negative_slope
  kGelu = 3,       // x * Phi(x), Phi the standard normal CDF (erf form)
  kGeluTanh = 4,   // x * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2
  kTanh = 5,
  kSigmoid = 6,
  kSilu = 7,       // x * sigmoid(x)
  kElu = 8,        // parameter: alpha
};

// Parses "identity", "relu", ... (the names above in snake_case); throws ValueError naming
// `argument` otherwise.
Activation parse_activation(const std::string& name, const std::string& argument);

enum class EncodePrecision : int {
  kFloat32 = 0,
  // Weights and layer inputs rounded to bfloat16 (round to nearest even), products summed in
  // float32. Uses the AVX512_BF16 dot-product instruction where the CPU has it; elsewhere the
  // same rounding feeds the float32 kernels (same accuracy, no speed-up).
  kBfloat16 = 1,
};

// Where a layer's row normalisation (torch.nn.LayerNorm over its outputs) runs.
enum class NormPlace : int {
  kNone = 0,
  kBeforeActivation = 1,  // Linear -> LayerNorm -> activation
  kAfterActivation = 2,   // Linear -> activation -> LayerNorm
};

// torch.nn.LayerNorm's eval forward over each row of n values (normalized_shape = (n,)):
// y = (h - mean) / sqrt(var + eps) * scale + shift, var the biased variance of the row.
// scale (torch's weight) and shift (its bias) hold n values, or are nullptr for 1 and 0
// (elementwise_affine=False, bias=False). eps stays a double, as torch.nn.LayerNorm holds it.
struct RowNorm {
  NormPlace place = NormPlace::kNone;
  double eps = 0.0;
  const float* scale = nullptr;
  const float* shift = nullptr;
};

// One layer as the caller holds it: weights (columns x depth) row-major, i.e. torch's
// nn.Linear.weight (out_features x in_features); bias (columns) or nullptr; an optional
// LayerNorm over its columns outputs (norm.place kNone: none).
struct LayerWeights {
  const float* weights = nullptr;
  const float* bias = nullptr;
  int64_t depth = 0;    // inputs (in_features)
  int64_t columns = 0;  // outputs (out_features)
  Activation activation = Activation::kIdentity;
  float parameter = 0.0f;
  RowNorm norm;
};

// The checks both encoders make of the layers as given: a non-empty chain of non-empty layers
// whose depths match the previous layer's outputs, finite activation parameters, known norm
// places. Throws ValueError naming weights[l], activation_params[l] or norms[l].
void check_layer_chain(const std::vector<LayerWeights>& layers);

class CpuMlpEncoder {
 public:
  // Copies and packs the weights (for the SIMD level active now). input_offset (depth of the
  // first layer, nullable) is subtracted from every input row first: PCA's mean, kept apart
  // from the bias so that x - mean is formed before the products (no cancellation).
  // input_norm (nullable; its place is ignored) is a LayerNorm over each input row, applied
  // before the offset is subtracted (a model that starts with nn.LayerNorm).
  // Throws ValueError for inconsistent shapes, non-finite weights or a bad eps.
  CpuMlpEncoder(const std::vector<LayerWeights>& layers, const float* input_offset,
                EncodePrecision precision, const RowNorm* input_norm = nullptr);
  ~CpuMlpEncoder();
  CpuMlpEncoder(const CpuMlpEncoder&) = delete;
  CpuMlpEncoder& operator=(const CpuMlpEncoder&) = delete;

  int64_t input_dim() const;
  int64_t output_dim() const;
  int64_t num_layers() const;
  EncodePrecision precision() const;
  // The kernel that runs: "scalar", "avx2", "avx512" or "avx512_bf16".
  const char* kernel_name() const;

  // out[r] = encoder(x[r]) for r < rows; x is (rows x input_dim), out (rows x output_dim), both
  // C-contiguous. Thread-safe (any number of concurrent calls). Throws ValueError naming the
  // lowest row of x that holds NaN or Inf (out is then partly written).
  void encode(const float* x, int64_t rows, float* out) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The same encoder on a CUDA GPU. Every pointer given to the constructor (weights, biases,
// norm scales and shifts, input_offset) is device memory that the caller keeps alive and
// unchanged while the encoder exists: nothing is copied (python/latentspace/_cuda_encoder.py
// holds them as torch tensors, checked finite before they were uploaded). Each layer is one
// launch: a tile of rows x outputs per block, the products in registers (float32 FMA, or bf16
// tensor cores with float32 sums for kBfloat16: the CPU's rounding), bias and activation applied
// before the one store; a layer with a LayerNorm adds one row-wise launch. Throws ValueError for
// inconsistent shapes, a bad eps, or a layer too wide for one launch's grid.
class CudaMlpEncoder {
 public:
  CudaMlpEncoder(const std::vector<LayerWeights>& layers, const float* input_offset,
                 EncodePrecision precision, const RowNorm* input_norm = nullptr);
  ~CudaMlpEncoder();
  CudaMlpEncoder(const CudaMlpEncoder&) = delete;
  CudaMlpEncoder& operator=(const CudaMlpEncoder&) = delete;

  int64_t input_dim() const;
  int64_t output_dim() const;
  int64_t num_layers() const;
  EncodePrecision precision() const;
  // "cuda_simt" (float32 on CUDA cores) or "cuda_wmma_bf16" (tensor cores).
  const char* kernel_name() const;
  // float32 elements of device workspace encode() needs for `rows` rows: the hidden layers'
  // activations (two ping-pong buffers of rows x the widest hidden layer, for three layers or
  // more) and a leading LayerNorm's normalised input (rows x input_dim). 0 for one layer
  // without a leading LayerNorm.
  int64_t workspace_floats(int64_t rows) const;

  // out[r] = encoder(x[r]) for r < rows, queued on `stream` (a cudaStream_t of the current
  // device); x (rows x input_dim), out (rows x output_dim) and workspace (workspace_floats(rows)
  // floats) are device memory, x and out C-contiguous. nonfinite (nullable): a device flag the
  // caller zeroed, set to 1 when an input value (minus input_offset; after the input norm) is
  // NaN or Inf, found while the first layer stages its inputs (no extra pass); the codes are
  // then unspecified. Returns without waiting for the GPU.
  void encode(const float* x, int64_t rows, float* out, float* workspace, uint32_t* nonfinite,
              uintptr_t stream) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace latentspace
