// Depthwise 3-D convolution kernels on channels-last float32 data, written once and compiled once
// per instruction set: dwconv3d.cpp has per_isa.h include it inside
// `namespace avx512|avx2|generic { ... }` under a `#pragma GCC target(...)`, with UF_VLEN the
// number of float lanes of that set's vectors.
//
// Layouts (all float32):
//   x, gy:  (B, T, H, W, C) with unit channel stride; B/T/H/W strides in elements are arguments
//   y, dx:  (B, T, H, W, C) contiguous
//   weight: (kt * kh * kw, C) contiguous: tap-major, so one tap's weights over C are one vector load
//   bias:   (C,) or null
//
// The lanes of a vector are channels, never positions: every output element is summed in the same
// order whatever the vector width or the thread count, which is what makes the results
// reproducible across thread counts (the weight gradient's cross-thread reduction is handled by the
// caller in dwconv3d.cpp with fixed chunks).

// Unaligned, alias-safe vector of UF_VLEN floats (GCC vector extension: +, * and broadcast of a
// scalar compile to the target's SIMD; with -ffp-contract=fast a*b+c becomes an FMA).
typedef float vec_t __attribute__((vector_size(UF_VLEN * 4), aligned(4), may_alias));

template <class V> struct Lanes;
template <> struct Lanes<vec_t> {
    static constexpr int n = UF_VLEN;
    static UF_INLINE vec_t load(const float* p) { return *reinterpret_cast<const vec_t*>(p); }
    static UF_INLINE void store(float* p, vec_t v) { *reinterpret_cast<vec_t*>(p) = v; }
    static UF_INLINE vec_t zero() { return vec_t{} ; }
};
template <> struct Lanes<float> {
    static constexpr int n = 1;
    static UF_INLINE float load(const float* p) { return *p; }
    static UF_INLINE void store(float* p, float v) { *p = v; }
    static UF_INLINE float zero() { return 0.0f; }
};

// Forward for HB output rows (the same b, t; rows h and h + 1 when HB = 2) and WB consecutive
// columns w0 .. w0 + WB - 1, one vector of channels at c. Each input row is loaded once and feeds
// every output row it is a tap of (TapRow::w[i] non-null), which cuts the input traffic by a
// third for 3-tall kernels; each output's sum runs over its taps in the same (dt, dh, dw) order
// as with HB = 1. CHECK: some taps fall outside [0, W) (the row's ends, or W small); they read
// zero, exactly the zero padding, so the block keeps WB independent accumulator chains. Only the
// first n (<= WB) columns are stored: a row's last block may hang over its end (W = 7 is one
// 8-column block, not 4 + 2 + 1 that each reload the taps).
template <class V, int KW, int WB, bool CHECK, int HB>
static UF_INLINE void fwd_block(const TapRow* rows, int nrows, long sxw, long C, int W, long c, int w0,
                                const float* bias, const float* xres, long sxh, float* yrow, int n = WB) {
    using L = Lanes<V>;
    constexpr int pw = KW / 2;
    V acc[HB][WB];
    const V b0 = bias ? L::load(bias + c) : L::zero();
    for (int o = 0; o < HB; ++o)
        for (int j = 0; j < WB; ++j) acc[o][j] = b0;
    for (int r = 0; r < nrows; ++r) {
        const float* xp = rows[r].x + c;
        V xv[WB + KW - 1];
        for (int i = 0; i < WB + KW - 1; ++i) {
            const long wi = (long)w0 - pw + i;
            xv[i] = (!CHECK || (unsigned long)wi < (unsigned long)W) ? L::load(xp + wi * sxw) : L::zero();
        }
        for (int o = 0; o < HB; ++o) {
            if (!rows[r].w[o]) continue;
            const float* wp = rows[r].w[o] + c;
            for (int dw = 0; dw < KW; ++dw) {
                const V wv = L::load(wp + dw * C);
                for (int j = 0; j < WB; ++j) acc[o][j] += wv * xv[j + dw];
            }
        }
    }
    for (int o = 0; o < HB; ++o)
        for (int j = 0; j < WB; ++j) {
            if (j >= n) break;
            if (xres) acc[o][j] += L::load(xres + o * sxh + (long)(w0 + j) * sxw + c);
            L::store(yrow + o * W * C + (long)(w0 + j) * C + c, acc[o][j]);
        }
}

// HB output rows (all W columns) for channels [c, c + lanes): unchecked blocks where every tap is
// inside the row, checked blocks at the ends, the last one cut to the row's end.
template <class V, int KW, int HB>
static UF_INLINE void fwd_rows_lanes(const TapRow* rows, int nrows, long sxw, long C, int W, long c,
                                     const float* bias, const float* xres, long sxh, float* yrow) {
    constexpr int pw = KW / 2;
    // Accumulators HB * WB plus WB + KW - 1 inputs within the register file (32 with AVX-512).
    constexpr int WB = (HB == 1 || (UF_VLEN >= 16 && KW <= 5)) ? 8 : 4;
    int w = 0;
    if (W >= WB) { fwd_block<V, KW, WB, true, HB>(rows, nrows, sxw, C, W, c, 0, bias, xres, sxh, yrow); w = WB; }
    for (; w + WB + pw <= W; w += WB) fwd_block<V, KW, WB, false, HB>(rows, nrows, sxw, C, W, c, w, bias, xres, sxh, yrow);
    while (w < W) {
        const int r = W - w;
        int n;
        if (WB == 8 && r > 4) { n = std::min(r, 8); fwd_block<V, KW, 8, true, HB>(rows, nrows, sxw, C, W, c, w, bias, xres, sxh, yrow, n); }
        else if (r > 2) { n = std::min(r, 4); fwd_block<V, KW, 4, true, HB>(rows, nrows, sxw, C, W, c, w, bias, xres, sxh, yrow, n); }
        else { n = r; fwd_block<V, KW, 2, true, HB>(rows, nrows, sxw, C, W, c, w, bias, xres, sxh, yrow, n); }
        w += n;
    }
}

// HB output rows, channels [c0, c1): channel vectors outermost so one vector's weights stay in L1
// while the W loop streams the input rows; leftover channels (c1 - c0 % lanes) run one at a time.
template <int KW, int HB>
static void fwd_rows_t(const TapRow* rows, int nrows, long sxw, long C, int W, long c0, long c1,
                       const float* bias, const float* xres, long sxh, float* yrow) {
    long c = c0;
    for (; c + UF_VLEN <= c1; c += UF_VLEN)
        fwd_rows_lanes<vec_t, KW, HB>(rows, nrows, sxw, C, W, c, bias, xres, sxh, yrow);
    for (; c < c1; ++c) fwd_rows_lanes<float, KW, HB>(rows, nrows, sxw, C, W, c, bias, xres, sxh, yrow);
}

template <int HB>
static void fwd_rows_hb(int kw, const TapRow* rows, int nrows, long sxw, long C, int W, long c0, long c1,
                        const float* bias, const float* xres, long sxh, float* yrow) {
    switch (kw) {
        case 1: fwd_rows_t<1, HB>(rows, nrows, sxw, C, W, c0, c1, bias, xres, sxh, yrow); break;
        case 3: fwd_rows_t<3, HB>(rows, nrows, sxw, C, W, c0, c1, bias, xres, sxh, yrow); break;
        case 5: fwd_rows_t<5, HB>(rows, nrows, sxw, C, W, c0, c1, bias, xres, sxh, yrow); break;
        default: fwd_rows_t<7, HB>(rows, nrows, sxw, C, W, c0, c1, bias, xres, sxh, yrow); break;
    }
}

static void fwd_rows(int hb, int kw, const TapRow* rows, int nrows, long sxw, long C, int W, long c0, long c1,
                     const float* bias, const float* xres, long sxh, float* yrow) {
    if (hb == 2) fwd_rows_hb<2>(kw, rows, nrows, sxw, C, W, c0, c1, bias, xres, sxh, yrow);
    else fwd_rows_hb<1>(kw, rows, nrows, sxw, C, W, c0, c1, bias, xres, sxh, yrow);
}

// The weight gradient, organised like the forward: the work item is HB gy rows (h, h + 1 of one
// (b, t)), and for each dt the x rows h - ph .. h + HB - 1 + ph that their taps read. A group of NH
// kernel rows dh0 .. dh0 + NH - 1 keeps its NH * KW tap sums in registers over the whole W sweep:
// each gy vector loaded feeds NH * KW taps and each x vector up to HB * KW, so the loop does
// ~2 FMAs per load instead of ~1 for a sweep per tap row.
//
// Register budget (vectors): NH * KW sums + HB * WB gy + WB + KW - 1 x.
template <int KW> struct WgradTile {
    // Measured (AVX-512, 1 thread, UniFormer-S stage shapes): 3 rows x 2 columns for 3x3x3 and
    // 2 x 2 for 5x5x5 beat wider blocks; spills and FMA-latency chains cost more than the loads saved.
    static constexpr int NH = KW <= 3 ? 3 : 2;               // kernel rows per group
    static constexpr int WB = KW == 1 && UF_VLEN >= 16 ? 4 : 2;  // columns per block
};

// Columns w0 .. w0 + WB - 1: sums[dh][d] += gy[o][w] * x[row o + dh][w + d - pw] for the group's
// nh (<= NH) kernel rows. xr[i] is the x row of (o + dh) == i, i < nh + HB - 1 (null: outside the
// input, reads nothing); gr[o] the gy rows (W, C) contiguous. CHECK: x columns outside [0, W) read
// zero (the padding).
template <class V, int KW, int NH, int HB, int WB, bool CHECK>
static UF_INLINE void wgrad_block(const float* const* xr, const float* const* gr, long sxw, long C, int W,
                                  long c, int w0, int nh, V (*sums)[KW]) {
    using L = Lanes<V>;
    constexpr int pw = KW / 2;
    V g[HB][WB];
    for (int o = 0; o < HB; ++o)
        for (int j = 0; j < WB; ++j) g[o][j] = L::load(gr[o] + (long)(w0 + j) * C + c);
    for (int i = 0; i < NH + HB - 1; ++i) {
        if (i >= nh + HB - 1 || !xr[i]) continue;  // a short last group has fewer rows
        V xv[WB + KW - 1];
        for (int q = 0; q < WB + KW - 1; ++q) {
            const long wi = (long)w0 - pw + q;
            xv[q] = (!CHECK || (unsigned long)wi < (unsigned long)W) ? L::load(xr[i] + wi * sxw + c) : L::zero();
        }
        for (int o = 0; o < HB; ++o) {
            const int dh = i - o;
            if (dh < 0 || dh >= NH || dh >= nh) continue;
            for (int d = 0; d < KW; ++d)
                for (int j = 0; j < WB; ++j) sums[dh][d] += g[o][j] * xv[j + d];
        }
    }
}

// One group over all W columns (unchecked blocks where every tap is inside the row), then
// dwp[dh, d, c] += sums[dh][d]; dwp is the partial weight gradient at tap (dt, dh0, 0), rows of C.
template <class V, int KW, int NH, int HB>
static UF_INLINE void wgrad_group(const float* const* xr, const float* const* gr, long sxw, long C, int W,
                                  long c, int nh, float* dwp) {
    using L = Lanes<V>;
    constexpr int pw = KW / 2, WB = WgradTile<KW>::WB;
    V sums[NH][KW];
    for (int dh = 0; dh < NH; ++dh)
        for (int d = 0; d < KW; ++d) sums[dh][d] = L::zero();
    int w = 0;
    for (; w < pw && w + WB <= W; w += WB) wgrad_block<V, KW, NH, HB, WB, true>(xr, gr, sxw, C, W, c, w, nh, sums);
    for (; w + WB + pw <= W; w += WB) wgrad_block<V, KW, NH, HB, WB, false>(xr, gr, sxw, C, W, c, w, nh, sums);
    for (; w + WB <= W; w += WB) wgrad_block<V, KW, NH, HB, WB, true>(xr, gr, sxw, C, W, c, w, nh, sums);
    if (WB > 2 && w + 2 <= W) { wgrad_block<V, KW, NH, HB, 2, true>(xr, gr, sxw, C, W, c, w, nh, sums); w += 2; }
    for (; w < W; ++w) wgrad_block<V, KW, NH, HB, 1, true>(xr, gr, sxw, C, W, c, w, nh, sums);
    for (int dh = 0; dh < nh; ++dh)
        for (int d = 0; d < KW; ++d) {
            float* p = dwp + (long)(dh * KW + d) * C + c;
            L::store(p, L::load(p) + sums[dh][d]);
        }
}

// The weight-gradient contribution of HB gy rows, channels [c0, c1), added to dw (kt*kh*kw, C):
//   dw[dt, dh, d, c] += sum_o sum_w gy[o][w, c] * x[t + dt - pt, h + o + dh - ph, w + d - pw, c]
// xrows: kt * (kh + HB - 1) row pointers, dt-major, x row h - ph + i at [dt * (kh + HB - 1) + i],
// null where outside the input.
template <int KW, int HB>
static void wgrad_rows_t(const float* const* xrows, const float* const* gr, int kt, int kh, long sxw, long C,
                         int W, long c0, long c1, float* dw) {
    constexpr int NH = WgradTile<KW>::NH;
    const int span = kh + HB - 1;
    long c = c0;
    for (; c + UF_VLEN <= c1; c += UF_VLEN)
        for (int dt = 0; dt < kt; ++dt)
            for (int dh0 = 0; dh0 < kh; dh0 += NH)
                wgrad_group<vec_t, KW, NH, HB>(xrows + dt * span + dh0, gr, sxw, C, W, c, std::min(NH, kh - dh0),
                                               dw + (long)((dt * kh + dh0) * KW) * C);
    for (; c < c1; ++c)
        for (int dt = 0; dt < kt; ++dt)
            for (int dh0 = 0; dh0 < kh; dh0 += NH)
                wgrad_group<float, KW, NH, HB>(xrows + dt * span + dh0, gr, sxw, C, W, c, std::min(NH, kh - dh0),
                                               dw + (long)((dt * kh + dh0) * KW) * C);
}

template <int HB>
static void wgrad_rows_hb(int kw, const float* const* xrows, const float* const* gr, int kt, int kh, long sxw,
                          long C, int W, long c0, long c1, float* dw) {
    switch (kw) {
        case 1: wgrad_rows_t<1, HB>(xrows, gr, kt, kh, sxw, C, W, c0, c1, dw); break;
        case 3: wgrad_rows_t<3, HB>(xrows, gr, kt, kh, sxw, C, W, c0, c1, dw); break;
        case 5: wgrad_rows_t<5, HB>(xrows, gr, kt, kh, sxw, C, W, c0, c1, dw); break;
        default: wgrad_rows_t<7, HB>(xrows, gr, kt, kh, sxw, C, W, c0, c1, dw); break;
    }
}

static void wgrad_rows(int hb, int kw, const float* const* xrows, const float* const* gr, int kt, int kh,
                       long sxw, long C, int W, long c0, long c1, float* dw) {
    if (hb == 2) wgrad_rows_hb<2>(kw, xrows, gr, kt, kh, sxw, C, W, c0, c1, dw);
    else wgrad_rows_hb<1>(kw, xrows, gr, kt, kh, sxw, C, W, c0, c1, dw);
}

// Bias gradient of one gy row, channels [c0, c1): db[c] += sum_w gy[w, c], two interleaved accumulators.
template <class V>
static UF_INLINE void bgrad_lanes(const float* grow, long C, int W, long c, float* db) {
    using L = Lanes<V>;
    V a0 = L::zero(), a1 = L::zero();
    int w = 0;
    for (; w + 2 <= W; w += 2) {
        a0 += L::load(grow + (long)w * C + c);
        a1 += L::load(grow + (long)(w + 1) * C + c);
    }
    if (w < W) a0 += L::load(grow + (long)w * C + c);
    L::store(db + c, L::load(db + c) + (a0 + a1));
}

static void bgrad_row(const float* grow, long C, int W, long c0, long c1, float* db) {
    long c = c0;
    for (; c + UF_VLEN <= c1; c += UF_VLEN) bgrad_lanes<vec_t>(grow, C, W, c, db);
    for (; c < c1; ++c) bgrad_lanes<float>(grow, C, W, c, db);
}

static const RowKernels kernels = {fwd_rows, wgrad_rows, bgrad_row};
