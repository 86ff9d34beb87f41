// uniformer_fast._C: softmax attention on the CPU straight from the packed qkv, float32 and bfloat16,
// AVX-512 (bfloat16 with AVX512-BF16's dot products), OpenMP.
//
// qkv is the qkv Linear's output, (B, N, 3, heads, D) with token stride sqn and batch stride sqb
// (elements), unit stride inside a token; out is (B, N, heads * D) dense. Every key fits one pass:
// a block of R query rows computes its whole row of scores (R x N floats, in L1/L2 for N up to a few
// thousand), its exact softmax (no online rescaling) and then P V. Per (batch, head) K and V are
// first laid out once for the micro-kernels:
//   float32:  Kt[d][k] (K transposed, keys padded to a multiple of 32 with zeros); V read in place.
//   bfloat16: Kp[d/2][k] = (K[k][d], K[k][d+1]) and Vp[k/2][d] = (V[k][d], V[k+1][d]) as 32-bit
//             pairs, the operand layout of vdpbf16ps; P is rounded to bfloat16 for P V, as flash
//             attention does on GPUs; scores, softmax statistics and both accumulations are float32.
// Both matmuls use one micro-kernel shape: R rows of a broadcast-scalar operand times a 32-column
// panel, 16 zmm accumulators.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define UF_HAVE_ATTENTION_AVX512 1
#endif

namespace {

constexpr int R = 8;      // query rows per micro-tile
constexpr int COLS = 32;  // columns per micro-tile: keys of S = Q K^T, output dims of O = P V
constexpr long ALIGN = 32;

long round_up(long n, long m) { return (n + m - 1) / m * m; }

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
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// acc[i][j] (R x 32) = sum_k a[i][k] * b[k][j], k < kdim: a row i at a[i] (unit stride), b rows ldb
// apart. float32.
inline void panel_f32(const float* const* a, const float* b, long ldb, long kdim, __m512 acc[R][2]) {
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (long k = 0; k < kdim; ++k) {
        const __m512 b0 = _mm512_loadu_ps(b + k * ldb), b1 = _mm512_loadu_ps(b + k * ldb + 16);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
            const __m512 ai = _mm512_set1_ps(a[i][k]);
            acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
}

// The same over bfloat16 pairs: a[i] and b hold 32-bit (even, odd) pairs along k, kpairs of them;
// float32 accumulation (vdpbf16ps).
inline void panel_bf16(const uint32_t* const* a, const uint32_t* b, long ldb, long kpairs, __m512 acc[R][2]) {
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (long k = 0; k < kpairs; ++k) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + k * ldb);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + k * ldb + 16);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
            const __m512bh ai = (__m512bh)_mm512_set1_epi32((int)a[i][k]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
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
    long Np;           // keys padded to a multiple of COLS
};

// One (batch, head, block of R query rows): scores, softmax, P V, out rows. Rows past N repeat row
// N - 1 and are not stored.
void rows_f32(const Problem& p, const float* qkv, const float* kt, long b, long h, long r0, float* out, float* s) {
    const long C = p.heads * p.D;
    const float* q[R];
    for (int i = 0; i < R; ++i) q[i] = qkv + b * p.sqb + std::min(r0 + i, p.N - 1) * p.sqn + h * p.D;
    __m512 acc[R][2];
    const __m512 c = _mm512_set1_ps(p.scale_log2);
    for (long k0 = 0; k0 < p.Np; k0 += COLS) {
        panel_f32(q, kt + k0, p.Np, p.D, acc);
        for (int i = 0; i < R; ++i) {
            _mm512_storeu_ps(s + i * p.Np + k0, _mm512_mul_ps(acc[i][0], c));
            _mm512_storeu_ps(s + i * p.Np + k0 + 16, _mm512_mul_ps(acc[i][1], c));
        }
    }
    float inv[R];
    const float* prow[R];
    for (int i = 0; i < R; ++i) {
        inv[i] = 1.0f / softmax_row(s + i * p.Np, p.N, p.Np);
        prow[i] = s + i * p.Np;
    }
    const float* v = qkv + b * p.sqb + 2 * C + h * p.D;
    const int rows = (int)std::min<long>(R, p.N - r0);
    for (long d0 = 0; d0 < p.D; d0 += COLS) {
        panel_f32(prow, v + d0, p.sqn, p.N, acc);
        for (int i = 0; i < rows; ++i) {
            float* o = out + (b * p.N + r0 + i) * C + h * p.D + d0;
            const __m512 w = _mm512_set1_ps(inv[i]);
            _mm512_storeu_ps(o, _mm512_mul_ps(acc[i][0], w));
            _mm512_storeu_ps(o + 16, _mm512_mul_ps(acc[i][1], w));
        }
    }
}

void rows_bf16(const Problem& p, const uint16_t* qkv, const uint32_t* kp, const uint32_t* vp, long b, long h,
               long r0, uint16_t* out, float* s, uint16_t* pb) {
    const long C = p.heads * p.D;
    const uint32_t* q[R];
    for (int i = 0; i < R; ++i)
        q[i] = reinterpret_cast<const uint32_t*>(qkv + b * p.sqb + std::min(r0 + i, p.N - 1) * p.sqn + h * p.D);
    __m512 acc[R][2];
    const __m512 c = _mm512_set1_ps(p.scale_log2);
    for (long k0 = 0; k0 < p.Np; k0 += COLS) {
        panel_bf16(q, kp + k0, p.Np, p.D / 2, acc);
        for (int i = 0; i < R; ++i) {
            _mm512_storeu_ps(s + i * p.Np + k0, _mm512_mul_ps(acc[i][0], c));
            _mm512_storeu_ps(s + i * p.Np + k0 + 16, _mm512_mul_ps(acc[i][1], c));
        }
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
    for (long d0 = 0; d0 < p.D; d0 += COLS) {
        panel_bf16(prow, vp + d0, p.D, kpairs, acc);
        for (int i = 0; i < rows; ++i) {
            uint16_t* o = out + (b * p.N + r0 + i) * C + h * p.D + d0;
            const __m512 w = _mm512_set1_ps(inv[i]);
            _mm256_storeu_si256((__m256i*)o, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[i][0], w)));
            _mm256_storeu_si256((__m256i*)(o + 16), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[i][1], w)));
        }
    }
}

#pragma GCC pop_options
#endif  // UF_HAVE_ATTENTION_AVX512

// Per-thread scratch reused between calls (OpenMP keeps its threads).
template <typename T>
T* scratch(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
}

}  // namespace

namespace uf {

bool attention_supported(bool bf16) {
#ifdef UF_HAVE_ATTENTION_AVX512
    __builtin_cpu_init();
    const bool base = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("fma");
    return base && (!bf16 || __builtin_cpu_supports("avx512bf16"));
#else
    (void)bf16;
    return false;
#endif
}

void attention_fwd(std::uintptr_t qkv_p, std::uintptr_t out_p, long B, long N, long heads, long D, long sqb,
                   long sqn, bool bf16, double scale, long threads) {
    if (B < 1 || N < 1 || heads < 1 || D < COLS || D % COLS != 0 || D > 256)
        throw std::invalid_argument("attention: needs B, N, heads >= 1 and head_dim a multiple of 32 up to 256");
    if (sqn < 3 * heads * D || sqb < 0)
        throw std::invalid_argument("attention: qkv's token stride must be at least 3 * heads * head_dim");
    if (!attention_supported(bf16))
        throw std::runtime_error(bf16 ? "attention: this CPU lacks AVX512-BF16" : "attention: this CPU lacks AVX-512");
#ifdef UF_HAVE_ATTENTION_AVX512
    const Problem p{B, N, heads, D, sqb, sqn, threads, (float)(scale * 1.4426950408889634), round_up(N, COLS)};
    const long C = heads * D, BH = B * heads, nblk = (N + R - 1) / R, nunit = BH * nblk;
    // The packed K (and V for bf16) of every (batch, head), shared by the team.
    const long kstride = round_up(D * p.Np, ALIGN), vstride = bf16 ? round_up(p.Np / 2 * D, ALIGN) : 0;
    static thread_local std::vector<float> packed;
    float* pk = scratch(packed, (size_t)(BH * (kstride + vstride) + ALIGN));
    const int nthreads = (int)std::max(1L, std::min({threads, nunit, 1024L}));
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (long bh = 0; bh < BH; ++bh) {
            const long b = bh / heads, h = bh % heads;
            float* kdst = pk + bh * (kstride + vstride);
            if (!bf16) {
                const float* kq = reinterpret_cast<const float*>(qkv_p) + b * sqb + C + h * D;
                for (long k = 0; k < N; ++k)
                    for (long d = 0; d < D; ++d) kdst[d * p.Np + k] = kq[k * sqn + d];
                for (long d = 0; d < D; ++d) std::fill(kdst + d * p.Np + N, kdst + (d + 1) * p.Np, 0.0f);
            } else {
                const uint16_t* base = reinterpret_cast<const uint16_t*>(qkv_p) + b * sqb + h * D;
                uint32_t* kp = reinterpret_cast<uint32_t*>(kdst);
                uint32_t* vp = reinterpret_cast<uint32_t*>(kdst + kstride);
                const long D2 = D / 2;
                for (long k = 0; k < N; ++k) {
                    const uint32_t* row = reinterpret_cast<const uint32_t*>(base + C + k * sqn);
                    for (long d = 0; d < D2; ++d) kp[d * p.Np + k] = row[d];
                }
                for (long d = 0; d < D2; ++d) std::fill(kp + d * p.Np + N, kp + (d + 1) * p.Np, 0u);
                for (long k2 = 0; k2 < p.Np / 2; ++k2) {
                    const long k = 2 * k2;
                    const uint16_t* v0 = base + 2 * C + k * sqn;
                    const uint16_t* v1 = v0 + sqn;
                    uint32_t* dst = vp + k2 * D;
                    if (k + 1 < N) {
                        for (long d = 0; d < D; ++d) dst[d] = (uint32_t)v0[d] | ((uint32_t)v1[d] << 16);
                    } else if (k < N) {
                        for (long d = 0; d < D; ++d) dst[d] = (uint32_t)v0[d];
                    } else {
                        std::fill(dst, dst + D, 0u);
                    }
                }
            }
        }
        static thread_local std::vector<float> srows;
        static thread_local std::vector<uint16_t> prows;
        float* s = scratch(srows, (size_t)(R * p.Np));
        uint16_t* pb = bf16 ? scratch(prows, (size_t)(R * p.Np)) : nullptr;
#pragma omp for schedule(static)
        for (long unit = 0; unit < nunit; ++unit) {
            const long bh = unit / nblk, b = bh / heads, h = bh % heads, r0 = (unit % nblk) * R;
            float* kdst = pk + bh * (kstride + vstride);
            if (!bf16)
                rows_f32(p, reinterpret_cast<const float*>(qkv_p), kdst, b, h, r0, reinterpret_cast<float*>(out_p), s);
            else
                rows_bf16(p, reinterpret_cast<const uint16_t*>(qkv_p), reinterpret_cast<const uint32_t*>(kdst),
                          reinterpret_cast<const uint32_t*>(kdst + kstride), b, h, r0,
                          reinterpret_cast<uint16_t*>(out_p), s, pb);
        }
    }
#else
    (void)qkv_p; (void)out_p; (void)scale; (void)threads;
#endif
}

}  // namespace uf
