// Fused CUDA kernels for one decode step (one new token per row), built into PTX by build.rs
// when the `cuda` feature is on, and launched from src/text/cuda_decode.rs.
//
// rope_append: RoPE on the new token's queries and keys, and the key/value write into the
//   preallocated cache, in one launch (replaces 3 contiguous copies, 2 RoPE kernels and 2 cache
//   copies per layer).
// decode_attention: one query per row against the cached keys/values, with grouped-query heads,
//   left-padding masks and the softmax in f32 (replaces matmul, scale, mask, 2 casts, softmax,
//   matmul and the output transpose per layer).
//
// gemv: the linear layers of a decode step (a few rows against a weight), in place of cuBLAS's
//   GEMM (and its split-K reduction) where that is slower.
// gemv_swiglu: the gate|up projection and SwiGLU in one launch (replaces gemv + silu_mul).
// gemv_rope: the q|k|v projection, RoPE and the cache write in one launch (replaces gemv +
//   rope_append).
// gemv_add, gemv_rope_norm, gemv_swiglu_norm (the default; off with TESSERA_CUDA_NORM_FOLD=0):
//   the output projections add the residual, and the next products apply the RMSNorm themselves
//   (replaces the two add_rms_norm launches of a layer).
// add_rms_norm: the residual add and the RMSNorm that follows it (replaces an add and a norm).
// guided_argmax: classifier-free guidance and the greedy pick of every job from the head's scores
//   (replaces a cast, two row gathers, three elementwise ops and an argmax per step).
// silu_mul: SwiGLU's silu(gate) * up straight from the fused gate|up projection (replaces a
//   strided SiLU and a multiply).
//
// Rounding follows the unfused candle path step by step, so bf16/f16 results stay within a
// rounding of it: scores are rounded to T after the dot product and after the scale, the
// probabilities are rounded to T before the weighted sum, and the output is rounded once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float tof(float x) { return x; }
__device__ __forceinline__ float tof(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float tof(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T fromf(float x);
template <> __device__ __forceinline__ float fromf<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 fromf<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half fromf<__half>(float x) { return __float2half(x); }

// Round a float to T and back: what storing an intermediate tensor of dtype T does.
template <typename T> __device__ __forceinline__ float round_t(float x) { return tof(fromf<T>(x)); }

// Programmatic dependent launch (compute capability 9.0+; no-ops before that, and when a kernel
// was launched without the attribute). A kernel launched with it may start while the previous
// kernel of the stream is still running: pdl_wait() returns once that kernel has finished and
// its writes are visible, so every kernel calls it before reading any input or writing anything.
// pdl_launch_dependents() lets the next kernel start launching once every block of this one has
// called it (or exited).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Features i and i + hd / 2 of one head (of q|k|v) of the new token of `row`: queries and keys
// are rotated (the same expression, in T, as candle's rope kernel) and stored to q_out or the
// key cache at `pos`; values go to the value cache as they are.
template <typename T>
__device__ __forceinline__ void rope_store(T x1, T x2, uint32_t row, uint32_t head, uint32_t i, const T *cos,
                                           const T *sin, T *q_out, T *k_cache, T *v_cache, uint32_t h, uint32_t kvh,
                                           uint32_t hd, uint32_t max_len, uint32_t pos) {
  const uint32_t half = hd / 2;
  if (head >= h + kvh) {
    T *dst = v_cache + (((size_t)row * kvh + (head - h - kvh)) * max_len + pos) * hd;
    dst[i] = x1;
    dst[i + half] = x2;
    return;
  }
  const T c = cos[(size_t)row * half + i];
  const T s = sin[(size_t)row * half + i];
  const T y1 = x1 * c - x2 * s;
  const T y2 = x1 * s + x2 * c;
  T *dst = head < h ? q_out + ((size_t)row * h + head) * hd
                    : k_cache + (((size_t)row * kvh + (head - h)) * max_len + pos) * hd;
  dst[i] = y1;
  dst[i + half] = y2;
}

// qkv: (b, (h + 2 kvh) * hd), the fused projection of the new token of each row.
// cos, sin: (b, hd / 2) at each row's position.
// q_out: (b, h, hd) rotated queries.
// k_cache, v_cache: (b, kvh, max_len, hd); the new token goes to index `pos`.
// One thread per (row, head of q|k|v, pair index i < hd / 2).
template <typename T>
__device__ void rope_append(const T *qkv, const T *cos, const T *sin, T *q_out, T *k_cache, T *v_cache,
                            uint32_t b, uint32_t h, uint32_t kvh, uint32_t hd, uint32_t max_len, uint32_t pos) {
  pdl_launch_dependents();
  pdl_wait();
  const uint32_t half = hd / 2;
  const uint32_t heads = h + 2 * kvh;
  const uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= b * heads * half) return;
  const uint32_t i = idx % half;
  const uint32_t head = (idx / half) % heads;
  const uint32_t row = idx / (half * heads);
  const T *x = qkv + (size_t)row * heads * hd + (size_t)head * hd;
  rope_store<T>(x[i], x[i + half], row, head, i, cos, sin, q_out, k_cache, v_cache, h, kvh, hd, max_len, pos);
}

#define ATT_THREADS 1024
#define ATT_WARPS (ATT_THREADS / 32)
#define MAX_HD 128

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, m));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffff, v, m);
  return v;
}

// Reduce over the block (ATT_THREADS threads) with `red` (ATT_WARPS floats of shared memory).
template <bool MAX>
__device__ float block_reduce(float v, float *red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = MAX ? warp_max(v) : warp_sum(v);
  __syncthreads();  // `red` may still be read from the previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < ATT_WARPS ? red[lane] : (MAX ? -INFINITY : 0.f);
  return MAX ? warp_max(v) : warp_sum(v);
}

// q: (b, h, hd); k_cache, v_cache: (b, kvh, max_len, hd) holding kv_len tokens; pad: (b,) u32,
// keys before pad[row] are masked; out: (b, h, hd). One block per (row, query head). `scale` is
// 1/sqrt(hd) already rounded to T on the host (candle's affine op multiplies by it in T).
// Dynamic shared memory: kv_len + hd + ATT_WARPS * hd + ATT_WARPS floats.
template <typename T>
__device__ void decode_attention(const T *q, const T *k_cache, const T *v_cache, const uint32_t *pad, T *out,
                                 uint32_t h, uint32_t kvh, uint32_t hd, uint32_t max_len, uint32_t kv_len,
                                 float scale) {
  extern __shared__ float smem[];
  float *p = smem;                     // kv_len: scores, then probabilities
  float *qs = p + kv_len;              // hd
  float *part = qs + hd;               // ATT_WARPS * hd: per-warp partial outputs
  float *red = part + ATT_WARPS * hd;  // ATT_WARPS
  const uint32_t row = blockIdx.x / h, head = blockIdx.x % h;
  const uint32_t kv_head = head / (h / kvh);
  const T *keys = k_cache + ((size_t)row * kvh + kv_head) * max_len * hd;
  const T *values = v_cache + ((size_t)row * kvh + kv_head) * max_len * hd;
  pdl_launch_dependents();  // its blocks all start at once: the next kernel may queue behind them
  pdl_wait();
  const uint32_t first = pad[row];

  for (uint32_t d = threadIdx.x; d < hd; d += ATT_THREADS) qs[d] = tof(q[((size_t)row * h + head) * hd + d]);
  __syncthreads();

  // Scores: one key per warp at a time, its lanes reading consecutive elements (coalesced).
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint32_t per_lane = hd / 32;  // 1, 2 or 4
  float mx = -INFINITY;
  for (uint32_t j = warp; j < kv_len; j += ATT_WARPS) {
    float s = -INFINITY;
    if (j >= first) {
      const T *kj = keys + (size_t)j * hd + lane * per_lane;
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < MAX_HD / 32; ++e)
        if (e < per_lane) dot += qs[lane * per_lane + e] * tof(kj[e]);
      s = round_t<T>(round_t<T>(warp_sum(dot)) * scale);
    }
    if (lane == 0) p[j] = s;
    mx = fmaxf(mx, s);
  }
  mx = block_reduce<true>(mx, red);
  float sum = 0.f;
  for (uint32_t j = threadIdx.x; j < kv_len; j += ATT_THREADS) {
    const float e = expf(p[j] - mx);
    p[j] = e;
    sum += e;
  }
  sum = block_reduce<false>(sum, red);
  const float inv = 1.f / sum;
  for (uint32_t j = threadIdx.x; j < kv_len; j += ATT_THREADS) p[j] = round_t<T>(p[j] * inv);
  __syncthreads();

  // Weighted sum of the values: warps split the keys, lanes split the head dimension.
  float acc[MAX_HD / 32] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
  for (uint32_t j = warp; j < kv_len; j += ATT_WARPS) {
    const float pj = p[j];
    const T *vj = values + (size_t)j * hd + lane * per_lane;
#pragma unroll
    for (int e = 0; e < MAX_HD / 32; ++e)
      if (e < per_lane) acc[e] += pj * tof(vj[e]);
  }
#pragma unroll
  for (int e = 0; e < MAX_HD / 32; ++e)
    if (e < per_lane) part[warp * hd + lane * per_lane + e] = acc[e];
  __syncthreads();
  for (uint32_t d = threadIdx.x; d < hd; d += ATT_THREADS) {
    float y = 0.f;
    for (int w = 0; w < ATT_WARPS; ++w) y += part[w * hd + d];
    out[((size_t)row * h + head) * hd + d] = fromf<T>(y);
  }
}

// --- gemv -------------------------------------------------------------------------------------
// y (M, n) = x (M, k) . w (n, k)^T for a handful of rows M. A decode step's products read each
// weight once and do M multiply-adds with it, so they are bound by the weights' bytes. One block
// per output feature: its GEMV_THREADS threads stream the weight row with 16-byte loads
// (GEMV_UNROLL in flight per thread, bypassing L1 so that x stays there), keep M sums each, and
// reduce them in a fixed order. Small work units keep every multiprocessor busy to the end of
// the launch. Sums are in f32 and rounded to T once, as cuBLAS's GEMM with an f32 compute type
// does. Needs k a multiple of 16 / sizeof(T) and 16-byte aligned x and w (checked on the host).
#define GEMV_THREADS 128
#define GEMV_UNROLL 4

__device__ __forceinline__ uint4 load_stream(const uint4 *p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// acc + the dot product of 16 bytes of weights and 16 bytes of inputs.
__device__ __forceinline__ float dot16(float acc, uint4 w, uint4 x, float) {
  acc = fmaf(__uint_as_float(w.x), __uint_as_float(x.x), acc);
  acc = fmaf(__uint_as_float(w.y), __uint_as_float(x.y), acc);
  acc = fmaf(__uint_as_float(w.z), __uint_as_float(x.z), acc);
  return fmaf(__uint_as_float(w.w), __uint_as_float(x.w), acc);
}
__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }
__device__ __forceinline__ float dot16(float acc, uint4 w, uint4 x, __nv_bfloat16) {
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w}, xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc = fmaf(bf16_lo(ws[i]), bf16_lo(xs[i]), acc);
    acc = fmaf(bf16_hi(ws[i]), bf16_hi(xs[i]), acc);
  }
  return acc;
}
__device__ __forceinline__ float dot16(float acc, uint4 w, uint4 x, __half) {
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w}, xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&ws[i]));
    const float2 b = __half22float2(*reinterpret_cast<const __half2 *>(&xs[i]));
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
  return acc;
}

// acc + the squares of 16 bytes of inputs.
__device__ __forceinline__ float sumsq16(float acc, uint4 x, float) {
  const uint32_t xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) acc = fmaf(__uint_as_float(xs[i]), __uint_as_float(xs[i]), acc);
  return acc;
}
__device__ __forceinline__ float sumsq16(float acc, uint4 x, __nv_bfloat16) {
  const uint32_t xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc = fmaf(bf16_lo(xs[i]), bf16_lo(xs[i]), acc);
    acc = fmaf(bf16_hi(xs[i]), bf16_hi(xs[i]), acc);
  }
  return acc;
}
__device__ __forceinline__ float sumsq16(float acc, uint4 x, __half) {
  const uint32_t xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&xs[i]));
    acc = fmaf(a.x, a.x, acc);
    acc = fmaf(a.y, a.y, acc);
  }
  return acc;
}

// 16 bytes of RMSNorm output from 16 bytes of its input s and weight g: each value
// scale * s * g rounded to T, as add_rms_norm computes it.
__device__ __forceinline__ uint4 norm16(uint4 s, uint4 g, float scale, float) {
  return make_uint4(__float_as_uint(scale * __uint_as_float(s.x) * __uint_as_float(g.x)),
                    __float_as_uint(scale * __uint_as_float(s.y) * __uint_as_float(g.y)),
                    __float_as_uint(scale * __uint_as_float(s.z) * __uint_as_float(g.z)),
                    __float_as_uint(scale * __uint_as_float(s.w) * __uint_as_float(g.w)));
}
__device__ __forceinline__ uint32_t norm_pair_bf16(uint32_t s, uint32_t g, float scale) {
  const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16(scale * bf16_lo(s) * bf16_lo(g)));
  const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16(scale * bf16_hi(s) * bf16_hi(g)));
  return lo | (hi << 16);
}
__device__ __forceinline__ uint4 norm16(uint4 s, uint4 g, float scale, __nv_bfloat16) {
  return make_uint4(norm_pair_bf16(s.x, g.x, scale), norm_pair_bf16(s.y, g.y, scale), norm_pair_bf16(s.z, g.z, scale),
                    norm_pair_bf16(s.w, g.w, scale));
}
__device__ __forceinline__ uint32_t norm_pair_f16(uint32_t s, uint32_t g, float scale) {
  const float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&s));
  const float2 b = __half22float2(*reinterpret_cast<const __half2 *>(&g));
  const __half2 r = __floats2half2_rn(scale * a.x * b.x, scale * a.y * b.y);
  return *reinterpret_cast<const uint32_t *>(&r);
}
__device__ __forceinline__ uint4 norm16(uint4 s, uint4 g, float scale, __half) {
  return make_uint4(norm_pair_f16(s.x, g.x, scale), norm_pair_f16(s.y, g.y, scale), norm_pair_f16(s.z, g.z, scale),
                    norm_pair_f16(s.w, g.w, scale));
}

// The dot products of R weight rows (`wrow`, rows of w (., k)) with the M rows of x (M, k), left
// in shared memory, res[r][m], for the whole block. Each sum is accumulated per thread in a fixed order, then
// over the lanes of a warp and over the warps in a fixed order, so results do not depend on R.
// With NORM, x is the residual stream and the product takes its RMSNorm with weight g (k): the
// block computes each row's scale rsqrt(mean(x^2) + eps) first, then normalises x on the fly,
// rounding each value to T as add_rms_norm's output is rounded.
template <typename T, int M, int R, bool NORM = false>
__device__ __forceinline__ void gemv_dots(const T *__restrict__ x, const T *__restrict__ w, const uint32_t (&wrow)[R],
                                          uint32_t k, float (&res)[R][M], const T *__restrict__ g = nullptr,
                                          float eps = 0.f) {
  __shared__ float part[GEMV_THREADS / 32][R][M];
  const uint32_t vecs = k / (16 / sizeof(T));  // 16-byte vectors per row
  const uint4 *xr = reinterpret_cast<const uint4 *>(x);
  const uint4 *wr[R];
#pragma unroll
  for (int r = 0; r < R; ++r) wr[r] = reinterpret_cast<const uint4 *>(w + (size_t)wrow[r] * k);
  // The weights do not depend on the previous kernel: load this thread's first GEMV_UNROLL vectors
  // of each row (for k = 4096 in bf16, all of them) while it may still be running, or, for rows
  // shorter than that, ask L2 for them; then wait for it before reading x. The norm's prologue
  // below then runs while those loads are in flight.
  uint32_t i = threadIdx.x;
  const bool first_full = i + GEMV_THREADS * (GEMV_UNROLL - 1) < vecs;
  uint4 w_first[R][GEMV_UNROLL];
  if (first_full) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int u = 0; u < GEMV_UNROLL; ++u) w_first[r][u] = load_stream(wr[r] + i + GEMV_THREADS * u);
  } else {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int u = 0; u < GEMV_UNROLL; ++u)
        if (i + GEMV_THREADS * u < vecs) asm volatile("prefetch.global.L2 [%0];" ::"l"(wr[r] + i + GEMV_THREADS * u));
  }
  pdl_wait();
  const uint4 *gr = reinterpret_cast<const uint4 *>(g);
  float scale[M];
  if constexpr (NORM) {
    __shared__ float sq_part[GEMV_THREADS / 32][M];
    __shared__ float sq_scale[M];
    float ss[M];
#pragma unroll
    for (int m = 0; m < M; ++m) ss[m] = 0.f;
    for (uint32_t c = threadIdx.x; c < vecs; c += GEMV_THREADS)
#pragma unroll
      for (int m = 0; m < M; ++m) ss[m] = sumsq16(ss[m], __ldg(xr + (size_t)m * vecs + c), T());
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float v = warp_sum(ss[m]);
      if (lane == 0) sq_part[warp][m] = v;
    }
    __syncthreads();
    if (threadIdx.x < M) {
      float v = 0.f;
#pragma unroll
      for (int p = 0; p < GEMV_THREADS / 32; ++p) v += sq_part[p][threadIdx.x];
      sq_scale[threadIdx.x] = rsqrtf(v / k + eps);
    }
    __syncthreads();
#pragma unroll
    for (int m = 0; m < M; ++m) scale[m] = sq_scale[m];
  }
  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
  // The multiply-adds of GEMV_UNROLL vectors per row starting at vector `at`.
  auto step = [&](const uint4 (&wv)[R][GEMV_UNROLL], uint32_t at) {
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; ++u) {
      uint4 gv;
      if constexpr (NORM) gv = __ldg(gr + at + GEMV_THREADS * u);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        uint4 xv = __ldg(xr + (size_t)m * vecs + at + GEMV_THREADS * u);
        if constexpr (NORM) xv = norm16(xv, gv, scale[m], T());
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][m] = dot16(acc[r][m], wv[r][u], xv, T());
      }
    }
  };
  if (first_full) {
    step(w_first, i);
    i += GEMV_THREADS * GEMV_UNROLL;
  }
  for (; i + GEMV_THREADS * (GEMV_UNROLL - 1) < vecs; i += GEMV_THREADS * GEMV_UNROLL) {
    uint4 wv[R][GEMV_UNROLL];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int u = 0; u < GEMV_UNROLL; ++u) wv[r][u] = load_stream(wr[r] + i + GEMV_THREADS * u);
    step(wv, i);
  }
  for (; i < vecs; i += GEMV_THREADS) {
    uint4 wv[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wv[r] = load_stream(wr[r] + i);
    uint4 gv;
    if constexpr (NORM) gv = __ldg(gr + i);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      uint4 xv = __ldg(xr + (size_t)m * vecs + i);
      if constexpr (NORM) xv = norm16(xv, gv, scale[m], T());
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r][m] = dot16(acc[r][m], wv[r], xv, T());
    }
  }
  pdl_launch_dependents();  // every weight of this block is read; the next kernel may launch
  const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float v = warp_sum(acc[r][m]);
      if (lane == 0) part[warp][r][m] = v;
    }
  __syncthreads();
  if (threadIdx.x < R * M) {
    const uint32_t r = threadIdx.x / M, m = threadIdx.x % M;
    float v = 0.f;
#pragma unroll
    for (int p = 0; p < GEMV_THREADS / 32; ++p) v += part[p][r][m];
    res[r][m] = v;
  }
  __syncthreads();
}

// y (M, n) = x (M, k) . w (n, k)^T; one block per output feature.
template <typename T, int M>
__device__ void gemv(const T *__restrict__ x, const T *__restrict__ w, T *__restrict__ y, uint32_t n, uint32_t k) {
  const uint32_t row = blockIdx.x;
  const uint32_t wrow[1] = {row};
  __shared__ float res[1][M];
  gemv_dots<T, M, 1>(x, w, wrow, k, res);
  if (threadIdx.x < M) y[(size_t)threadIdx.x * n + row] = fromf<T>(res[0][threadIdx.x]);
}

// y (M, n) = resid + x . w^T: an output projection with the residual add, the sum rounded as
// add_rms_norm rounds it (the product rounded to T first, as gemv stores it).
template <typename T, int M>
__device__ void gemv_add(const T *__restrict__ x, const T *__restrict__ w, const T *resid, T *__restrict__ y, uint32_t n,
                         uint32_t k) {
  const uint32_t row = blockIdx.x;
  const uint32_t wrow[1] = {row};
  __shared__ float res[1][M];
  gemv_dots<T, M, 1>(x, w, wrow, k, res);
  if (threadIdx.x < M) {
    const size_t at = (size_t)threadIdx.x * n + row;
    y[at] = fromf<T>(tof(resid[at]) + round_t<T>(res[0][threadIdx.x]));
  }
}

// SwiGLU straight from the fused gate|up weight w (2 inter, k): y (M, inter) = silu(x . gate^T)
// * (x . up^T), block j reading gate row j and up row inter + j. Both products are rounded to T
// first, as gemv then silu_mul does.
// With NORM, x is the residual stream, normed on the fly with weight g (see gemv_dots).
template <typename T, int M, bool NORM = false>
__device__ void gemv_swiglu(const T *__restrict__ x, const T *__restrict__ w, T *__restrict__ y, uint32_t inter,
                            uint32_t k, const T *g = nullptr, float eps = 0.f) {
  const uint32_t j = blockIdx.x;
  const uint32_t wrow[2] = {j, inter + j};
  __shared__ float res[2][M];
  gemv_dots<T, M, 2, NORM>(x, w, wrow, k, res, g, eps);
  if (threadIdx.x < M) {
    const float g = round_t<T>(res[0][threadIdx.x]);
    const float u = round_t<T>(res[1][threadIdx.x]);
    y[(size_t)threadIdx.x * inter + j] = fromf<T>(round_t<T>(g / (1.f + expf(-g))) * u);
  }
}

// The fused q|k|v projection with RoPE and the cache write: w ((h + 2 kvh) hd, k); block
// (head, i) computes features i and i + hd / 2 of that head for the M rows (rounded to T, as the
// projection's output is), then does what rope_append does with them.
// With NORM, x is the residual stream, normed on the fly with weight g (see gemv_dots).
template <typename T, int M, bool NORM = false>
__device__ void gemv_rope(const T *__restrict__ x, const T *__restrict__ w, const T *cos, const T *sin, T *q_out,
                          T *k_cache, T *v_cache, uint32_t h, uint32_t kvh, uint32_t hd, uint32_t max_len,
                          uint32_t pos, uint32_t k, const T *g = nullptr, float eps = 0.f) {
  const uint32_t half = hd / 2;
  const uint32_t head = blockIdx.x / half, i = blockIdx.x % half;
  const uint32_t wrow[2] = {head * hd + i, head * hd + i + half};
  __shared__ float res[2][M];
  gemv_dots<T, M, 2, NORM>(x, w, wrow, k, res, g, eps);
  if (threadIdx.x >= M) return;
  const uint32_t row = threadIdx.x;
  rope_store<T>(fromf<T>(res[0][row]), fromf<T>(res[1][row]), row, head, i, cos, sin, q_out, k_cache, v_cache, h,
                kvh, hd, max_len, pos);
}

// x, p: (rows, d); w: (d). s = x + p rounded to T (written to sum_out), then RMSNorm of s:
// y = s * rsqrt(mean(s^2) + eps) * w in f32, rounded once (candle's rmsnorm kernel). With
// p == nullptr, s = x and sum_out is not written. One block per row (blockDim a multiple of 32).
template <typename T>
__device__ void add_rms_norm(const T *x, const T *p, const T *w, T *sum_out, T *y, uint32_t d, float eps) {
  __shared__ float red[32];
  pdl_launch_dependents();
  pdl_wait();
  const size_t base = (size_t)blockIdx.x * d;
  float ss = 0.f;
  for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
    float v = tof(x[base + c]);
    if (p) {
      const T t = fromf<T>(v + tof(p[base + c]));
      sum_out[base + c] = t;
      v = tof(t);
    }
    ss += v * v;
  }
  ss = warp_sum(ss);
  const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) red[warp] = ss;
  __syncthreads();
  ss = lane < blockDim.x / 32 ? red[lane] : 0.f;
  ss = warp_sum(ss);
  const float scale = rsqrtf(ss / d + eps);
  for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float v = p ? round_t<T>(tof(x[base + c]) + tof(p[base + c])) : tof(x[base + c]);
    y[base + c] = fromf<T>(scale * v * tof(w[c]));
  }
}

// gu: (rows, 2 * inter), gate then up; out: (rows, inter) = silu(gate) * up, with silu's
// output rounded to T as storing it would.
template <typename T>
__device__ void silu_mul(const T *gu, T *out, uint32_t rows, uint32_t inter) {
  pdl_launch_dependents();
  pdl_wait();
  const uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= rows * inter) return;
  const uint32_t r = idx / inter, c = idx % inter;
  const float g = tof(gu[(size_t)r * 2 * inter + c]);
  const float u = tof(gu[(size_t)r * 2 * inter + inter + c]);
  out[idx] = fromf<T>(round_t<T>(g / (1.f + expf(-g))) * u);
}

// scores: (rows, n), the head's output for the candidate tokens; cond, uncond: (jobs,) the row of
// each job's conditional and unconditional scores (the same row for a job without guidance);
// scale: (jobs,) its guidance scale. picked[job] = the first j with the largest
// (s[cond][j] - s[uncond][j]) * scale + s[uncond][j], computed in f32 one rounded operation at a
// time (no fused multiply-add), as the scores cast to f32 and then a subtraction, a
// multiplication and an addition as tensor ops compute it, and an argmax that keeps the first
// maximum (torch's). One block of PICK_THREADS threads per job.
#define PICK_THREADS 1024
template <typename T>
__device__ void guided_argmax(const T *scores, const uint32_t *cond, const uint32_t *uncond, const float *scale,
                              uint32_t *picked, uint32_t n) {
  __shared__ float best_v[PICK_THREADS / 32];
  __shared__ uint32_t best_i[PICK_THREADS / 32];
  pdl_launch_dependents();
  pdl_wait();
  const uint32_t job = blockIdx.x;
  const T *c = scores + (size_t)cond[job] * n;
  const T *u = scores + (size_t)uncond[job] * n;
  const float g = scale[job];
  float bv = -INFINITY;
  uint32_t bi = 0xffffffffu;
  for (uint32_t j = threadIdx.x; j < n; j += PICK_THREADS) {  // j rises: a thread keeps its first maximum
    const float uj = tof(u[j]);
    const float v = __fadd_rn(__fmul_rn(__fsub_rn(tof(c[j]), uj), g), uj);
    if (v > bv || bi == 0xffffffffu) {
      bv = v;
      bi = j;
    }
  }
  // The larger value wins; of equal values, the smaller index.
  auto take = [&](float ov, uint32_t oi) {
    if (ov > bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  };
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) take(__shfl_xor_sync(0xffffffff, bv, m), __shfl_xor_sync(0xffffffff, bi, m));
  const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    best_v[warp] = bv;
    best_i[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    bv = best_v[lane];
    bi = best_i[lane];
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) take(__shfl_xor_sync(0xffffffff, bv, m), __shfl_xor_sync(0xffffffff, bi, m));
    if (lane == 0) picked[job] = bi;
  }
}

#define GEMV_OP(T, SUFFIX, M)                                                                                  \
  extern "C" __global__ void gemv_##SUFFIX##_##M(const T *x, const T *w, T *y, uint32_t n, uint32_t k) {        \
    gemv<T, M>(x, w, y, n, k);                                                                                 \
  }                                                                                                            \
  extern "C" __global__ void gemv_swiglu_##SUFFIX##_##M(const T *x, const T *w, T *y, uint32_t inter,          \
                                                        uint32_t k) {                                          \
    gemv_swiglu<T, M>(x, w, y, inter, k);                                                                      \
  }                                                                                                            \
  extern "C" __global__ void gemv_rope_##SUFFIX##_##M(const T *x, const T *w, const T *cos, const T *sin,      \
                                                      T *q_out, T *k_cache, T *v_cache, uint32_t h,            \
                                                      uint32_t kvh, uint32_t hd, uint32_t max_len,             \
                                                      uint32_t pos, uint32_t k) {                              \
    gemv_rope<T, M>(x, w, cos, sin, q_out, k_cache, v_cache, h, kvh, hd, max_len, pos, k);                     \
  }                                                                                                            \
  extern "C" __global__ void gemv_add_##SUFFIX##_##M(const T *x, const T *w, const T *resid, T *y, uint32_t n,  \
                                                     uint32_t k) {                                             \
    gemv_add<T, M>(x, w, resid, y, n, k);                                                                      \
  }                                                                                                            \
  extern "C" __global__ void gemv_swiglu_norm_##SUFFIX##_##M(const T *x, const T *w, T *y, const T *g,         \
                                                             uint32_t inter, uint32_t k, float eps) {          \
    gemv_swiglu<T, M, true>(x, w, y, inter, k, g, eps);                                                        \
  }                                                                                                            \
  extern "C" __global__ void gemv_rope_norm_##SUFFIX##_##M(                                                    \
      const T *x, const T *w, const T *cos, const T *sin, T *q_out, T *k_cache, T *v_cache, const T *g,         \
      uint32_t h, uint32_t kvh, uint32_t hd, uint32_t max_len, uint32_t pos, uint32_t k, float eps) {          \
    gemv_rope<T, M, true>(x, w, cos, sin, q_out, k_cache, v_cache, h, kvh, hd, max_len, pos, k, g, eps);       \
  }

#define GEMV_OPS(T, SUFFIX) \
  GEMV_OP(T, SUFFIX, 1)     \
  GEMV_OP(T, SUFFIX, 2)     \
  GEMV_OP(T, SUFFIX, 3)     \
  GEMV_OP(T, SUFFIX, 4)     \
  GEMV_OP(T, SUFFIX, 5)     \
  GEMV_OP(T, SUFFIX, 6)     \
  GEMV_OP(T, SUFFIX, 7)     \
  GEMV_OP(T, SUFFIX, 8)

#define DECODE_OPS(T, SUFFIX)                                                                                  \
  extern "C" __global__ void rope_append_##SUFFIX(const T *qkv, const T *cos, const T *sin, T *q_out,          \
                                                  T *k_cache, T *v_cache, uint32_t b, uint32_t h, uint32_t kvh, \
                                                  uint32_t hd, uint32_t max_len, uint32_t pos) {                \
    rope_append<T>(qkv, cos, sin, q_out, k_cache, v_cache, b, h, kvh, hd, max_len, pos);                       \
  }                                                                                                            \
  extern "C" __global__ void decode_attention_##SUFFIX(const T *q, const T *k_cache, const T *v_cache,         \
                                                       const uint32_t *pad, T *out, uint32_t h, uint32_t kvh,  \
                                                       uint32_t hd, uint32_t max_len, uint32_t kv_len,         \
                                                       float scale) {                                          \
    decode_attention<T>(q, k_cache, v_cache, pad, out, h, kvh, hd, max_len, kv_len, scale);                    \
  }                                                                                                            \
  extern "C" __global__ void silu_mul_##SUFFIX(const T *gu, T *out, uint32_t rows, uint32_t inter) {           \
    silu_mul<T>(gu, out, rows, inter);                                                                         \
  }                                                                                                            \
  extern "C" __global__ void add_rms_norm_##SUFFIX(const T *x, const T *p, const T *w, T *sum_out, T *y,       \
                                                   uint32_t d, float eps) {                                    \
    add_rms_norm<T>(x, p, w, sum_out, y, d, eps);                                                              \
  }                                                                                                            \
  extern "C" __global__ void guided_argmax_##SUFFIX(const T *scores, const uint32_t *cond,                     \
                                                    const uint32_t *uncond, const float *scale,                \
                                                    uint32_t *picked, uint32_t n) {                            \
    guided_argmax<T>(scores, cond, uncond, scale, picked, n);                                                  \
  }                                                                                                            \
  GEMV_OPS(T, SUFFIX)

DECODE_OPS(float, f32)
DECODE_OPS(__nv_bfloat16, bf16)
DECODE_OPS(__half, f16)
