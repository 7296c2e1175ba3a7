// CPU kernels of the PoolFormer block for MindSpore's Custom "aot" ops (float32, NCHW).
//
// Why: on a CPU, MindSpore runs the block's elementwise work as separate kernels, each a full pass
// over memory, and its Erf kernel is scalar and single-threaded (305 ms on a 32x256x56x56 map against
// 18 ms for x*x). These kernels fuse each step of the block into one or two threaded, vectorisable
// passes, forward and backward:
//   PoolMixer:    y = x + d_b * s_c * rstd_b * (avgpool_k(x) - x)   (GroupNorm(1) folded in: the
//                 pool averages valid pixels only, so pool(n) - n = rstd * (pool(x) - x))
//   Normalize:    n = (x - mean_b) * rstd_b                          (GroupNorm(1) without affine)
//   GeluBias:     h = z * (erf(z) + 1), z = acc + bias_c              (sqrt2 * GELU, constants folded
//                                                                      into the convs around it)
//   ResidualBias: out = y + d_b * (acc + bias_c)                      (fc2 bias, drop path, residual)
//   FoldMlp:      norm2's affine, the GELU constants and LayerScale folded into fc1/fc2's weights
// and, with AVX-512, the MLP's 1x1 convs as a batch GEMM that applies GeluBias / ResidualBias (and
// the GELU's derivative in the backward) as it stores (MlpForward, MlpInference, MlpHiddenGrad).
// d_b is the per-sample drop-path scale (ones at inference). Statistics accumulate in double.
// Outside the block: AllFinite (a training step's gradient check) and ResizedPixelNll (+ Grad), the
// segmentation loss: bilinear resize to the label size, log_softmax and NLL in one pass.
//
// Every entry point has MindSpore's aot signature; params holds the inputs then the outputs.

#include <sched.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace {

int NumThreads() {
  static const int threads = [] {
    if (const char *env = std::getenv("MINDCV_POOLFORMER_KERNEL_THREADS")) {
      int value = std::atoi(env);
      if (value > 0) return value;
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return threads;
}

// Run fn(begin, end) over [0, n) split into one contiguous range per thread (the caller's thread
// takes the first range). Work items here are whole planes or long runs, so a spawn per call is cheap.
template <typename F>
void ParallelFor(int64_t n, int64_t min_per_thread, F fn) {
  int64_t threads = std::min<int64_t>(NumThreads(), std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_thread)));
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  int64_t chunk = (n + threads - 1) / threads;
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) {
    int64_t begin = t * chunk, end = std::min(n, begin + chunk);
    if (begin < end) pool.emplace_back(fn, begin, end);
  }
  fn(int64_t{0}, std::min(n, chunk));
  for (auto &thread : pool) thread.join();
}

// Scratch memory kept between calls. A fresh multi-megabyte buffer is fresh pages (glibc maps large blocks
// anew, and spawned threads allocate from their own arenas), and their faults cost ~2 us a page on these
// VMs: a 9.4 MB Winograd weight-gradient buffer took 8-10 ms to allocate and zero, more than its 4x4 GEMMs.
// Blocks go back to the pool when a Scratch ends and are handed out again (the smallest that fits); the pool
// holds at most what the largest set of buffers in use at once needed.
class Scratch {
 public:
  explicit Scratch(size_t floats) : size_(std::max<size_t>(floats, 1)) {
    std::lock_guard<std::mutex> lock(Mutex());
    auto &free = Free();
    auto best = free.end();
    for (auto it = free.begin(); it != free.end(); ++it)
      if (it->first >= size_ && (best == free.end() || it->first < best->first)) best = it;
    if (best != free.end()) {
      size_ = best->first;
      data_ = best->second;
      free.erase(best);
    }
    if (!data_) data_ = static_cast<float *>(std::aligned_alloc(64, (size_ * sizeof(float) + 63) / 64 * 64));
  }
  ~Scratch() {
    std::lock_guard<std::mutex> lock(Mutex());
    Free().emplace_back(size_, data_);
  }
  Scratch(const Scratch &) = delete;
  Scratch &operator=(const Scratch &) = delete;
  float *get() const { return data_; }
  float *zeroed(size_t floats) const { return static_cast<float *>(std::memset(data_, 0, floats * sizeof(float))); }

 private:
  static std::mutex &Mutex() {
    static std::mutex mutex;
    return mutex;
  }
  static std::vector<std::pair<size_t, float *>> &Free() {
    static std::vector<std::pair<size_t, float *>> free;
    return free;
  }
  size_t size_;
  float *data_ = nullptr;
};

// erf as a rational function on [-4, 4] (beyond it erf is +-1 in float32); max error ~1e-7, the
// coefficients of Eigen's / XLA's float erf. Branch-free so the loops vectorise.
inline float Erf(float a) {
  float x = a < -4.f ? -4.f : (a > 4.f ? 4.f : a);
  float x2 = x * x;
  float p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = x2 * p + -2.10102402082508e-06f;
  p = x2 * p + -5.69250639462346e-05f;
  p = x2 * p + -7.34990630326855e-04f;
  p = x2 * p + -2.95459980854025e-03f;
  p = x2 * p + -1.60960333262415e-02f;
  p = x * p;
  float q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
  q = x2 * q + -1.68282697438203e-03f;
  q = x2 * q + -7.37332916720468e-03f;
  q = x2 * q + -1.42647390514189e-02f;
  return p / q;
}

// 2^f for f in [-0.5, 0.5]: the degree-6 polynomial both exponentials below share.
inline float Exp2Fraction(float f) {
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  return p * f + 1.0f;
}

// exp(x) for x in [-16, 0] (here x = -z*z with |z| <= 4, where the GELU derivative needs it; below,
// z * exp(-z*z) < 5e-7): 2^-m * 2^f with a degree-6 polynomial for 2^f, f in [-0.5, 0.5], and 2^-m
// (m = 0..24) from the bits of m by selects, so the loops around it vectorise. Relative error ~2e-7.
inline float ExpNegativeSmall(float x) {
  x = x < -16.f ? -16.f : x;
  float t = x * 1.44269504088896341f;
  float n = std::floor(t + 0.5f);
  float f = t - n;
  float p = Exp2Fraction(f);
  int m = static_cast<int>(-n);
  p *= (m & 1) ? 0.5f : 1.f;
  p *= (m & 2) ? 0.25f : 1.f;
  p *= (m & 4) ? 0.0625f : 1.f;
  p *= (m & 8) ? 0.00390625f : 1.f;
  p *= (m & 16) ? 1.52587890625e-05f : 1.f;
  return p;
}

// exp(x) for x <= 0 (x below -87 gives ~0): the polynomial of ExpNegativeSmall for 2^f and 2^n built
// from its exponent bits, so a loop of it vectorises without intrinsics. Relative error ~2e-7.
inline float ExpNonPositive(float x) {
  x = x < -87.f ? -87.f : x;
  float t = x * 1.44269504088896341f;
  float n = std::floor(t + 0.5f);
  float f = t - n;
  float p = Exp2Fraction(f);
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#if defined(__AVX512F__)
}  // namespace
#include <immintrin.h>
namespace {

inline __m512 ErfV(__m512 a) {
  __m512 x = _mm512_min_ps(_mm512_set1_ps(4.f), _mm512_max_ps(_mm512_set1_ps(-4.f), a));
  __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = _mm512_fmadd_ps(x2, _mm512_set1_ps(-2.72614225801306e-10f), _mm512_set1_ps(2.77068142495902e-08f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-2.10102402082508e-06f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-5.69250639462346e-05f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-7.34990630326855e-04f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-2.95459980854025e-03f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-1.60960333262415e-02f));
  p = _mm512_mul_ps(x, p);
  __m512 q = _mm512_fmadd_ps(x2, _mm512_set1_ps(-1.45660718464996e-05f), _mm512_set1_ps(-2.13374055278905e-04f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-1.68282697438203e-03f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-7.37332916720468e-03f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-1.42647390514189e-02f));
  return _mm512_div_ps(p, q);
}

// exp(x) for x in [-87, 0]: 2^n * 2^f, the same polynomial as ExpNegativeSmall, 2^n by scalef
inline __m512 ExpV(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// z (erf(z) + 1) and its derivative erf(z) + 1 + z 2/sqrt(pi) exp(-z^2): sqrt2 * GELU with the 1/sqrt2
// folded into the convs around it (see mindcv_poolformer.models.layers.ConvMlp)
inline __m512 GeluV(__m512 z) { return _mm512_mul_ps(z, _mm512_add_ps(ErfV(z), _mm512_set1_ps(1.f))); }

inline __m512 GeluGradV(__m512 z) {
  __m512 e = ExpV(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), z));
  return _mm512_add_ps(_mm512_add_ps(ErfV(z), _mm512_set1_ps(1.f)),
                       _mm512_mul_ps(_mm512_mul_ps(z, _mm512_set1_ps(1.12837916709551257f)), e));
}
#endif

// dst = grad * d/dz [z (erf(z) + 1)] with z = src + bias; returns the sum of dst (the bias gradient).
// With ``stream`` dst goes out with streaming stores where it is 64-byte aligned: for a map larger
// than the last-level cache, reading its old contents first (write-allocate) is wasted traffic.
double GeluGradRow(const float *src, float bias, const float *grad, float *dst, int64_t size, bool stream) {
  const float two_over_sqrt_pi = 1.12837916709551257f;
  int64_t i = 0;
  double total = 0;
#if defined(__AVX512F__)
  const __m512 vb = _mm512_set1_ps(bias);
  __m512 sum = _mm512_setzero_ps();
  const bool aligned = stream && reinterpret_cast<uintptr_t>(dst) % 64 == 0;
  for (; i + 16 <= size; i += 16) {
    __m512 out = _mm512_mul_ps(_mm512_loadu_ps(grad + i), GeluGradV(_mm512_add_ps(_mm512_loadu_ps(src + i), vb)));
    sum = _mm512_add_ps(sum, out);
    if (aligned)
      _mm512_stream_ps(dst + i, out);
    else
      _mm512_storeu_ps(dst + i, out);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; i < size; ++i) {
    float z = src[i] + bias;
    dst[i] = grad[i] * (Erf(z) + 1.f + z * two_over_sqrt_pi * ExpNegativeSmall(z < -4.f || z > 4.f ? -16.f : -z * z));
    total += dst[i];
  }
  return total;
}

// Geometry of an NCHW map and of a k x k window (stride 1, zero padding k/2, count_include_pad=False).
struct Planes {
  int64_t batch, channels, height, width, plane, sample;
  Planes(const int64_t *shape) : batch(shape[0]), channels(shape[1]), height(shape[2]), width(shape[3]) {
    plane = height * width;
    sample = channels * plane;
  }
};

// The k x k window sum over a plane, computed on the flattened plane so every loop runs over
// H*W contiguous values (vectorises as well on a 7x7 plane as on 56x56): horizontal neighbours
// with 0/1 masks that drop pixels from the next or previous row, vertical neighbours as shifts
// by whole rows. ``masks`` holds 2*radius planes (BoxMasks).
struct BoxMasks {
  int64_t height, width, radius;
  std::vector<float> data;  // [d-1][0]: right neighbour at distance d is in the row; [d-1][1]: left
  BoxMasks(int64_t h, int64_t w, int64_t r) : height(h), width(w), radius(r), data(2 * r * h * w) {
    const int64_t plane = h * w;
    for (int64_t d = 1; d <= r; ++d)
      for (int64_t i = 0; i < plane; ++i) {
        data[(2 * (d - 1)) * plane + i] = (i % w) + d < w ? 1.f : 0.f;
        data[(2 * (d - 1) + 1) * plane + i] = (i % w) - d >= 0 ? 1.f : 0.f;
      }
  }
};

void BoxSum(const float *__restrict in, float *__restrict out, float *__restrict tmp, const BoxMasks &m) {
  const int64_t plane = m.height * m.width, w = m.width;
  for (int64_t i = 0; i < plane; ++i) tmp[i] = in[i];
  for (int64_t d = 1; d <= m.radius; ++d) {
    const float *right = m.data.data() + (2 * (d - 1)) * plane;
    const float *left = right + plane;
    for (int64_t i = 0; i + d < plane; ++i) tmp[i] += right[i] * in[i + d];
    for (int64_t i = d; i < plane; ++i) tmp[i] += left[i] * in[i - d];
  }
  for (int64_t i = 0; i < plane; ++i) out[i] = tmp[i];
  for (int64_t d = 1; d <= m.radius && d < m.height; ++d) {
    const int64_t shift = d * w;
    for (int64_t i = 0; i + shift < plane; ++i) out[i] += tmp[i + shift];
    for (int64_t i = shift; i < plane; ++i) out[i] += tmp[i - shift];
  }
}

// 1 / (number of valid pixels in the window) at every position.
std::vector<float> ReciprocalCounts(int64_t height, int64_t width, int64_t radius) {
  std::vector<float> rc(height * width);
  for (int64_t h = 0; h < height; ++h) {
    int64_t ch = std::min<int64_t>(height - 1, h + radius) - std::max<int64_t>(0, h - radius) + 1;
    for (int64_t w = 0; w < width; ++w) {
      int64_t cw = std::min<int64_t>(width - 1, w + radius) - std::max<int64_t>(0, w - radius) + 1;
      rc[h * width + w] = 1.f / static_cast<float>(ch * cw);
    }
  }
  return rc;
}

// Per-sample mean and 1/sqrt(var + eps) over (C, H, W); plane sums run in parallel.
void SampleStats(const float *x, const Planes &g, float eps, float *mean, float *rstd) {
  int64_t planes = g.batch * g.channels;
  std::vector<double> sum(planes), sumsq(planes);
  ParallelFor(planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float *src = x + p * g.plane;
      double s = 0, q = 0;
      float fs = 0, fq = 0;
      int64_t i = 0;
      // float partials over short runs (vectorised), folded into double every 1024 values
      for (; i < g.plane; i += 1024) {
        int64_t stop = std::min<int64_t>(g.plane, i + 1024);
        fs = 0;
        fq = 0;
        for (int64_t j = i; j < stop; ++j) {
          fs += src[j];
          fq += src[j] * src[j];
        }
        s += fs;
        q += fq;
      }
      sum[p] = s;
      sumsq[p] = q;
    }
  });
  for (int64_t b = 0; b < g.batch; ++b) {
    double s = 0, q = 0;
    for (int64_t c = 0; c < g.channels; ++c) {
      s += sum[b * g.channels + c];
      q += sumsq[b * g.channels + c];
    }
    double m = s / g.sample;
    double var = std::max(0.0, q / g.sample - m * m);
    mean[b] = static_cast<float>(m);
    rstd[b] = static_cast<float>(1.0 / std::sqrt(var + eps));
  }
}

constexpr float kEps = 1e-5f;

// out[c] = sum over images b of plane_sums[b * C + c]: a per-channel gradient from per-plane partials
void SumOverBatch(const std::vector<double> &plane_sums, const Planes &g, float *out) {
  for (int64_t c = 0; c < g.channels; ++c) {
    double s = 0;
    for (int64_t b = 0; b < g.batch; ++b) s += plane_sums[b * g.channels + c];
    out[c] = static_cast<float>(s);
  }
}

// Every tensor must be float32 (the int32 pool size excepted): a float16 tensor (AMP) read as
// float32 would be garbage, so refuse it and let MindSpore raise.
bool AllFloat32(int nparam, const char **dtypes, int skip = -1) {
  for (int i = 0; i < nparam; ++i) {
    if (i != skip && std::strcmp(dtypes[i], "float32") != 0 && std::strcmp(dtypes[i], "float") != 0) return false;
  }
  return true;
}

}  // namespace

extern "C" {

// The MLP's weight folds in one op each way (they were ~16 small MindSpore ops per block, ~0.2 ms
// each on the CPU): with s = 1/sqrt2,
//   W1f[k][c] = s W1[k][c] g[c],  b1f[k] = s (b1[k] + sum_c W1[k][c] beta[c])   (norm2's affine, GELU's 1/sqrt2)
//   W2f[c][k] = s ls[c] W2[c][k], b2f[c] = ls[c] b2[c]                         (LayerScale, GELU's sqrt2 back)
// inputs: W1 (K,C), b1 (K), g (C), beta (C), W2 (C,K), b2 (C), ls (C); outputs: W1f, b1f, W2f, b2f
constexpr float kInvSqrt2 = 0.70710678118654752f;

int FoldMlp(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, -1) || ndims[0] != 2 || ndims[4] != 2) return 1;
  const int64_t k_rows = shapes[0][0], c_cols = shapes[0][1];
  if (shapes[4][0] != c_cols || shapes[4][1] != k_rows) return 1;
  const float *w1 = static_cast<const float *>(params[0]), *b1 = static_cast<const float *>(params[1]);
  const float *gamma = static_cast<const float *>(params[2]), *beta = static_cast<const float *>(params[3]);
  const float *w2 = static_cast<const float *>(params[4]), *b2 = static_cast<const float *>(params[5]);
  const float *ls = static_cast<const float *>(params[6]);
  float *w1f = static_cast<float *>(params[7]), *b1f = static_cast<float *>(params[8]);
  float *w2f = static_cast<float *>(params[9]), *b2f = static_cast<float *>(params[10]);
  for (int64_t k = 0; k < k_rows; ++k) {
    const float *row = w1 + k * c_cols;
    float shift = 0;
    for (int64_t c = 0; c < c_cols; ++c) {
      w1f[k * c_cols + c] = kInvSqrt2 * row[c] * gamma[c];
      shift += row[c] * beta[c];
    }
    b1f[k] = kInvSqrt2 * (b1[k] + shift);
  }
  for (int64_t c = 0; c < c_cols; ++c) {
    const float scale = kInvSqrt2 * ls[c];
    for (int64_t k = 0; k < k_rows; ++k) w2f[c * k_rows + k] = scale * w2[c * k_rows + k];
    b2f[c] = ls[c] * b2[c];
  }
  return 0;
}

// inputs: W1, g, beta, W2, b2, ls, dW1f, db1f, dW2f, db2f; outputs: dW1, db1, dg, dbeta, dW2, db2, dls
// (FoldMlp's inputs in order)
int FoldMlpGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, -1) || ndims[0] != 2 || ndims[3] != 2) return 1;
  const int64_t k_rows = shapes[0][0], c_cols = shapes[0][1];
  const float *w1 = static_cast<const float *>(params[0]), *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]), *w2 = static_cast<const float *>(params[3]);
  const float *b2 = static_cast<const float *>(params[4]), *ls = static_cast<const float *>(params[5]);
  const float *dw1f = static_cast<const float *>(params[6]), *db1f = static_cast<const float *>(params[7]);
  const float *dw2f = static_cast<const float *>(params[8]), *db2f = static_cast<const float *>(params[9]);
  float *dw1 = static_cast<float *>(params[10]), *db1 = static_cast<float *>(params[11]);
  float *dgamma = static_cast<float *>(params[12]), *dbeta = static_cast<float *>(params[13]);
  float *dw2 = static_cast<float *>(params[14]), *db2 = static_cast<float *>(params[15]);
  float *dls = static_cast<float *>(params[16]);
  std::vector<double> sum_gamma(c_cols, 0.0), sum_beta(c_cols, 0.0);
  for (int64_t k = 0; k < k_rows; ++k) {
    const float *row = w1 + k * c_cols, *grad = dw1f + k * c_cols;
    const float bias_grad = kInvSqrt2 * db1f[k];
    for (int64_t c = 0; c < c_cols; ++c) {
      dw1[k * c_cols + c] = kInvSqrt2 * grad[c] * gamma[c] + bias_grad * beta[c];
      sum_gamma[c] += grad[c] * row[c];
      sum_beta[c] += db1f[k] * row[c];
    }
    db1[k] = bias_grad;
  }
  for (int64_t c = 0; c < c_cols; ++c) {
    dgamma[c] = static_cast<float>(kInvSqrt2 * sum_gamma[c]);
    dbeta[c] = static_cast<float>(kInvSqrt2 * sum_beta[c]);
    double scale_grad = 0;
    for (int64_t k = 0; k < k_rows; ++k) {
      dw2[c * k_rows + k] = kInvSqrt2 * ls[c] * dw2f[c * k_rows + k];
      scale_grad += dw2f[c * k_rows + k] * w2[c * k_rows + k];
    }
    dls[c] = static_cast<float>(kInvSqrt2 * scale_grad + db2f[c] * b2[c]);
    db2[c] = ls[c] * db2f[c];
  }
  return 0;
}

// inputs: any number of float32/float16 tensors (the gradients); outputs: one bool, true when every
// element is finite. One kernel instead of an IsFinite + ReduceAll pair per gradient tensor
// (~250 small ops per S12 training step). An element is not finite when its exponent bits are all set.
int AllFinite(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  bool *out = static_cast<bool *>(params[nparam - 1]);
  bool finite = true;
  for (int t = 0; t < nparam - 1 && finite; ++t) {
    int64_t n = 1;
    for (int d = 0; d < ndims[t]; ++d) n *= shapes[t][d];
    const bool half = std::strcmp(dtypes[t], "float16") == 0;
    if (!half && std::strcmp(dtypes[t], "float32") != 0 && std::strcmp(dtypes[t], "float") != 0) return 1;
    std::atomic<bool> bad{false};
    ParallelFor(n, 1 << 18, [&](int64_t begin, int64_t end) {
      int found = 0;
      if (half) {
        const uint16_t *v = static_cast<const uint16_t *>(params[t]);
        for (int64_t i = begin; i < end; ++i) found |= (v[i] & 0x7c00u) == 0x7c00u;
      } else {
        const uint32_t *v = static_cast<const uint32_t *>(params[t]);
        for (int64_t i = begin; i < end; ++i) found |= (v[i] & 0x7f800000u) == 0x7f800000u;
      }
      if (found) bad.store(true, std::memory_order_relaxed);
    });
    finite = !bad.load();
  }
  *out = finite;
  return 0;
}

// inputs: x (B,C,H,W), scale (C), drop (B), pool_size (1, int32); outputs: y, mean (B), rstd (B)
int PoolMixer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, 3)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *scale = static_cast<const float *>(params[1]);
  const float *drop = static_cast<const float *>(params[2]);
  const int64_t radius = static_cast<const int32_t *>(params[3])[0] / 2;
  float *y = static_cast<float *>(params[4]);
  float *mean = static_cast<float *>(params[5]);
  float *rstd = static_cast<float *>(params[6]);
  if (ndims[0] != 4) return 1;
  Planes g(shapes[0]);
  SampleStats(x, g, kEps, mean, rstd);
  std::vector<float> rc = ReciprocalCounts(g.height, g.width, radius);
  const BoxMasks masks(g.height, g.width, radius);
  ParallelFor(g.batch * g.channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> pooled(g.plane), tmp(g.plane);
    for (int64_t p = begin; p < end; ++p) {
      int64_t b = p / g.channels, c = p % g.channels;
      const float k = drop[b] * scale[c] * rstd[b];
      const float *src = x + p * g.plane;
      float *dst = y + p * g.plane;
      BoxSum(src, pooled.data(), tmp.data(), masks);
      for (int64_t i = 0; i < g.plane; ++i) dst[i] = src[i] + k * (pooled[i] * rc[i] - src[i]);
    }
  });
  return 0;
}

// inputs: x, scale, drop, pool_size, mean, rstd, dy; outputs: dx (B,C,H,W), dscale (C)
int PoolMixerGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, 3)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *scale = static_cast<const float *>(params[1]);
  const float *drop = static_cast<const float *>(params[2]);
  const int64_t radius = static_cast<const int32_t *>(params[3])[0] / 2;
  const float *mean = static_cast<const float *>(params[4]);
  const float *rstd = static_cast<const float *>(params[5]);
  const float *dy = static_cast<const float *>(params[6]);
  float *dx = static_cast<float *>(params[7]);
  float *dscale = static_cast<float *>(params[8]);
  if (ndims[0] != 4) return 1;
  Planes g(shapes[0]);
  const int64_t planes = g.batch * g.channels;
  std::vector<float> rc = ReciprocalCounts(g.height, g.width, radius);
  const BoxMasks masks(g.height, g.width, radius);
  // pass 1: A[b,c] = sum(dy * (pool(x) - x)), the gradient of the plane's scalar factor
  std::vector<double> a(planes);
  ParallelFor(planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> pooled(g.plane), tmp(g.plane);
    for (int64_t p = begin; p < end; ++p) {
      const float *src = x + p * g.plane;
      const float *grad = dy + p * g.plane;
      BoxSum(src, pooled.data(), tmp.data(), masks);
      double total = 0;
      for (int64_t i = 0; i < g.plane; i += 1024) {
        int64_t stop = std::min<int64_t>(g.plane, i + 1024);
        float part = 0;
        for (int64_t j = i; j < stop; ++j) part += grad[j] * (pooled[j] * rc[j] - src[j]);
        total += part;
      }
      a[p] = total;
    }
  });
  // d rstd_b / d x = -rstd_b^3 (x - mean_b) / N
  std::vector<float> coef(g.batch);
  for (int64_t c = 0; c < g.channels; ++c) {
    double s = 0;
    for (int64_t b = 0; b < g.batch; ++b) s += drop[b] * rstd[b] * a[b * g.channels + c];
    dscale[c] = static_cast<float>(s);
  }
  for (int64_t b = 0; b < g.batch; ++b) {
    double dr = 0;
    for (int64_t c = 0; c < g.channels; ++c) dr += drop[b] * scale[c] * a[b * g.channels + c];
    double r = rstd[b];
    coef[b] = static_cast<float>(-dr * r * r * r / g.sample);
  }
  // pass 2: dx = dy + k * (pool^T(dy) - dy) + coef_b * (x - mean_b), pool^T(t) = boxsum(t / count)
  ParallelFor(planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weighted(g.plane), pooled(g.plane), tmp(g.plane);
    for (int64_t p = begin; p < end; ++p) {
      int64_t b = p / g.channels, c = p % g.channels;
      const float k = drop[b] * scale[c] * rstd[b];
      const float cb = coef[b], mb = mean[b];
      const float *src = x + p * g.plane;
      const float *grad = dy + p * g.plane;
      float *out = dx + p * g.plane;
      for (int64_t i = 0; i < g.plane; ++i) weighted[i] = grad[i] * rc[i];
      BoxSum(weighted.data(), pooled.data(), tmp.data(), masks);
      for (int64_t i = 0; i < g.plane; ++i) out[i] = grad[i] + k * (pooled[i] - grad[i]) + cb * (src[i] - mb);
    }
  });
  return 0;
}

// inputs: x (B,C,H,W); outputs: n, mean (B), rstd (B)
int Normalize(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, -1)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *n = static_cast<float *>(params[1]);
  float *mean = static_cast<float *>(params[2]);
  float *rstd = static_cast<float *>(params[3]);
  if (ndims[0] != 4) return 1;
  Planes g(shapes[0]);
  SampleStats(x, g, kEps, mean, rstd);
  ParallelFor(g.batch * g.sample, 1 << 14, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      int64_t b = i / g.sample;
      int64_t stop = std::min(end, (b + 1) * g.sample);
      const float m = mean[b], r = rstd[b];
      for (int64_t j = i; j < stop; ++j) n[j] = (x[j] - m) * r;
      i = stop;
    }
  });
  return 0;
}

// inputs: n (B,C,H,W), rstd (B), dn; outputs: dx = rstd * (dn - mean(dn) - n * mean(dn * n))
int NormalizeGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, -1)) return 1;
  const float *n = static_cast<const float *>(params[0]);
  const float *rstd = static_cast<const float *>(params[1]);
  const float *dn = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  if (ndims[0] != 4) return 1;
  Planes g(shapes[0]);
  const int64_t planes = g.batch * g.channels;
  std::vector<double> s1(planes), s2(planes);
  ParallelFor(planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float *v = n + p * g.plane;
      const float *d = dn + p * g.plane;
      double a = 0, b = 0;
      for (int64_t i = 0; i < g.plane; i += 1024) {
        int64_t stop = std::min<int64_t>(g.plane, i + 1024);
        float fa = 0, fb = 0;
        for (int64_t j = i; j < stop; ++j) {
          fa += d[j];
          fb += d[j] * v[j];
        }
        a += fa;
        b += fb;
      }
      s1[p] = a;
      s2[p] = b;
    }
  });
  std::vector<float> m1(g.batch), m2(g.batch);
  for (int64_t b = 0; b < g.batch; ++b) {
    double a = 0, c2 = 0;
    for (int64_t c = 0; c < g.channels; ++c) {
      a += s1[b * g.channels + c];
      c2 += s2[b * g.channels + c];
    }
    m1[b] = static_cast<float>(a / g.sample);
    m2[b] = static_cast<float>(c2 / g.sample);
  }
  ParallelFor(g.batch * g.sample, 1 << 14, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      int64_t b = i / g.sample;
      int64_t stop = std::min(end, (b + 1) * g.sample);
      const float r = rstd[b], a = m1[b], c2 = m2[b];
      for (int64_t j = i; j < stop; ++j) dx[j] = r * (dn[j] - a - n[j] * c2);
      i = stop;
    }
  });
  return 0;
}

// inputs: acc (B,K,H,W), bias (K); outputs: h = z * (erf(z) + 1), z = acc + bias
int GeluBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, -1)) return 1;
  const float *acc = static_cast<const float *>(params[0]);
  const float *bias = static_cast<const float *>(params[1]);
  float *h = static_cast<float *>(params[2]);
  if (ndims[0] != 4) return 1;
  Planes g(shapes[0]);
  ParallelFor(g.batch * g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float b = bias[p % g.channels];
      const float *src = acc + p * g.plane;
      float *dst = h + p * g.plane;
      for (int64_t i = 0; i < g.plane; ++i) {
        float z = src[i] + b;
        dst[i] = z * (Erf(z) + 1.f);
      }
    }
  });
  return 0;
}

// inputs: acc, bias, dh; outputs: dacc = dh * (erf(z) + 1 + z * 2/sqrt(pi) * exp(-z^2)), dbias (K)
int GeluBiasGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, -1)) return 1;
  const float *acc = static_cast<const float *>(params[0]);
  const float *bias = static_cast<const float *>(params[1]);
  const float *dh = static_cast<const float *>(params[2]);
  float *dacc = static_cast<float *>(params[3]);
  float *dbias = static_cast<float *>(params[4]);
  if (ndims[0] != 4) return 1;
  Planes g(shapes[0]);
  const int64_t planes = g.batch * g.channels;
  std::vector<double> sums(planes);
  const bool stream = planes * g.plane * sizeof(float) > (int64_t{64} << 20);
  ParallelFor(planes, 1, [&](int64_t begin, int64_t end) {
    const int64_t size = g.plane;
    for (int64_t p = begin; p < end; ++p) {
      const float b = bias[p % g.channels];
      const float *__restrict src = acc + p * size;
      const float *__restrict grad = dh + p * size;
      float *__restrict dst = dacc + p * size;
      sums[p] = GeluGradRow(src, b, grad, dst, size, stream);
    }
#if defined(__AVX512F__)
    _mm_sfence();  // order the streaming stores before the caller's join
#endif
  });
  SumOverBatch(sums, g, dbias);
  return 0;
}

// inputs: y (B,C,H,W), acc (B,C,H,W), bias (C), drop (B); outputs: out = y + drop_b * (acc + bias_c)
int ResidualBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, -1)) return 1;
  const float *y = static_cast<const float *>(params[0]);
  const float *acc = static_cast<const float *>(params[1]);
  const float *bias = static_cast<const float *>(params[2]);
  const float *drop = static_cast<const float *>(params[3]);
  float *out = static_cast<float *>(params[4]);
  if (ndims[0] != 4) return 1;
  Planes g(shapes[0]);
  ParallelFor(g.batch * g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float d = drop[p / g.channels], b = bias[p % g.channels];
      const int64_t offset = p * g.plane;
      for (int64_t i = 0; i < g.plane; ++i) out[offset + i] = y[offset + i] + d * (acc[offset + i] + b);
    }
  });
  return 0;
}

// inputs: drop (B), dout (B,C,H,W); outputs: dacc = drop_b * dout, dbias (C) = sum of dacc
int ResidualBiasGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, -1)) return 1;
  const float *drop = static_cast<const float *>(params[0]);
  const float *dout = static_cast<const float *>(params[1]);
  float *dacc = static_cast<float *>(params[2]);
  float *dbias = static_cast<float *>(params[3]);
  if (ndims[1] != 4) return 1;
  Planes g(shapes[1]);
  const int64_t planes = g.batch * g.channels;
  std::vector<double> sums(planes);
  ParallelFor(planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float d = drop[p / g.channels];
      const float *src = dout + p * g.plane;
      float *dst = dacc + p * g.plane;
      double total = 0;
      for (int64_t i = 0; i < g.plane; i += 1024) {
        int64_t stop = std::min<int64_t>(g.plane, i + 1024);
        float part = 0;
        for (int64_t j = i; j < stop; ++j) {
          dst[j] = d * src[j];
          part += dst[j];
        }
        total += part;
      }
      sums[p] = total;
    }
  });
  SumOverBatch(sums, g, dbias);
  return 0;
}

// mmseg's decode-head loss in one pass each way: the logits resized bilinearly to the label size
// (align_corners=False), log_softmax over the classes and the label's negative log-likelihood, without
// the label-size class maps ever being written. Through MindSpore's ops an FPN-S12 step at 512x512,
// batch 8, writes five of them (the resize, the log_softmax, their gradients: 1.26 GB each) and its CPU
// ResizeBilinearGrad is one of the slowest kernels of the step (bench/op_profile.py). Each task takes
// one label row: the two logit rows it reads are blended once for all classes, then 64 pixels at a time
// are interpolated across, for every class, into a small buffer the softmax reads back.
//   ResizedPixelNll:     z = resize(logits), lse = log sum_c exp z_c, sums[b] = sum over b's labelled
//                        pixels of lse - z_label (ignore_index pixels count nothing)
//   ResizedPixelNllGrad: dlogits = resize^T(dsums[b] (softmax(z) - onehot(label))) on labelled pixels
// The gradient scatters into two logit rows per label row; label rows are taken in bands of 4 source
// rows, the even bands and then the odd ones, so no two threads ever add to the same row.
}  // extern "C"

namespace {

constexpr int64_t kPixelRun = 64, kBandRows = 4;

// A bilinear resize's source samples along one axis, align_corners=False: src = (dst + 0.5) in / out - 0.5,
// clamped below at 0, i1 = min(i0 + 1, in - 1), weight src - i0 on i1 (PyTorch's rule, in float as its
// CPU kernel computes it; MindSpore's half-pixel ResizeBilinearV2 gives the same values).
struct ResizeTaps {
  std::vector<int64_t> i0, i1;
  std::vector<float> w1;
  ResizeTaps(int64_t in, int64_t out) : i0(out), i1(out), w1(out) {
    const float scale = static_cast<float>(in) / static_cast<float>(out);
    for (int64_t d = 0; d < out; ++d) {
      const float src = std::max((static_cast<float>(d) + 0.5f) * scale - 0.5f, 0.f);
      i0[d] = std::min<int64_t>(static_cast<int64_t>(src), in - 1);
      i1[d] = std::min<int64_t>(i0[d] + 1, in - 1);
      w1[d] = src - static_cast<float>(i0[d]);
    }
  }
};

struct PixelNll {
  const float *logits = nullptr;  // (batch, classes, height, width)
  const int32_t *labels = nullptr;  // (batch, out_height, out_width)
  int32_t ignore = 255;
  int64_t batch = 0, classes = 0, height = 0, width = 0, out_height = 0, out_width = 0;
  ResizeTaps rows, cols;
  PixelNll(int64_t **shapes, void **params)
      : logits(static_cast<const float *>(params[0])), labels(static_cast<const int32_t *>(params[1])),
        ignore(*static_cast<const int32_t *>(params[2])), batch(shapes[0][0]), classes(shapes[0][1]),
        height(shapes[0][2]), width(shapes[0][3]), out_height(shapes[1][1]), out_width(shapes[1][2]),
        rows(height, out_height), cols(width, out_width) {}

  // blend[c][j] = the logits of image b interpolated to label row y, at source column j
  void BlendRows(int64_t b, int64_t y, float *blend) const {
    const float w1 = rows.w1[y], w0 = 1.f - w1;
    for (int64_t c = 0; c < classes; ++c) {
      const float *plane = logits + (b * classes + c) * height * width;
      const float *r0 = plane + rows.i0[y] * width, *r1 = plane + rows.i1[y] * width;
      float *dst = blend + c * width;
      for (int64_t j = 0; j < width; ++j) dst[j] = w0 * r0[j] + w1 * r1[j];
    }
  }

  // z[c][k] = the resized logit of class c at label pixel (y, x0 + k), k < n
  void Interpolate(const float *blend, int64_t x0, int64_t n, float *z) const {
    const int64_t *j0 = cols.i0.data() + x0, *j1 = cols.i1.data() + x0;
    const float *w1 = cols.w1.data() + x0;
    for (int64_t c = 0; c < classes; ++c) {
      const float *src = blend + c * width;
      float *dst = z + c * kPixelRun;
      for (int64_t k = 0; k < n; ++k) dst[k] = (1.f - w1[k]) * src[j0[k]] + w1[k] * src[j1[k]];
    }
  }

  // lse[k] = log sum_c exp(z - m) + m over the classes of Interpolate's z, m[k] their max (the forward only:
  // the gradient reads the forward's lse)
  void LogSumExp(const float *z, int64_t n, float *m, float *lse) const {
    for (int64_t k = 0; k < n; ++k) m[k] = z[k], lse[k] = 0.f;
    for (int64_t c = 1; c < classes; ++c)
      for (int64_t k = 0; k < n; ++k) m[k] = std::max(m[k], z[c * kPixelRun + k]);
    for (int64_t c = 0; c < classes; ++c)
      for (int64_t k = 0; k < n; ++k) lse[k] += ExpNonPositive(z[c * kPixelRun + k] - m[k]);
    for (int64_t k = 0; k < n; ++k) lse[k] = m[k] + std::log(lse[k]);
  }

  bool BadLabel(int32_t label) const { return label != ignore && (label < 0 || label >= classes); }
};

// The NLL kernels' leading operands: logits (B,C,h,w) float32, labels (B,H,W) int32, ignore_index int32
bool IsPixelNll(int nparam, int expected, const int *ndims, int64_t **shapes, const char **dtypes) {
  return nparam == expected && !std::strcmp(dtypes[0], "float32") && !std::strcmp(dtypes[1], "int32") &&
         !std::strcmp(dtypes[2], "int32") && ndims[0] == 4 && ndims[1] == 3 && shapes[1][0] == shapes[0][0];
}

}  // namespace

extern "C" {

// inputs: logits (B,C,h,w) float32, labels (B,H,W) int32, ignore_index (1) int32;
// outputs: sums (B) the NLL summed over each image's labelled pixels, lse (B,H,W) (for the gradient).
// Fails (MindSpore raises) on a label outside [0, C) other than ignore_index.
int ResizedPixelNll(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!IsPixelNll(nparam, 5, ndims, shapes, dtypes)) return 1;
  const PixelNll g(shapes, params);
  float *sums = static_cast<float *>(params[3]), *lse_out = static_cast<float *>(params[4]);
  std::vector<double> row_sums(g.batch * g.out_height, 0.0);
  std::atomic<bool> bad{false};
  ParallelFor(g.batch * g.out_height, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> blend(g.classes * g.width), z(g.classes * kPixelRun);
    float m[kPixelRun], lse[kPixelRun];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.out_height, y = task % g.out_height;
      g.BlendRows(b, y, blend.data());
      const int32_t *labels = g.labels + task * g.out_width;
      double total = 0.0;
      for (int64_t x0 = 0; x0 < g.out_width; x0 += kPixelRun) {
        const int64_t n = std::min(kPixelRun, g.out_width - x0);
        g.Interpolate(blend.data(), x0, n, z.data());
        g.LogSumExp(z.data(), n, m, lse);
        for (int64_t k = 0; k < n; ++k) {
          const int32_t label = labels[x0 + k];
          if (g.BadLabel(label)) bad = true;
          else if (label != g.ignore) total += lse[k] - z[label * kPixelRun + k];
        }
        std::copy(lse, lse + n, lse_out + task * g.out_width + x0);
      }
      row_sums[task] = total;
    }
  });
  for (int64_t b = 0; b < g.batch; ++b) {  // in row order: the same sum for any thread count
    double total = 0.0;
    for (int64_t y = 0; y < g.out_height; ++y) total += row_sums[b * g.out_height + y];
    sums[b] = static_cast<float>(total);
  }
  return bad ? 1 : 0;
}

// inputs: logits (B,C,h,w), labels (B,H,W) int32, ignore_index (1) int32, lse (B,H,W) the forward's,
// dsums (B); outputs: dlogits (B,C,h,w)
int ResizedPixelNllGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                        void *) {
  if (!IsPixelNll(nparam, 6, ndims, shapes, dtypes)) return 1;
  const PixelNll g(shapes, params);
  const float *lse_in = static_cast<const float *>(params[3]), *dsums = static_cast<const float *>(params[4]);
  float *dlogits = static_cast<float *>(params[5]);
  const int64_t plane = g.classes * g.height * g.width;
  ParallelFor(g.batch, 1, [&](int64_t begin, int64_t end) {
    std::fill(dlogits + begin * plane, dlogits + end * plane, 0.f);
  });
  // label rows [first[band], first[band + 1]) read source rows from band * kBandRows on (i0 is non-decreasing)
  const int64_t bands = (g.height + kBandRows - 1) / kBandRows;
  std::vector<int64_t> first(bands + 1, g.out_height);
  for (int64_t y = g.out_height - 1; y >= 0; --y) first[g.rows.i0[y] / kBandRows] = y;
  for (int64_t band = bands - 1; band >= 0; --band) first[band] = std::min(first[band], first[band + 1]);
  for (int parity = 0; parity < 2; ++parity) {
    const int64_t per_image = (bands - parity + 1) / 2;
    ParallelFor(g.batch * per_image, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> blend(g.classes * g.width), z(g.classes * kPixelRun), spread(g.classes * g.width);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / per_image, band = 2 * (task % per_image) + parity;
        const float scale = dsums[b];
        for (int64_t y = first[band]; y < first[band + 1]; ++y) {
          g.BlendRows(b, y, blend.data());
          std::fill(spread.begin(), spread.end(), 0.f);
          const int32_t *labels = g.labels + (b * g.out_height + y) * g.out_width;
          const float *lse_row = lse_in + (b * g.out_height + y) * g.out_width;
          for (int64_t x0 = 0; x0 < g.out_width; x0 += kPixelRun) {
            const int64_t n = std::min(kPixelRun, g.out_width - x0);
            g.Interpolate(blend.data(), x0, n, z.data());
            const float *lse = lse_row + x0;
            float keep[kPixelRun];
            for (int64_t k = 0; k < n; ++k) {
              const int32_t label = labels[x0 + k];
              keep[k] = label == g.ignore || g.BadLabel(label) ? 0.f : scale;
            }
            for (int64_t c = 0; c < g.classes; ++c) {  // dz = scale (softmax - onehot), in place
              float *zc = z.data() + c * kPixelRun;
              for (int64_t k = 0; k < n; ++k) zc[k] = keep[k] * ExpNonPositive(std::min(zc[k] - lse[k], 0.f));
            }
            for (int64_t k = 0; k < n; ++k) {
              const int32_t label = labels[x0 + k];
              if (keep[k] != 0.f) z[label * kPixelRun + k] -= keep[k];
            }
            const int64_t *j0 = g.cols.i0.data() + x0, *j1 = g.cols.i1.data() + x0;
            const float *w1 = g.cols.w1.data() + x0;
            for (int64_t c = 0; c < g.classes; ++c) {  // the resize's transpose across: two columns per pixel
              const float *zc = z.data() + c * kPixelRun;
              float *dst = spread.data() + c * g.width;
              for (int64_t k = 0; k < n; ++k) {
                dst[j0[k]] += (1.f - w1[k]) * zc[k];
                dst[j1[k]] += w1[k] * zc[k];
              }
            }
          }
          const float w1 = g.rows.w1[y], w0 = 1.f - w1;  // and down: two source rows per label row
          for (int64_t c = 0; c < g.classes; ++c) {
            float *dplane = dlogits + (b * g.classes + c) * g.height * g.width;
            float *r0 = dplane + g.rows.i0[y] * g.width, *r1 = dplane + g.rows.i1[y] * g.width;
            const float *src = spread.data() + c * g.width;
            for (int64_t j = 0; j < g.width; ++j) r0[j] += w0 * src[j];
            for (int64_t j = 0; j < g.width; ++j) r1[j] += w1 * src[j];
          }
        }
      }
    });
  }
  return 0;
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------
// 1x1 convolutions as register-blocked AVX-512 GEMMs (MindSpore's oneDNN is capped at AVX2 on this
// package's CPUs, see mindcv_poolformer/_runtime.py). Tile: 8 output rows x up to 48 columns in
// 24 zmm accumulators, each step broadcasting one value of each of the 8 rows. This CPU's peak is
// 339 GFLOP/s with 512-bit FMAs on its 2 cores (204 with 256-bit ones).
//   Conv1x1:           y[b][k][p] = sum_c w[k][c] x[b][c][p]        (Conv1x1Transposed: dx = w^T dy)
//   Conv1x1WeightGrad: dw[k][c]   = sum_b sum_p dy[b][k][p] x[b][c][p]
// and the same GEMMs for a 3x3, stride-1, zero-padded conv (Semantic FPN's neck and head), its depth the
// 9 C taps: the packing reads each input row shifted by a tap, with zeros off the map (an implicit im2col).
//   Conv3x3:           y[b][k][p] = sum_c sum_t w[k][c][t] x[b][c][p + s_t]
//   Conv3x3Transposed: dx[b][c][p] = sum_k sum_t w[k][c][8 - t] dy[b][k][p + s_t]   (s_{8-t} = -s_t)
//   Conv3x3WeightGrad: dw[k][c][t] = sum_b sum_p dy[b][k][p] x[b][c][p + s_t]
#if defined(__AVX512F__)
#include <immintrin.h>

namespace {

constexpr int64_t kRows = 8, kCols = 48;

// a GEMM's row operand in PackRows layout
using Packed = std::unique_ptr<Scratch>;

inline __mmask16 TailMask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1);
}

// packed[(r8 * depth + d) * 8 + r] = a[(r8 * 8 + r) * lda + d * step]: 8-row panels, depth-major
void PackRows(const float *a, int64_t rows, int64_t depth, int64_t lda, int64_t step, float *packed) {
  for (int64_t r8 = 0; r8 < rows / kRows; ++r8)
    for (int64_t d = 0; d < depth; ++d)
      for (int64_t r = 0; r < kRows; ++r)
        packed[(r8 * depth + d) * kRows + r] = a[(r8 * kRows + r) * lda + d * step];
}

// acc[r][:] += sum_d a_r[d] * b[d][0:16 NV] for the 8 rows r; b rows ldb apart. The row operand is
// either packed (PACKED: a_r[d] = a[d * 8 + r], one 32-byte line per step) or 8 plain rows lda apart
// (a_r[d] = a[r * lda + d]): broadcasts need no layout, so plain rows skip the packing.
template <int NV, bool PACKED>
__attribute__((always_inline)) inline void Accumulate(__m512 (&acc)[kRows][NV], const __mmask16 (&mask)[NV],
                                                      const float *a, int64_t lda, const float *b, int64_t ldb,
                                                      int64_t depth) {
  for (int64_t d = 0; d < depth; ++d) {
    __m512 bv[NV];
#pragma GCC unroll 3
    for (int j = 0; j < NV; ++j) bv[j] = _mm512_maskz_loadu_ps(mask[j], b + d * ldb + 16 * j);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      __m512 wv = _mm512_set1_ps(PACKED ? a[d * kRows + r] : a[r * lda + d]);
#pragma GCC unroll 3
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_fmadd_ps(wv, bv[j], acc[r][j]);
    }
  }
}

template <int NV>
struct TileSums {
  __mmask16 mask[NV];
  __m512 acc[kRows][NV];

  // out[8][0:width] (ldo apart) read (ACCUMULATE) or zeros
  TileSums(const float *out, int64_t ldo, int64_t width, bool accumulate) {
    for (int j = 0; j < NV; ++j) mask[j] = TailMask(std::max<int64_t>(width - 16 * j, 0));
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 3
      for (int j = 0; j < NV; ++j)
        acc[r][j] = accumulate ? _mm512_maskz_loadu_ps(mask[j], out + r * ldo + 16 * j) : _mm512_setzero_ps();
  }

  void Store(float *out, int64_t ldo) const {
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 3
      for (int j = 0; j < NV; ++j) _mm512_mask_storeu_ps(out + r * ldo + 16 * j, mask[j], acc[r][j]);
  }
};

// out[r][0:width] (+)= sum_d a_r[d] * b[d][0:width]: one 8 x 48 register tile of a packed row operand
template <bool ACCUMULATE>
inline void Tile(const float *a, const float *b, int64_t ldb, int64_t depth, float *out, int64_t ldo) {
  TileSums<3> t(out, ldo, kCols, ACCUMULATE);
  Accumulate<3, true>(t.acc, t.mask, a, 0, b, ldb, depth);
  t.Store(out, ldo);
}

// One GEMM over a whole batch: out[b][m][p] = E(sum_k a[m][k] x'[b][k][p]) for every image b, where the
// columns of all images form one index n = b * pixels + p, so 7x7 and 14x14 maps still fill 48-wide
// tiles. Blocked for the caches (Goto/BLIS order): each thread takes a contiguous range of 48-column
// panels; a block of panels is packed once (depth x 48 slabs, contiguous and L2-resident, gathered
// across image boundaries), then for every 64-row block of a and 128-deep slice, each packed slab
// (24 KB, L1) is reused by 8 row tiles while the rows' sums collect in a small per-thread buffer.
// The epilogue E runs on those sums as they are stored, so the MLP's elementwise steps cost no
// pass of their own over memory (x' = x except for kNormGelu):
enum class Epi {
  kPlain,     // out = s
  kNormGelu,  // x' = (x - mean_b) rstd_b; out = gelu(s + bias)        fc1 at inference (norm2 folded)
  kGeluPair,  // out = s, out2 = gelu(s + bias)                         fc1 in training (s kept for backward)
  kResidual,  // out = residual + drop_b (s + bias)                     fc2, its bias, drop path, residual
  kGeluGrad,  // out = s gelu'(pre + bias), bias_grad += sum of out    fc2's input gradient through the GELU
};

struct BatchGemm {
  const float *a_packed = nullptr;  // PackRows layout: [rows / 8][depth][8]
  int64_t rows = 0, depth = 0;
  const float *x = nullptr;  // (batch, depth, pixels)
  int64_t batch = 0, pixels = 0;
  float *out = nullptr;  // (batch, rows, pixels)
  const float *bias = nullptr;                         // (rows): every epilogue but kPlain
  const float *mean = nullptr, *rstd = nullptr;        // kNormGelu (batch)
  float *out2 = nullptr;                               // kGeluPair (batch, rows, pixels)
  const float *residual = nullptr, *drop = nullptr;    // kResidual: (batch, rows, pixels), (batch) or null (ones)
  const float *pre = nullptr;                          // kGeluGrad (batch, rows, pixels)
  float *bias_grad = nullptr;                          // kGeluGrad (rows)
  int64_t taps_width = 0;  // > 0: x is (batch, depth / 9, pixels / taps_width, taps_width), read as 3x3 taps
  bool serial = false;     // on the calling thread only (a caller that is itself one of several threads)
};

constexpr int64_t kRowBlock = 64, kDepthBlock = 128;

// A block's columns as runs inside images: block column `offset` is pixel `pixel` of image `image`
struct ColumnRun {
  int64_t image, pixel, offset, length;
};

// the runs of columns [first, first + width) of a batch's pixels as one index (cut at the last image)
int BlockRuns(int64_t batch, int64_t pixels, int64_t first, int64_t width, std::vector<ColumnRun> &runs) {
  const int64_t end = std::min(first + width, batch * pixels);
  runs.clear();
  for (int64_t n = first; n < end;) {
    ColumnRun run{n / pixels, n % pixels, n - first, 0};
    run.length = std::min(end - n, pixels - run.pixel);
    runs.push_back(run);
    n += run.length;
  }
  return static_cast<int>(runs.size());
}

// Visit a run in pieces of at most 16 columns that stay inside one 48-column panel:
// fn(column offset in the run, panel, column within the panel, mask)
template <typename F>
inline void ForPanelPieces(const ColumnRun &run, F fn) {
  for (int64_t j = 0; j < run.length;) {
    const int64_t column = run.offset + j, within = column % kCols;
    const int64_t piece = std::min({int64_t{16}, run.length - j, kCols - within});
    fn(j, column / kCols, within, TailMask(piece));
    j += piece;
  }
}

// Pixel offset of tap t (row-major over the 3x3 window, as a conv weight's last two axes) on a map `width` wide
inline int64_t TapShift(int t, int64_t width) { return (t / 3 - 1) * width + t % 3 - 1; }

// The lanes of a 16-pixel piece starting at pixel `first` of a height x width map (`lanes` of them)
// whose tap t lies on the map: one mask per tap. Lanes past `lanes` are off.
void TapMasks(int64_t first, int64_t lanes, int64_t height, int64_t width, std::array<__mmask16, 9> &masks) {
  masks.fill(0);
  for (int64_t l = 0; l < lanes; ++l) {
    const int64_t h = (first + l) / width, w = (first + l) % width;
    for (int t = 0; t < 9; ++t) {
      const int64_t th = h + t / 3 - 1, tw = w + t % 3 - 1;
      if (th >= 0 && th < height && tw >= 0 && tw < width) masks[t] |= static_cast<__mmask16>(1u << l);
    }
  }
}

// PackBlock for a 3x3 conv: slab depth index c * 9 + t holds x[c] at the column's pixel shifted by tap t,
// zero where the tap leaves the map (masked loads: off-map lanes are never read).
void PackTapsBlock(const BatchGemm &g, const std::vector<ColumnRun> &runs, int64_t panels, float *slabs) {
  struct Piece {
    int64_t j, panel, within;
    __mmask16 mask;
    std::array<__mmask16, 9> taps;
  };
  const int64_t channels = g.depth / 9, width = g.taps_width, height = g.pixels / width;
  const int64_t used = runs.empty() ? 0 : runs.back().offset + runs.back().length;
  std::vector<Piece> pieces;
  for (const ColumnRun &run : runs) {
    pieces.clear();
    ForPanelPieces(run, [&](int64_t j, int64_t panel, int64_t within, __mmask16 mask) {
      Piece piece{j, panel, within, mask, {}};
      TapMasks(run.pixel + j, __builtin_popcount(mask), height, width, piece.taps);
      pieces.push_back(piece);
    });
    const float *src = g.x + run.image * channels * g.pixels + run.pixel;
    for (int64_t c = 0; c < channels; ++c)
      for (int t = 0; t < 9; ++t) {
        const float *row = src + c * g.pixels + TapShift(t, width);
        float *slab = slabs + (c * 9 + t) * kCols;
        for (const Piece &p : pieces)
          _mm512_mask_storeu_ps(slab + p.panel * g.depth * kCols + p.within, p.mask,
                                _mm512_maskz_loadu_ps(p.taps[t], row + p.j));
      }
  }
  for (int64_t column = used; column < panels * kCols; ++column)
    for (int64_t k = 0; k < g.depth; ++k) slabs[((column / kCols) * g.depth + k) * kCols + column % kCols] = 0.f;
}

// slabs[panel][k][0:48] = x'[k][column] for the block's panels (zero past the last image). Rows of x
// are read in runs as long as the block, which keeps the hardware prefetchers streaming.
template <Epi E>
void PackBlock(const BatchGemm &g, const std::vector<ColumnRun> &runs, int64_t panels, float *slabs) {
  const int64_t used = runs.empty() ? 0 : runs.back().offset + runs.back().length;
  for (const ColumnRun &run : runs) {
    const float *src = g.x + run.image * g.depth * g.pixels + run.pixel;
    const __m512 center = _mm512_set1_ps(E == Epi::kNormGelu ? g.mean[run.image] : 0.f);
    const __m512 scale = _mm512_set1_ps(E == Epi::kNormGelu ? g.rstd[run.image] : 1.f);
    for (int64_t k = 0; k < g.depth; ++k) {
      const float *row = src + k * g.pixels;
      ForPanelPieces(run, [&](int64_t j, int64_t panel, int64_t within, __mmask16 mask) {
        __m512 v = _mm512_maskz_loadu_ps(mask, row + j);
        if (E == Epi::kNormGelu) v = _mm512_mul_ps(_mm512_sub_ps(v, center), scale);
        _mm512_mask_storeu_ps(slabs + (panel * g.depth + k) * kCols + within, mask, v);
      });
    }
  }
  for (int64_t column = used; column < panels * kCols; ++column)
    for (int64_t k = 0; k < g.depth; ++k) slabs[((column / kCols) * g.depth + k) * kCols + column % kCols] = 0.f;
}

// out rows [row0, row0 + rows) of the block's columns from the tiles' sums (sums[r8][panel][8][48]),
// through the epilogue; kGeluGrad adds each row's total to bias_sums
template <Epi E>
void StoreBlock(const BatchGemm &g, const std::vector<ColumnRun> &runs, int64_t panels, int64_t row0, int64_t rows,
                const float *sums, double *bias_sums) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = row0 + r;
    const float *src = sums + ((r / kRows) * panels * kRows + r % kRows) * kCols;
    const __m512 bias = _mm512_set1_ps(E == Epi::kPlain ? 0.f : g.bias[m]);
    __m512 total = _mm512_setzero_ps();
    for (const ColumnRun &run : runs) {
      const int64_t at = (run.image * g.rows + m) * g.pixels + run.pixel;
      const __m512 drop = _mm512_set1_ps(E == Epi::kResidual && g.drop ? g.drop[run.image] : 1.f);
      ForPanelPieces(run, [&](int64_t j, int64_t panel, int64_t within, __mmask16 mask) {
        __m512 v = _mm512_maskz_loadu_ps(mask, src + panel * kRows * kCols + within);
        if (E == Epi::kNormGelu) v = GeluV(_mm512_add_ps(v, bias));
        if (E == Epi::kGeluPair) _mm512_mask_storeu_ps(g.out2 + at + j, mask, GeluV(_mm512_add_ps(v, bias)));
        if (E == Epi::kResidual)
          v = _mm512_fmadd_ps(drop, _mm512_add_ps(v, bias), _mm512_maskz_loadu_ps(mask, g.residual + at + j));
        if (E == Epi::kGeluGrad) {
          v = _mm512_mul_ps(v, GeluGradV(_mm512_add_ps(_mm512_maskz_loadu_ps(mask, g.pre + at + j), bias)));
          total = _mm512_add_ps(total, v);  // masked-off lanes are zero
        }
        _mm512_mask_storeu_ps(g.out + at + j, mask, v);
      });
    }
    if (E == Epi::kGeluGrad) bias_sums[m] += _mm512_reduce_add_ps(total);
  }
}

template <Epi E>
void RunBatchGemm(const BatchGemm &g) {
  const int64_t panels = (g.batch * g.pixels + kCols - 1) / kCols;
  // panels per block: the packed block (depth x 48 per panel) stays within ~512 KB of L2
  const int64_t block = std::clamp<int64_t>(131072 / (g.depth * kCols), 1, 8);
  std::mutex merge;
  std::vector<double> bias_grad(E == Epi::kGeluGrad ? g.rows : 0);
  ParallelFor(panels, g.serial ? panels : 1, [&](int64_t begin, int64_t end) {
    const int64_t used = std::min(block, end - begin);  // a small GEMM (Winograd's) zeroes only what it uses
    Scratch slabs(used * g.depth * kCols), sums(kRowBlock * used * kCols);  // every value used is written first
    std::vector<double> bias_sums(bias_grad.size());
    std::vector<ColumnRun> runs;
    for (int64_t first = begin; first < end; first += block) {
      const int64_t count = std::min(block, end - first);
      BlockRuns(g.batch, g.pixels, first * kCols, count * kCols, runs);
      if (g.taps_width > 0)
        PackTapsBlock(g, runs, count, slabs.get());
      else
        PackBlock<E>(g, runs, count, slabs.get());
      for (int64_t row0 = 0; row0 < g.rows; row0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, g.rows - row0);
        for (int64_t k0 = 0; k0 < g.depth; k0 += kDepthBlock) {
          const int64_t depth = std::min(kDepthBlock, g.depth - k0);
          for (int64_t j = 0; j < count; ++j) {
            const float *slab = slabs.get() + (j * g.depth + k0) * kCols;
            for (int64_t r8 = 0; r8 < rows / kRows; ++r8) {
              const float *panel = g.a_packed + ((row0 / kRows + r8) * g.depth + k0) * kRows;
              float *tile = sums.get() + (r8 * count + j) * kRows * kCols;
              if (k0 == 0)
                Tile<false>(panel, slab, kCols, depth, tile, kCols);
              else
                Tile<true>(panel, slab, kCols, depth, tile, kCols);
            }
          }
        }
        StoreBlock<E>(g, runs, count, row0, rows, sums.get(), bias_sums.data());
      }
    }
    std::lock_guard<std::mutex> lock(merge);
    for (size_t m = 0; m < bias_sums.size(); ++m) bias_grad[m] += bias_sums[m];
  });
  for (size_t m = 0; m < bias_grad.size(); ++m) g.bias_grad[m] = static_cast<float>(bias_grad[m]);
}

// In-register transpose of 16 rows of 16 floats (unpacks, then 128-bit lane shuffles).
inline void Transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}

// Conv1x1's weight gradient: sums[d][s] = sum over images and pixels of direct[d][p] slabbed[s][p]. Both
// operands run along pixels, so one must be transposed: each task (256 columns of the batch's pixels
// as one index, so 7x7 maps still give deep tasks) transposes its slice of `slabbed` into 48-channel
// slabs (256 x 48) with 16x16 register transposes, and the 8-row tiles broadcast `direct` straight
// from its rows, one run per image, with the sums kept in registers; each thread sums into its own copy.
struct WeightGrad {
  const float *direct = nullptr, *slabbed = nullptr;  // (batch, channels, pixels)
  int64_t batch = 0, pixels = 0, direct_channels = 0, slab_channels = 0;
  // > 0: slabbed is (batch, slab_channels / 9, pixels / taps_width, taps_width), its channel c * 9 + t
  // the map shifted by 3x3 tap t (zero off the map)
  int64_t taps_width = 0;
};

constexpr int64_t kPixelChunk = 256;

// slabs[panel][p][0:48] = src[panel * 48 + i][p] for p < length (channels past the last read as zeros);
// panels are kPixelChunk rows apart
void TransposeToSlabs(const float *src, int64_t channels, int64_t pixels, int64_t length, float *slabs) {
  __m512 r[16];
  for (int64_t c0 = 0; c0 < channels; c0 += 16) {
    float *slab = slabs + (c0 / kCols) * kPixelChunk * kCols + c0 % kCols;
    for (int64_t p0 = 0; p0 < length; p0 += 16) {
      const __mmask16 mask = TailMask(length - p0);
      for (int i = 0; i < 16; ++i)
        r[i] = c0 + i < channels ? _mm512_maskz_loadu_ps(mask, src + (c0 + i) * pixels + p0) : _mm512_setzero_ps();
      Transpose16(r);
      for (int64_t i = 0; i < std::min<int64_t>(16, length - p0); ++i) _mm512_storeu_ps(slab + (p0 + i) * kCols, r[i]);
    }
  }
}

// TransposeToSlabs of a 3x3 conv's input: virtual channel c * 9 + t is src's channel c shifted by tap t, for
// the `length` pixels from pixel `first` of a height x width map (src: the image's first channel)
void TransposeTapsToSlabs(const float *src, int64_t channels, int64_t height, int64_t width, int64_t first,
                          int64_t length, float *slabs) {
  const int64_t pixels = height * width, groups = (length + 15) / 16;
  std::vector<std::array<__mmask16, 9>> masks(groups);
  for (int64_t i = 0; i < groups; ++i)
    TapMasks(first + 16 * i, std::min<int64_t>(16, length - 16 * i), height, width, masks[i]);
  __m512 r[16];
  for (int64_t v0 = 0; v0 < channels * 9; v0 += 16) {
    float *slab = slabs + (v0 / kCols) * kPixelChunk * kCols + v0 % kCols;
    for (int64_t i = 0; i < groups; ++i) {
      const int64_t p0 = 16 * i;
      for (int l = 0; l < 16; ++l) {
        const int64_t v = v0 + l;
        const int t = static_cast<int>(v % 9);
        r[l] = v < channels * 9 ? _mm512_maskz_loadu_ps(masks[i][t], src + (v / 9) * pixels + first + p0 +
                                                                          TapShift(t, width))
                                : _mm512_setzero_ps();
      }
      Transpose16(r);
      for (int64_t l = 0; l < std::min<int64_t>(16, length - p0); ++l) _mm512_storeu_ps(slab + (p0 + l) * kCols, r[l]);
    }
  }
}

// out (8 rows x width, ldo apart) += the 8 direct rows from row0 times the slab, over the chunk's runs
template <int NV>
void WeightGradTile(const WeightGrad &g, const std::vector<ColumnRun> &runs, int64_t row0, const float *slab,
                    float *out, int64_t ldo, int64_t width) {
  TileSums<NV> t(out, ldo, width, true);
  for (const ColumnRun &run : runs) {
    const float *a = g.direct + (run.image * g.direct_channels + row0) * g.pixels + run.pixel;
    Accumulate<NV, false>(t.acc, t.mask, a, g.pixels, slab + run.offset * kCols, kCols, run.length);
  }
  t.Store(out, ldo);
}

// acc (direct_channels x slab_channels) += the products over task t's kPixelChunk columns of the batch's pixels
// (slabs: WeightGradSlabs floats)
void WeightGradTask(const WeightGrad &g, int64_t t, float *slabs, std::vector<ColumnRun> &runs, float *acc) {
  const int64_t panels = (g.slab_channels + kCols - 1) / kCols;
  BlockRuns(g.batch, g.pixels, t * kPixelChunk, kPixelChunk, runs);
  for (const ColumnRun &run : runs) {
    float *at = slabs + run.offset * kCols;
    if (g.taps_width > 0)
      TransposeTapsToSlabs(g.slabbed + run.image * (g.slab_channels / 9) * g.pixels, g.slab_channels / 9,
                           g.pixels / g.taps_width, g.taps_width, run.pixel, run.length, at);
    else
      TransposeToSlabs(g.slabbed + run.image * g.slab_channels * g.pixels + run.pixel, g.slab_channels, g.pixels,
                       run.length, at);
  }
  for (int64_t j = 0; j < panels; ++j) {
    const int64_t width = std::min(kCols, g.slab_channels - j * kCols);
    const float *slab = slabs + j * kPixelChunk * kCols;
    for (int64_t row0 = 0; row0 < g.direct_channels; row0 += kRows) {
      float *out = acc + row0 * g.slab_channels + j * kCols;
      if (width > 32)
        WeightGradTile<3>(g, runs, row0, slab, out, g.slab_channels, width);
      else if (width > 16)
        WeightGradTile<2>(g, runs, row0, slab, out, g.slab_channels, width);
      else
        WeightGradTile<1>(g, runs, row0, slab, out, g.slab_channels, width);
    }
  }
}

int64_t WeightGradTasks(const WeightGrad &g) { return (g.batch * g.pixels + kPixelChunk - 1) / kPixelChunk; }
int64_t WeightGradSlabs(int64_t slab_channels) { return (slab_channels + kCols - 1) / kCols * kPixelChunk * kCols; }

void RunWeightGrad(const WeightGrad &g, float *sums) {
  const int64_t tasks = WeightGradTasks(g), size = g.direct_channels * g.slab_channels;
  const int threads = static_cast<int>(std::min<int64_t>(NumThreads(), tasks));
  std::vector<std::unique_ptr<Scratch>> partial(threads);
  const int64_t per_thread = (tasks + threads - 1) / threads;
  auto work = [&](int index) {
    partial[index] = std::make_unique<Scratch>(size);
    partial[index]->zeroed(size);
    Scratch slabs(WeightGradSlabs(g.slab_channels));
    std::vector<ColumnRun> runs;
    for (int64_t t = index * per_thread; t < std::min(tasks, (index + 1) * per_thread); ++t)
      WeightGradTask(g, t, slabs.get(), runs, partial[index]->get());
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < threads; ++i) pool.emplace_back(work, i);
  work(0);
  for (auto &thread : pool) thread.join();
  for (int64_t i = 0; i < size; ++i) {
    float s = 0;
    for (int t = 0; t < threads; ++t) s += partial[t]->get()[i];
    sums[i] = s;
  }
}

// The GEMM out[b] = a x[b] for every image b of x (B,C,H,W), a (rows x C) packed by PackRows; the
// caller sets the epilogue's operands.
BatchGemm Gemm(const int64_t *x_shape, const Packed &a_packed, int64_t rows, const float *x, float *out) {
  BatchGemm g;
  g.batch = x_shape[0];
  g.depth = x_shape[1];
  g.pixels = x_shape[2] * x_shape[3];
  g.rows = rows;
  g.a_packed = a_packed->get();
  g.x = x;
  g.out = out;
  return g;
}

// inputs x (B,C,H,W) and w (K,C) of a 1x1 conv (transposed: w^T), its output rows a multiple of 8
bool IsConv1x1(const int *ndims, int64_t **shapes, int x, int w, bool transposed) {
  if (ndims[x] != 4 || ndims[w] != 2) return false;
  const int64_t depth = shapes[w][transposed ? 0 : 1], rows = shapes[w][transposed ? 1 : 0];
  return depth == shapes[x][1] && rows % kRows == 0;
}

// w (K,C) packed as the GEMM's row operand: as is (K rows of depth C) or transposed (C rows of depth K)
Packed PackWeight(const float *w, const int64_t *w_shape, bool transposed) {
  const int64_t k = w_shape[0], c = w_shape[1];
  auto packed = std::make_unique<Scratch>(k * c);
  if (transposed)
    PackRows(w, c, k, 1, c, packed->get());
  else
    PackRows(w, k, c, c, 1, packed->get());
  return packed;
}

// out (B,rows,H,W) = the 3x3 taps of x (B,C,H,W) times a_packed (rows x 9C, PackRows layout)
void RunConv3x3(const int64_t *x_shape, const Packed &a_packed, int64_t rows, const float *x, float *out) {
  BatchGemm g = Gemm(x_shape, a_packed, rows, x, out);
  g.depth = x_shape[1] * 9;
  g.taps_width = x_shape[3];
  RunBatchGemm<Epi::kPlain>(g);
}

// Winograd F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): each 4x4
// output tile is A^T [(G w G^T) . (B^T d B)] A for its 6x6 input patch d, so the 3x3 conv's 9 C K multiply-adds
// per output pixel become 36 / 16 = 2.25 per (K, C) pair: 36 GEMMs U_p (K x C) V_p (C x tiles), p over the
// 6x6 transformed points, on the batch GEMM above. The transforms are additions and small integer scalings
// (interpolation points 0, +-1, +-2); float32 rounding is ~10x the direct conv's (5e-6 of the output's scale
// against 4e-7 at C = 256, tests/test_kernels.py).
constexpr int64_t kWinoChunkTiles = 48;
// G: the 3-tap kernel to its 6 transformed points
constexpr double kWinoG[6][3] = {{0.25, 0, 0},
                                 {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                 {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                 {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                 {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                 {0, 0, 1}};

// U_p = (G w G^T)_p in double, rounded once, written straight into each p's (rows x depth) PackRows panels. The
// conv's row m, depth d, tap t is w[m * row_stride + d * depth_stride + t] (reversed: tap 8 - t, the input gradient's
// flipped kernel). Eight rows (one panel) at a time in 8-wide double vectors, across threads: the transform runs on
// every call (the weights change every training step) and must stay small beside a 4x4 map's GEMMs.
std::unique_ptr<Scratch> WinogradWeights(const float *w, int64_t rows, int64_t depth, int64_t row_stride,
                                         int64_t depth_stride, bool reversed) {
  const auto &g = kWinoG;
  const int64_t plane = rows * depth;
  auto packed = std::make_unique<Scratch>(36 * plane);
  const __m256i lanes = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                           _mm256_set1_epi32(static_cast<int32_t>(row_stride)));
  ParallelFor(plane / kRows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {  // i = r8 * depth + d: packed[p][i * 8 + r] for row r8 * 8 + r
      const float *base = w + (i / depth) * kRows * row_stride + (i % depth) * depth_stride;
      __m512d tap[9], t[6][3];
      for (int k = 0; k < 9; ++k) tap[k] = _mm512_cvtps_pd(_mm256_i32gather_ps(base + (reversed ? 8 - k : k), lanes, 4));
      for (int a = 0; a < 6; ++a)
        for (int j = 0; j < 3; ++j)
          t[a][j] = _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(_mm512_set1_pd(g[a][0]), tap[j]),
                                                _mm512_mul_pd(_mm512_set1_pd(g[a][1]), tap[3 + j])),
                                  _mm512_mul_pd(_mm512_set1_pd(g[a][2]), tap[6 + j]));
      for (int a = 0; a < 6; ++a)
        for (int b = 0; b < 6; ++b) {
          const __m512d u = _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(t[a][0], _mm512_set1_pd(g[b][0])),
                                                        _mm512_mul_pd(t[a][1], _mm512_set1_pd(g[b][1]))),
                                          _mm512_mul_pd(t[a][2], _mm512_set1_pd(g[b][2])));
          _mm256_storeu_ps(packed->get() + (a * 6 + b) * plane + i * kRows, _mm512_cvtpd_ps(u));
        }
    }
  });
  return packed;
}

// B^T along one axis of 6-point patches, 16 tiles a vector (FMAs: the same values as the scalar form to rounding)
inline void WinogradInputAxis(const __m512 (&d)[6], __m512 (&o)[6]) {
  const __m512 two = _mm512_set1_ps(2.f), four = _mm512_set1_ps(4.f), five = _mm512_set1_ps(5.f);
  o[0] = _mm512_fmadd_ps(four, d[0], _mm512_fnmadd_ps(five, d[2], d[4]));              // 4 d0 - 5 d2 + d4
  o[1] = _mm512_fnmadd_ps(four, _mm512_add_ps(d[1], d[2]), _mm512_add_ps(d[3], d[4]));  // -4 (d1 + d2) + d3 + d4
  o[2] = _mm512_fmadd_ps(four, _mm512_sub_ps(d[1], d[2]), _mm512_sub_ps(d[4], d[3]));   // 4 (d1 - d2) - d3 + d4
  o[3] = _mm512_fmadd_ps(two, _mm512_sub_ps(d[3], d[1]), _mm512_sub_ps(d[4], d[2]));    // 2 (d3 - d1) - d2 + d4
  o[4] = _mm512_fmadd_ps(two, _mm512_sub_ps(d[1], d[3]), _mm512_sub_ps(d[4], d[2]));    // 2 (d1 - d3) - d2 + d4
  o[5] = _mm512_fmadd_ps(four, d[1], _mm512_fnmadd_ps(five, d[3], d[5]));              // 4 d1 - 5 d3 + d5
}

// A^T along one axis of 6-point patches: 4 outputs
inline void WinogradOutputAxis(const __m512 (&m)[6], __m512 (&o)[4]) {
  const __m512 a = _mm512_add_ps(m[1], m[2]), b = _mm512_sub_ps(m[1], m[2]);
  const __m512 c = _mm512_add_ps(m[3], m[4]), d = _mm512_sub_ps(m[3], m[4]);
  o[0] = _mm512_add_ps(m[0], _mm512_add_ps(a, c));                                // m0 + a + c
  o[1] = _mm512_fmadd_ps(_mm512_set1_ps(2.f), d, b);                               // b + 2 d
  o[2] = _mm512_fmadd_ps(_mm512_set1_ps(4.f), c, a);                               // a + 4 c
  o[3] = _mm512_fmadd_ps(_mm512_set1_ps(8.f), d, _mm512_add_ps(b, m[5]));          // b + 8 d + m5
}

// A along one axis (the output transform's transpose, for the weight gradient): a 4-point output-gradient
// patch to its 6 transformed points
inline void WinogradGradAxis(const __m512 (&y)[4], __m512 (&o)[6]) {
  const __m512 even = _mm512_add_ps(y[0], y[2]), odd = _mm512_add_ps(y[1], y[3]);
  const __m512 a = _mm512_fmadd_ps(_mm512_set1_ps(4.f), y[2], y[0]);
  const __m512 b = _mm512_fmadd_ps(_mm512_set1_ps(8.f), y[3], _mm512_add_ps(y[1], y[1]));
  o[0] = y[0];
  o[1] = _mm512_add_ps(even, odd);  // y0 + y1 + y2 + y3
  o[2] = _mm512_sub_ps(even, odd);  // y0 - y1 + y2 - y3
  o[3] = _mm512_add_ps(a, b);       // y0 + 2 y1 + 4 y2 + 8 y3
  o[4] = _mm512_sub_ps(a, b);       // y0 - 2 y1 + 4 y2 - 8 y3
  o[5] = y[3];
}

struct WinogradMap {
  int64_t batch, channels, rows, height, width, tw, per_image, total;  // rows: output channels

  WinogradMap(const int64_t *x_shape, int64_t out_channels)
      : batch(x_shape[0]), channels(x_shape[1]), rows(out_channels), height(x_shape[2]), width(x_shape[3]),
        tw((width + 3) / 4), per_image(((height + 3) / 4) * tw), total(batch * per_image) {}
};

// 16 consecutive tiles n0 + l of the batch (n = (image * th + ty) * tw + tx), one a vector lane, so that the
// transforms run 16 tiles at a time on any map (a tile row of a 16x16 map has only 4): where each lane's 36
// patch points lie in x (gathered, off-map points masked to the zero padding) and its 16 outputs in out (scattered).
struct TileGroup {
  alignas(64) int32_t in_at[36][16];   // point (r, j) of the patch at rows 4 ty - 1 + r, columns 4 tx - 1 + j
  alignas(64) int32_t out_at[16][16];  // output (r, j) at row 4 ty + r, column 4 tx + j
  __mmask16 in_on[36], out_on[16], lanes;

  TileGroup(const WinogradMap &s, int64_t n0, int64_t count) : in_at{}, out_at{}, in_on{}, out_on{} {
    lanes = TailMask(count);
    const int64_t plane = s.height * s.width;
    for (int64_t l = 0; l < count; ++l) {
      const int64_t n = n0 + l, image = n / s.per_image, y0 = 4 * (n % s.per_image / s.tw), x0 = 4 * (n % s.tw);
      const auto bit = static_cast<__mmask16>(1u << l);
      for (int r = 0; r < 6; ++r)
        for (int j = 0; j < 6; ++j) {
          const int64_t y = y0 - 1 + r, x = x0 - 1 + j;
          if (y < 0 || y >= s.height || x < 0 || x >= s.width) continue;
          in_at[r * 6 + j][l] = static_cast<int32_t>(image * s.channels * plane + y * s.width + x);
          in_on[r * 6 + j] |= bit;
        }
      for (int r = 0; r < 4; ++r)
        for (int j = 0; j < 4; ++j) {
          const int64_t y = y0 + r, x = x0 + j;
          if (y >= s.height || x >= s.width) continue;
          out_at[r * 4 + j][l] = static_cast<int32_t>(image * s.rows * plane + y * s.width + x);
          out_on[r * 4 + j] |= bit;
        }
    }
  }
};

// V[p][c][lane0 + l] = (B^T d B)_p for channel c of the group's tiles; V's point stride `point`, channel stride `ld`
void WinogradInputTile(const TileGroup &g, const float *plane, float *v, int64_t point) {
  __m512 t[6][6], d[6], o[6];
  for (int j = 0; j < 6; ++j) {  // down each patch column: B^T d
    for (int r = 0; r < 6; ++r)
      d[r] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), g.in_on[r * 6 + j], _mm512_load_si512(g.in_at[r * 6 + j]),
                                      plane, 4);
    WinogradInputAxis(d, o);
    for (int r = 0; r < 6; ++r) t[r][j] = o[r];
  }
  for (int r = 0; r < 6; ++r) {  // and along each row: (B^T d) B
    WinogradInputAxis(t[r], o);
    for (int j = 0; j < 6; ++j) _mm512_mask_storeu_ps(v + (r * 6 + j) * point, g.lanes, o[j]);
  }
}

// out (channel plane) at the group's tiles = A^T M A from M[p][k][lane0 + l] (point stride `point`)
void WinogradOutputTile(const TileGroup &g, const float *m, int64_t point, float *plane) {
  __m512 t[4][6], in[6], o[4];
  for (int j = 0; j < 6; ++j) {
    for (int i = 0; i < 6; ++i) in[i] = _mm512_maskz_loadu_ps(g.lanes, m + (i * 6 + j) * point);
    WinogradOutputAxis(in, o);
    for (int r = 0; r < 4; ++r) t[r][j] = o[r];
  }
  for (int r = 0; r < 4; ++r) {
    WinogradOutputAxis(t[r], o);
    for (int j = 0; j < 4; ++j)
      _mm512_mask_i32scatter_ps(plane, g.out_on[r * 4 + j], _mm512_load_si512(g.out_at[r * 4 + j]), o[j], 4);
  }
}

// The 36 GEMMs M_p (rows x ld) = U_p V_p (channels x ld) over ld tiles, on the calling thread, for p in [p0, p1)
void WinogradGemms(const WinogradMap &s, const float *u, const float *v, float *m, int64_t ld, int p0,
                   int p1) {
  for (int p = p0; p < p1; ++p) {
    BatchGemm g;
    g.batch = 1;
    g.depth = s.channels;
    g.pixels = ld;
    g.rows = s.rows;
    g.a_packed = u + p * s.rows * s.channels;
    g.x = v + p * s.channels * ld;
    g.out = m + p * s.rows * ld;
    g.serial = true;
    RunBatchGemm<Epi::kPlain>(g);
  }
}

// out (B,rows,H,W) = the zero-padded 3x3 conv of x (B,C,H,W) with u (WinogradWeights of rows x C).
// Large batches of tiles: each thread takes chunks of kWinoChunkTiles tiles (one 48-column GEMM panel) through the
// input transform, the 36 GEMMs and the output transform on its own, so a chunk's transformed maps (36 x channels
// x 48) are still in L2 when the next step reads them (chunks of 96 / 192 / 384 tiles: 0.97x / 0.85x / 0.77x the
// speed at 128x128). Fewer tiles than two chunks a thread (the demo's 16x16 maps and smaller): all tiles at once,
// each step split across threads by channel, by point p, by output channel, so that no thread idles.
void RunWinograd3x3(const int64_t *x_shape, const float *u, int64_t rows, const float *x, float *out) {
  const WinogradMap s(x_shape, rows);
  const int64_t plane = s.height * s.width, chunks = (s.total + kWinoChunkTiles - 1) / kWinoChunkTiles;
  if (chunks >= 2 * NumThreads()) {
    ParallelFor(chunks, 1, [&](int64_t begin, int64_t end) {
      Scratch v(36 * s.channels * kWinoChunkTiles), m(36 * rows * kWinoChunkTiles);
      std::vector<TileGroup> groups;
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t n_first = chunk * kWinoChunkTiles, tiles = std::min(kWinoChunkTiles, s.total - n_first);
        groups.clear();
        for (int64_t l = 0; l < tiles; l += 16) groups.emplace_back(s, n_first + l, std::min<int64_t>(16, tiles - l));
        for (int64_t c = 0; c < s.channels; ++c)
          for (size_t i = 0; i < groups.size(); ++i)
            WinogradInputTile(groups[i], x + c * plane, v.get() + c * tiles + 16 * i, s.channels * tiles);
        WinogradGemms(s, u, v.get(), m.get(), tiles, 0, 36);
        for (int64_t k = 0; k < rows; ++k)
          for (size_t i = 0; i < groups.size(); ++i)
            WinogradOutputTile(groups[i], m.get() + k * tiles + 16 * i, rows * tiles, out + k * plane);
      }
    });
    return;
  }
  std::vector<TileGroup> groups;
  for (int64_t l = 0; l < s.total; l += 16) groups.emplace_back(s, l, std::min<int64_t>(16, s.total - l));
  Scratch v(36 * s.channels * s.total), m(36 * rows * s.total);
  ParallelFor(s.channels, 8, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (size_t i = 0; i < groups.size(); ++i)
        WinogradInputTile(groups[i], x + c * plane, v.get() + c * s.total + 16 * i, s.channels * s.total);
  });
  ParallelFor(36, 1, [&](int64_t p0, int64_t p1) {
    WinogradGemms(s, u, v.get(), m.get(), s.total, static_cast<int>(p0), static_cast<int>(p1));
  });
  ParallelFor(rows, 8, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      for (size_t i = 0; i < groups.size(); ++i)
        WinogradOutputTile(groups[i], m.get() + k * s.total + 16 * i, rows * s.total, out + k * plane);
  });
}

// dM[p][k][lane0 + l] = (A dy A^T)_p for output channel k of the group's tiles (plane: dy's channel k), the
// gradient of M given the output gradient; off-map outputs read as zero
void WinogradGradTile(const TileGroup &g, const float *plane, float *dm, int64_t point) {
  __m512 t[6][4], y[4], o[6];
  for (int j = 0; j < 4; ++j) {
    for (int r = 0; r < 4; ++r)
      y[r] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), g.out_on[r * 4 + j], _mm512_load_si512(g.out_at[r * 4 + j]),
                                      plane, 4);
    WinogradGradAxis(y, o);
    for (int i = 0; i < 6; ++i) t[i][j] = o[i];
  }
  for (int i = 0; i < 6; ++i) {
    const __m512(&row)[4] = t[i];
    WinogradGradAxis(row, o);
    for (int j = 0; j < 6; ++j) _mm512_mask_storeu_ps(dm + (i * 6 + j) * point, g.lanes, o[j]);
  }
}

// acc[p] (rows x channels) += dM_p V_p^T over ld tiles, for p in [p0, p1), on the calling thread
void WinogradWeightGemms(const WinogradMap &s, const float *dm, const float *v, int64_t ld, int p0, int p1,
                         float *acc) {
  Scratch slabs(WeightGradSlabs(s.channels));
  std::vector<ColumnRun> runs;
  for (int p = p0; p < p1; ++p) {
    WeightGrad g;
    g.batch = 1;
    g.pixels = ld;
    g.direct = dm + p * s.rows * ld;
    g.slabbed = v + p * s.channels * ld;
    g.direct_channels = s.rows;
    g.slab_channels = s.channels;
    for (int64_t t = 0; t < WeightGradTasks(g); ++t) WeightGradTask(g, t, slabs.get(), runs, acc + p * s.rows * s.channels);
  }
}

// dw (rows, channels, 3, 3) = G^T dU G from the sum of the partial dU (36 x rows x channels each) in double, eight
// channels a vector, across threads
void WinogradWeightsGrad(const std::vector<std::unique_ptr<Scratch>> &partial, int64_t rows, int64_t channels,
                         float *dw) {
  const auto &g = kWinoG;
  const int64_t plane = rows * channels;
  ParallelFor(plane / kRows, 64, [&](int64_t begin, int64_t end) {
    alignas(64) double out[9][8];
    for (int64_t i = begin; i < end; ++i) {  // (k, c) pairs i * 8 .. i * 8 + 7: one row k, eight channels c
      __m512d du[36], t[3][6];
      for (int p = 0; p < 36; ++p) {
        du[p] = _mm512_setzero_pd();
        for (const auto &sums : partial)
          du[p] = _mm512_add_pd(du[p], _mm512_cvtps_pd(_mm256_loadu_ps(sums->get() + p * plane + i * kRows)));
      }
      for (int a = 0; a < 3; ++a)
        for (int j = 0; j < 6; ++j) {
          t[a][j] = _mm512_setzero_pd();
          for (int q = 0; q < 6; ++q) t[a][j] = _mm512_fmadd_pd(_mm512_set1_pd(g[q][a]), du[q * 6 + j], t[a][j]);
        }
      for (int a = 0; a < 3; ++a)
        for (int b = 0; b < 3; ++b) {
          __m512d w = _mm512_setzero_pd();
          for (int j = 0; j < 6; ++j) w = _mm512_fmadd_pd(t[a][j], _mm512_set1_pd(g[j][b]), w);
          _mm512_store_pd(out[a * 3 + b], w);
        }
      for (int l = 0; l < kRows; ++l)
        for (int tap = 0; tap < 9; ++tap) dw[(i * kRows + l) * 9 + tap] = static_cast<float>(out[tap][l]);
    }
  });
}

// dw (rows, C, 3, 3): the weight gradient of the zero-padded 3x3 conv of x (B,C,H,W) given dy (B,rows,H,W), in the
// Winograd form: dU_p = sum over tiles of dM_p V_p^T (36 GEMMs whose depth is the tiles), then dw = G^T dU G.
// Large batches of tiles: each thread takes chunks of kPixelChunk tiles (one weight-gradient task) and sums into its
// own dU; fewer than two chunks a thread: all tiles at once, the transforms split by channel and the GEMMs by p.
void RunWinograd3x3WeightGrad(const int64_t *x_shape, int64_t rows, const float *x, const float *dy, float *dw) {
  const WinogradMap s(x_shape, rows);
  const int64_t plane = s.height * s.width, size = 36 * rows * s.channels;
  const int64_t chunks = (s.total + kPixelChunk - 1) / kPixelChunk;
  auto transform = [&](const std::vector<TileGroup> &groups, int64_t ld, int64_t c0, int64_t c1, int64_t k0,
                       int64_t k1, float *v, float *dm) {
    for (int64_t c = c0; c < c1; ++c)
      for (size_t i = 0; i < groups.size(); ++i)
        WinogradInputTile(groups[i], x + c * plane, v + c * ld + 16 * i, s.channels * ld);
    for (int64_t k = k0; k < k1; ++k)
      for (size_t i = 0; i < groups.size(); ++i)
        WinogradGradTile(groups[i], dy + k * plane, dm + k * ld + 16 * i, rows * ld);
  };
  if (chunks >= 2 * NumThreads()) {
    const int threads = NumThreads();
    std::vector<std::unique_ptr<Scratch>> partial(threads);
    const int64_t per_thread = (chunks + threads - 1) / threads;
    auto work = [&](int index) {
      partial[index] = std::make_unique<Scratch>(size);
      partial[index]->zeroed(size);
      Scratch v(36 * s.channels * kPixelChunk), dm(36 * rows * kPixelChunk);
      std::vector<TileGroup> groups;
      for (int64_t chunk = index * per_thread; chunk < std::min(chunks, (index + 1) * per_thread); ++chunk) {
        const int64_t n_first = chunk * kPixelChunk, tiles = std::min(kPixelChunk, s.total - n_first);
        groups.clear();
        for (int64_t l = 0; l < tiles; l += 16) groups.emplace_back(s, n_first + l, std::min<int64_t>(16, tiles - l));
        transform(groups, tiles, 0, s.channels, 0, rows, v.get(), dm.get());
        WinogradWeightGemms(s, dm.get(), v.get(), tiles, 0, 36, partial[index]->get());
      }
    };
    std::vector<std::thread> pool;
    for (int i = 1; i < threads; ++i) pool.emplace_back(work, i);
    work(0);
    for (auto &thread : pool) thread.join();
    WinogradWeightsGrad(partial, rows, s.channels, dw);
    return;
  }
  std::vector<TileGroup> groups;
  for (int64_t l = 0; l < s.total; l += 16) groups.emplace_back(s, l, std::min<int64_t>(16, s.total - l));
  Scratch v(36 * s.channels * s.total), dm(36 * rows * s.total);
  ParallelFor(s.channels, 8, [&](int64_t c0, int64_t c1) {
    const int64_t k0 = c0 * rows / s.channels, k1 = c1 * rows / s.channels;  // the output channels in proportion
    transform(groups, s.total, c0, c1, k0, k1, v.get(), dm.get());
  });
  std::vector<std::unique_ptr<Scratch>> sums;
  sums.push_back(std::make_unique<Scratch>(size));
  float *acc = sums[0]->zeroed(size);
  ParallelFor(36, 1, [&](int64_t p0, int64_t p1) {
    WinogradWeightGemms(s, dm.get(), v.get(), s.total, static_cast<int>(p0), static_cast<int>(p1), acc);
  });
  WinogradWeightsGrad(sums, rows, s.channels, dw);
}

// Whether the Winograd form serves a 3x3 conv of this map (x_shape, to `rows` output channels): where its 36
// multiply-adds per tile, over the tiles padded to whole 48-column GEMM panels (the weight gradient's GEMMs take the
// tiles as their depth, unpadded), are at most half the direct form's 9 per pixel, and the lanes' int32 offsets
// reach every element. Winograd vs direct on 2 Zen 4 cores, batch 8-16, 128-256 channels, forward
// (bench/conv3x3.py): 128x128 2.4x, 64x64 2.0x, 32x32 1.4-1.9x, 16x16 1.6-2.0x, 8x8 at batch 16 1.3-1.4x (work
// ratio 0.38); 4x4 at batch 16 (16 tiles in one panel: ratio 0.75) 0.8-0.95x, so direct.
bool UseWinograd(const int64_t *x_shape, int64_t rows, bool weight_grad = false) {
  const WinogradMap s(x_shape, rows);
  const int64_t pixels = s.batch * s.height * s.width;
  const int64_t tiles = weight_grad ? s.total : (s.total + kCols - 1) / kCols * kCols;
  return 8 * tiles <= pixels && s.batch * std::max(s.channels, rows) * s.height * s.width < (int64_t{1} << 31);
}

// inputs x (B,C,H,W) and w (K,C,3,3) of a 3x3, stride-1, padding-1 conv (dilation 1, one group; transposed: x is
// its output gradient, with K channels), C and K multiples of 8
bool IsConv3x3(const int *ndims, int64_t **shapes, int x, int w, bool transposed) {
  return ndims[x] == 4 && ndims[w] == 4 && shapes[w][transposed ? 0 : 1] == shapes[x][1] && shapes[w][2] == 3 &&
         shapes[w][3] == 3 && shapes[w][0] % kRows == 0 && shapes[w][1] % kRows == 0;
}

}  // namespace

extern "C" {

int PoolformerHasFastGemm() { return 1; }

// inputs: x (B,C,H,W), w (K,C); outputs: y (B,K,H,W) = w x. K a multiple of 8.
int Conv1x1(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, -1) || !IsConv1x1(ndims, shapes, 0, 1, false)) return 1;
  const Packed w = PackWeight(static_cast<const float *>(params[1]), shapes[1], false);
  RunBatchGemm<Epi::kPlain>(Gemm(shapes[0], w, shapes[1][0], static_cast<const float *>(params[0]),
                                 static_cast<float *>(params[2])));
  return 0;
}

// inputs: dy (B,K,H,W), w (K,C); outputs: dx (B,C,H,W) = w^T dy (Conv1x1's input gradient). C a multiple of 8.
int Conv1x1Transposed(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, -1) || !IsConv1x1(ndims, shapes, 0, 1, true)) return 1;
  const Packed w = PackWeight(static_cast<const float *>(params[1]), shapes[1], true);
  RunBatchGemm<Epi::kPlain>(Gemm(shapes[0], w, shapes[1][1], static_cast<const float *>(params[0]),
                                 static_cast<float *>(params[2])));
  return 0;
}

// The block's channel MLP in training, two GEMMs with their elementwise steps in the epilogues.
// inputs: n (B,C,H,W) the normalised map, w1 (K,C), b1 (K), w2 (C,K), b2 (C), y (B,C,H,W), drop (B);
// outputs: out = y + drop_b (w2 h + b2), acc = w1 n (kept for the GELU's gradient), h = gelu(acc + b1)
int MlpForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, -1) || !IsConv1x1(ndims, shapes, 0, 1, false) || ndims[3] != 2 ||
      shapes[3][0] != shapes[0][1] || shapes[3][1] != shapes[1][0] || shapes[0][1] % kRows)
    return 1;
  const Packed w1 = PackWeight(static_cast<const float *>(params[1]), shapes[1], false);
  const Packed w2 = PackWeight(static_cast<const float *>(params[3]), shapes[3], false);
  float *acc = static_cast<float *>(params[8]), *h = static_cast<float *>(params[9]);
  BatchGemm fc1 = Gemm(shapes[0], w1, shapes[1][0], static_cast<const float *>(params[0]), acc);
  fc1.bias = static_cast<const float *>(params[2]);
  fc1.out2 = h;
  RunBatchGemm<Epi::kGeluPair>(fc1);
  const int64_t hidden_shape[4] = {shapes[0][0], shapes[1][0], shapes[0][2], shapes[0][3]};
  BatchGemm fc2 = Gemm(hidden_shape, w2, shapes[3][0], h, static_cast<float *>(params[7]));
  fc2.bias = static_cast<const float *>(params[4]);
  fc2.residual = static_cast<const float *>(params[5]);
  fc2.drop = static_cast<const float *>(params[6]);
  RunBatchGemm<Epi::kResidual>(fc2);
  return 0;
}

// The channel MLP at inference: norm2 (folded into w1/b1), fc1, GELU, fc2, bias and residual in two
// GEMMs; neither the normalised map nor fc1's sums are ever written.
// inputs: y (B,C,H,W), w1 (K,C), b1 (K), mean (B), rstd (B), w2 (C,K), b2 (C);
// outputs: out = y + w2 h + b2, h = gelu(w1 ((y_b - mean_b) rstd_b) + b1)
int MlpInference(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, -1) || !IsConv1x1(ndims, shapes, 0, 1, false) || ndims[5] != 2 ||
      shapes[5][0] != shapes[0][1] || shapes[5][1] != shapes[1][0] || shapes[0][1] % kRows)
    return 1;
  const Packed w1 = PackWeight(static_cast<const float *>(params[1]), shapes[1], false);
  const Packed w2 = PackWeight(static_cast<const float *>(params[5]), shapes[5], false);
  const float *y = static_cast<const float *>(params[0]);
  float *h = static_cast<float *>(params[8]);
  BatchGemm fc1 = Gemm(shapes[0], w1, shapes[1][0], y, h);
  fc1.bias = static_cast<const float *>(params[2]);
  fc1.mean = static_cast<const float *>(params[3]);
  fc1.rstd = static_cast<const float *>(params[4]);
  RunBatchGemm<Epi::kNormGelu>(fc1);
  const int64_t hidden_shape[4] = {shapes[0][0], shapes[1][0], shapes[0][2], shapes[0][3]};
  BatchGemm fc2 = Gemm(hidden_shape, w2, shapes[5][0], h, static_cast<float *>(params[7]));
  fc2.bias = static_cast<const float *>(params[6]);
  fc2.residual = y;
  RunBatchGemm<Epi::kResidual>(fc2);
  return 0;
}

// MlpForward's gradient into fc1's sums: fc2's input gradient and the GELU's in one GEMM.
// inputs: dacc2 (B,C,H,W) the gradient of fc2's sums, w2 (C,K), acc (B,K,H,W), b1 (K);
// outputs: dacc = (w2^T dacc2) gelu'(acc + b1), db1 (K) = sum of dacc over images and pixels
int MlpHiddenGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, -1) || !IsConv1x1(ndims, shapes, 0, 1, true) || ndims[2] != 4 ||
      shapes[2][1] != shapes[1][1])
    return 1;
  const Packed w2 = PackWeight(static_cast<const float *>(params[1]), shapes[1], true);
  BatchGemm g = Gemm(shapes[0], w2, shapes[1][1], static_cast<const float *>(params[0]), static_cast<float *>(params[4]));
  g.pre = static_cast<const float *>(params[2]);
  g.bias = static_cast<const float *>(params[3]);
  g.bias_grad = static_cast<float *>(params[5]);
  RunBatchGemm<Epi::kGeluGrad>(g);
  return 0;
}

// inputs: x (B,C,H,W); outputs: mean (B), rstd (B) over (C,H,W), as Normalize computes them
int SampleMoments(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, -1)) return 1;
  if (ndims[0] != 4) return 1;
  Planes g(shapes[0]);
  SampleStats(static_cast<const float *>(params[0]), g, kEps, static_cast<float *>(params[1]),
              static_cast<float *>(params[2]));
  return 0;
}

// inputs: dy (B,K,H,W), x (B,C,H,W); outputs: dw (K,C) = sum over images and pixels of dy x^T
int Conv1x1WeightGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (!AllFloat32(nparam, dtypes, -1)) return 1;
  if (ndims[0] != 4 || ndims[1] != 4 || shapes[0][0] != shapes[1][0] ||
      shapes[0][2] * shapes[0][3] != shapes[1][2] * shapes[1][3])
    return 1;
  const int64_t rows = shapes[0][1], channels = shapes[1][1];
  // the operand with fewer channels is transposed into slabs; the tiles take the other 8 rows at a time
  const bool slab_dy = channels % kRows == 0 && (rows % kRows != 0 || rows < channels);
  WeightGrad g;
  g.batch = shapes[0][0];
  g.pixels = shapes[0][2] * shapes[0][3];
  g.direct = static_cast<const float *>(params[slab_dy ? 1 : 0]);
  g.slabbed = static_cast<const float *>(params[slab_dy ? 0 : 1]);
  g.direct_channels = slab_dy ? channels : rows;
  g.slab_channels = slab_dy ? rows : channels;
  if (g.direct_channels % kRows) return 1;
  float *dw = static_cast<float *>(params[2]);
  if (!slab_dy) {
    RunWeightGrad(g, dw);
    return 0;
  }
  Scratch dw_t(rows * channels);  // dw^T (channels x rows)
  RunWeightGrad(g, dw_t.get());
  for (int64_t k = 0; k < rows; ++k)
    for (int64_t c = 0; c < channels; ++c) dw[k * channels + c] = dw_t.get()[c * rows + k];
  return 0;
}

}  // extern "C"

namespace {

// Conv3x3 (winograd: in the Winograd form where the map allows)
int Conv3x3Forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool winograd) {
  if (!AllFloat32(nparam, dtypes, -1) || !IsConv3x3(ndims, shapes, 0, 1, false)) return 1;
  const int64_t rows = shapes[1][0], channels = shapes[1][1], flat[2] = {rows, channels * 9};  // w as (K, 9C)
  const float *w = static_cast<const float *>(params[1]), *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[2]);
  if (winograd && UseWinograd(shapes[0], rows))
    RunWinograd3x3(shapes[0], WinogradWeights(w, rows, channels, channels * 9, 9, false)->get(), rows, x, y);
  else
    RunConv3x3(shapes[0], PackWeight(w, flat, false), rows, x, y);
  return 0;
}

// Conv3x3Transposed: the 3x3 conv of dy with w's channel axes swapped and its taps reversed
int Conv3x3InputGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool winograd) {
  if (!AllFloat32(nparam, dtypes, -1) || !IsConv3x3(ndims, shapes, 0, 1, true)) return 1;
  const int64_t k_out = shapes[1][0], channels = shapes[1][1], flat[2] = {channels, k_out * 9};
  const float *w = static_cast<const float *>(params[1]), *dy = static_cast<const float *>(params[0]);
  float *dx = static_cast<float *>(params[2]);
  if (winograd && UseWinograd(shapes[0], channels)) {
    RunWinograd3x3(shapes[0], WinogradWeights(w, channels, k_out, 9, channels * 9, true)->get(), channels, dy, dx);
    return 0;
  }
  Scratch flipped(channels * k_out * 9);  // (C, K, 3, 3): channel axes swapped, taps reversed
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t k = 0; k < k_out; ++k)
      for (int t = 0; t < 9; ++t) flipped.get()[(c * k_out + k) * 9 + t] = w[(k * channels + c) * 9 + 8 - t];
  RunConv3x3(shapes[0], PackWeight(flipped.get(), flat, false), channels, dy, dx);
  return 0;
}

// Conv3x3WeightGrad (winograd: in the Winograd form where the map allows it)
int Conv3x3WeightGradient(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool winograd) {
  if (!AllFloat32(nparam, dtypes, -1) || ndims[0] != 4 || ndims[1] != 4 || shapes[0][0] != shapes[1][0] ||
      shapes[0][2] != shapes[1][2] || shapes[0][3] != shapes[1][3] || shapes[0][1] % kRows)
    return 1;
  const auto *dy = static_cast<const float *>(params[0]), *x = static_cast<const float *>(params[1]);
  auto *dw = static_cast<float *>(params[2]);
  if (winograd && UseWinograd(shapes[1], shapes[0][1], true)) {
    RunWinograd3x3WeightGrad(shapes[1], shapes[0][1], x, dy, dw);
    return 0;
  }
  WeightGrad g;
  g.batch = shapes[0][0];
  g.pixels = shapes[0][2] * shapes[0][3];
  g.direct = dy;
  g.slabbed = x;
  g.direct_channels = shapes[0][1];
  g.slab_channels = shapes[1][1] * 9;
  g.taps_width = shapes[1][3];
  RunWeightGrad(g, dw);  // (K, 9C): w's own layout
  return 0;
}

}  // namespace

extern "C" {

// inputs: x (B,C,H,W), w (K,C,3,3); outputs: y (B,K,H,W), the zero-padded 3x3 conv
int Conv3x3(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return Conv3x3Forward(nparam, params, ndims, shapes, dtypes, false);
}

// Conv3x3 in the Winograd F(4x4, 3x3) form where the map allows it (UseWinograd)
int Conv3x3Winograd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return Conv3x3Forward(nparam, params, ndims, shapes, dtypes, true);
}

// inputs: dy (B,K,H,W), w (K,C,3,3); outputs: dx (B,C,H,W), Conv3x3's input gradient
int Conv3x3Transposed(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return Conv3x3InputGrad(nparam, params, ndims, shapes, dtypes, false);
}

// Conv3x3Transposed in the Winograd form where the map allows it
int Conv3x3TransposedWinograd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                              void *) {
  return Conv3x3InputGrad(nparam, params, ndims, shapes, dtypes, true);
}

// inputs: dy (B,K,H,W), x (B,C,H,W); outputs: dw (K,C,3,3), Conv3x3's weight gradient
int Conv3x3WeightGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return Conv3x3WeightGradient(nparam, params, ndims, shapes, dtypes, false);
}

// Conv3x3WeightGrad in the Winograd form where the map allows it
int Conv3x3WeightGradWinograd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                              void *) {
  return Conv3x3WeightGradient(nparam, params, ndims, shapes, dtypes, true);
}

}  // extern "C"
#else
extern "C" int PoolformerHasFastGemm() { return 0; }
#endif
