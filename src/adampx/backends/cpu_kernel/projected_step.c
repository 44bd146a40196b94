/* adampx's fused CPU kernel: one call steps every tensor of a param group, AdamP or SGDP
 * (the algorithm, its test and its projection: docs/algorithm.md).
 *
 * Why: the projection needs, per tensor, the scale-invariance test on p and g and then, where
 * it projects, the dot of the update direction d with p before p can be written. Done with
 * separate tensor operations that is many passes over param-sized arrays; here each tested
 * tensor (rows = its channel view [n0, N/n0]) takes three stages that keep the memory traffic
 * close to AdamW's / SGD's:
 *   1. its row sums p·p, g·g, p·g (all the test needs; a read of p and g);
 *   2. the test on those sums: channel view, then layer view;
 *   3. the step:
 *      - not projected: AdamW's / SGD's one-pass step with the full decay;
 *      - projected per row (AdamP: rows up to row_limit long): row by row, the moments and
 *        the direction d of the row (AdamP keeps it in a per-thread buffer of one row), its
 *        dot with p, the row's coefficient c_i = p·d / (‖p‖ + eps)², then
 *        p ← p·keep − step·(d − c_i·p) while the row is still in cache. AdamP so reads 6 and
 *        writes 3 param-sized arrays where AdamW reads 4 and writes 3; SGDP reads 5 and
 *        writes 2 where SGD reads 3 and writes 2;
 *      - projected as a whole, or rows longer than row_limit (rare): the moments and the
 *        dots p·d in one pass, then p in a second pass that recomputes d from the moments.
 * Untested tensors (and groups with the projection off) take the one-pass AdamW / SGD step.
 * With caution=True every tensor takes the cautious step instead (three passes, see
 * cautious in the body).
 * Row sums and dots accumulate in double. The decay amount a (lr·λ, SGDP's lr·λ/(1−μ)) comes
 * computed from Python; keep = 1 − a·r, r = wd_ratio where projected, else 1.
 *
 * Layout: this file holds what does not depend on the element type (the parameters, the
 * test, the scales) and includes projected_step_body.h once per element type for the rest,
 * which defines adamp_f32, sgdp_f32, adamp_f64 and sgdp_f64. hyper_t is mirrored by ctypes in
 * adampx/backends/cpu_kernel/abi.py, which checks it against adampx_hyper_layout on load.
 * Built by adampx.backends.cpu_kernel with the system C compiler, with OpenMP if it can. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
/* OMP(clauses): an OpenMP directive, gone when built without OpenMP (one thread, no
 * unknown-pragma warnings) */
#define PRAGMA_(...) _Pragma(#__VA_ARGS__)
#ifdef _OPENMP
#include <omp.h>
#define OMP(...) PRAGMA_(omp __VA_ARGS__)
#define THREAD omp_get_thread_num()
#else
#define OMP(...)
#define THREAD 0
#endif

#define LANES 16
_Static_assert(LANES == 16, "lane_total adds up 16 lanes");
#define BLOCK 4096     /* elements per task in the one-pass loops */
#define PARALLEL 65536 /* fewer elements than this run on one thread */

/* The step's parameters. Mirrored field for field by abi.Hyper: change both together. */
typedef struct {
    double lr, beta1, beta2, eps;
    double decay; /* the decay amount a: lr·λ (AdamP), lr·λ/(1−μ) (SGDP) */
    double delta, wd_ratio;
    double momentum, dampening; /* SGDP */
    int64_t row_limit;          /* longest row stepped in cache (AdamP's row buffer) */
    int32_t maximize, nesterov, threads;
    int32_t caution; /* the cautious masks (docs/algorithm.md) */
} hyper_t;

/* sizeof(hyper_t), then the offset of each field in declaration order, into out (at most
 * capacity entries); returns how many were written. Lets the Python side check its mirror. */
int64_t adampx_hyper_layout(int64_t *out, int64_t capacity) {
    const int64_t layout[] = {
        (int64_t)sizeof(hyper_t),
        (int64_t)offsetof(hyper_t, lr),        (int64_t)offsetof(hyper_t, beta1),
        (int64_t)offsetof(hyper_t, beta2),     (int64_t)offsetof(hyper_t, eps),
        (int64_t)offsetof(hyper_t, decay),     (int64_t)offsetof(hyper_t, delta),
        (int64_t)offsetof(hyper_t, wd_ratio),  (int64_t)offsetof(hyper_t, momentum),
        (int64_t)offsetof(hyper_t, dampening), (int64_t)offsetof(hyper_t, row_limit),
        (int64_t)offsetof(hyper_t, maximize),  (int64_t)offsetof(hyper_t, nesterov),
        (int64_t)offsetof(hyper_t, threads),   (int64_t)offsetof(hyper_t, caution),
    };
    int64_t n = (int64_t)(sizeof layout / sizeof layout[0]);
    if (n > capacity) n = capacity > 0 ? capacity : 0;
    for (int64_t i = 0; i < n; i++) out[i] = layout[i];
    return n;
}

enum { NOT_PROJECTED, CHANNEL, LAYER };

/* The decay factor keep = 1 − a·r (r = wd_ratio where projected, else 1), in double; the
 * callers cast it to the element type. */
static inline double decay_keep(const hyper_t *h, int projected) {
    const double ratio = projected ? h->wd_ratio : 1.0;
    return 1.0 - h->decay * ratio;
}

/* Row sums are kept in LANES independent double accumulators per quantity (a plain loop
 * over a lane array vectorises well; an "omp simd reduction" was much slower here), then
 * added up. FOR_LANES runs its body for the elements j0 + l < n of a row: whole groups of
 * LANES with a constant trip count (which vectorises; a variable one ran far slower), then
 * the rest. It declares j0 in the enclosing block. */
#define FOR_LANES(n, ...)                                                                      \
    int64_t j0 = 0;                                                                            \
    for (; j0 + LANES <= (n); j0 += LANES) {                                                   \
        OMP(simd)                                                                              \
        for (int64_t l = 0; l < LANES; l++) { __VA_ARGS__ }                                    \
    }                                                                                          \
    for (int64_t l = 0; j0 + l < (n); l++) { __VA_ARGS__ }

static inline double lane_total(const double *acc) {
    /* pairwise: four dependent additions, not fifteen (a fixed cost per row, which shows on
     * short rows such as convolutions' with few columns) */
    double half[LANES / 2], quarter[LANES / 4];
    for (int l = 0; l < LANES / 2; l++) half[l] = acc[l] + acc[l + LANES / 2];
    for (int l = 0; l < LANES / 4; l++) quarter[l] = half[l] + half[l + LANES / 4];
    return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

/* The test of one tensor from its row sums (p·p, g·g, p·g per row), and for the step's
 * decisions `out` = channel, layer, max |cos| of the rows, |cos| of the layer. */
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

/* the dtype-generic body, once per element type */
#define T float
#define SUFFIX f32
#define SQRT sqrtf
#include "projected_step_body.h"
#undef T
#undef SUFFIX
#undef SQRT

#define T double
#define SUFFIX f64
#define SQRT sqrt
#include "projected_step_body.h"
#undef T
#undef SUFFIX
#undef SQRT
