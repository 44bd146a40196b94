/* adampx fused kernels: one call steps every tensor of a list, on the CPU.
 *
 * AdamP and SGDP of ALGORITHM.md in two passes over memory per tested tensor:
 *   pass 1, row by row: update the moments, and sum p·p, g·g, p·g and p·d per row
 *           (d the update direction, computed on the fly);
 *   test:   channel view, then layer view, from the row sums;
 *   pass 2, row by row: p ← p·(1 − decay·r) − step·(d − c_i·p); AdamP keeps d in a
 *           workspace the size of the tensor (recomputing its sqrt and division cost
 *           more than the memory), SGDP recomputes it from the momentum.
 * Untested tensors (and groups with the projection off) take one pass.
 * Row sums accumulate in double. Built by adampx.fused with the system C compiler. */
#include <math.h>
#include <stdint.h>

#define LANES 16
#define BLOCK 4096 /* elements per task in the one-pass loop of untested tensors */

typedef struct {
    double lr, beta1, beta2, eps, weight_decay, delta, wd_ratio;
    double momentum, dampening; /* SGDP */
    int32_t maximize, nesterov, threads;
} hyper_t;

/* Row sums are kept in LANES independent double accumulators per quantity (a plain loop
 * over a lane array vectorises well; an "omp simd reduction" was 2x slower here), then
 * added up: the four sums p·p, g·g, p·g, p·d of one row. */
static inline void store_row_sums(double acc[4][LANES], double *out) {
    for (int q = 0; q < 4; q++) {
        double total = 0;
        for (int l = 0; l < LANES; l++) total += acc[q][l];
        out[q] = total;
    }
}

/* per tested tensor, written for adampx.statistics: channel, layer, max |cos| rows, |cos| layer */
static void decide(const double *sums, int64_t rows, int64_t cols, const hyper_t *h,
                   double *coef, double *ratio, double *out) {
    double pp = 0, gg = 0, pg = 0, pd = 0, max_cos = 0;
    for (int64_t i = 0; i < rows; i++) {
        const double *s = sums + 4 * i;
        double c = fabs(s[2]) / (fmax(sqrt(s[0]), h->eps) * fmax(sqrt(s[1]), h->eps));
        if (c > max_cos || isnan(c)) max_cos = c;
        pp += s[0]; gg += s[1]; pg += s[2]; pd += s[3];
    }
    double cos_layer = fabs(pg) / (fmax(sqrt(pp), h->eps) * fmax(sqrt(gg), h->eps));
    int channel = max_cos < h->delta / sqrt((double)cols);
    int layer = !channel && cos_layer < h->delta / sqrt((double)cols * (double)rows);
    double layer_coef = pd / ((sqrt(pp) + h->eps) * (sqrt(pp) + h->eps));
    for (int64_t i = 0; i < rows; i++) {
        const double *s = sums + 4 * i;
        double n = sqrt(s[0]) + h->eps;
        coef[i] = channel ? s[3] / (n * n) : (layer ? layer_coef : 0.0);
    }
    *ratio = (channel || layer) ? h->wd_ratio : 1.0;
    out[0] = channel; out[1] = layer; out[2] = max_cos; out[3] = cos_layer;
}

#define DEFINE_KERNELS(T, SUFFIX)                                                              \
                                                                                               \
/* AdamP: the direction d = n / (sqrt(v) / sqrt(bc2) + eps), n = m or, with nesterov,       \
 * β1·m + (1−β1)·g; 1/bc1 is folded into the step size */                                     \
static inline T adam_direction_##SUFFIX(T n, T v, T inv_bc2_sqrt, T eps) {                   \
    return n / (sqrt(v) * inv_bc2_sqrt + eps);                                                 \
}                                                                                              \
                                                                                               \
void adamp_##SUFFIX(int64_t count, T **ps, T **gs, T **ms, T **vs, float **steps,              \
                    const int64_t *rows, const int64_t *cols, const int32_t *tested,           \
                    const hyper_t *h, double *work, T *direction, double *decisions) {         \
    const T b1 = (T)h->beta1, b2 = (T)h->beta2, eps = (T)h->eps;                              \
    const T sign = h->maximize ? (T)-1 : (T)1;                                                 \
    const int nesterov = h->nesterov;                                                          \
    for (int64_t k = 0; k < count; k++) {                                                      \
        T *p = ps[k]; const T *g = gs[k]; T *m = ms[k]; T *v = vs[k];                          \
        const int64_t R = rows[k], C = cols[k], N = R * C;                                     \
        const double t = (double)(*steps[k] += 1.0f);                                          \
        const T inv_bc2_sqrt = (T)(1.0 / sqrt(1.0 - pow(h->beta2, t)));                       \
        const T step = (T)(h->lr / (1.0 - pow(h->beta1, t)));                                  \
        if (!tested[k]) {                                                                      \
            const T keep = (T)(1.0 - h->lr * h->weight_decay);                                 \
            _Pragma("omp parallel for num_threads(h->threads) schedule(static) if(N > 65536)")\
            for (int64_t block = 0; block < (N + BLOCK - 1) / BLOCK; block++) {                 \
            const int64_t end = block * BLOCK + BLOCK < N ? block * BLOCK + BLOCK : N;          \
            _Pragma("omp simd")                                                               \
            for (int64_t j = block * BLOCK; j < end; j++) {                                    \
                T gj = sign * g[j];                                                            \
                T mj = b1 * m[j] + (1 - b1) * gj, vj = b2 * v[j] + (1 - b2) * gj * gj;         \
                T nj = nesterov ? b1 * mj + (1 - b1) * gj : mj;                             \
                m[j] = mj; v[j] = vj;                                                          \
                p[j] = p[j] * keep - step * adam_direction_##SUFFIX(nj, vj, inv_bc2_sqrt, eps);    \
            }}                                                                                 \
            continue;                                                                          \
        }                                                                                      \
        double *sums = work, *coef = work + 4 * R, ratio;                                      \
        _Pragma("omp parallel for num_threads(h->threads) schedule(static) if(N > 65536)")    \
        for (int64_t i = 0; i < R; i++) {                                                      \
            double acc[4][LANES] = {{0}};                                                      \
            T *pi = p + i * C, *mi = m + i * C, *vi = v + i * C, *di = direction + i * C;      \
            const T *gi = g + i * C;                                                           \
            for (int64_t j0 = 0; j0 < C; j0 += LANES) {                                        \
                const int64_t n = C - j0 < LANES ? C - j0 : LANES;                             \
                _Pragma("omp simd")                                                           \
                for (int64_t l = 0; l < n; l++) {                                              \
                    const int64_t j = j0 + l;                                                  \
                    T gj = sign * gi[j];                                                       \
                    T mj = b1 * mi[j] + (1 - b1) * gj, vj = b2 * vi[j] + (1 - b2) * gj * gj;   \
                    mi[j] = mj; vi[j] = vj;                                                    \
                    T nj = nesterov ? b1 * mj + (1 - b1) * gj : mj;                            \
                    T dj = adam_direction_##SUFFIX(nj, vj, inv_bc2_sqrt, eps);                 \
                    double pj = pi[j];                                                         \
                    di[j] = dj;                                                                \
                    acc[0][l] += pj * pj; acc[1][l] += (double)gj * gj;                        \
                    acc[2][l] += pj * gj; acc[3][l] += pj * dj;                                \
                }                                                                              \
            }                                                                                  \
            store_row_sums(acc, sums + 4 * i);                                                 \
        }                                                                                      \
        decide(sums, R, C, h, coef, &ratio, decisions + 4 * k);                                \
        const T keep = (T)(1.0 - h->lr * h->weight_decay * ratio);                             \
        _Pragma("omp parallel for num_threads(h->threads) schedule(static) if(N > 65536)")    \
        for (int64_t i = 0; i < R; i++) {                                                      \
            T *pi = p + i * C; const T *di = direction + i * C; const T c = (T)coef[i];        \
            _Pragma("omp simd")                                                                \
            for (int64_t j = 0; j < C; j++) pi[j] = pi[j] * keep - step * (di[j] - c * pi[j]); \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
void sgdp_##SUFFIX(int64_t count, T **ps, T **gs, T **bs, const int64_t *rows,                 \
                   const int64_t *cols, const int32_t *tested, const hyper_t *h,               \
                   double *work, double *decisions) {                                          \
    const T mu = (T)h->momentum, damp = (T)(1.0 - h->dampening), lr = (T)h->lr;               \
    const T sign = h->maximize ? (T)-1 : (T)1;                                                 \
    const int nesterov = h->nesterov;                                                          \
    const double decay = h->lr * h->weight_decay / (1.0 - h->momentum);                        \
    for (int64_t k = 0; k < count; k++) {                                                      \
        T *p = ps[k]; const T *g = gs[k]; T *b = bs[k];                                        \
        const int64_t R = rows[k], C = cols[k], N = R * C;                                     \
        if (!tested[k]) {                                                                      \
            const T keep = (T)(1.0 - decay);                                                   \
            _Pragma("omp parallel for num_threads(h->threads) schedule(static) if(N > 65536)")\
            for (int64_t block = 0; block < (N + BLOCK - 1) / BLOCK; block++) {                 \
            const int64_t end = block * BLOCK + BLOCK < N ? block * BLOCK + BLOCK : N;          \
            _Pragma("omp simd")                                                               \
            for (int64_t j = block * BLOCK; j < end; j++) {                                    \
                T gj = sign * g[j], bj = mu * b[j] + damp * gj;                                \
                b[j] = bj;                                                                     \
                p[j] = p[j] * keep - lr * (nesterov ? gj + mu * bj : bj);                      \
            }}                                                                                 \
            continue;                                                                          \
        }                                                                                      \
        double *sums = work, *coef = work + 4 * R, ratio;                                      \
        _Pragma("omp parallel for num_threads(h->threads) schedule(static) if(N > 65536)")    \
        for (int64_t i = 0; i < R; i++) {                                                      \
            double acc[4][LANES] = {{0}};                                                      \
            const T *pi = p + i * C, *gi = g + i * C; T *bi = b + i * C;                       \
            for (int64_t j0 = 0; j0 < C; j0 += LANES) {                                        \
                const int64_t n = C - j0 < LANES ? C - j0 : LANES;                             \
                _Pragma("omp simd")                                                           \
                for (int64_t l = 0; l < n; l++) {                                              \
                    const int64_t j = j0 + l;                                                  \
                    T gj = sign * gi[j], bj = mu * bi[j] + damp * gj;                          \
                    bi[j] = bj;                                                                \
                    double pj = pi[j], dj = nesterov ? gj + mu * bj : bj;                      \
                    acc[0][l] += pj * pj; acc[1][l] += (double)gj * gj;                        \
                    acc[2][l] += pj * gj; acc[3][l] += pj * dj;                                \
                }                                                                              \
            }                                                                                  \
            store_row_sums(acc, sums + 4 * i);                                                 \
        }                                                                                      \
        decide(sums, R, C, h, coef, &ratio, decisions + 4 * k);                                \
        const T keep = (T)(1.0 - decay * ratio);                                               \
        _Pragma("omp parallel for num_threads(h->threads) schedule(static) if(N > 65536)")    \
        for (int64_t i = 0; i < R; i++) {                                                      \
            T *pi = p + i * C; const T *gi = g + i * C, *bi = b + i * C; const T c = (T)coef[i]; \
            if (nesterov) {                                                                    \
                _Pragma("omp simd")                                                            \
                for (int64_t j = 0; j < C; j++) {                                              \
                    T dj = sign * gi[j] + mu * bi[j];                                          \
                    pi[j] = pi[j] * keep - lr * (dj - c * pi[j]);                              \
                }                                                                              \
            } else {                                                                           \
                _Pragma("omp simd")                                                            \
                for (int64_t j = 0; j < C; j++)                                                \
                    pi[j] = pi[j] * keep - lr * (bi[j] - c * pi[j]);                           \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)
