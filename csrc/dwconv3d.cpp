// uniformer_fast._C: depthwise 3-D convolution on the CPU, channels-last float32, OpenMP.
//
// Built without torch's headers: Python validates the tensors and passes data pointers (as
// integers), sizes, strides (in elements) and a thread count, so the binary does not depend on the
// torch version. The row kernels (dwconv3d_impl.h) are compiled three times (per_isa.h), for
// AVX-512, AVX2+FMA and the baseline x86-64 / other architectures, and run with the module's
// instruction set (isa.h; module.cpp binds these entries).
#include "dwconv3d.h"

#include "isa.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#define UF_INLINE inline __attribute__((always_inline))

namespace {

// An input row (b, t + dt - pt, hi) that the forward's current output rows read: x at (w = 0, c = 0);
// w[o] is the weight at tap (dt, hi - (h + o) + ph, dw = 0), c = 0, for output row h + o, or null
// where hi is not one of that row's taps. The kw taps follow at stride C.
struct TapRow {
    const float* x;
    const float* w[2];
};
// hb (1 or 2) output rows h, h + 1 of one (b, t), channels [c0, c1); y rows contiguous, x rows sxh
// apart (residual).
using FwdRowFn = void (*)(int hb, int kw, const TapRow* rows, int nrows, long sxw, long C, int W, long c0,
                          long c1, const float* bias, const float* xres, long sxh, float* yrow);
// Weight-gradient contribution of hb gy rows (gr[o], contiguous (W, C)) read against the x rows
// of their taps (xrows: kt * (kh + hb - 1) pointers, null outside the input), channels [c0, c1),
// added to dw (kt*kh*kw, C).
using WgradRowFn = void (*)(int hb, int kw, const float* const* xrows, const float* const* gr, int kt, int kh,
                            long sxw, long C, int W, long c0, long c1, float* dw);
using BgradRowFn = void (*)(const float* grow, long C, int W, long c0, long c1, float* db);

struct RowKernels {
    FwdRowFn fwd_row;
    WgradRowFn wgrad_rows;
    BgradRowFn bgrad_row;
};

}  // namespace

#define UF_ISA_IMPL "dwconv3d_impl.h"
#include "per_isa.h"
#undef UF_ISA_IMPL

namespace {

// The row kernels of the current instruction set.
const RowKernels* row_kernels() { return &UF_FOR_ISA(kernels); }

inline const float* fptr(std::uintptr_t p) { return reinterpret_cast<const float*>(p); }
inline float* mptr(std::uintptr_t p) { return reinterpret_cast<float*>(p); }

struct Shape {
    long B, C, T, H, W;
    int kt, kh, kw;
    long K() const { return (long)kt * kh * kw; }
};

Shape make_shape(long B, long C, long T, long H, long W, int kt, int kh, int kw) {
    if (B < 1 || C < 1 || T < 1 || H < 1 || W < 1)
        throw std::invalid_argument("dwconv3d: sizes must be positive");
    for (int k : {kt, kh, kw})
        if (k < 1 || k > 7 || k % 2 == 0)
            throw std::invalid_argument("dwconv3d: kernel sizes must be odd and at most 7");
    if (W > (1L << 30) || H > (1L << 30)) throw std::invalid_argument("dwconv3d: W and H must be < 2**30");
    return {B, C, T, H, W, kt, kh, kw};
}

int clamp_threads(long threads) { return (int)std::max(1L, std::min(threads, 1024L)); }

// The input rows that output rows h .. h + hb - 1 of (b, t) read, dt-major and ascending in the
// input row, so each output row meets its taps in (dt, dh) order.
int tap_rows(const Shape& s, const float* x, long sxb, long sxt, long sxh, const float* wt,
             long b, long t, long h, int hb, TapRow* rows) {
    const int pt = s.kt / 2, ph = s.kh / 2;
    int n = 0;
    for (int dt = 0; dt < s.kt; ++dt) {
        const long ti = t + dt - pt;
        if (ti < 0 || ti >= s.T) continue;
        for (long hi = std::max(0L, h - ph); hi <= std::min(s.H - 1, h + hb - 1 + ph); ++hi) {
            rows[n].x = x + b * sxb + ti * sxt + hi * sxh;
            for (int o = 0; o < 2; ++o) {
                const long dh = hi - (h + o) + ph;
                rows[n].w[o] = (o < hb && dh >= 0 && dh < s.kh) ? wt + (long)((dt * s.kh + dh) * s.kw) * s.C : nullptr;
            }
            ++n;
        }
    }
    return n;
}

// weight (C, 1, kt, kh, kw) with element strides (swc, swt, swh, sww), read into wt (kt*kh*kw, C)
// contiguous, point-reflected if flip (the input gradient convolves gy with the reflected kernel).
void taps_by_channel(const Shape& s, const float* weight, long swc, long swt, long swh, long sww, bool flip,
                     float* wt) {
    for (int dt = 0; dt < s.kt; ++dt)
        for (int dh = 0; dh < s.kh; ++dh)
            for (int dw = 0; dw < s.kw; ++dw) {
                const long tap = (dt * s.kh + dh) * s.kw + dw;
                const long off = flip ? (s.kt - 1 - dt) * swt + (s.kh - 1 - dh) * swh + (s.kw - 1 - dw) * sww
                                      : dt * swt + dh * swh + dw * sww;
                for (long c = 0; c < s.C; ++c) wt[tap * s.C + c] = weight[off + c * swc];
            }
}

}  // namespace

namespace uf {

// y[b, t, h, w, c] = bias[c] + sum_taps weight[c, dt, dh, dw] * x[b, t + dt - pt, h + dh - ph, w + dw - pw, c]
//                    (+ x[b, t, h, w, c] if residual)
// x: (B, T, H, W, C) with strides (sxb, sxt, sxh, sxw, 1); weight: (C, 1, kt, kh, kw) with strides
// (swc, swt, swh, sww), reflected if flip; bias: (C,) with stride sbc, or 0; y: (B, T, H, W, C)
// contiguous. The backward's input gradient is this with flip on and gy as x.
void dwconv3d_fwd(std::uintptr_t x_p, std::uintptr_t w_p, std::uintptr_t bias_p, std::uintptr_t y_p,
                  long B, long C, long T, long H, long W, int kt, int kh, int kw,
                  long sxb, long sxt, long sxh, long sxw, long swc, long swt, long swh, long sww, long sbc,
                  bool flip, bool residual, long threads) {
    const Shape s = make_shape(B, C, T, H, W, kt, kh, kw);
    const float* x = fptr(x_p);
    float* y = mptr(y_p);
    // The weights as the kernels read them (and a unit-stride bias) in a reused per-thread scratch.
    static thread_local std::vector<float> scratch;
    scratch.resize((size_t)((s.K() + 1) * C));
    float* wt = scratch.data();
    taps_by_channel(s, fptr(w_p), swc, swt, swh, sww, flip, wt);
    const float* bias = fptr(bias_p);
    if (bias && sbc != 1) {
        float* b = wt + s.K() * C;
        for (long c = 0; c < C; ++c) b[c] = bias[c * sbc];
        bias = b;
    }
    const RowKernels* k = row_kernels();
    const long nrow = B * T * H;
    // Output rows go in pairs (h, h + 1) of the same (b, t): see fwd_block.
    const long hpairs = (H + 1) / 2, nunit = B * T * hpairs;
    // A thread per ~256K multiply-adds at most: waking a thread costs more than a tiny call's work.
    const int nthreads = clamp_threads(std::min({threads, nunit, (nrow * W * C * s.K()) >> 18}));
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long unit = 0; unit < nunit; ++unit) {
        const long h = 2 * (unit % hpairs), bt = unit / hpairs, t = bt % T, b = bt / T;
        const int hb = h + 1 < H ? 2 : 1;
        TapRow rows[7 * 8];
        const int n = tap_rows(s, x, sxb, sxt, sxh, wt, b, t, h, hb, rows);
        const float* xres = residual ? x + b * sxb + t * sxt + h * sxh : nullptr;
        k->fwd_row(hb, kw, rows, n, sxw, C, (int)W, 0, C, bias, xres, sxh, y + ((bt * H) + h) * W * C);
    }
}

// The backward in one pass over gy and x:
//   dx[b, t, h, w, c] = sum_taps weight[c, tap] * gy[b, t - dt + pt, h - dh + ph, w - dw + pw, c]
//                       (+ gy[b, t, h, w, c] if residual)          (if dx is requested)
//   dweight[c, tap]   = sum_{b,t,h,w} gy[b, t, h, w, c] * x[b, t + dt - pt, h + dh - ph, w + dw - pw, c]
//   db[c]             = sum_{b,t,h,w} gy[b, t, h, w, c]             (if db is requested)
// x: (B, T, H, W, C) strides (sxb, sxt, sxh, sxw, 1); gy, dx: (B, T, H, W, C) contiguous; weight
// (C, 1, kt, kh, kw) strides (swc, swt, swh, sww); dweight (C, 1, kt, kh, kw) contiguous and db (C,)
// are overwritten.
// Two passes in one parallel region: dx (the forward's row kernel on gy with the reflected
// weights, per output-row pair), then the weight gradient, whose work unit is a chunk of output-row
// pairs times a block of channels with its own partial sums. (Interleaving the two per row pair
// measured slower: the gy and x row windows together overflow L2 for 5x5x5.) The chunks depend on
// the shape only and the partials are added in chunk order, so every output is bitwise the same
// for any thread count.
void dwconv3d_bwd(std::uintptr_t x_p, std::uintptr_t gy_p, std::uintptr_t w_p, std::uintptr_t dx_p,
                  std::uintptr_t dw_p, std::uintptr_t db_p, long B, long C, long T, long H, long W,
                  int kt, int kh, int kw, long sxb, long sxt, long sxh, long sxw,
                  long swc, long swt, long swh, long sww, bool residual, long threads) {
    const Shape s = make_shape(B, C, T, H, W, kt, kh, kw);
    const float* x = fptr(x_p);
    const float* gy = fptr(gy_p);
    float* dx = mptr(dx_p);
    float* dweight = mptr(dw_p);
    float* db = mptr(db_p);
    const RowKernels* k = row_kernels();
    const long K = s.K();
    const long sgh = W * C, sgt = H * sgh, sgb = T * sgt;  // gy is dense
    const long hpairs = (H + 1) / 2, npair = B * T * hpairs;
    const long per_chunk = K * C + C;  // partial dW then partial db
    // Scratch reused between calls: the reflected weights (if dx) and the chunks' partial sums.
    // At most 32 chunks and about 64 MiB of partial sums; chunks of at least ~4M multiply-adds
    // (so small shapes do not pay for many partial buffers); the channel blocks still feed the
    // threads when there are few chunks.
    const long cap = std::max(1L, (64L << 20) / (4 * per_chunk));
    const long work = std::max(1L, B * T * H * W * C * K >> 22);
    const long nchunk = std::max(1L, std::min({npair, 32L, cap, work}));
    const long CB = 64, ncb = (C + CB - 1) / CB, nunit = nchunk * ncb;
    static thread_local std::vector<float> scratch;
    const size_t need = (size_t)(nchunk * per_chunk + (dx ? K * C : 0));
    if (scratch.size() < need) scratch.resize(need);
    float* part = scratch.data();
    float* wt = part + nchunk * per_chunk;
    if (dx) taps_by_channel(s, fptr(w_p), swc, swt, swh, sww, true, wt);
    const int nthreads = clamp_threads(std::min({threads, nunit, (B * T * H * W * C * K * (dx ? 2 : 1)) >> 18}));
#pragma omp parallel num_threads(nthreads)
    {
        if (dx) {
#pragma omp for schedule(static)
            for (long pair = 0; pair < npair; ++pair) {
                const long h = 2 * (pair % hpairs), bt = pair / hpairs, t = bt % T, b = bt / T;
                const int hb = h + 1 < H ? 2 : 1;
                const float* grow = gy + (bt * H + h) * sgh;
                TapRow rows[7 * 8];
                const int n = tap_rows(s, gy, sgb, sgt, sgh, wt, b, t, h, hb, rows);
                k->fwd_row(hb, kw, rows, n, C, C, (int)W, 0, C, nullptr, residual ? grow : nullptr, sgh,
                           dx + (bt * H + h) * sgh);
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (long unit = 0; unit < nunit; ++unit) {
            const long ch = unit / ncb, c0 = (unit % ncb) * CB, c1 = std::min(C, c0 + CB);
            float* pdw = part + ch * per_chunk;
            float* pdb = pdw + K * C;
            for (long tap = 0; tap <= K; ++tap)  // this unit's channels of every tap row, then of db
                std::fill(pdw + tap * C + c0, pdw + tap * C + c1, 0.0f);
            for (long pair = npair * ch / nchunk; pair < npair * (ch + 1) / nchunk; ++pair) {
                const long h = 2 * (pair % hpairs), bt = pair / hpairs, t = bt % T, b = bt / T;
                const int hb = h + 1 < H ? 2 : 1;
                const float* grow = gy + (bt * H + h) * sgh;
                const float* xrows[7 * 8];
                const int span = kh + hb - 1;
                for (int dt = 0; dt < kt; ++dt) {
                    const long ti = t + dt - kt / 2;
                    for (int i = 0; i < span; ++i) {
                        const long hi = h - kh / 2 + i;
                        xrows[dt * span + i] = (ti < 0 || ti >= T || hi < 0 || hi >= H)
                                                   ? nullptr : x + b * sxb + ti * sxt + hi * sxh;
                    }
                }
                const float* gr[2] = {grow, grow + sgh};
                k->wgrad_rows(hb, kw, xrows, gr, kt, kh, sxw, C, (int)W, c0, c1, pdw);
                if (db)
                    for (int o = 0; o < hb; ++o) k->bgrad_row(gr[o], C, (int)W, c0, c1, pdb);
            }
        }
        // Fixed-order sum over chunks; each output element is owned by one thread.
        const long nout = db ? per_chunk : K * C;
#pragma omp for schedule(static)
        for (long i = 0; i < nout; ++i) {
            float acc = 0.0f;
            for (long ch = 0; ch < nchunk; ++ch) acc += part[ch * per_chunk + i];
            if (i < K * C) dweight[(i % C) * K + i / C] = acc;
            else db[i - K * C] = acc;
        }
    }
}

}  // namespace uf
