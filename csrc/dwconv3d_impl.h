// Depthwise 3-D convolution kernels on channels-last float32 data, written once and compiled once
// per instruction set: dwconv3d.cpp includes this file inside `namespace UF_ISA { ... }` under a
// `#pragma GCC target(...)`, with UF_VLEN the number of float lanes of that set's vectors.
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
// zero, exactly the zero padding, so the block keeps WB independent accumulator chains.
template <class V, int KW, int WB, bool CHECK, int HB>
static UF_INLINE void fwd_block(const TapRow* rows, int nrows, long sxw, long C, int W, long c, int w0,
                                const float* bias, const float* xres, long sxh, float* yrow) {
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
            if (xres) acc[o][j] += L::load(xres + o * sxh + (long)(w0 + j) * sxw + c);
            L::store(yrow + o * W * C + (long)(w0 + j) * C + c, acc[o][j]);
        }
}

// HB output rows (all W columns) for channels [c, c + lanes): unchecked blocks where every tap is
// inside the row, checked blocks of WB, 4, 2, 1 at the ends.
template <class V, int KW, int HB>
static UF_INLINE void fwd_rows_lanes(const TapRow* rows, int nrows, long sxw, long C, int W, long c,
                                     const float* bias, const float* xres, long sxh, float* yrow) {
    constexpr int pw = KW / 2;
    // Accumulators HB * WB plus WB + KW - 1 inputs within the register file (32 with AVX-512).
    constexpr int WB = (HB == 1 || (UF_VLEN >= 16 && KW <= 5)) ? 8 : 4;
    int w = 0;
    if (W >= WB) { fwd_block<V, KW, WB, true, HB>(rows, nrows, sxw, C, W, c, 0, bias, xres, sxh, yrow); w = WB; }
    for (; w + WB + pw <= W; w += WB) fwd_block<V, KW, WB, false, HB>(rows, nrows, sxw, C, W, c, w, bias, xres, sxh, yrow);
    if (WB == 8 && w + 8 <= W) { fwd_block<V, KW, 8, true, HB>(rows, nrows, sxw, C, W, c, w, bias, xres, sxh, yrow); w += 8; }
    if (w + 4 <= W) { fwd_block<V, KW, 4, true, HB>(rows, nrows, sxw, C, W, c, w, bias, xres, sxh, yrow); w += 4; }
    if (w + 4 <= W) { fwd_block<V, KW, 4, true, HB>(rows, nrows, sxw, C, W, c, w, bias, xres, sxh, yrow); w += 4; }
    if (w + 2 <= W) { fwd_block<V, KW, 2, true, HB>(rows, nrows, sxw, C, W, c, w, bias, xres, sxh, yrow); w += 2; }
    if (w + 1 <= W) { fwd_block<V, KW, 1, true, HB>(rows, nrows, sxw, C, W, c, w, bias, xres, sxh, yrow); w += 1; }
}

// HB output rows, all channels: channel vectors outermost so one vector's weights stay in L1 while
// the W loop streams the input rows; leftover channels (C % lanes) run one at a time.
template <int KW, int HB>
static void fwd_rows_t(const TapRow* rows, int nrows, long sxw, long C, int W,
                       const float* bias, const float* xres, long sxh, float* yrow) {
    long c = 0;
    for (; c + UF_VLEN <= C; c += UF_VLEN)
        fwd_rows_lanes<vec_t, KW, HB>(rows, nrows, sxw, C, W, c, bias, xres, sxh, yrow);
    for (; c < C; ++c) fwd_rows_lanes<float, KW, HB>(rows, nrows, sxw, C, W, c, bias, xres, sxh, yrow);
}

template <int HB>
static void fwd_rows_hb(int kw, const TapRow* rows, int nrows, long sxw, long C, int W,
                        const float* bias, const float* xres, long sxh, float* yrow) {
    switch (kw) {
        case 1: fwd_rows_t<1, HB>(rows, nrows, sxw, C, W, bias, xres, sxh, yrow); break;
        case 3: fwd_rows_t<3, HB>(rows, nrows, sxw, C, W, bias, xres, sxh, yrow); break;
        case 5: fwd_rows_t<5, HB>(rows, nrows, sxw, C, W, bias, xres, sxh, yrow); break;
        default: fwd_rows_t<7, HB>(rows, nrows, sxw, C, W, bias, xres, sxh, yrow); break;
    }
}

static void fwd_rows(int hb, int kw, const TapRow* rows, int nrows, long sxw, long C, int W,
                     const float* bias, const float* xres, long sxh, float* yrow) {
    if (hb == 2) fwd_rows_hb<2>(kw, rows, nrows, sxw, C, W, bias, xres, sxh, yrow);
    else fwd_rows_hb<1>(kw, rows, nrows, sxw, C, W, bias, xres, sxh, yrow);
}

// Weight-gradient contribution of WB consecutive columns w0 .. w0 + WB - 1 of one (gy row, x row)
// pair: acc[.][dw] += gy[w] * x[w + dw - pw]; columns are spread over accumulators so the
// FMA chains overlap (NA accumulators per dw, column j going to j % NA). CHECK: x outside [0, W) reads zero (the padding).
template <class V, int KW, int WB, bool CHECK, int NA>
static UF_INLINE void wgrad_block(const float* xrow, long sxw, const float* grow, long C, int W, long c, int w0,
                                  V (*acc)[KW]) {
    using L = Lanes<V>;
    constexpr int pw = KW / 2;
    V g[WB], xv[WB + KW - 1];
    for (int j = 0; j < WB; ++j) g[j] = L::load(grow + (long)(w0 + j) * C + c);
    for (int i = 0; i < WB + KW - 1; ++i) {
        const long wi = (long)w0 - pw + i;
        xv[i] = (!CHECK || (unsigned long)wi < (unsigned long)W) ? L::load(xrow + wi * sxw + c) : L::zero();
    }
    for (int d = 0; d < KW; ++d)
        for (int j = 0; j < WB; ++j) acc[j % NA][d] += g[j] * xv[j + d];
}

// Weight gradient of one (dt, dh) tap over a list of (x row, gy row) pairs (the output rows of one
// chunk where that tap is inside the input), channels [c, c + lanes):
//   dwrow[dw, c] += sum_pairs sum_w gy[w, c] * x[w + dw - pw, c]
// The kw sums stay in registers over all the pairs; one store per chunk and tap.
template <class V, int KW>
static UF_INLINE void wgrad_lanes(const WgradPair* pairs, int npairs, long sxw, long C, int W, long c,
                                  float* dwrow) {
    using L = Lanes<V>;
    constexpr int pw = KW / 2;
    // Enough independent chains to cover the FMA latency without running out of registers.
    constexpr int NA = KW <= 3 ? 4 : 2;
    V acc[NA][KW];
    for (int a = 0; a < NA; ++a)
        for (int d = 0; d < KW; ++d) acc[a][d] = L::zero();
    for (int p = 0; p < npairs; ++p) {
        const float* xrow = pairs[p].x;
        const float* grow = pairs[p].gy;
        int w = 0;
        if (W >= 4) { wgrad_block<V, KW, 4, true, NA>(xrow, sxw, grow, C, W, c, 0, acc); w = 4; }
        for (; w + 4 + pw <= W; w += 4) wgrad_block<V, KW, 4, false, NA>(xrow, sxw, grow, C, W, c, w, acc);
        for (; w + 4 <= W; w += 4) wgrad_block<V, KW, 4, true, NA>(xrow, sxw, grow, C, W, c, w, acc);
        for (; w < W; ++w) wgrad_block<V, KW, 1, true, NA>(xrow, sxw, grow, C, W, c, w, acc);
    }
    for (int d = 0; d < KW; ++d) {
        float* p = dwrow + (long)d * C + c;
        V sum = acc[0][d];
        for (int a = 1; a < NA; ++a) sum += acc[a][d];
        L::store(p, L::load(p) + sum);
    }
}

// Pairs go in groups whose gy and x rows (channels [c0, c1)) fit in L1 together (~24 KiB), each
// group swept once per channel vector: the register sums cover several short rows (small W).
template <int KW>
static void wgrad_tap_t(const WgradPair* pairs, int npairs, long sxw, long C, int W, long c0, long c1,
                        float* dwrow) {
    const long row_bytes = 2L * W * (c1 - c0) * (long)sizeof(float);
    const int group = (int)std::max(1L, std::min((long)npairs, (24L << 10) / row_bytes));
    for (int p0 = 0; p0 < npairs; p0 += group) {
        const int n = std::min(group, npairs - p0);
        long c = c0;
        for (; c + UF_VLEN <= c1; c += UF_VLEN) wgrad_lanes<vec_t, KW>(pairs + p0, n, sxw, C, W, c, dwrow);
        for (; c < c1; ++c) wgrad_lanes<float, KW>(pairs + p0, n, sxw, C, W, c, dwrow);
    }
}

// Channels [c0, c1) of one tap row's weight gradient; see wgrad_lanes.
static void wgrad_tap(int kw, const WgradPair* pairs, int npairs, long sxw, long C, int W, long c0, long c1,
                      float* dwrow) {
    switch (kw) {
        case 1: wgrad_tap_t<1>(pairs, npairs, sxw, C, W, c0, c1, dwrow); break;
        case 3: wgrad_tap_t<3>(pairs, npairs, sxw, C, W, c0, c1, dwrow); break;
        case 5: wgrad_tap_t<5>(pairs, npairs, sxw, C, W, c0, c1, dwrow); break;
        default: wgrad_tap_t<7>(pairs, npairs, sxw, C, W, c0, c1, dwrow); break;
    }
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

static const RowKernels kernels = {fwd_rows, wgrad_tap, bgrad_row};
