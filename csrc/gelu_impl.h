// The exact (erf) GELU in place on float32, written once and compiled once per instruction set:
// gelu.cpp has per_isa.h include it inside `namespace avx512|avx2|generic { ... }` under a
// `#pragma GCC target(...)`, with UF_VLEN the number of float lanes of that set's vectors.
//
// gelu(x) = x/2 (1 + erf(x / sqrt 2)), with erf(x / sqrt 2) = x P(x^2) / Q(x^2) on |x| <= 4 sqrt 2
// (beyond it erf rounds to +-1 in float32), P of degree 6 and Q of degree 4: a rational fit of our
// own (least squares in erf's absolute error, reweighted towards the largest), max |error| 3.7e-7 in
// erf evaluated in float32, so |gelu error| <= 2.4e-7 max(|x|, 1). About 20 vector operations and a
// division per vector: 12-13 cycles per 8 floats on Zen 3 against ATen's 35-46 (an erf built on
// exp), whose GELU was a compute-bound pass of its own at 1.5 G elements/s on two AVX2 cores.
// NaN stays NaN; +inf gives +inf and -inf NaN, as ATen's.

typedef float gelu_vec __attribute__((vector_size(UF_VLEN * 4), aligned(4), may_alias));

// max(lo, v) and min(hi, v), NaN v staying NaN: one vmaxps / vminps where the set has them (their
// second operand is what they return when either is NaN), where a vector ?: costs a compare and a
// blend.
static inline float clamp_low(float lo, float v) { return lo > v ? lo : v; }
static inline float clamp_high(float hi, float v) { return hi < v ? hi : v; }
#if UF_VLEN == 16
static inline gelu_vec clamp_low(float lo, gelu_vec v) { return (gelu_vec)_mm512_max_ps(_mm512_set1_ps(lo), (__m512)v); }
static inline gelu_vec clamp_high(float hi, gelu_vec v) { return (gelu_vec)_mm512_min_ps(_mm512_set1_ps(hi), (__m512)v); }
#elif UF_VLEN == 8
static inline gelu_vec clamp_low(float lo, gelu_vec v) { return (gelu_vec)_mm256_max_ps(_mm256_set1_ps(lo), (__m256)v); }
static inline gelu_vec clamp_high(float hi, gelu_vec v) { return (gelu_vec)_mm256_min_ps(_mm256_set1_ps(hi), (__m256)v); }
#else
static inline gelu_vec clamp_low(float lo, gelu_vec v) { return lo > v ? lo : v; }
static inline gelu_vec clamp_high(float hi, gelu_vec v) { return hi < v ? hi : v; }
#endif

template <typename V>
static inline V gelu_of(V x) {
    constexpr float lim = 5.656854249f;  // 4 sqrt 2
    constexpr float p0 = 7.978842258e-01f, p1 = 7.564068586e-02f, p2 = 9.269040078e-03f, p3 = 3.794505028e-04f,
                    p4 = 6.873576694e-06f, p5 = -4.397847420e-08f, p6 = 2.123121262e-10f;
    constexpr float q1 = 2.614653707e-01f, q2 = 3.019989096e-02f, q3 = 1.943887561e-03f, q4 = 6.862541341e-05f;
    const V z = clamp_high(lim, clamp_low(-lim, x));
    // Estrin's scheme: dependency chains four deep instead of Horner's six, so that more vectors
    // overlap in the out-of-order window (a vector takes some 50 cycles from load to store).
    const V t = z * z, t2 = t * t;
    const V p = ((p6 * t + p5) * t + p4) * (t2 * t2) + ((p3 * t + p2) * t2 + (p1 * t + p0));
    const V q = (q4 * t2 + (q3 * t + q2)) * t2 + (q1 * t + 1.0f);
    // The fit overshoots 1 by up to 2e-7 near the clamp: without this, gelu(-1e30) would be 1e23.
    const V e = clamp_high(1.0f, clamp_low(-1.0f, z * p / q));
    const V h = 0.5f * x;
    return h + h * e;
}

// x[0 .. n) = gelu(x), vectors of UF_VLEN lanes and the tail one element at a time.
static void gelu_span(float* x, long n) {
    long i = 0;
    for (; i + UF_VLEN <= n; i += UF_VLEN) {
        gelu_vec* v = reinterpret_cast<gelu_vec*>(x + i);
        *v = gelu_of<gelu_vec>(*v);
    }
    for (; i < n; ++i) x[i] = gelu_of<float>(x[i]);
}
