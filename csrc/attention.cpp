// uniformer_fast._C: softmax attention on the CPU straight from the packed qkv, float32 and bfloat16,
// AVX-512 (bfloat16 with AVX512-BF16's dot products), OpenMP.
//
// qkv is the qkv Linear's output, (B, N, 3, heads, D) with token stride sqn and batch stride sqb
// (elements), unit stride inside a token; out is (B, N, heads * D) dense. Every key fits one pass:
// a block of R query rows computes its whole row of scores (R x N floats, in L1/L2 for N up to a few
// thousand), its exact softmax (no online rescaling) and then P V. Per (batch, head) K and V are
// first laid out once for the micro-kernels, as contiguous panels of 64 columns (keys padded to a
// multiple of 64 with zeros; head_dim in panels of 64 and a last one of 32):
//   float32:  K^T panels Kt[k/64][d][64 keys], V panels Vt[d/64][k][64 dims].
//   bfloat16: the same over 32-bit pairs, the operand layout of vdpbf16ps: Kp[k/64][d/2][64 keys]
//             of (K[k][d], K[k][d+1]) and Vp[d/64][k/2][64 dims] of (V[k][d], V[k+1][d]). P is
//             rounded to bfloat16 for P V, as flash attention does on GPUs; scores, softmax
//             statistics and both accumulations are float32.
// Both matmuls use one micro-kernel shape: R = 6 rows of a broadcast-scalar operand times a
// 64-column panel, 24 zmm accumulators. Measured on Zen 5, 2 threads, N = 784, head_dim 64 (GFLOP/s,
// float32 / bfloat16): R = 8 x 32 columns 287 / 514, 2 x 64 214 / 463,
// 4 x 64 409 / 705, 6 x 64 429 / 726; SDPA's flash kernel 185 / 175.
#include "attention.h"

#include "isa.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef UF_X86_VARIANTS
#include <immintrin.h>
#define UF_HAVE_ATTENTION_AVX512 1
#endif

namespace {

#ifndef UF_ATTENTION_ROWS
#define UF_ATTENTION_ROWS 6
#endif
constexpr int R = UF_ATTENTION_ROWS;  // query rows per micro-tile
constexpr int KEYS = 64;  // keys per S = Q K^T micro-tile (and the key padding)
constexpr int DIMS = 64;  // output dims per O = P V micro-tile (the last may be 32)
constexpr long ALIGN = 32;

long round_up(long n, long m) { return (n + m - 1) / m * m; }

// exp(y)'s Taylor series to degree 7, highest coefficient first (Horner), for the AVX-512 exp2.
constexpr int EXP_TAYLOR_TERMS = 8;
constexpr float EXP_TAYLOR[EXP_TAYLOR_TERMS] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24,
                                                1.0f / 6,    0.5f,       1.0f,       1.0f};

#ifdef UF_HAVE_ATTENTION_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,fma")

// 2^x for x <= 0, elementwise: 2^n * exp(f ln 2) with n = round(x), |f ln 2| <= 0.35 and exp's
// Taylor series to degree 7 (relative error < 3e-9 before rounding); below -150 it is 0 (scalef
// underflows), and a NaN x gives NaN (vmaxps returns its second operand when either is NaN).
inline __m512 exp2_nonpositive(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-150.0f), x);
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 y = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.6931471805599453f));
    __m512 p = _mm512_set1_ps(EXP_TAYLOR[0]);
    for (int i = 1; i < EXP_TAYLOR_TERMS; ++i) p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(EXP_TAYLOR[i]));
    return _mm512_scalef_ps(p, n);
}

// acc[i][j] (R x 16 NC) = sum_k a[i][k] * b[k][j], k < kdim: a row i at a[i] (unit stride), b a
// panel of rows of 16 NC contiguous floats. float32.
template <int NC>
inline void panel_f32(const float* const* a, const float* b, long kdim, __m512 (&acc)[R][NC]) {
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_setzero_ps();
    for (long k = 0; k < kdim; ++k) {
        __m512 bk[NC];
        for (int j = 0; j < NC; ++j) bk[j] = _mm512_loadu_ps(b + (k * NC + j) * 16);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
            const __m512 ai = _mm512_set1_ps(a[i][k]);
            for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_fmadd_ps(ai, bk[j], acc[i][j]);
        }
    }
}

// The same over bfloat16 pairs: a[i] and b hold 32-bit (even, odd) pairs along k, kpairs of them;
// float32 accumulation (vdpbf16ps).
template <int NC>
inline void panel_bf16(const uint32_t* const* a, const uint32_t* b, long kpairs, __m512 (&acc)[R][NC]) {
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_setzero_ps();
    for (long k = 0; k < kpairs; ++k) {
        __m512bh bk[NC];
        for (int j = 0; j < NC; ++j) bk[j] = (__m512bh)_mm512_loadu_si512(b + (k * NC + j) * 16);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
            const __m512bh ai = (__m512bh)_mm512_set1_epi32((int)a[i][k]);
            for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], ai, bk[j]);
        }
    }
}

// In place over one row of scores s[0 .. np) already in log2 units: s = 2^(s - max s[0 .. n)) for
// k < n and 0 beyond (padding keys); returns the sum.
inline float softmax_row(float* s, long n, long np) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    long k = 0;
    for (; k + 16 <= n; k += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + k));
    if (k < n) {
        const __mmask16 tail = (__mmask16)((1u << (n - k)) - 1);
        m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, s + k));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (k = 0; k < np; k += 16) {
        const long left = n - k;
        const __mmask16 live = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
        const __m512 p = _mm512_maskz_mov_ps(live, exp2_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + k), mx)));
        sum = _mm512_add_ps(sum, p);
        _mm512_storeu_ps(s + k, p);
    }
    return _mm512_reduce_add_ps(sum);
}

struct Problem {
    long B, N, heads, D, sqb, sqn, threads;
    float scale_log2;  // scale * log2(e): scores go straight to log2 units
    long Np;           // keys padded to a multiple of KEYS
};

// Row i of the scores block s (R x Np) = c * acc[i] at keys k0 .. k0 + 16 NC.
template <int NC>
inline void store_scores(const __m512 (&acc)[R][NC], __m512 c, float* s, long Np, long k0) {
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < NC; ++j) _mm512_storeu_ps(s + i * Np + k0 + 16 * j, _mm512_mul_ps(acc[i][j], c));
}

// Output rows r0 .. r0 + rows of one head, dims d0 .. d0 + 16 NC: acc[i] / sum[i].
template <int NC, typename T>
inline void store_out(const __m512 (&acc)[R][NC], const float* inv, int rows, T* o, long C) {
    for (int i = 0; i < rows; ++i) {
        const __m512 w = _mm512_set1_ps(inv[i]);
        for (int j = 0; j < NC; ++j) {
            const __m512 y = _mm512_mul_ps(acc[i][j], w);
            if constexpr (sizeof(T) == 4)
                _mm512_storeu_ps(o + i * C + 16 * j, y);
            else
                _mm256_storeu_si256((__m256i*)(o + i * C + 16 * j), (__m256i)_mm512_cvtneps_pbh(y));
        }
    }
}

// One (batch, head, block of R query rows): scores, softmax, P V, out rows. Rows past N repeat row
// N - 1 and are not stored.
void rows_f32(const Problem& p, const float* qkv, const float* kt, const float* vt, long b, long h, long r0, float* out,
              float* s) {
    const long C = p.heads * p.D;
    const float* q[R];
    for (int i = 0; i < R; ++i) q[i] = qkv + b * p.sqb + std::min(r0 + i, p.N - 1) * p.sqn + h * p.D;
    const __m512 c = _mm512_set1_ps(p.scale_log2);
    for (long k0 = 0; k0 < p.Np; k0 += KEYS) {
        __m512 acc[R][KEYS / 16];
        panel_f32(q, kt + k0 * p.D, p.D, acc);
        store_scores(acc, c, s, p.Np, k0);
    }
    float inv[R];
    const float* prow[R];
    for (int i = 0; i < R; ++i) {
        inv[i] = 1.0f / softmax_row(s + i * p.Np, p.N, p.Np);
        prow[i] = s + i * p.Np;
    }
    const int rows = (int)std::min<long>(R, p.N - r0);
    float* o = out + (b * p.N + r0) * C + h * p.D;
    for (long d0 = 0; d0 < p.D; d0 += DIMS) {
        if (p.D - d0 >= DIMS) {
            __m512 acc[R][DIMS / 16];
            panel_f32(prow, vt + d0 * p.Np, p.N, acc);
            store_out(acc, inv, rows, o + d0, C);
        } else {  // the last 32 dims
            __m512 acc[R][2];
            panel_f32(prow, vt + d0 * p.Np, p.N, acc);
            store_out(acc, inv, rows, o + d0, C);
        }
    }
}

void rows_bf16(const Problem& p, const uint16_t* qkv, const uint32_t* kp, const uint32_t* vp, long b, long h,
               long r0, uint16_t* out, float* s, uint16_t* pb) {
    const long C = p.heads * p.D;
    const uint32_t* q[R];
    for (int i = 0; i < R; ++i)
        q[i] = reinterpret_cast<const uint32_t*>(qkv + b * p.sqb + std::min(r0 + i, p.N - 1) * p.sqn + h * p.D);
    const __m512 c = _mm512_set1_ps(p.scale_log2);
    for (long k0 = 0; k0 < p.Np; k0 += KEYS) {
        __m512 acc[R][KEYS / 16];
        panel_bf16(q, kp + k0 * (p.D / 2), p.D / 2, acc);
        store_scores(acc, c, s, p.Np, k0);
    }
    float inv[R];
    const uint32_t* prow[R];
    for (int i = 0; i < R; ++i) {
        float* srow = s + i * p.Np;
        inv[i] = 1.0f / softmax_row(srow, p.N, p.Np);
        uint16_t* brow = pb + i * p.Np;
        for (long k = 0; k < p.Np; k += 16)
            _mm256_storeu_si256((__m256i*)(brow + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(srow + k)));
        prow[i] = reinterpret_cast<const uint32_t*>(brow);
    }
    const int rows = (int)std::min<long>(R, p.N - r0);
    const long kpairs = round_up(p.N, 2) / 2;
    uint16_t* o = out + (b * p.N + r0) * C + h * p.D;
    for (long d0 = 0; d0 < p.D; d0 += DIMS) {
        if (p.D - d0 >= DIMS) {
            __m512 acc[R][DIMS / 16];
            panel_bf16(prow, vp + d0 * (p.Np / 2), kpairs, acc);
            store_out(acc, inv, rows, o + d0, C);
        } else {
            __m512 acc[R][2];
            panel_bf16(prow, vp + d0 * (p.Np / 2), kpairs, acc);
            store_out(acc, inv, rows, o + d0, C);
        }
    }
}

#pragma GCC pop_options
#endif  // UF_HAVE_ATTENTION_AVX512

#ifdef UF_HAVE_ATTENTION_AVX512
// --- float32 with AVX2 + FMA (CPUs without AVX-512) ----------------------------------------------
// The same algorithm on 8-wide vectors and 16 registers: micro-tiles of R2 = 6 rows x 16 columns
// (12 ymm accumulators), panels 16 wide: Kt[k/16][d][16 keys], Vt[d/16][k][16 dims]. The tile
// functions are kept out of line so that no loop constant around them competes with the
// accumulators for the 16 registers.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {

constexpr int R2 = 6;
constexpr long W2 = 16;  // panel width: keys per S tile, dims per O tile
constexpr int NC2 = W2 / 8;

// 2^f on [-0.5, 0.5], degree 6, highest coefficient first: a least-squares fit of our own in the
// relative error (2e-9 in exact arithmetic, 1e-7 evaluated in float32).
constexpr int EXP2_POLY_TERMS = 7;
constexpr float EXP2_POLY[EXP2_POLY_TERMS] = {1.538241631e-04f, 1.340027666e-03f, 9.618353099e-03f,
                                              5.550327525e-02f, 2.402264774e-01f, 6.931471825e-01f, 1.0f};

// 2^x for x <= 0 as exp2_nonpositive, below -126 0 (at most 2^-126 of a row whose largest term is
// 1), NaN staying NaN; 11 vector operations where rounding with vroundps and converting with
// vcvtps2dq, then the Taylor series of exp in f ln 2, took 15. Adding 1.5 * 2^23 + 127 to x in
// [-127, 0] rounds it to the nearest integer n and leaves n + 127 in the low mantissa bits: shifted
// left by 23 they are the exponent field of 2^n (n = -127 gives 0, and 0 times p).
inline __m256 exp2_nonpositive(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-127.0f), x);
    const __m256 shifter = _mm256_set1_ps(12582912.0f + 127.0f);
    const __m256 biased = _mm256_add_ps(x, shifter);
    const __m256 f = _mm256_sub_ps(x, _mm256_sub_ps(biased, shifter));
    __m256 p = _mm256_set1_ps(EXP2_POLY[0]);
    for (int i = 1; i < EXP2_POLY_TERMS; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_POLY[i]));
    const __m256i bits = _mm256_slli_epi32(_mm256_castps_si256(biased), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// epilogue(acc) with acc (R2 x 16) = a rows . a panel of rows of 16 contiguous floats, k < kdim.
// The 12 accumulators are named variables: as an array (indexed in unrolled loops, or filled through
// a reference) GCC stored them to the stack after every FMA in the k loop.
#define UF_AVX2_ROW(i)                                                  \
    {                                                                   \
        const __m256 ai = _mm256_broadcast_ss(a[i] + k);                \
        c##i##0 = _mm256_fmadd_ps(ai, b0, c##i##0);                     \
        c##i##1 = _mm256_fmadd_ps(ai, b1, c##i##1);                     \
    }
template <typename Epilogue>
inline void panel(const float* const* a, const float* b, long kdim, Epilogue epilogue) {
    static_assert(R2 == 6 && NC2 == 2, "the accumulators below are written out for 6 x 16");
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
           c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (long k = 0; k < kdim; ++k) {
        const __m256 b0 = _mm256_loadu_ps(b + k * W2), b1 = _mm256_loadu_ps(b + k * W2 + 8);
        UF_AVX2_ROW(0) UF_AVX2_ROW(1) UF_AVX2_ROW(2) UF_AVX2_ROW(3) UF_AVX2_ROW(4) UF_AVX2_ROW(5)
    }
    const __m256 acc[R2][NC2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    epilogue(acc);
}
#undef UF_AVX2_ROW

// Scores of R2 query rows q[i] against keys k0 .. k0 + 16 (panel kt), times c, into s rows (Np apart).
__attribute__((noinline)) void scores_tile(const float* const* q, const float* kt, long D, float c, float* s,
                                           long Np, long k0) {
    panel(q, kt, D, [&](const __m256 (&acc)[R2][NC2]) {
        const __m256 cv = _mm256_set1_ps(c);
        for (int i = 0; i < R2; ++i)
            for (int j = 0; j < NC2; ++j) _mm256_storeu_ps(s + i * Np + k0 + 8 * j, _mm256_mul_ps(acc[i][j], cv));
    });
}

// Output rows (rows <= R2) of dims d0 .. d0 + 16: P rows p[i] . V panel vt over n keys, times inv[i].
__attribute__((noinline)) void out_tile(const float* const* p, const float* vt, long n, const float* inv,
                                        int rows, float* o, long C) {
    panel(p, vt, n, [&](const __m256 (&acc)[R2][NC2]) {
        for (int i = 0; i < rows; ++i) {
            const __m256 w = _mm256_set1_ps(inv[i]);
            for (int j = 0; j < NC2; ++j) _mm256_storeu_ps(o + i * C + 8 * j, _mm256_mul_ps(acc[i][j], w));
        }
    });
}

inline __m256 live_lanes(long left) {  // all-ones in lanes < left
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)std::max(0L, std::min(left, 8L))),
                                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

// softmax_row on 8-wide vectors: s = 2^(s - max) for k < n, 0 for n <= k < np; returns the sum.
inline float softmax_row(float* s, long n, long np) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    long k = 0;
    for (; k + 8 <= n; k += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + k));
    if (k < n) m = _mm256_max_ps(m, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(s + k), live_lanes(n - k)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    const __m256 mx = _mm256_set1_ps(_mm_cvtss_f32(h));
    __m256 sum = _mm256_setzero_ps();
    for (k = 0; k < np; k += 8) {
        __m256 e = exp2_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + k), mx));
        if (k + 8 > n) e = _mm256_and_ps(e, live_lanes(n - k));
        sum = _mm256_add_ps(sum, e);
        _mm256_storeu_ps(s + k, e);
    }
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_shuffle_ps(t, t, 1));
    return _mm_cvtss_f32(t);
}

// One (batch, head, block of R2 query rows); rows past N repeat row N - 1 and are not stored.
void rows(const float* qkv, long sqb, long sqn, long N, long Np, long heads, long D, float c, const float* kt,
          const float* vt, long b, long h, long r0, float* out, float* s) {
    const long C = heads * D;
    const float* q[R2];
    for (int i = 0; i < R2; ++i) q[i] = qkv + b * sqb + std::min(r0 + i, N - 1) * sqn + h * D;
    for (long k0 = 0; k0 < Np; k0 += W2) scores_tile(q, kt + k0 * D, D, c, s, Np, k0);
    float inv[R2];
    const float* prow[R2];
    for (int i = 0; i < R2; ++i) {
        inv[i] = 1.0f / softmax_row(s + i * Np, N, Np);
        prow[i] = s + i * Np;
    }
    const int live = (int)std::min<long>(R2, N - r0);
    float* o = out + (b * N + r0) * C + h * D;
    for (long d0 = 0; d0 < D; d0 += W2) out_tile(prow, vt + d0 * Np, N, inv, live, o + d0, C);
}

}  // namespace avx2
#pragma GCC pop_options
#endif  // UF_HAVE_ATTENTION_AVX512

// Per-thread scratch reused between calls (OpenMP keeps its threads).
template <typename T>
T* scratch(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
}

#ifdef UF_HAVE_ATTENTION_AVX512
// K and V of one (batch, head), float32, laid out for the micro-kernels: Kt[k/kw][d][kw] and
// Vt[d/dw][k][w], w = dw or what is left of D for the last panel; keys padded to Np with zeros.
void pack_f32(const float* kq, const float* vq, long sqn, long N, long D, long Np, long kw, long dw, float* kt,
              float* vt) {
    for (long k0 = 0; k0 < Np; k0 += kw) {
        float* panel = kt + k0 * D;
        for (long j = 0; j < kw; ++j) {
            const long k = k0 + j;
            for (long d = 0; d < D; ++d) panel[d * kw + j] = k < N ? kq[k * sqn + d] : 0.0f;
        }
    }
    for (long d0 = 0; d0 < D; d0 += dw) {
        const long w = std::min(dw, D - d0);
        for (long k = 0; k < Np; ++k) {
            float* dst = vt + d0 * Np + k * w;
            if (k < N) std::memcpy(dst, vq + k * sqn + d0, w * sizeof(float));
            else std::fill(dst, dst + w, 0.0f);
        }
    }
}

// On one team of threads: pack(bh) for every (batch, head), then unit(u) for every block of query
// rows (static schedules: each thread keeps to a run of heads, whose panels stay in its L2).
template <typename Pack, typename Unit>
void in_team(long BH, long nunit, long threads, Pack pack, Unit unit) {
    const int nthreads = (int)std::max(1L, std::min({threads, nunit, 1024L}));
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (long bh = 0; bh < BH; ++bh) pack(bh);
#pragma omp for schedule(static)
        for (long u = 0; u < nunit; ++u) unit(u);
    }
}
#endif  // UF_HAVE_ATTENTION_AVX512

}  // namespace

namespace uf {

bool attention_supported(bool bf16) {
#ifdef UF_HAVE_ATTENTION_AVX512
    __builtin_cpu_init();
    switch (current_isa()) {
    case Isa::avx512: {
        const bool base = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("fma");
        return base && (!bf16 || __builtin_cpu_supports("avx512bf16"));
    }
    case Isa::avx2:
        return !bf16 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default:
        return false;
    }
#else
    (void)bf16;
    return false;
#endif
}

void attention_fwd(std::uintptr_t qkv_p, std::uintptr_t out_p, long B, long N, long heads, long D, long sqb,
                   long sqn, bool bf16, double scale, long threads) {
    if (B < 1 || N < 1 || heads < 1 || D < 32 || D % 32 != 0 || D > 256)
        throw std::invalid_argument("attention: needs B, N, heads >= 1 and head_dim a multiple of 32 up to 256");
    if (sqn < 3 * heads * D || sqb < 0)
        throw std::invalid_argument("attention: qkv's token stride must be at least 3 * heads * head_dim");
    const Isa isa = current_isa();
    const bool avx2 = isa == Isa::avx2;
    if (!attention_supported(bf16)) {
        if (isa != Isa::avx512 && !avx2)
            throw std::runtime_error(std::string("attention: no kernels for instruction set '") + isa_name(isa) +
                                     "' (needs AVX-512, or AVX2 + FMA for float32)");
        throw std::runtime_error(avx2 ? (bf16 ? "attention: bfloat16 needs AVX512-BF16, not AVX2"
                                              : "attention: this CPU lacks AVX2 and FMA")
                                      : bf16 ? "attention: this CPU lacks AVX512-BF16" : "attention: this CPU lacks AVX-512");
    }
#ifdef UF_HAVE_ATTENTION_AVX512
    const long C = heads * D, BH = B * heads;
    const float c = (float)(scale * 1.4426950408889634);  // scores go straight to log2 units
    // The packed K and V panels of every (batch, head), shared by the team (32-bit elements:
    // floats, or bfloat16 pairs).
    static thread_local std::vector<float> packed;
    if (avx2) {
        const long Np = round_up(N, avx2::W2), nblk = (N + avx2::R2 - 1) / avx2::R2;
        const long half = round_up(D * Np, ALIGN);
        const float* qkv = reinterpret_cast<const float*>(qkv_p);
        float* pk = scratch(packed, (size_t)(BH * 2 * half + ALIGN));
        in_team(
            BH, BH * nblk, threads,
            [&](long bh) {
                const float* kq = qkv + (bh / heads) * sqb + C + (bh % heads) * D;
                pack_f32(kq, kq + C, sqn, N, D, Np, avx2::W2, avx2::W2, pk + bh * 2 * half, pk + bh * 2 * half + half);
            },
            [&](long u) {
                static thread_local std::vector<float> srows;
                const long bh = u / nblk;
                avx2::rows(qkv, sqb, sqn, N, Np, heads, D, c, pk + bh * 2 * half, pk + bh * 2 * half + half,
                           bh / heads, bh % heads, (u % nblk) * avx2::R2, reinterpret_cast<float*>(out_p),
                           scratch(srows, (size_t)(avx2::R2 * Np)));
            });
        return;
    }
    const Problem p{B, N, heads, D, sqb, sqn, threads, c, round_up(N, KEYS)};
    const long nblk = (N + R - 1) / R;
    const long kstride = round_up(D * p.Np / (bf16 ? 2 : 1), ALIGN), stride = 2 * kstride;
    float* pk = scratch(packed, (size_t)(BH * stride + ALIGN));
    in_team(
        BH, BH * nblk, threads,
        [&](long bh) {
            const long b = bh / heads, h = bh % heads;
            if (!bf16) {
                const float* kq = reinterpret_cast<const float*>(qkv_p) + b * sqb + C + h * D;
                pack_f32(kq, kq + C, sqn, N, D, p.Np, KEYS, DIMS, pk + bh * stride, pk + bh * stride + kstride);
                return;
            }
            const uint16_t* kq = reinterpret_cast<const uint16_t*>(qkv_p) + b * sqb + C + h * D;
            const uint16_t* vq = kq + C;
            uint32_t* kp = reinterpret_cast<uint32_t*>(pk + bh * stride);
            uint32_t* vp = reinterpret_cast<uint32_t*>(pk + bh * stride + kstride);
            const long D2 = D / 2;
            for (long k0 = 0; k0 < p.Np; k0 += KEYS) {  // Kp[k/64][d/2][64]
                uint32_t* panel = kp + k0 * D2;
                for (long j = 0; j < KEYS; ++j) {
                    const long k = k0 + j;
                    const uint32_t* row = reinterpret_cast<const uint32_t*>(kq + k * sqn);
                    for (long d = 0; d < D2; ++d) panel[d * KEYS + j] = k < N ? row[d] : 0u;
                }
            }
            for (long d0 = 0; d0 < D; d0 += DIMS) {  // Vp[d/64][k/2][64 or the last 32]
                const long w = std::min<long>(DIMS, D - d0);
                for (long k2 = 0; k2 < p.Np / 2; ++k2) {
                    const long k = 2 * k2;
                    const uint16_t* v0 = vq + k * sqn + d0;
                    const uint16_t* v1 = v0 + sqn;
                    uint32_t* dst = vp + d0 * (p.Np / 2) + k2 * w;
                    if (k + 1 < N) {
                        for (long d = 0; d < w; ++d) dst[d] = (uint32_t)v0[d] | ((uint32_t)v1[d] << 16);
                    } else if (k < N) {
                        for (long d = 0; d < w; ++d) dst[d] = (uint32_t)v0[d];
                    } else {
                        std::fill(dst, dst + w, 0u);
                    }
                }
            }
        },
        [&](long u) {
            static thread_local std::vector<float> srows;
            static thread_local std::vector<uint16_t> prows;
            const long bh = u / nblk, b = bh / heads, h = bh % heads, r0 = (u % nblk) * R;
            const float* kpanels = pk + bh * stride;
            float* s = scratch(srows, (size_t)(R * p.Np));
            if (!bf16)
                rows_f32(p, reinterpret_cast<const float*>(qkv_p), kpanels, kpanels + kstride, b, h, r0,
                         reinterpret_cast<float*>(out_p), s);
            else
                rows_bf16(p, reinterpret_cast<const uint16_t*>(qkv_p), reinterpret_cast<const uint32_t*>(kpanels),
                          reinterpret_cast<const uint32_t*>(kpanels + kstride), b, h, r0,
                          reinterpret_cast<uint16_t*>(out_p), s, scratch(prows, (size_t)(R * p.Np)));
        });
#else
    (void)qkv_p; (void)out_p; (void)scale; (void)threads;
#endif
}

}  // namespace uf
