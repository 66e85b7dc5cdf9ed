// A whole decode step of a dense Llama-family model in one call: every layer for a few rows.
//
// Single-stream decode of a small model is bound by fixed costs, not arithmetic: through the
// PyTorch modules a step runs about 35 Python-level ops per layer (norms, RoPE, cache writes,
// residual adds, casts), each costing a dispatch, so a 30-layer model spends more time
// dispatching than reading its weights. Here each layer is the same four linears, through the
// same ATen kernels the modules call (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm` or
// `linear`: identical products), and everything between them is a loop over the rows:
// RMSNorm (rms_norm.cpp), RoPE with the cache write, decode attention on the paged cache
// (paged_attention.cpp), SiLU-and-multiply, the residual adds. Elementwise results are
// rounded to the activations' dtype after each operation, as the PyTorch ops round them.
//
// A plan holds the model's weights (as ATen views of the caller's tensors, not owned: the
// caller keeps the model and cache alive while the plan exists) and the per-layer KV pools.
// Rows are independent tokens, each with its own position, cache slot, block table and
// context length, so one call serves a batch of single-token decodes and a sequence's k + 1
// speculative rows alike (the rows' keys are written before any row attends).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include "scalar.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

extern "C" {
void talkloop_rms_norm_f32(const float*, const float*, int64_t, int64_t, float, float*);
void talkloop_rms_norm_bf16(const uint16_t*, const uint16_t*, int64_t, int64_t, float, uint16_t*);
void talkloop_add_rms_norm_f32(float*, const float*, const float*, int64_t, int64_t, float, float*);
void talkloop_add_rms_norm_bf16(uint16_t*, const uint16_t*, const uint16_t*, int64_t, int64_t,
                                float, uint16_t*);
void talkloop_decode_attention_f32(float*, float*, const float*, const float*, const float*,
                                   const int64_t*, const int64_t*, int64_t, int64_t, int64_t,
                                   int64_t, int64_t, int64_t, int64_t, float);
void talkloop_int4_linear_f32(const float*, int64_t, int64_t, const uint8_t*, int64_t,
                              const float*, float*);
void talkloop_int4_linear_bf16(const uint16_t*, int64_t, int64_t, const uint8_t*, int64_t,
                               const uint16_t*, uint16_t*);
void talkloop_decode_attention_bf16(uint16_t*, float*, const uint16_t*, const uint16_t*,
                                    const uint16_t*, const int64_t*, const int64_t*, int64_t,
                                    int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float);
}

namespace {

using talkloop::as_stored;
using talkloop::from_float;
using talkloop::to_float;

// Descriptor layout shared with native/__init__.py (`_describe`): one tensor is 6 int64s.
constexpr int64_t kTensorWords = 6;  // data pointer, dtype code, ndim, up to 3 sizes
constexpr int64_t kLinearWords = 2 + 3 * kTensorWords;  // kind, group size, weight/scales/bias
constexpr int64_t kLayerWords = 2 * kTensorWords + 4 * kLinearWords;

// kInt4Native: int4_linear.cpp's packed form (weight [N / 16, K / 32, 320] bytes). The same
// codes are native/__init__.py's LINEAR_* constants.
enum LinearKind : int64_t { kDense = 0, kInt8 = 8, kInt4 = 4, kInt4Native = 5 };

at::ScalarType scalar_type(int64_t code) {
  switch (code) {
    case 0: return at::kFloat;
    case 1: return at::kBFloat16;
    case 2: return at::kChar;
    case 3: return at::kByte;
    default: throw std::runtime_error("unknown dtype code " + std::to_string(code));
  }
}

at::Tensor tensor(const int64_t* words) {  // an undefined tensor for a null pointer
  if (words[0] == 0) return at::Tensor();
  const int64_t ndim = words[2];
  if (ndim < 1 || ndim > 3) throw std::runtime_error("descriptor ndim must be 1..3");
  std::vector<int64_t> sizes(words + 3, words + 3 + ndim);
  return at::from_blob(reinterpret_cast<void*>(words[0]), sizes,
                       at::TensorOptions().dtype(scalar_type(words[1])));
}

struct Linear {
  int64_t kind = kDense;
  int64_t group_size = 0;
  at::Tensor weight, scales, bias;

  at::Tensor operator()(const at::Tensor& x) const {
    if (kind == kInt4Native) return native_int4(x.contiguous());
    if (kind == kDense) return bias.defined() ? at::linear(x, weight, bias) : at::linear(x, weight);
    const at::Tensor x16 = x.to(at::kBFloat16);
    at::Tensor y = kind == kInt8 ? at::_weight_int8pack_mm(x16, weight, scales)
                                 : at::_weight_int4pack_mm_for_cpu(x16, weight, group_size, scales);
    y = y.to(x.scalar_type());
    return bias.defined() ? y + bias : y;
  }

  at::Tensor native_int4(const at::Tensor& x) const {
    const int64_t rows = x.size(0), cols = x.size(1), out_features = weight.size(0) * 16;
    at::Tensor y = at::empty({rows, out_features}, x.options());
    if (x.scalar_type() == at::kFloat) {
      talkloop_int4_linear_f32(x.data_ptr<float>(), rows, cols, weight.data_ptr<uint8_t>(),
                               out_features, bias.defined() ? bias.data_ptr<float>() : nullptr,
                               y.data_ptr<float>());
    } else {
      const auto* b = bias.defined() ? static_cast<const uint16_t*>(bias.data_ptr()) : nullptr;
      talkloop_int4_linear_bf16(static_cast<const uint16_t*>(x.data_ptr()), rows, cols,
                                weight.data_ptr<uint8_t>(), out_features, b,
                                static_cast<uint16_t*>(y.data_ptr()));
    }
    return y;
  }
};

Linear linear(const int64_t* words) {
  Linear out;
  out.kind = words[0];
  out.group_size = words[1];
  if (out.kind != kDense && out.kind != kInt8 && out.kind != kInt4 && out.kind != kInt4Native)
    throw std::runtime_error("unknown linear kind " + std::to_string(out.kind));
  out.weight = tensor(words + 2);
  out.scales = tensor(words + 2 + kTensorWords);
  out.bias = tensor(words + 2 + 2 * kTensorWords);
  return out;
}

struct Layer {
  at::Tensor input_norm, post_norm;
  Linear qkv, o_proj, gate_up, down;
  void* key_cache;
  void* value_cache;
};

struct Plan {
  int64_t hidden, num_heads, num_kv_heads, head_dim, intermediate;
  int64_t num_blocks, block_size;
  float eps, scale;
  at::ScalarType dtype;
  at::Tensor final_norm, embed, cos, sin;  // embed [V, hidden]; cos, sin [positions, D / 2]
  std::vector<Layer> layers;
};

template <typename T>
void rms_norm(const T* x, const T* weight, int64_t rows, int64_t cols, float eps, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    talkloop_rms_norm_f32(x, weight, rows, cols, eps, out);
  } else {
    talkloop_rms_norm_bf16(x, weight, rows, cols, eps, out);
  }
}

// x += y (the residual add), then out = RMSNorm(x): one pass over the rows.
template <typename T>
void add_rms_norm(T* x, const T* y, const T* weight, int64_t rows, int64_t cols, float eps,
                  T* out) {
  if constexpr (std::is_same_v<T, float>) {
    talkloop_add_rms_norm_f32(x, y, weight, rows, cols, eps, out);
  } else {
    talkloop_add_rms_norm_bf16(x, y, weight, rows, cols, eps, out);
  }
}

// q, k rotated (transformers' rotate-half convention), then k and v stored at each row's slot.
// qkv [B, (H + 2 Hkv) * D]; cos, sin [B, D / 2] float32; q_out [B, H, D];
// caches [Hkv, num_blocks * block_size, D].
template <typename T>
void rope_and_store(const T* qkv, const float* cos, const float* sin, const int64_t* slots,
                    int64_t rows, const Plan& plan, T* q_out, T* key_cache, T* value_cache) {
  const int64_t dim = plan.head_dim, half = dim / 2, heads = plan.num_heads;
  const int64_t kv_heads = plan.num_kv_heads, width = (heads + 2 * kv_heads) * dim;
  const int64_t pool = plan.num_blocks * plan.block_size * dim;  // one kv head's pool
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = qkv + r * width;
      const float* c = cos + r * half;
      const float* s = sin + r * half;
      for (int64_t h = 0; h < heads + kv_heads; ++h) {
        const T* x = row + h * dim;
        T* dst = h < heads ? q_out + (r * heads + h) * dim
                           : key_cache + (h - heads) * pool + slots[r] * dim;
        int64_t d = 0;
#ifdef TALKLOOP_AVX512
        if (half % 16 == 0) {  // 16 lanes at a time, within one half
          using talkloop::as_stored16;
          using talkloop::load16;
          for (; d < dim; d += 16) {
            const int64_t i = d < half ? d : d - half;  // index into cos and sin
            const __m512 cd = as_stored16(_mm512_loadu_ps(c + i), T{});
            const __m512 sd = as_stored16(_mm512_loadu_ps(s + i), T{});
            const __m512 rotated = d < half ? _mm512_sub_ps(_mm512_setzero_ps(), load16(x + d + half))
                                            : load16(x + d - half);
            const __m512 a = as_stored16(_mm512_mul_ps(load16(x + d), cd), T{});
            const __m512 b = as_stored16(_mm512_mul_ps(rotated, sd), T{});
            talkloop::store16(dst + d, _mm512_add_ps(a, b));
          }
        }
#endif
        for (; d < dim; ++d) {
          const float cd = as_stored(c[d % half], T{}), sd = as_stored(s[d % half], T{});
          const float rotated = d < half ? -to_float(x[d + half]) : to_float(x[d - half]);
          const float a = as_stored(to_float(x[d]) * cd, T{});
          const float b = as_stored(rotated * sd, T{});
          from_float(a + b, dst + d);
        }
      }
      for (int64_t h = 0; h < kv_heads; ++h)
        std::memcpy(value_cache + h * pool + slots[r] * dim, row + (heads + kv_heads + h) * dim,
                    dim * sizeof(T));
    }
  });
}

// gate_up [B, 2I] -> silu(gate) * up [B, I], each op rounded to T. With AVX-512, 16 lanes
// at a time with a polynomial e^x (~2e-7 relative error; libm's scalar expf cost 7% of a
// 32-row step).
template <typename T>
void silu_mul(const T* gate_up, int64_t rows, int64_t inter, T* out) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = gate_up + r * 2 * inter;
      const T* up = gate + inter;
      T* dst = out + r * inter;
      int64_t i = 0;
#ifdef TALKLOOP_AVX512
      using talkloop::load16;
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i < inter; i += 16) {
        const __mmask16 m = talkloop::tail_mask(inter - i);
        const __m512 g = load16(gate + i, m);
        const __m512 e = talkloop::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
        const __m512 act = talkloop::as_stored16(_mm512_div_ps(g, _mm512_add_ps(one, e)), T{});
        talkloop::store16(dst + i, _mm512_mul_ps(act, load16(up + i, m)), m);
      }
#endif
      for (; i < inter; ++i) {
        const float g = to_float(gate[i]);
        const float act = as_stored(g / (1.f + std::exp(-g)), T{});
        from_float(act * to_float(up[i]), dst + i);
      }
    }
  });
}

template <typename T>
void attention(T* out, const T* q, const T* key_cache, const T* value_cache,
               const int64_t* tables, const int64_t* lens, int64_t rows, int64_t max_blocks,
               const Plan& plan) {
  const float scale = plan.scale;
  const int64_t group = plan.num_heads / plan.num_kv_heads;
  if constexpr (std::is_same_v<T, float>) {
    talkloop_decode_attention_f32(out, nullptr, q, key_cache, value_cache, tables, lens, rows,
                                  plan.num_kv_heads, group, plan.head_dim, plan.num_blocks,
                                  plan.block_size, max_blocks, scale);
  } else {
    talkloop_decode_attention_bf16(out, nullptr, q, key_cache, value_cache, tables, lens, rows,
                                   plan.num_kv_heads, group, plan.head_dim, plan.num_blocks,
                                   plan.block_size, max_blocks, scale);
  }
}

template <typename T>
T* data(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename T>
void step(const Plan& plan, const int64_t* token_ids, const int64_t* positions, int64_t rows,
          const int64_t* slots, const int64_t* tables, const int64_t* lens, int64_t max_blocks,
          T* out) {
  const auto options = at::TensorOptions().dtype(plan.dtype);
  const int64_t hidden = plan.hidden, half = plan.head_dim / 2;
  const int64_t vocab = plan.embed.size(0), max_positions = plan.cos.size(0);
  at::Tensor x = at::empty({rows, hidden}, options);  // the residual stream
  at::Tensor cos = at::empty({rows, half}, at::kFloat), sin = at::empty({rows, half}, at::kFloat);
  for (int64_t r = 0; r < rows; ++r) {
    if (token_ids[r] < 0 || token_ids[r] >= vocab)
      throw std::runtime_error("token id " + std::to_string(token_ids[r]) + " out of range");
    if (positions[r] < 0 || positions[r] >= max_positions)
      throw std::runtime_error("position " + std::to_string(positions[r]) + " out of range");
    std::memcpy(data<T>(x) + r * hidden, data<T>(plan.embed) + token_ids[r] * hidden,
                hidden * sizeof(T));
    std::memcpy(data<float>(cos) + r * half, data<float>(plan.cos) + positions[r] * half,
                half * sizeof(float));
    std::memcpy(data<float>(sin) + r * half, data<float>(plan.sin) + positions[r] * half,
                half * sizeof(float));
  }
  T* residual = data<T>(x);
  at::Tensor normed = at::empty({rows, hidden}, options);
  at::Tensor q = at::empty({rows, plan.num_heads * plan.head_dim}, options);
  at::Tensor attended = at::empty({rows, plan.num_heads * plan.head_dim}, options);
  at::Tensor act = at::empty({rows, plan.intermediate}, options);
  // Each residual add is fused with the norm after it (the next layer's, or the final one).
  rms_norm(residual, data<T>(plan.layers.front().input_norm), rows, hidden, plan.eps,
           data<T>(normed));
  for (size_t i = 0; i < plan.layers.size(); ++i) {
    const Layer& layer = plan.layers[i];
    T* keys = static_cast<T*>(layer.key_cache);
    T* values = static_cast<T*>(layer.value_cache);
    at::Tensor qkv = layer.qkv(normed).contiguous();
    rope_and_store(data<T>(qkv), data<float>(cos), data<float>(sin), slots, rows, plan,
                   data<T>(q), keys, values);
    attention(data<T>(attended), data<T>(q), keys, values, tables, lens, rows, max_blocks, plan);
    at::Tensor o = layer.o_proj(attended).contiguous();
    add_rms_norm(residual, data<T>(o), data<T>(layer.post_norm), rows, hidden, plan.eps,
                 data<T>(normed));
    at::Tensor gate_up = layer.gate_up(normed).contiguous();
    silu_mul(data<T>(gate_up), rows, plan.intermediate, data<T>(act));
    at::Tensor down = layer.down(act).contiguous();
    const bool last = i + 1 == plan.layers.size();
    add_rms_norm(residual, data<T>(down),
                 data<T>(last ? plan.final_norm : plan.layers[i + 1].input_norm), rows, hidden,
                 plan.eps, last ? out : data<T>(normed));
  }
}

void set_error(char* error, int64_t capacity, const char* message) {
  if (error == nullptr || capacity <= 0) return;
  std::strncpy(error, message, capacity - 1);
  error[capacity - 1] = '\0';
}

}  // namespace

extern "C" {

// header: hidden, num_heads, num_kv_heads, head_dim, intermediate, dtype code, num_layers,
// num_blocks, block_size; then the tensor words of the final norm, the embedding table and
// the float32 RoPE cos and sin tables; layers: per layer kLayerWords (input norm,
// post-attention norm, qkv, o_proj, gate_up, down); caches: 2 * num_layers pointers (keys
// then values per layer). Returns the plan, or null with `error` filled.
void* talkloop_decode_plan_create(const int64_t* header, const int64_t* layers,
                                  void* const* caches, float eps, float scale, char* error,
                                  int64_t capacity) {
  try {
    auto plan = std::make_unique<Plan>();
    plan->hidden = header[0];
    plan->num_heads = header[1];
    plan->num_kv_heads = header[2];
    plan->head_dim = header[3];
    plan->intermediate = header[4];
    plan->dtype = scalar_type(header[5]);
    if (plan->dtype != at::kFloat && plan->dtype != at::kBFloat16)
      throw std::runtime_error("activations must be float32 or bfloat16");
    if (plan->num_kv_heads <= 0 || plan->num_heads % plan->num_kv_heads != 0 ||
        plan->head_dim % 2 != 0)
      throw std::runtime_error("unsupported head layout");
    const int64_t num_layers = header[6];
    if (num_layers < 1) throw std::runtime_error("a decode plan needs at least one layer");
    plan->num_blocks = header[7];
    plan->block_size = header[8];
    plan->eps = eps;
    plan->scale = scale;
    const int64_t* tensors = header + 9;
    plan->final_norm = tensor(tensors);
    plan->embed = tensor(tensors + kTensorWords);
    plan->cos = tensor(tensors + 2 * kTensorWords);
    plan->sin = tensor(tensors + 3 * kTensorWords);
    if (plan->embed.scalar_type() != plan->dtype || plan->cos.scalar_type() != at::kFloat ||
        plan->cos.size(1) != plan->head_dim / 2 || plan->sin.sizes() != plan->cos.sizes())
      throw std::runtime_error("embedding or RoPE tables do not match the model");
    for (int64_t i = 0; i < num_layers; ++i) {
      const int64_t* words = layers + i * kLayerWords;
      Layer layer;
      layer.input_norm = tensor(words);
      layer.post_norm = tensor(words + kTensorWords);
      const int64_t* linears = words + 2 * kTensorWords;
      layer.qkv = linear(linears);
      layer.o_proj = linear(linears + kLinearWords);
      layer.gate_up = linear(linears + 2 * kLinearWords);
      layer.down = linear(linears + 3 * kLinearWords);
      layer.key_cache = caches[2 * i];
      layer.value_cache = caches[2 * i + 1];
      plan->layers.push_back(std::move(layer));
    }
    return plan.release();
  } catch (const std::exception& exc) {
    set_error(error, capacity, exc.what());
    return nullptr;
  }
}

void talkloop_decode_plan_free(void* plan) { delete static_cast<Plan*>(plan); }

// token_ids, positions, slots, lens [rows] int64; tables [rows, max_blocks] int64 ->
// out [rows, hidden], the final norm's output. Returns 0, or -1 with `error` filled.
int talkloop_decode_step(void* plan_ptr, const int64_t* token_ids, const int64_t* positions,
                         int64_t rows, const int64_t* slots, const int64_t* tables,
                         const int64_t* lens, int64_t max_blocks, void* out, char* error,
                         int64_t capacity) {
  try {
    c10::InferenceMode guard;
    const Plan& plan = *static_cast<const Plan*>(plan_ptr);
    if (plan.dtype == at::kFloat) {
      step(plan, token_ids, positions, rows, slots, tables, lens, max_blocks,
           static_cast<float*>(out));
    } else {
      step(plan, token_ids, positions, rows, slots, tables, lens, max_blocks,
           static_cast<uint16_t*>(out));
    }
    return 0;
  } catch (const std::exception& exc) {
    set_error(error, capacity, exc.what());
    return -1;
  }
}

}  // extern "C"
