/* adampx fused kernels: one call steps every tensor of a list, on the CPU.
 *
 * AdamP and SGDP of ALGORITHM.md. Per tested tensor (rows = the channel view [n0, N/n0]):
 *   1. row sums p·p, g·g, p·g (the test needs nothing else; 2 reads);
 *   2. the test: channel view, then layer view, from those sums;
 *   3. the step, with the memory traffic of AdamW / SGD:
 *      - not projected: AdamW / SGD with the full decay, one pass;
 *      - projected per row (rows up to row_limit long): row by row, the moments and the
 *        direction d of the row (AdamP keeps it in a per-thread row buffer), its dot with p,
 *        the row's coefficient c_i = p·d / (‖p‖ + eps)², then p ← p·keep − step·(d − c_i·p)
 *        while the row is still in cache;
 *      - projected as a whole, or rows longer than row_limit (rare): the moments and the
 *        dots p·d in one pass, then p in a second pass that recomputes d from the moments.
 * Untested tensors (and groups with the projection off) take the one-pass AdamW / SGD step.
 * Row sums accumulate in double. Built by adampx.fused with the system C compiler. */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#define THREAD omp_get_thread_num()
#else
#define THREAD 0
#endif

#define LANES 16
_Static_assert(LANES == 16, "lane_total adds up 16 lanes");
#define BLOCK 4096   /* elements per task in the one-pass loops */
#define PARALLEL 65536 /* fewer elements than this run on one thread */

typedef struct {
    double lr, beta1, beta2, eps, weight_decay, delta, wd_ratio;
    double momentum, dampening; /* SGDP */
    int64_t row_limit;          /* longest row stepped in cache (AdamP's row buffer) */
    int32_t maximize, nesterov, threads;
} hyper_t;

enum { NOT_PROJECTED, CHANNEL, LAYER };

/* Row sums are kept in LANES independent double accumulators per quantity (a plain loop
 * over a lane array vectorises well; an "omp simd reduction" was 2x slower here), then
 * added up. FOR_LANES runs its body for the elements j0 + l < n of a row: whole groups of
 * LANES with a constant trip count (which vectorises; a variable one ran 1.8x slower),
 * then the rest. */
#define FOR_LANES(n, ...)                                                                      \
    int64_t j0 = 0;                                                                            \
    for (; j0 + LANES <= (n); j0 += LANES) {                                                   \
        _Pragma("omp simd")                                                                    \
        for (int64_t l = 0; l < LANES; l++) { __VA_ARGS__ }                                    \
    }                                                                                          \
    for (int64_t l = 0; j0 + l < (n); l++) { __VA_ARGS__ }

static inline double lane_total(const double *acc) {
    /* pairwise: four dependent additions, not fifteen (a row's fixed cost, which shows on
     * short rows: 22 % of the kernel's time on ResNet-50's tensors cut to 2 columns) */
    double half[LANES / 2], quarter[LANES / 4];
    for (int l = 0; l < LANES / 2; l++) half[l] = acc[l] + acc[l + LANES / 2];
    for (int l = 0; l < LANES / 4; l++) quarter[l] = half[l] + half[l + LANES / 4];
    return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

/* The test of one tensor from its row sums (p·p, g·g, p·g per row), and for adampx.statistics
 * `out` = channel, layer, max |cos| of the rows, |cos| of the layer. */
static int decide(const double *sums, int64_t rows, int64_t cols, const hyper_t *h, double *out) {
    double pp = 0, gg = 0, pg = 0, max_cos = 0;
    for (int64_t i = 0; i < rows; i++) {
        const double *s = sums + 3 * i;
        double c = fabs(s[2]) / (fmax(sqrt(s[0]), h->eps) * fmax(sqrt(s[1]), h->eps));
        if (c > max_cos || isnan(c)) max_cos = c;
        pp += s[0]; gg += s[1]; pg += s[2];
    }
    double cos_layer = fabs(pg) / (fmax(sqrt(pp), h->eps) * fmax(sqrt(gg), h->eps));
    int channel = max_cos < h->delta / sqrt((double)cols);
    int layer = !channel && cos_layer < h->delta / sqrt((double)cols * (double)rows);
    out[0] = channel; out[1] = layer; out[2] = max_cos; out[3] = cos_layer;
    return channel ? CHANNEL : (layer ? LAYER : NOT_PROJECTED);
}

/* (‖p‖ + eps)² of a row, from its p·p */
static inline double row_scale(double pp, double eps) {
    double n = sqrt(pp) + eps;
    return n * n;
}

/* (‖p‖ + eps)² of the whole tensor, from its rows' p·p */
static double whole_scale(const double *sums, int64_t rows, double eps) {
    double pp = 0;
    for (int64_t i = 0; i < rows; i++) pp += sums[3 * i];
    double n = sqrt(pp) + eps;
    return n * n;
}

/* the square root in the element type (C's sqrt of a float would compute in double) */
#define SQRT_f32 sqrtf
#define SQRT_f64 sqrt

#define DEFINE_KERNELS(T, SUFFIX)                                                              \
                                                                                               \
/* p·p, g·g, p·g of every row, into sums[3·i .. 3·i + 2] */                                   \
static void row_sums_##SUFFIX(const T *p, const T *g, int64_t R, int64_t C, double *sums,     \
                              int threads) {                                                   \
    _Pragma("omp parallel for num_threads(threads) schedule(static) if(R * C > PARALLEL)")    \
    for (int64_t i = 0; i < R; i++) {                                                          \
        double acc[3][LANES] = {{0}};                                                          \
        const T *pi = p + i * C, *gi = g + i * C;                                              \
        FOR_LANES(C,                                                                           \
            double pj = pi[j0 + l], gj = gi[j0 + l];                                           \
            acc[0][l] += pj * pj; acc[1][l] += gj * gj; acc[2][l] += pj * gj;)                 \
        for (int q = 0; q < 3; q++) sums[3 * i + q] = lane_total(acc[q]);                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
/* AdamP: the direction d = n / (sqrt(v) / sqrt(bc2) + eps), n = m or, with nesterov,       \
 * β1·m + (1−β1)·g (m, v already updated); 1/bc1 is folded into the step size */              \
static inline T adam_direction_##SUFFIX(T m, T v, T g, T b1, T inv_bc2_sqrt, T eps,           \
                                        int nesterov) {                                        \
    T n = nesterov ? b1 * m + (1 - b1) * g : m;                                                \
    return n / (SQRT_##SUFFIX(v) * inv_bc2_sqrt + eps);                                                 \
}                                                                                              \
                                                                                               \
typedef struct {                                                                               \
    T b1, b2, eps, sign, inv_bc2_sqrt, step;                                                   \
    int nesterov;                                                                              \
} adam_##SUFFIX##_t;                                                                           \
                                                                                               \
/* the moments of n elements updated; d (if not NULL) ← the direction; returns Σ p·d */       \
static inline double adam_moments_##SUFFIX(const adam_##SUFFIX##_t *a, int64_t n, const T *p, \
                                           const T *g, T *m, T *v, T *d) {                     \
    double acc[LANES] = {0};                                                                   \
    FOR_LANES(n,                                                                               \
        const int64_t j = j0 + l;                                                              \
        T gj = a->sign * g[j];                                                                 \
        T mj = a->b1 * m[j] + (1 - a->b1) * gj, vj = a->b2 * v[j] + (1 - a->b2) * gj * gj;     \
        m[j] = mj; v[j] = vj;                                                                  \
        T dj = adam_direction_##SUFFIX(mj, vj, gj, a->b1, a->inv_bc2_sqrt, a->eps, a->nesterov); \
        if (d) d[j] = dj;                                                                      \
        acc[l] += (double)p[j] * dj;)                                                          \
    return lane_total(acc);                                                                    \
}                                                                                              \
                                                                                               \
/* AdamW's step of n elements: the moments, then p ← p·keep − step·d */                       \
static void adamw_##SUFFIX(const adam_##SUFFIX##_t *a, int64_t N, T keep, T *p, const T *g,   \
                           T *m, T *v, int threads) {                                          \
    _Pragma("omp parallel for num_threads(threads) schedule(static) if(N > PARALLEL)")        \
    for (int64_t block = 0; block < (N + BLOCK - 1) / BLOCK; block++) {                        \
        const int64_t end = block * BLOCK + BLOCK < N ? block * BLOCK + BLOCK : N;             \
        _Pragma("omp simd")                                                                    \
        for (int64_t j = block * BLOCK; j < end; j++) {                                        \
            T gj = a->sign * g[j];                                                             \
            T mj = a->b1 * m[j] + (1 - a->b1) * gj, vj = a->b2 * v[j] + (1 - a->b2) * gj * gj; \
            m[j] = mj; v[j] = vj;                                                              \
            p[j] = p[j] * keep - a->step * adam_direction_##SUFFIX(mj, vj, gj, a->b1,          \
                                                 a->inv_bc2_sqrt, a->eps, a->nesterov);        \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
void adamp_##SUFFIX(int64_t count, T **ps, T **gs, T **ms, T **vs, float **steps,              \
                    const int64_t *rows, const int64_t *cols, const int32_t *tested,           \
                    const hyper_t *h, double *sums, T *row_buffers, double *decisions) {       \
    const int threads = h->threads;                                                            \
    for (int64_t k = 0; k < count; k++) {                                                      \
        T *p = ps[k]; const T *g = gs[k]; T *m = ms[k]; T *v = vs[k];                          \
        const int64_t R = rows[k], C = cols[k], N = R * C;                                     \
        const double t = (double)(*steps[k] += 1.0f);                                          \
        const adam_##SUFFIX##_t a = {                                                          \
            (T)h->beta1, (T)h->beta2, (T)h->eps, h->maximize ? (T)-1 : (T)1,                   \
            (T)(1.0 / sqrt(1.0 - pow(h->beta2, t))), (T)(h->lr / (1.0 - pow(h->beta1, t))),    \
            h->nesterov};                                                                      \
        int view = NOT_PROJECTED;                                                              \
        if (tested[k]) {                                                                       \
            row_sums_##SUFFIX(p, g, R, C, sums, threads);                                      \
            view = decide(sums, R, C, h, decisions + 4 * k);                                   \
        }                                                                                      \
        const double decay = h->lr * h->weight_decay;                                          \
        if (view == NOT_PROJECTED) {                                                           \
            adamw_##SUFFIX(&a, N, (T)(1.0 - decay), p, g, m, v, threads);                      \
            continue;                                                                          \
        }                                                                                      \
        const T keep = (T)(1.0 - decay * h->wd_ratio);                                         \
        if (view == CHANNEL && C <= h->row_limit) { /* row by row, in cache */                 \
            _Pragma("omp parallel for num_threads(threads) schedule(static) if(N > PARALLEL)") \
            for (int64_t i = 0; i < R; i++) {                                                  \
                T *pi = p + i * C, *d = row_buffers + (int64_t)THREAD * h->row_limit;          \
                double pd = adam_moments_##SUFFIX(&a, C, pi, g + i * C, m + i * C, v + i * C,  \
                                                  d);                                          \
                const T c = (T)(pd / row_scale(sums[3 * i], h->eps));                      \
                _Pragma("omp simd")                                                            \
                for (int64_t j = 0; j < C; j++) pi[j] = pi[j] * keep - a.step * (d[j] - c * pi[j]); \
            }                                                                                  \
            continue;                                                                          \
        }                                                                                      \
        /* as a whole, or long rows: the moments and the dots, then p with d recomputed */    \
        double *pd = sums + 3 * R; /* the rows' p·d */                                        \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if(N > PARALLEL)")    \
        for (int64_t i = 0; i < R; i++)                                                        \
            pd[i] = adam_moments_##SUFFIX(&a, C, p + i * C, g + i * C, m + i * C, v + i * C,   \
                                          0);                                                  \
        double layer_pd = 0;                                                                   \
        for (int64_t i = 0; i < R; i++) layer_pd += pd[i];                                     \
        const double layer_c = view == LAYER ? layer_pd / whole_scale(sums, R, h->eps) : 0.0;  \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if(N > PARALLEL)")    \
        for (int64_t i = 0; i < R; i++) {                                                      \
            T *pi = p + i * C; const T *gi = g + i * C, *mi = m + i * C, *vi = v + i * C;      \
            const T c = (T)(view == LAYER ? layer_c : pd[i] / row_scale(sums[3 * i], h->eps)); \
            _Pragma("omp simd")                                                                \
            for (int64_t j = 0; j < C; j++) {                                                  \
                T dj = adam_direction_##SUFFIX(mi[j], vi[j], a.sign * gi[j], a.b1,             \
                                               a.inv_bc2_sqrt, a.eps, a.nesterov);             \
                pi[j] = pi[j] * keep - a.step * (dj - c * pi[j]);                              \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
typedef struct {                                                                               \
    T mu, damp, sign, lr;                                                                      \
    int nesterov;                                                                              \
} sgd_##SUFFIX##_t;                                                                            \
                                                                                               \
/* SGD's direction d = b, or with nesterov g + μ·b (b already updated, g signed) */           \
static inline T sgd_direction_##SUFFIX(const sgd_##SUFFIX##_t *s, T g, T b) {                 \
    return s->nesterov ? g + s->mu * b : b;                                                    \
}                                                                                              \
                                                                                               \
/* the momentum of n elements updated; returns Σ p·d */                                       \
static inline double sgd_momentum_##SUFFIX(const sgd_##SUFFIX##_t *s, int64_t n, const T *p,  \
                                           const T *g, T *b) {                                 \
    double acc[LANES] = {0};                                                                   \
    FOR_LANES(n,                                                                               \
        const int64_t j = j0 + l;                                                              \
        T gj = s->sign * g[j], bj = s->mu * b[j] + s->damp * gj;                               \
        b[j] = bj;                                                                             \
        acc[l] += (double)p[j] * sgd_direction_##SUFFIX(s, gj, bj);)                           \
    return lane_total(acc);                                                                    \
}                                                                                              \
                                                                                               \
/* p ← p·keep − lr·(d − c·p) for n elements whose momentum is updated */                      \
static inline void sgd_apply_##SUFFIX(const sgd_##SUFFIX##_t *s, int64_t n, T keep, T c, T *p, \
                                      const T *g, const T *b) {                                \
    _Pragma("omp simd")                                                                        \
    for (int64_t j = 0; j < n; j++)                                                            \
        p[j] = p[j] * keep - s->lr * (sgd_direction_##SUFFIX(s, s->sign * g[j], b[j]) - c * p[j]); \
}                                                                                              \
                                                                                               \
/* SGD's step of N elements: the momentum, then p ← p·keep − lr·d */                          \
static void sgd_##SUFFIX(const sgd_##SUFFIX##_t *s, int64_t N, T keep, T *p, const T *g, T *b,\
                         int threads) {                                                        \
    _Pragma("omp parallel for num_threads(threads) schedule(static) if(N > PARALLEL)")        \
    for (int64_t block = 0; block < (N + BLOCK - 1) / BLOCK; block++) {                        \
        const int64_t end = block * BLOCK + BLOCK < N ? block * BLOCK + BLOCK : N;             \
        _Pragma("omp simd")                                                                    \
        for (int64_t j = block * BLOCK; j < end; j++) {                                        \
            T gj = s->sign * g[j], bj = s->mu * b[j] + s->damp * gj;                           \
            b[j] = bj;                                                                         \
            p[j] = p[j] * keep - s->lr * sgd_direction_##SUFFIX(s, gj, bj);                    \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
void sgdp_##SUFFIX(int64_t count, T **ps, T **gs, T **bs, const int64_t *rows,                 \
                   const int64_t *cols, const int32_t *tested, const hyper_t *h,               \
                   double *sums, double *decisions) {                                          \
    const sgd_##SUFFIX##_t s = {(T)h->momentum, (T)(1.0 - h->dampening),                       \
                                h->maximize ? (T)-1 : (T)1, (T)h->lr, h->nesterov};            \
    const int threads = h->threads;                                                            \
    const double decay = h->lr * h->weight_decay / (1.0 - h->momentum);                        \
    for (int64_t k = 0; k < count; k++) {                                                      \
        T *p = ps[k]; const T *g = gs[k]; T *b = bs[k];                                        \
        const int64_t R = rows[k], C = cols[k], N = R * C;                                     \
        int view = NOT_PROJECTED;                                                              \
        if (tested[k]) {                                                                       \
            row_sums_##SUFFIX(p, g, R, C, sums, threads);                                      \
            view = decide(sums, R, C, h, decisions + 4 * k);                                   \
        }                                                                                      \
        if (view == NOT_PROJECTED) {                                                           \
            sgd_##SUFFIX(&s, N, (T)(1.0 - decay), p, g, b, threads);                           \
            continue;                                                                          \
        }                                                                                      \
        const T keep = (T)(1.0 - decay * h->wd_ratio);                                         \
        if (view == CHANNEL) { /* row by row, in cache */                                     \
            _Pragma("omp parallel for num_threads(threads) schedule(static) if(N > PARALLEL)") \
            for (int64_t i = 0; i < R; i++) {                                                  \
                T *pi = p + i * C; const T *gi = g + i * C; T *bi = b + i * C;                 \
                double pd = sgd_momentum_##SUFFIX(&s, C, pi, gi, bi);                          \
                T c = (T)(pd / row_scale(sums[3 * i], h->eps));                            \
                sgd_apply_##SUFFIX(&s, C, keep, c, pi, gi, bi);                                \
            }                                                                                  \
            continue;                                                                          \
        }                                                                                      \
        double *pd = sums + 3 * R, layer_pd = 0; /* as a whole: all dots first */             \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if(N > PARALLEL)")    \
        for (int64_t i = 0; i < R; i++)                                                        \
            pd[i] = sgd_momentum_##SUFFIX(&s, C, p + i * C, g + i * C, b + i * C);             \
        for (int64_t i = 0; i < R; i++) layer_pd += pd[i];                                     \
        const T c = (T)(layer_pd / whole_scale(sums, R, h->eps));                              \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if(N > PARALLEL)")    \
        for (int64_t i = 0; i < R; i++)                                                        \
            sgd_apply_##SUFFIX(&s, C, keep, c, p + i * C, g + i * C, b + i * C);               \
    }                                                                                          \
}

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)
