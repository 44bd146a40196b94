/* The dtype-generic half of the fused kernel: the row sums and AdamP's and SGDP's steps,
 * written once for both element types. See projected_step.c for what they compute.
 *
 * Not a standalone header: projected_step.c includes it once per element type, after
 * defining hyper_t, the helpers that do not depend on the element type (decide, decay_keep,
 * lane_total, row_scale, whole_scale), the macros OMP, FOR_LANES, THREAD, LANES, BLOCK and
 * PARALLEL, and these three:
 *   T       the element type (float, double);
 *   SUFFIX  the suffix of every name defined here (f32, f64), pasted on by NAME(x);
 *   SQRT    the square root in the element type (C's sqrt of a float computes in double).
 * Hence no include guard. */
#if !defined(T) || !defined(SUFFIX) || !defined(SQRT)
#error "projected_step_body.h: define T, SUFFIX and SQRT before including it"
#endif

#define CAT_(x, suffix) x##_##suffix
#define CAT(x, suffix) CAT_(x, suffix)
#define NAME(x) CAT(x, SUFFIX) /* NAME(adamp) is adamp_f32 when SUFFIX is f32 */

/* p·p, g·g, p·g of every row, into sums[3·i .. 3·i + 2] */
static void NAME(row_sums)(const T *p, const T *g, int64_t R, int64_t C, double *sums,
                           int threads) {
    (void)threads; /* unused without OpenMP */
    OMP(parallel for num_threads(threads) schedule(static) if(R * C > PARALLEL))
    for (int64_t i = 0; i < R; i++) {
        double acc[3][LANES] = {{0}};
        const T *pi = p + i * C, *gi = g + i * C;
        FOR_LANES(C,
            double pj = pi[j0 + l], gj = gi[j0 + l];
            acc[0][l] += pj * pj; acc[1][l] += gj * gj; acc[2][l] += pj * gj;)
        for (int q = 0; q < 3; q++) sums[3 * i + q] = lane_total(acc[q]);
    }
}

/* ------------------------------------------------------------------------------- AdamP */

/* the direction d = n / (sqrt(v) / sqrt(bc2) + eps), n = m or, with nesterov,
 * β1·m + (1−β1)·g (m, v already updated); 1/bc1 is folded into the step size */
static inline T NAME(adam_direction)(T m, T v, T g, T b1, T inv_bc2_sqrt, T eps,
                                     int nesterov) {
    T n = nesterov ? b1 * m + (1 - b1) * g : m;
    return n / (SQRT(v) * inv_bc2_sqrt + eps);
}

/* the constants of one tensor's step, in the element type */
typedef struct {
    T b1, b2, eps, sign, inv_bc2_sqrt, step;
    int nesterov;
} NAME(adam_t);

/* the moments of n elements updated; d (if not NULL) ← the direction; returns Σ p·d */
static inline double NAME(adam_moments)(const NAME(adam_t) *a, int64_t n, const T *p,
                                        const T *g, T *m, T *v, T *d) {
    double acc[LANES] = {0};
    FOR_LANES(n,
        const int64_t j = j0 + l;
        T gj = a->sign * g[j];
        T mj = a->b1 * m[j] + (1 - a->b1) * gj, vj = a->b2 * v[j] + (1 - a->b2) * gj * gj;
        m[j] = mj; v[j] = vj;
        T dj = NAME(adam_direction)(mj, vj, gj, a->b1, a->inv_bc2_sqrt, a->eps, a->nesterov);
        if (d) d[j] = dj;
        acc[l] += (double)p[j] * dj;)
    return lane_total(acc);
}

/* AdamW's step of N elements: the moments, then p ← p·keep − step·d */
static void NAME(adamw)(const NAME(adam_t) *a, int64_t N, T keep, T *p, const T *g, T *m,
                        T *v, int threads) {
    (void)threads; /* unused without OpenMP */
    OMP(parallel for num_threads(threads) schedule(static) if(N > PARALLEL))
    for (int64_t block = 0; block < (N + BLOCK - 1) / BLOCK; block++) {
        const int64_t end = block * BLOCK + BLOCK < N ? block * BLOCK + BLOCK : N;
        OMP(simd)
        for (int64_t j = block * BLOCK; j < end; j++) {
            T gj = a->sign * g[j];
            T mj = a->b1 * m[j] + (1 - a->b1) * gj, vj = a->b2 * v[j] + (1 - a->b2) * gj * gj;
            m[j] = mj; v[j] = vj;
            p[j] = p[j] * keep - a->step * NAME(adam_direction)(mj, vj, gj, a->b1,
                                                                a->inv_bc2_sqrt, a->eps,
                                                                a->nesterov);
        }
    }
}

/* SGDP's constants (below), and the cautious step both optimizers share (at the end) */
typedef struct NAME(sgd_s) NAME(sgd_t);
static void NAME(cautious)(const NAME(adam_t) *a, const NAME(sgd_t) *s, const hyper_t *h,
                           int64_t R, int64_t C, int view, T *p, const T *g, T *m, T *v,
                           double *sums);

/* AdamP's step of count tensors (ps[k] of rows[k] × cols[k], its gradient, moments and
 * step counter, which is incremented); the test applies where tested[k]. sums: 4 doubles
 * per row of the longest tensor; row_buffers: row_limit elements per thread; decisions:
 * 4 doubles per tensor, written for the tested ones (see decide). */
void NAME(adamp)(int64_t count, T **ps, T **gs, T **ms, T **vs, float **steps,
                 const int64_t *rows, const int64_t *cols, const int32_t *tested,
                 const hyper_t *h, double *sums, T *row_buffers, double *decisions) {
    const int threads = h->threads;
    for (int64_t k = 0; k < count; k++) {
        T *p = ps[k]; const T *g = gs[k]; T *m = ms[k]; T *v = vs[k];
        const int64_t R = rows[k], C = cols[k], N = R * C;
        const double t = (double)(*steps[k] += 1.0f);
        const NAME(adam_t) a = {
            (T)h->beta1, (T)h->beta2, (T)h->eps, h->maximize ? (T)-1 : (T)1,
            (T)(1.0 / sqrt(1.0 - pow(h->beta2, t))), (T)(h->lr / (1.0 - pow(h->beta1, t))),
            h->nesterov};
        int view = NOT_PROJECTED;
        if (tested[k]) {
            NAME(row_sums)(p, g, R, C, sums, threads);
            view = decide(sums, R, C, h, decisions + 4 * k);
        }
        if (h->caution) {
            NAME(cautious)(&a, 0, h, R, C, view, p, g, m, v, sums);
            continue;
        }
        if (view == NOT_PROJECTED) {
            NAME(adamw)(&a, N, (T)decay_keep(h, 0), p, g, m, v, threads);
            continue;
        }
        const T keep = (T)decay_keep(h, 1);
        if (view == CHANNEL && C <= h->row_limit) { /* row by row, in cache */
            OMP(parallel for num_threads(threads) schedule(static) if(N > PARALLEL))
            for (int64_t i = 0; i < R; i++) {
                T *pi = p + i * C, *d = row_buffers + (int64_t)THREAD * h->row_limit;
                double pd = NAME(adam_moments)(&a, C, pi, g + i * C, m + i * C, v + i * C, d);
                const T c = (T)(pd / row_scale(sums[3 * i], h->eps));
                OMP(simd)
                for (int64_t j = 0; j < C; j++) pi[j] = pi[j] * keep - a.step * (d[j] - c * pi[j]);
            }
            continue;
        }
        /* as a whole, or long rows: the moments and the dots, then p with d recomputed */
        double *pd = sums + 3 * R; /* the rows' p·d */
        OMP(parallel for num_threads(threads) schedule(static) if(N > PARALLEL))
        for (int64_t i = 0; i < R; i++)
            pd[i] = NAME(adam_moments)(&a, C, p + i * C, g + i * C, m + i * C, v + i * C, 0);
        double layer_pd = 0;
        for (int64_t i = 0; i < R; i++) layer_pd += pd[i];
        const double layer_c = view == LAYER ? layer_pd / whole_scale(sums, R, h->eps) : 0.0;
        OMP(parallel for num_threads(threads) schedule(static) if(N > PARALLEL))
        for (int64_t i = 0; i < R; i++) {
            T *pi = p + i * C; const T *gi = g + i * C, *mi = m + i * C, *vi = v + i * C;
            const T c = (T)(view == LAYER ? layer_c : pd[i] / row_scale(sums[3 * i], h->eps));
            OMP(simd)
            for (int64_t j = 0; j < C; j++) {
                T dj = NAME(adam_direction)(mi[j], vi[j], a.sign * gi[j], a.b1,
                                            a.inv_bc2_sqrt, a.eps, a.nesterov);
                pi[j] = pi[j] * keep - a.step * (dj - c * pi[j]);
            }
        }
    }
}

/* -------------------------------------------------------------------------------- SGDP */

/* the constants of the step, in the element type (damp = 1 − dampening) */
struct NAME(sgd_s) {
    T mu, damp, sign, lr;
    int nesterov;
};

/* SGD's direction d = b, or with nesterov g + μ·b (b already updated, g signed) */
static inline T NAME(sgd_direction)(const NAME(sgd_t) *s, T g, T b) {
    return s->nesterov ? g + s->mu * b : b;
}

/* the momentum of n elements updated; returns Σ p·d */
static inline double NAME(sgd_momentum)(const NAME(sgd_t) *s, int64_t n, const T *p,
                                        const T *g, T *b) {
    double acc[LANES] = {0};
    FOR_LANES(n,
        const int64_t j = j0 + l;
        T gj = s->sign * g[j], bj = s->mu * b[j] + s->damp * gj;
        b[j] = bj;
        acc[l] += (double)p[j] * NAME(sgd_direction)(s, gj, bj);)
    return lane_total(acc);
}

/* p ← p·keep − lr·(d − c·p) for n elements whose momentum is updated */
static inline void NAME(sgd_apply)(const NAME(sgd_t) *s, int64_t n, T keep, T c, T *p,
                                   const T *g, const T *b) {
    OMP(simd)
    for (int64_t j = 0; j < n; j++)
        p[j] = p[j] * keep - s->lr * (NAME(sgd_direction)(s, s->sign * g[j], b[j]) - c * p[j]);
}

/* SGD's step of N elements: the momentum, then p ← p·keep − lr·d */
static void NAME(sgd)(const NAME(sgd_t) *s, int64_t N, T keep, T *p, const T *g, T *b,
                      int threads) {
    (void)threads; /* unused without OpenMP */
    OMP(parallel for num_threads(threads) schedule(static) if(N > PARALLEL))
    for (int64_t block = 0; block < (N + BLOCK - 1) / BLOCK; block++) {
        const int64_t end = block * BLOCK + BLOCK < N ? block * BLOCK + BLOCK : N;
        OMP(simd)
        for (int64_t j = block * BLOCK; j < end; j++) {
            T gj = s->sign * g[j], bj = s->mu * b[j] + s->damp * gj;
            b[j] = bj;
            p[j] = p[j] * keep - s->lr * NAME(sgd_direction)(s, gj, bj);
        }
    }
}

/* SGDP's step of count tensors (ps[k] of rows[k] × cols[k], its gradient and momentum
 * buffer); the test applies where tested[k]. sums: 4 doubles per row of the longest
 * tensor; decisions: 4 doubles per tensor, written for the tested ones (see decide). */
void NAME(sgdp)(int64_t count, T **ps, T **gs, T **bs, const int64_t *rows,
                const int64_t *cols, const int32_t *tested, const hyper_t *h,
                double *sums, double *decisions) {
    const NAME(sgd_t) s = {(T)h->momentum, (T)(1.0 - h->dampening),
                           h->maximize ? (T)-1 : (T)1, (T)h->lr, h->nesterov};
    const int threads = h->threads;
    for (int64_t k = 0; k < count; k++) {
        T *p = ps[k]; const T *g = gs[k]; T *b = bs[k];
        const int64_t R = rows[k], C = cols[k], N = R * C;
        int view = NOT_PROJECTED;
        if (tested[k]) {
            NAME(row_sums)(p, g, R, C, sums, threads);
            view = decide(sums, R, C, h, decisions + 4 * k);
        }
        if (h->caution) {
            NAME(cautious)(0, &s, h, R, C, view, p, g, b, 0, sums);
            continue;
        }
        if (view == NOT_PROJECTED) {
            NAME(sgd)(&s, N, (T)decay_keep(h, 0), p, g, b, threads);
            continue;
        }
        const T keep = (T)decay_keep(h, 1);
        if (view == CHANNEL) { /* row by row, in cache */
            OMP(parallel for num_threads(threads) schedule(static) if(N > PARALLEL))
            for (int64_t i = 0; i < R; i++) {
                T *pi = p + i * C; const T *gi = g + i * C; T *bi = b + i * C;
                double pd = NAME(sgd_momentum)(&s, C, pi, gi, bi);
                T c = (T)(pd / row_scale(sums[3 * i], h->eps));
                NAME(sgd_apply)(&s, C, keep, c, pi, gi, bi);
            }
            continue;
        }
        double *pd = sums + 3 * R, layer_pd = 0; /* as a whole: all dots first */
        OMP(parallel for num_threads(threads) schedule(static) if(N > PARALLEL))
        for (int64_t i = 0; i < R; i++)
            pd[i] = NAME(sgd_momentum)(&s, C, p + i * C, g + i * C, b + i * C);
        for (int64_t i = 0; i < R; i++) layer_pd += pd[i];
        const T c = (T)(layer_pd / whole_scale(sums, R, h->eps));
        OMP(parallel for num_threads(threads) schedule(static) if(N > PARALLEL))
        for (int64_t i = 0; i < R; i++)
            NAME(sgd_apply)(&s, C, keep, c, p + i * C, g + i * C, b + i * C);
    }
}

/* ----------------------------------------------------------------- the cautious step */

/* Pass 2 of a row of n elements (see cautious): the count of elements where u·g⊥ > 0 into
 * row_kept and Σ p·u over them into row_dot; DIR is element j's direction, gj the signed g.
 * Branch-free in LANES accumulators, so that it vectorises. */
#define CAUTIOUS_COUNT(DIR)                                                                    \
    do {                                                                                       \
        double count[LANES] = {0}, acc[LANES] = {0};                                           \
        FOR_LANES(n,                                                                           \
            const int64_t j = j0 + l;                                                          \
            const T gj = sign * gi[j], dj = (DIR);                                             \
            const T uj = projected ? dj - c_u * pi[j] : dj;                                    \
            const T kj = uj * (projected ? gj - c_g * pi[j] : gj) > 0 ? (T)1 : (T)0;           \
            count[l] += kj; acc[l] += (double)pi[j] * (uj * kj);)                              \
        row_kept = lane_total(count);                                                          \
        row_dot = lane_total(acc);                                                             \
    } while (0)

/* Pass 3 of a row: p ← p·keep − step·(w − c_w·p), w = u·([u·g⊥ > 0]·scale). The mask
 * multiplies, as in the eager math: a NaN or inf in u stays NaN, never a silent 0. Not
 * projected, u is d and g⊥ is g, with no term in p (an inf weight stays inf). */
#define CAUTIOUS_STEP(DIR)                                                                     \
    do {                                                                                       \
        OMP(simd)                                                                              \
        for (int64_t j = 0; j < n; j++) {                                                      \
            const T gj = sign * gi[j], dj = (DIR);                                             \
            const T uj = projected ? dj - c_u * pi[j] : dj;                                    \
            const T kj = uj * (projected ? gj - c_g * pi[j] : gj) > 0 ? (T)1 : (T)0;           \
            const T wj = uj * (scale * kj);                                                    \
            pi[j] = pi[j] * keep - step * (projected ? wj - c_w * pi[j] : wj);                 \
        }                                                                                      \
    } while (0)

/* row i's projection coefficient of a direction whose dot with p_i is dot: channel view
 * dot / (‖p_i‖ + eps)² (dot read only then), else the tensor's, layer (0 where not
 * projected) */
#define COEFFICIENT(dot, layer)                                                                \
    (view == CHANNEL ? (dot) / row_scale(sums[3 * i], eps) : (layer))

#define ADAM_DIR                                                                               \
    NAME(adam_direction)(mi[j], vi[j], gj, a->b1, a->inv_bc2_sqrt, a->eps, a->nesterov)
#define SGD_DIR NAME(sgd_direction)(s, gj, mi[j])

/* One tensor's cautious step (caution=True, docs/algorithm.md), AdamP's (a) or SGDP's (s, m
 * its buffer, v unused), in three passes, the direction d recomputed from the updated state
 * in each:
 *   1. the moments (or the buffer) and each row's p·d;
 *   2. with u = d − c_u·p and g⊥ = g − c_g·p (c_u, c_g the projection's coefficients of d and
 *      g in the view that passed), the count of elements where u·g⊥ > 0 and each row's p·u
 *      over them;
 *   3. w = u·[u·g⊥ > 0] / max(count / N, 1e-3) and p ← p·keep − step·(w − c_w·p), c_w the
 *      coefficient of w.
 * Projected, the passes go over the R rows of C elements. Not projected (the standard mask:
 * every coefficient zero), over blocks of at most BLOCK elements, whatever R is, so that
 * every thread takes part; nothing per row is kept then. sums: the rows' p·p, g·g, p·g (3
 * per row), then 2 doubles per row of room, read and written only where projected. */
static void NAME(cautious)(const NAME(adam_t) *a, const NAME(sgd_t) *s, const hyper_t *h,
                           int64_t R, int64_t C, int view, T *p, const T *g, T *m, T *v,
                           double *sums) {
    const int threads = h->threads;
    (void)threads; /* unused without OpenMP */
    const double eps = h->eps;
    const int64_t N = R * C;
    const int projected = view != NOT_PROJECTED;
    const T keep = (T)decay_keep(h, projected);
    const T sign = a ? a->sign : s->sign, step = a ? a->step : s->lr;
    if (!projected) { /* blocks: a unit of work only */
        C = N < BLOCK ? N : BLOCK;
        R = C ? (N + C - 1) / C : 0;
    }
    /* per row, where projected: p·d then c_u; p·u over the kept elements */
    double *cu = projected ? sums + 3 * R : 0, *cw = projected ? sums + 4 * R : 0;
    OMP(parallel for num_threads(threads) schedule(static) if(N > PARALLEL))
    for (int64_t i = 0; i < R; i++) {
        const int64_t n = N - i * C < C ? N - i * C : C;
        double pd = a ? NAME(adam_moments)(a, n, p + i * C, g + i * C, m + i * C, v + i * C, 0)
                      : NAME(sgd_momentum)(s, n, p + i * C, g + i * C, m + i * C);
        if (projected) cu[i] = pd;
    }
    double whole = 1, layer_u = 0, layer_g = 0;
    if (view == LAYER) {
        double pd = 0, pg = 0;
        for (int64_t i = 0; i < R; i++) { pd += cu[i]; pg += sums[3 * i + 2]; }
        whole = whole_scale(sums, R, eps);
        layer_u = pd / whole;
        layer_g = (double)sign * pg / whole;
    }
    if (projected)
        for (int64_t i = 0; i < R; i++) cu[i] = COEFFICIENT(cu[i], layer_u);
    double kept = 0;
    OMP(parallel for num_threads(threads) schedule(static) if(N > PARALLEL) reduction(+ : kept))
    for (int64_t i = 0; i < R; i++) {
        const int64_t n = N - i * C < C ? N - i * C : C;
        const T *pi = p + i * C, *gi = g + i * C, *mi = m + i * C, *vi = v ? v + i * C : 0;
        const T c_u = (T)(projected ? cu[i] : 0.0);
        const T c_g = (T)COEFFICIENT((double)sign * sums[3 * i + 2], layer_g);
        double row_kept, row_dot;
        (void)vi;
        if (a) CAUTIOUS_COUNT(ADAM_DIR);
        else CAUTIOUS_COUNT(SGD_DIR);
        if (projected) cw[i] = row_dot;
        kept += row_kept;
    }
    const T fraction = (T)kept / (T)N;
    const T scale = (T)1 / (fraction > (T)1e-3 ? fraction : (T)1e-3);
    double layer_w = 0;
    if (view == LAYER) {
        for (int64_t i = 0; i < R; i++) layer_w += cw[i];
        layer_w = layer_w * (double)scale / whole;
    }
    OMP(parallel for num_threads(threads) schedule(static) if(N > PARALLEL))
    for (int64_t i = 0; i < R; i++) {
        const int64_t n = N - i * C < C ? N - i * C : C;
        T *pi = p + i * C;
        const T *gi = g + i * C, *mi = m + i * C, *vi = v ? v + i * C : 0;
        const T c_u = (T)(projected ? cu[i] : 0.0);
        const T c_g = (T)COEFFICIENT((double)sign * sums[3 * i + 2], layer_g);
        const T c_w = (T)COEFFICIENT(cw[i] * (double)scale, layer_w);
        (void)vi;
        if (a) CAUTIOUS_STEP(ADAM_DIR);
        else CAUTIOUS_STEP(SGD_DIR);
    }
}

#undef CAUTIOUS_COUNT
#undef COEFFICIENT
#undef CAUTIOUS_STEP
#undef ADAM_DIR
#undef SGD_DIR
#undef NAME
#undef CAT
#undef CAT_
