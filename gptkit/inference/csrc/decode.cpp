// One decoding step of a gptkit GPT in one call -- one sequence, several rows of one sequence
// (a speculative verification) or one token for each of several sequences (a batch): the
// quantized products run in the same PyTorch kernels as eager decoding (fbgemm's int8 x int8,
// the int8/int4 weight-only kernels), fp32 ones in a row-parallel GEMV; everything between
// them -- norms, rotary, the cache write, one query's attention, activations, residuals -- is
// plain loops over a few hundred floats. Eager
// PyTorch pays 1-3 us of dispatch and allocation for each of ~50 such operations a layer;
// here they cost what their arithmetic does.
//
// Built on first use by torch.utils.cpp_extension (gptkit/inference/native.py). Compiled
// with -ffp-contract=off, so elementwise steps round as eager PyTorch's do; reductions
// (norms, softmax) and the transcendental functions may differ from ATen's in the last bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/quantized/PackedParams.h>
#include <torch/csrc/jit/api/object.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

enum Kind { FP32 = 0, INT8 = 1, INT8_WEIGHT_ONLY = 2, INT4 = 3 };
enum Mlp { GELU_TANH = 0, GELU_EXACT = 1, RELU2 = 2, SWIGLU = 3 };

// Not inlined: one compiled loop for every caller, so a sum adds in the same order whether its
// row is decoded alone or among a verification's rows.
__attribute__((noinline)) float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

struct Linear {
  int kind = FP32;
  int64_t in = 0, out = 0, pad = 0;  // pad: zero columns the weight-only kernels need
  at::Tensor weight, bias, extra;    // extra: int8 scales, or int4 scales and zeros
  c10::intrusive_ptr<LinearPackedParamsBase> packed;
  // int8, several rows at once (set_rows): the weights packed again with scale 1 and a zero
  // column, their row sums and scales
  c10::intrusive_ptr<LinearPackedParamsBase> unit;
  at::Tensor rowsum, wscale;

  // x: (1, T, in) -> (1, T, out), each row with the numbers eager QuantizedLinear gives it
  // alone (fp32: F.linear's, up to the order of each row's sum)
  at::Tensor operator()(const at::Tensor& x) const {
    const int64_t rows = x.size(1);
    if (kind == FP32) return gemv(x);
    if (kind == INT8) {
      // fbgemm quantizes its whole input over one range: a row at a time, as decoding does
      if (rows == 1) return packed->apply_dynamic(x, false);
      if (unit) {
        at::Tensor y = int8_rows(x);
        if (y.defined()) return y;
      }
      std::vector<at::Tensor> ys;
      for (int64_t t = 0; t < rows; ++t) ys.push_back(packed->apply_dynamic(x.narrow(1, t, 1), false));
      return at::cat(ys, 1);
    }
    at::Tensor flat = x.reshape({-1, in});
    if (pad) flat = at::constant_pad_nd(flat, {0, pad});
    flat = flat.to(at::kBFloat16).contiguous();
    at::Tensor y = kind == INT8_WEIGHT_ONLY
        ? at::_weight_int8pack_mm(flat, weight, extra)
        : at::_weight_int4pack_mm_for_cpu(flat, weight, 32, extra).slice(1, 0, out);
    y = y.to(at::kFloat);
    if (bias.defined()) y = y + bias;
    return y.view({1, rows, out});
  }

  // fbgemm's single-row products of T rows, bit for bit, in one product that reads the weights
  // once. Each row is quantized as fbgemm quantizes a row alone (its range with 0 in it, scale
  // and zero point chosen as fbgemm chooses them, round half to even); the integers, with a
  // column of 255 that pins the whole input's range to 0..255, go through a copy of the weights
  // packed with scale 1, so fbgemm quantizes them to themselves and returns the exact integer
  // sums; fbgemm's own output scaling is then applied in its order of operations. Undefined
  // (the caller goes a row at a time) for a row of near-zero range or a sum past float's exact
  // integers.
  at::Tensor int8_rows(const at::Tensor& x) const {
    const int64_t rows = x.size(1), n = in, m = out;
    at::Tensor q = at::empty({rows, n + 1}, x.options());
    std::vector<float> zero(rows), scale(rows);
    const float* xp = x.data_ptr<float>();
    float* qp = q.data_ptr<float>();
    for (int64_t t = 0; t < rows; ++t) {
      const float* r = xp + t * n;
      float lo = 0.f, hi = 0.f;
      for (int64_t i = 0; i < n; ++i) {
        lo = std::min(lo, r[i]);
        hi = std::max(hi, r[i]);
      }
      const float sc = static_cast<float>((static_cast<double>(hi) - lo) / 255.0);
      if (!(sc >= 6.1e-5f)) return at::Tensor();
      // the zero point from whichever end of the range has the smaller error, as fbgemm picks it
      const double s = sc;
      double z = std::fabs(lo / s) < 255.0 + std::fabs(hi / s) ? -lo / s : 255.0 - hi / s;
      const float zf = static_cast<float>(std::nearbyint(std::min(std::max(z, 0.0), 255.0)));
      const float inv = 1.f / sc;
      float* qr = qp + t * (n + 1);
      // fbgemm's quantization: x / scale + zero point as one fused multiply-add, then rounded
      for (int64_t i = 0; i < n; ++i) qr[i] = std::min(std::max(std::nearbyint(std::fma(r[i], inv, zf)), 0.f), 255.f);
      qr[n] = 255.f;
      zero[t] = zf;
      scale[t] = sc;
    }
    at::Tensor acc = unit->apply_dynamic(q, false);
    const float* a = acc.data_ptr<float>();
    for (int64_t k = 0; k < rows * m; ++k)
      if (!(std::fabs(a[k]) < 16777216.f)) return at::Tensor();
    at::Tensor y = at::empty({1, rows, m}, x.options());
    float* o = y.data_ptr<float>();
    const float* rs = rowsum.data_ptr<float>();
    const float* ws = wscale.data_ptr<float>();
    const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t j = 0; j < m; ++j) {
        // fbgemm subtracts the zero point's share in int32, then converts: so here
        const int64_t raw = static_cast<int64_t>(a[t * m + j]) -
                            static_cast<int64_t>(zero[t]) * static_cast<int64_t>(rs[j]);
        const float v = static_cast<float>(static_cast<int32_t>(raw));
        double d = static_cast<double>(v) * static_cast<double>(scale[t] * ws[j]);
        if (b) d = d + static_cast<double>(b[j]);
        o[t * m + j] = static_cast<float>(d);
      }
    return y;
  }

  // y = W x + b for T rows, W read once. MKL's single-row product streams a matrix larger than
  // the cache at about half this machine's memory bandwidth; W's rows read in order, split over
  // ATen's threads, come near it (measured: 28 against 11-14 GB/s at 49,152 x 576, 2 threads).
  at::Tensor gemv(const at::Tensor& x) const {
    const int64_t rows = x.size(1), n = in, m = out;
    at::Tensor y = at::empty({1, rows, m}, x.options());
    const float* w = weight.data_ptr<float>();
    const float* v = x.data_ptr<float>();
    float* o = y.data_ptr<float>();
    at::parallel_for(0, m, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j)
        for (int64_t t = 0; t < rows; ++t) o[t * m + j] = dot(w + j * n, v + t * n, n);
    });
    if (bias.defined()) {
      const float* b = bias.data_ptr<float>();
      for (int64_t t = 0; t < rows; ++t)
        for (int64_t j = 0; j < m; ++j) o[t * m + j] += b[j];
    }
    return y;
  }
};

struct Layer {
  at::Tensor ln1_w, ln1_b, ln2_w, ln2_b, q_norm, k_norm;
  Linear qkv, proj, fc, down;
};

// an absent gain or bias comes as an empty tensor
inline const float* ptr(const at::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr; }

class Decoder {
 public:
  // ints: n_layer, n_head, n_kv_head, head_dim, n_embd, vocab, rmsnorm, mlp, qk_norm (0 none,
  // 1 plain, 2 with gains), rope, learned positions, mlp_hidden
  Decoder(std::vector<int64_t> ints, double eps, double softcap, std::vector<at::Tensor> tables)
      : eps_(eps), softcap_(softcap) {
    TORCH_CHECK(ints.size() == 12, "gptkit decode: 12 ints expected");
    n_layer_ = ints[0]; n_head_ = ints[1]; n_kv_ = ints[2]; hd_ = ints[3]; d_ = ints[4];
    vocab_ = ints[5]; rms_ = ints[6]; mlp_ = ints[7]; qk_norm_ = ints[8]; rope_ = ints[9];
    learned_ = ints[10]; hidden_ = ints[11];
    TORCH_CHECK(tables.size() == 6, "gptkit decode: 6 tables expected");
    wte_ = tables[0]; wpe_ = tables[1]; cos_ = tables[2]; sin_ = tables[3];
    lnf_w_ = tables[4]; lnf_b_ = tables[5];
    cos_len_ = learned_ ? wpe_.size(0) : (rope_ ? cos_.size(0) : INT64_MAX);
    layers_.resize(n_layer_);
    scores_ = at::empty({1}, at::TensorOptions().dtype(at::kFloat));
  }

  void set_norms(int64_t layer, std::vector<at::Tensor> t) {
    TORCH_CHECK(t.size() == 6, "gptkit decode: 6 norm tensors expected");
    Layer& l = layers_.at(layer);
    l.ln1_w = t[0]; l.ln1_b = t[1]; l.ln2_w = t[2]; l.ln2_b = t[3]; l.q_norm = t[4]; l.k_norm = t[5];
  }

  // which: 0 qkv, 1 attention out, 2 mlp in, 3 mlp out; layer -1: the LM head
  void set_linear(int64_t layer, int64_t which, int64_t kind, int64_t in, int64_t out, int64_t pad,
                  c10::optional<at::Tensor> weight, c10::optional<at::Tensor> bias,
                  c10::optional<at::Tensor> extra, py::object packed) {
    Linear lin;
    lin.kind = kind; lin.in = in; lin.out = out; lin.pad = pad;
    if (weight) lin.weight = *weight;
    if (bias) lin.bias = *bias;
    if (extra) lin.extra = *extra;
    if (kind == INT8) {
      auto obj = py::cast<torch::jit::Object>(packed);
      lin.packed = c10::IValue(obj._ivalue()).toCustomClass<LinearPackedParamsBase>();
    }
    *linear(layer, which) = lin;
  }

  // An int8 Linear's second packing, for several rows in one product (Linear::int8_rows); the
  // bias stays the one set_linear gave
  void set_rows(int64_t layer, int64_t which, py::object unit, at::Tensor rowsum, at::Tensor wscale,
                c10::optional<at::Tensor> bias) {
    Linear* lin = linear(layer, which);
    TORCH_CHECK(lin->kind == INT8, "gptkit decode: set_rows on a Linear that is not int8");
    lin->unit = c10::IValue(py::cast<torch::jit::Object>(unit)._ivalue()).toCustomClass<LinearPackedParamsBase>();
    lin->rowsum = rowsum;
    lin->wscale = wscale;
    if (bias) lin->bias = *bias;
  }

  Linear* linear(int64_t layer, int64_t which) {
    if (layer < 0) return &head_;
    Layer& l = layers_.at(layer);
    Linear* slot[4] = {&l.qkv, &l.proj, &l.fc, &l.down};
    TORCH_CHECK(which >= 0 && which < 4, "gptkit decode: linear slot out of range");
    return slot[which];
  }

  // The logits (1, T, vocab) after each of T tokens, the first at position pos of its sequence
  // and the rest after it, whose keys and values go to slots slot.. of k and v, and the first of
  // which attends to slots first..slot (each next one to one more): k and v are
  // (n_layer, 1, n_kv_head, max_len, head_dim) fp32, contiguous but for the layer stride (a row
  // of the serving engine's pool). Plain decoding: one token, slot == pos, first == 0; a
  // speculative verification: the last token and the guesses, each row computed as it would
  // be decoded alone.
  at::Tensor step(std::vector<int64_t> tokens, int64_t pos, int64_t slot, int64_t first, at::Tensor k,
                  at::Tensor v) {
    check_cache(k, v, 1);
    std::vector<Row> rows(tokens.size());
    for (size_t t = 0; t < rows.size(); ++t) rows[t] = {pos + int64_t(t), slot + int64_t(t), first, 0};
    return run(tokens, rows, k, v);
  }

  // One token for each of B sequences, the rows of k and v (n_layer, B, n_kv_head, max_len,
  // head_dim): sequence b's token at position pos[b], its key and value to `slot` of its row,
  // attending to slots first[b]..slot (the serving engine's left-padded pool). Logits (1, B,
  // vocab), each row the numbers that sequence gets decoded alone.
  at::Tensor step_rows(std::vector<int64_t> tokens, std::vector<int64_t> pos, std::vector<int64_t> first,
                       int64_t slot, at::Tensor k, at::Tensor v) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    TORCH_CHECK(pos.size() == tokens.size() && first.size() == tokens.size(),
                "gptkit decode: one position and one first slot per token");
    check_cache(k, v, n);
    std::vector<Row> rows(n);
    for (int64_t b = 0; b < n; ++b) rows[b] = {pos[b], slot, first[b], b};
    return run(tokens, rows, k, v);
  }

 private:
  // where one row of a step reads and writes: its position, its cache slot, the first slot it
  // attends to, and its sequence's row of the cache
  struct Row {
    int64_t pos, slot, first, seq;
  };

  void check_cache(const at::Tensor& k, const at::Tensor& v, int64_t seqs) const {
    TORCH_CHECK(k.dim() == 5 && k.size(0) == n_layer_ && k.size(1) == seqs && k.sizes() == v.sizes() &&
                    k.strides() == v.strides() && k.scalar_type() == at::kFloat &&
                    v.scalar_type() == at::kFloat && k[0].is_contiguous() && v[0].is_contiguous(),
                "gptkit decode: the cache must be fp32 rows, one a sequence, contiguous within each layer");
  }

  at::Tensor run(const std::vector<int64_t>& tokens, const std::vector<Row>& rows, const at::Tensor& k,
                 const at::Tensor& v) {
    const int64_t n = static_cast<int64_t>(tokens.size()), max_len = k.size(3);
    TORCH_CHECK(n >= 1, "gptkit decode: no tokens");
    for (int64_t t : tokens) TORCH_CHECK(t >= 0 && t < vocab_, "gptkit decode: token out of range");
    for (const Row& r : rows)
      TORCH_CHECK(0 <= r.first && r.first <= r.slot && r.slot < max_len && 0 <= r.pos && r.pos < cos_len_,
                  "gptkit decode: position past the cache or the context");
    if (scores_.numel() < max_len) scores_ = at::empty({max_len}, scores_.options());
    buffers(n);
    float* x = x_.data_ptr<float>();
    float* xn = xn_.data_ptr<float>();
    for (int64_t t = 0; t < n; ++t) {
      const float* e = wte_.data_ptr<float>() + tokens[t] * d_;
      float* xt = x + t * d_;
      if (learned_) {
        const float* p = wpe_.data_ptr<float>() + rows[t].pos * d_;
        for (int64_t i = 0; i < d_; ++i) xt[i] = e[i] + p[i];
      } else {
        std::copy(e, e + d_, xt);
      }
    }
    const int64_t layer_stride = k.stride(0), seq_stride = k.stride(1);
    for (int64_t i = 0; i < n_layer_; ++i) {
      const Layer& l = layers_[i];
      for (int64_t t = 0; t < n; ++t) norm(x + t * d_, xn + t * d_, ptr(l.ln1_w), ptr(l.ln1_b));
      at::Tensor qkv = l.qkv(xn_);
      // in order: a sequence's later rows attend to the keys its earlier ones wrote
      for (int64_t t = 0; t < n; ++t) {
        const Row& r = rows[t];
        const int64_t at = i * layer_stride + r.seq * seq_stride;
        attention(l, qkv, t, r.pos, r.slot, r.first, k.data_ptr<float>() + at, v.data_ptr<float>() + at, max_len);
      }
      add(x, l.proj(att_));
      for (int64_t t = 0; t < n; ++t) norm(x + t * d_, xn + t * d_, ptr(l.ln2_w), ptr(l.ln2_b));
      add(x, l.down(activation(l.fc(xn_))));
    }
    for (int64_t t = 0; t < n; ++t) norm(x + t * d_, xn + t * d_, ptr(lnf_w_), ptr(lnf_b_));
    at::Tensor logits = head_(xn_);
    if (softcap_ > 0) {
      float* z = logits.data_ptr<float>();
      const float c = static_cast<float>(softcap_);
      for (int64_t i = 0; i < logits.numel(); ++i) z[i] = c * std::tanh(z[i] / c);
    }
    return logits;
  }

  // working buffers for `rows` rows, reused while the row count stays
  void buffers(int64_t rows) {
    if (x_.defined() && x_.size(0) == rows) return;
    auto opts = at::TensorOptions().dtype(at::kFloat);
    x_ = at::empty({rows, d_}, opts);
    xn_ = at::empty({1, rows, d_}, opts);
    att_ = at::empty({1, rows, n_head_ * hd_}, opts);
    act_ = at::empty({1, rows, hidden_}, opts);
    qk_ = at::empty({(n_head_ + n_kv_) * hd_}, opts);
  }

  void add(float* x, const at::Tensor& y) const {
    const float* p = y.data_ptr<float>();
    for (int64_t i = 0; i < y.numel(); ++i) x[i] += p[i];
  }

  // LayerNorm (with optional bias) or RMSNorm of n values, into y
  void norm_n(const float* x, float* y, int64_t n, const float* w, const float* b, bool rms, float eps) const {
    float mean = 0.f;
    if (!rms) {
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < n; ++i) s += x[i];
      mean = s / n;
    }
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += (x[i] - mean) * (x[i] - mean);
    const float r = 1.f / std::sqrt(ss / n + eps);
    for (int64_t i = 0; i < n; ++i) {
      float t = (x[i] - mean) * r;
      if (w) t = t * w[i];
      if (b) t = t + b[i];
      y[i] = t;
    }
  }

  void norm(const float* x, float* y, const float* w, const float* b) const {
    norm_n(x, y, d_, w, b, rms_, static_cast<float>(eps_));
  }

  // Row `row` of qkv (1, T, (H + 2 H_kv) D): its queries and keys normalised and rotated to
  // position pos, its key and value written to `slot`, one query a head attending to slots
  // first..slot, into row `row` of att_.
  void attention(const Layer& l, const at::Tensor& qkv, int64_t row, int64_t pos, int64_t slot,
                 int64_t first, float* kc, float* vc, int64_t max_len) {
    const float* in = qkv.data_ptr<float>() + row * qkv.size(2);
    float* qk = qk_.data_ptr<float>();
    const int64_t heads = n_head_ + n_kv_;
    for (int64_t h = 0; h < heads; ++h) {
      const float* src = in + h * hd_;
      float* dst = qk + h * hd_;
      if (qk_norm_ == 0) {
        std::copy(src, src + hd_, dst);
      } else {
        // learned gains: the model's eps; plain QK-norm: F.rms_norm's default, fp32's epsilon
        const float* g = qk_norm_ == 2 ? ptr(h < n_head_ ? l.q_norm : l.k_norm) : nullptr;
        const float eps = qk_norm_ == 2 ? static_cast<float>(eps_) : std::numeric_limits<float>::epsilon();
        norm_n(src, dst, hd_, g, nullptr, true, eps);
      }
      if (rope_) rotate(dst, pos);
    }
    const float* vin = in + heads * hd_;
    for (int64_t g = 0; g < n_kv_; ++g) {
      std::copy(qk + (n_head_ + g) * hd_, qk + (n_head_ + g + 1) * hd_, kc + (g * max_len + slot) * hd_);
      std::copy(vin + g * hd_, vin + (g + 1) * hd_, vc + (g * max_len + slot) * hd_);
    }
    const float scale = 1.f / std::sqrt(static_cast<float>(hd_));
    const int64_t group = n_head_ / n_kv_;
    float* s = scores_.data_ptr<float>();
    float* out = att_.data_ptr<float>() + row * n_head_ * hd_;
    for (int64_t h = 0; h < n_head_; ++h) {
      const float* q = qk + h * hd_;
      const float* keys = kc + (h / group) * max_len * hd_;
      const float* values = vc + (h / group) * max_len * hd_;
      float top = -INFINITY;
      for (int64_t t = first; t <= slot; ++t) {
        s[t] = dot(q, keys + t * hd_, hd_) * scale;
        top = std::max(top, s[t]);
      }
      float sum = 0.f;
      for (int64_t t = first; t <= slot; ++t) {
        s[t] = std::exp(s[t] - top);
        sum += s[t];
      }
      float* y = out + h * hd_;
      std::fill(y, y + hd_, 0.f);
      for (int64_t t = first; t <= slot; ++t) {
        const float p = s[t] / sum;
        const float* vt = values + t * hd_;
#pragma omp simd
        for (int64_t j = 0; j < hd_; ++j) y[j] += p * vt[j];
      }
    }
  }

  // x * cos + roll(x, D/2) * sin, with the model's tables (sin signed per half)
  void rotate(float* x, int64_t pos) const {
    const float* c = cos_.data_ptr<float>() + pos * hd_;
    const float* s = sin_.data_ptr<float>() + pos * hd_;
    const int64_t half = hd_ / 2;
    for (int64_t i = 0; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      x[i] = a * c[i] + b * s[i];
      x[i + half] = b * c[i + half] + a * s[i + half];
    }
  }

  const at::Tensor& activation(const at::Tensor& h) {
    for (int64_t t = 0; t < h.size(1); ++t) activate(h.data_ptr<float>() + t * h.size(2), act_.data_ptr<float>() + t * hidden_);
    return act_;
  }

  void activate(const float* z, float* a) const {
    const int64_t n = hidden_;
    if (mlp_ == SWIGLU) {
      for (int64_t i = 0; i < n; ++i) {
        const float g = z[i];
        a[i] = (g / (1.f + std::exp(-g))) * z[n + i];
      }
    } else if (mlp_ == GELU_TANH) {
      const float k = std::sqrt(2.f / static_cast<float>(M_PI));
      for (int64_t i = 0; i < n; ++i) {
        const float u = z[i];
        a[i] = 0.5f * u * (1.f + std::tanh(k * (u + 0.044715f * u * u * u)));
      }
    } else if (mlp_ == GELU_EXACT) {
      for (int64_t i = 0; i < n; ++i) a[i] = 0.5f * z[i] * (1.f + std::erf(z[i] * static_cast<float>(M_SQRT1_2)));
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const float r = z[i] > 0.f ? z[i] : 0.f;
        a[i] = r * r;
      }
    }
  }

  int64_t n_layer_, n_head_, n_kv_, hd_, d_, vocab_, rms_, mlp_, qk_norm_, rope_, learned_, hidden_;
  int64_t cos_len_;  // positions the model has tables for (its context)
  double eps_, softcap_;
  at::Tensor wte_, wpe_, cos_, sin_, lnf_w_, lnf_b_;
  std::vector<Layer> layers_;
  Linear head_;
  at::Tensor x_, xn_, att_, act_, qk_, scores_;  // working buffers, reused every step
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<std::vector<int64_t>, double, double, std::vector<at::Tensor>>())
      .def("set_norms", &Decoder::set_norms)
      .def("set_linear", &Decoder::set_linear)
      .def("set_rows", &Decoder::set_rows)
      .def("step", &Decoder::step, py::call_guard<py::gil_scoped_release>())
      .def("step_rows", &Decoder::step_rows, py::call_guard<py::gil_scoped_release>());
}
