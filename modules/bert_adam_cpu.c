/* BertAdam's fp32 update in one pass over memory, for CPU (built and checked by modules/optimization_cpu.py).
 *
 * Each statement is one operation of torch's eager kernels in the original per-tensor step, rounded the way they
 * round it: every operator is one IEEE single-precision operation, fmaf stands where torch's kernels fuse a multiply
 * and an add (add with alpha, addcmul), and the square root is the function torch's own sqrt kernel calls, passed in
 * by the caller (it need not be the correctly rounded one). Built with -ffp-contract=off so that the compiler fuses
 * nothing else. The Python side uses it only after it reproduced torch's update bit for bit on probe values.
 */
#include <math.h>
#include <stdint.h>

typedef void (*sqrt_fn)(int64_t n, const float *in, float *out, int64_t mode);

struct bert_adam_hyper {
    float b1, one_minus_b1, b2, one_minus_b2, e, weight_decay, neg_lr;
    int32_t decay;
};

/* Elements per inner pass: the five rows a pass touches (80 KiB) stay in the core's cache between its three loops. */
enum { CHUNK = 4096 };

/* The correctly rounded square root, for torch builds whose sqrt kernel is the hardware's. */
void exact_sqrt(int64_t n, const float *in, float *out, int64_t mode) {
    (void)mode;
    for (int64_t i = 0; i < n; i++) out[i] = sqrtf(in[i]);
}

/* p, g, m, v: n elements each. coef: the per-tensor clip factor (1 leaves g untouched, as multiplying by 1 would). */
void bert_adam_update(int64_t n, float *restrict p, float *restrict g, float *restrict m, float *restrict v,
                      float coef, const struct bert_adam_hyper *h, sqrt_fn vsqrt, int64_t sqrt_mode) {
    const float b1 = h->b1, a1 = h->one_minus_b1, b2 = h->b2, a2 = h->one_minus_b2, e = h->e, wd = h->weight_decay;
    const float neg_lr = h->neg_lr;
    const int clip = coef != 1.0f, decay = h->decay != 0;
    float root[CHUNK];
    for (int64_t start = 0; start < n; start += CHUNK) {
        const int64_t len = n - start < CHUNK ? n - start : CHUNK;
        float *restrict ps = p + start, *restrict gs = g + start, *restrict ms = m + start, *restrict vs = v + start;
        for (int64_t i = 0; i < len; i++) {
            float gi = gs[i];
            if (clip) {
                gi = gi * coef; /* grad.mul_(clip_coef) */
                gs[i] = gi;
            }
            ms[i] = fmaf(gi, a1, ms[i] * b1);      /* m.mul_(b1).add_(g, alpha=1 - b1) */
            vs[i] = fmaf(a2 * gi, gi, vs[i] * b2); /* v.mul_(b2).addcmul_(g, g, value=1 - b2) */
        }
        vsqrt(len, vs, root, sqrt_mode); /* v.sqrt() */
        for (int64_t i = 0; i < len; i++) {
            float u = ms[i] / (root[i] + e); /* m / (sqrt(v) + e) */
            if (decay) u = u + ps[i] * wd; /* update += weight_decay * p */
            ps[i] = ps[i] + u * neg_lr; /* p.add_(-(lr * update)) */
        }
    }
}
