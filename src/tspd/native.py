"""Small compiled C loops for hot work of the step.

- `uniform16`: `tspd.masks.uniform` takes its U(0, 1) values four to a 64-bit word of
  `torch.randint(-2**63, 2**63 - 1, ...)`, whose CPU kernel runs torch's Mersenne Twister one value
  at a time (with a 64-bit modulo each) on one thread: ~1 ms per (64 x 64 x 100) mask on the
  2-core hosts here, 12 such masks a step in the induction reference rows. This produces the very
  same values and leaves the generator in the very same state (torch's MT19937 stream read from
  and written back to `Generator.get_state()`), from a loop that runs the twist and tempering in
  vector registers and converts to fp32 in the same pass: 0.18 vs 0.7-1.2 ms per such mask.
- `kl_rows` (under `train.compile`, `tspd.losses._KLRows`): the reconstruction terms' KL of n
  stacked passes with, in the same pass over each row of logits, its gradient psum softmax - p, so
  one exp per logit where the compiled KL's forward and backward took one each (and the backward
  is a scaling). Its exp is its own (Taylor to r^7 after range reduction, ~1e-8 relative), so it
  agrees with torch's log_softmax to fp32 rounding rather than bit for bit; rows are split over
  torch's OpenMP threads (the library links libgomp.so.1, already loaded by torch). Per (4 x 256 x
  64) x 130 group of logits in isolation: 5.5 ms for values and gradient against 7.1 ms for the
  compiled forward alone (14.2 with its backward). bf16 logits (autocast) are widened row by row
  into an fp32 buffer and take the same arithmetic: 4.0 vs 7.7 ms for the compiled KL per (5 x
  1024) x 1024 logits.
- `ci_min` (under `train.compile`, `tspd.losses._CIAndMinimality`): a site's CI chain forward, the
  lower CI, the minimality sum of (upper + eps)^p and the factor q its gradient needs, in one pass
  with its own log (2 atanh series) and exp; the lower CI exactly, the rest to fp32 rounding
  (q within 2e-6 relative of fp64). 0.60 vs 0.83 ms per (64 x 64 x 100) site in isolation.

The C source is compiled once per machine with the system's C compiler (`cc`, as torch.compile
needs one too) into `$TSPD_CACHE/native/`; at first use in a process each part is checked against
torch's own ops (the draws: several sizes, a twist boundary crossed, the generator states after;
the KL: values and gradients against torch's log_softmax in fp64, three shapes, an underflowing exp;
the CI chain: against fp64 torch across the sigmoid's pieces for a few p, leak and eps).
No compiler, a failed build or check, a big-endian host, or `TSPD_NATIVE=0`: the callers run
torch's ops instead (the same numbers for the draws, slower; for the KL and the CI chain, their
torch.compile'd versions).

Measured and not kept: a masked segment's (x V) * (lerp(r, 1, g) - d) with its backward as one C
loop each (exactly torch's values and gradients): 0.37 vs 1.1 ms per (64 x 64 x 100) segment in
isolation, but 0.4-0.65 ms forward in the step (one thread on cache-cold inputs, where torch's ops
run on two) and the induction shared-64 step slower with it (161.9 vs 148.4 ms, 7 of 8 rounds).
Built with -fopenmp (run on torch's own OpenMP runtime, libgomp.so.1, already loaded) and used under
train.compile only: shared-64 131.6 vs 139.2 ms (7/8) but shared-256 552.9 vs 539.4 (2/8), Q,K,V,O
744.0 vs 708.3 (3/8), vector-64 462.2 vs 446.2 (4/8), tiny GPT-2 288.2 vs 284.8 (3/8): not a win.

Example:
    >>> import torch
    >>> from tspd.native import uniform16
    >>> u = uniform16(10, torch.Generator().manual_seed(0))
    >>> u is None or (u.shape == (10,) and bool(((u > 0) & (u < 1)).all()))
    True
"""

from __future__ import annotations

import ctypes
import functools
import math
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from tspd.cache import building, cache_dir

# torch's CPUGeneratorImplState (c10 CPUGeneratorImpl.cpp): the legacy THGeneratorState (uint64
# seed; int left; int seeded; uint64 next; uint64 state[624]; three doubles and an int for the old
# normal sampler) followed by the float normal sample and its flag; 5056 bytes on x86-64 and arm64.
# The self-check at load catches a layout that differs.
STATE_BYTES = 5056

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif
#define MT_N 624
#define MT_M 397
#define MATRIX_A 0x9908b0dfU
#define UMASK 0x80000000U
#define LMASK 0x7fffffffU

static void twist(uint32_t *mt) {
    int i;
    for (i = 0; i < MT_N - MT_M; i++) {
        uint32_t y = (mt[i] & UMASK) | (mt[i + 1] & LMASK);
        mt[i] = mt[i + MT_M] ^ (y >> 1) ^ ((0U - (y & 1U)) & MATRIX_A);
    }
    for (; i < MT_N - 1; i++) {
        uint32_t y = (mt[i] & UMASK) | (mt[i + 1] & LMASK);
        mt[i] = mt[i + MT_M - MT_N] ^ (y >> 1) ^ ((0U - (y & 1U)) & MATRIX_A);
    }
    uint32_t y = (mt[MT_N - 1] & UMASK) | (mt[0] & LMASK);
    mt[MT_N - 1] = mt[MT_M - 1] ^ (y >> 1) ^ ((0U - (y & 1U)) & MATRIX_A);
}

/* `count` tempered outputs of torch's at::mt19937 (state mt; counters left, next as torch keeps
   them: a twist is due when left reaches 1). */
static void gen32(uint32_t *mt, int64_t *left, int64_t *next, uint32_t *out, int64_t count) {
    while (count > 0) {
        if (*left == 1) { twist(mt); *left = MT_N + 1; *next = 0; }
        int64_t k = *left - 1 < count ? *left - 1 : count;
        const uint32_t *src = mt + *next;
        for (int64_t i = 0; i < k; i++) {
            uint32_t y = src[i];
            y ^= (y >> 11);
            y ^= (y << 7) & 0x9d2c5680U;
            y ^= (y << 15) & 0xefc60000U;
            y ^= (y >> 18);
            out[i] = y;
        }
        *left -= k; *next += k; out += k; count -= k;
    }
}

/* Words w of 32-bit output pairs -> m <= 4 w uniforms. torch's random64 is (first << 32) | second
   and randint(-2^63, 2^63 - 1) maps it to (v % (2^64 - 1)) - 2^63: the top bit flipped, the
   all-ones word (1 in 2^64) sent to -2^63. Each word's int16 lanes, low first (little-endian), k
   -> (2^15 + 1/2 + k) / 2^16, exact in fp32. */
void tspd_words_to_uniform(const uint32_t *buf, int64_t w, float *out, int64_t m) {
    uint32_t word[1024];
    const float c = (32768.0f + 0.5f) / 65536.0f, s = 1.0f / 65536.0f;
    while (w > 0) {
        int64_t b = w < 512 ? w : 512;
        uint32_t all_ones = 0;
        for (int64_t j = 0; j < b; j++) {
            all_ones |= (uint32_t)((buf[2 * j] & buf[2 * j + 1]) == 0xffffffffU);
            word[2 * j] = buf[2 * j + 1];
            word[2 * j + 1] = buf[2 * j] ^ 0x80000000U;
        }
        if (all_ones) {
            for (int64_t j = 0; j < b; j++) {
                if ((buf[2 * j] & buf[2 * j + 1]) == 0xffffffffU) { word[2 * j] = 0; word[2 * j + 1] = 0x80000000U; }
            }
        }
        int16_t k[2048];
        memcpy(k, word, sizeof(uint32_t) * 2 * b);
        int64_t n = m < 4 * b ? m : 4 * b;
        for (int64_t i = 0; i < n; i++) out[i] = c + (float)k[i] * s;
        buf += 2 * b; w -= b; out += n; m -= n;
    }
}

/* n uniforms from the generator state `st` (torch's get_state() bytes, updated in place).
   Returns 0, or -1 for a state this code does not know (nothing drawn). */
int tspd_uniform16(uint8_t *st, float *out, int64_t n) {
    int32_t left32, seeded;
    uint64_t next64, s64[MT_N];
    uint32_t mt[MT_N], buf[1024];
    memcpy(&left32, st + 8, 4); memcpy(&seeded, st + 12, 4); memcpy(&next64, st + 16, 8);
    memcpy(s64, st + 24, 8 * MT_N);
    if (!seeded || left32 < 1 || left32 > MT_N || next64 > MT_N || (uint64_t)left32 + next64 > MT_N + 1) return -1;
    for (int i = 0; i < MT_N; i++) mt[i] = (uint32_t)s64[i];
    int64_t left = left32, next = (int64_t)next64;
    int64_t words = (n + 3) / 4;
    while (words > 0) {
        int64_t w = words < 512 ? words : 512;
        gen32(mt, &left, &next, buf, 2 * w);
        int64_t m = n < 4 * w ? n : 4 * w;
        tspd_words_to_uniform(buf, w, out, m);
        out += m; n -= m; words -= w;
    }
    for (int i = 0; i < MT_N; i++) s64[i] = mt[i];
    left32 = (int32_t)left; next64 = (uint64_t)next;
    memcpy(st + 8, &left32, 4); memcpy(st + 16, &next64, 8); memcpy(st + 24, s64, 8 * MT_N);
    return 0;
}

/* exp(y): y clamped to [-87, 88.7228394] (the largest finite fp32 exp), then 2^n e^r with
   r = y - n ln 2 in [-ln2/2, ln2/2] (ln 2 in two parts) and e^r by its Taylor series to r^7
   (relative error < 1e-8 before rounding); 2^n as two exact power-of-two factors (n reaches 128). */
static inline float exp_any(float y) {
    y = y < -87.0f ? -87.0f : (y > 88.7228394f ? 88.7228394f : y);
    float n = __builtin_rintf(y * 1.44269504088896341f);
    float r = __builtin_fmaf(-n, 0.693145751953125f, y);
    r = __builtin_fmaf(-n, 1.428606765330187045e-06f, r);
    float q = 1.0f / 5040.0f;
    q = __builtin_fmaf(q, r, 1.0f / 720.0f);
    q = __builtin_fmaf(q, r, 1.0f / 120.0f);
    q = __builtin_fmaf(q, r, 1.0f / 24.0f);
    q = __builtin_fmaf(q, r, 1.0f / 6.0f);
    q = __builtin_fmaf(q, r, 0.5f);
    q = __builtin_fmaf(q, r, 1.0f);
    q = __builtin_fmaf(q, r, 1.0f);
    int32_t ni = (int32_t)n, n1 = ni >> 1, n2 = ni - n1;
    int32_t b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, 4);
    memcpy(&s2, &b2, 4);
    return (q * s1) * s2;
}

/* log(x) for normal x > 0: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s) with
   s = (m - 1) / (m + 1), |s| <= 0.1716, by its series to s^9 (next term < 2e-9 relative). */
static inline float log_normal(float x) {
    int32_t bits;
    memcpy(&bits, &x, 4);
    int32_t e = ((bits >> 23) & 0xff) - 127;
    int32_t mb = (bits & 0x007fffff) | 0x3f800000;
    float m;
    memcpy(&m, &mb, 4);
    int big = m > 1.41421356237309505f;
    m = big ? 0.5f * m : m;
    float ef = (float)(e + big);
    float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    float t = 1.0f / 9.0f;
    t = __builtin_fmaf(t, s2, 1.0f / 7.0f);
    t = __builtin_fmaf(t, s2, 1.0f / 5.0f);
    t = __builtin_fmaf(t, s2, 1.0f / 3.0f);
    t = __builtin_fmaf(t, s2, 1.0f);
    float lm = 2.0f * s * t;
    return __builtin_fmaf(ef, 0.693145751953125f, __builtin_fmaf(ef, 1.428606765330187045e-06f, lm));
}

/* One CI logit z: writes lower = clamp(z, 0, 1) and q = p base^p / base, returns base^p, where
   base = lower + leak max(z - 1, 0) + eps (NaN and inf as powf gives them; the caller keeps
   p log eps > -87, so no small base^p is held at exp_any's floor). */
static inline float ci_one(float zi, float leak, float eps, float p, float *lower, float *q) {
    float lw = zi < 0.0f ? 0.0f : (zi > 1.0f ? 1.0f : zi);
    float above = zi - 1.0f > 0.0f ? zi - 1.0f : 0.0f;
    float base = (lw + above * leak) + eps;
    float y = p * log_normal(base);
    float pw = exp_any(y);
    pw = y > 88.7228394f ? INFINITY : pw;                        /* overflows, as powf would */
    pw = base == INFINITY ? (p > 0.0f ? INFINITY : 1.0f) : pw;   /* inf^p */
    pw = base != base ? base : pw;                               /* NaN stays NaN */
    *lower = lw;
    *q = p * pw / base;
    return pw;
}

/* One site's CI chain forward (tspd.losses._CIAndMinimality): lower = clamp(z, 0, 1); base = lower
   + leak max(z - 1, 0) + eps; powered = base^p = exp(p log base); q = p powered / base; and the sum
   of powered (per thread in blocks of 1024 summed in fp32 lanes, then in fp64, threads in order). */
void tspd_ci_min(const float *z, float *lower, float *q, double *total, int64_t n, float leak, float eps, float p,
                 int nt) {
    double part[64];
    nt = nt < 1 ? 1 : (nt > 64 ? 64 : nt);
    memset(part, 0, sizeof(part));
    #pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), used = omp_get_num_threads();
        int64_t lo = n * tid / used, hi = n * (tid + 1) / used;
        double acc = 0.0;
        for (int64_t b = lo; b < hi; b += 1024) {
            int64_t end = b + 1024 < hi ? b + 1024 : hi;
            float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int64_t i = b;
            for (; i + 8 <= end; i += 8)
                for (int l = 0; l < 8; l++) lanes[l] += ci_one(z[i + l], leak, eps, p, lower + i + l, q + i + l);
            for (; i < end; i++) lanes[0] += ci_one(z[i], leak, eps, p, lower + i, q + i);
            for (int l = 0; l < 8; l++) acc += lanes[l];
        }
        part[tid] = acc;
    }
    double t = 0.0;
    for (int j = 0; j < nt; j++) t += part[j];
    *total = t;
}

/* The KL of the target distribution p (rows x V, row sums psum) to softmax(x) for n passes stacked
   in x ((n rows) x V), as sum_v p log_softmax(x) per pass (totals[k], summed in double), and the
   gradient of -sum_v p log_softmax(x) with respect to x, psum softmax(x) - p, into g (fp32, x's
   shape). One exp per value: e = exp(x - max) is kept in g, then scaled in place. Rows are split
   over the OpenMP threads in fixed blocks, each thread's per-pass partial totals added in thread
   order. For fp32 x (tspd_kl_rows) and bf16 x (tspd_kl_rows_bf16: each row widened exactly to fp32
   first, then the same arithmetic, as on x.float()). */
static double kl_row(const float *restrict xr, const float *restrict pr, float psr, float *restrict gr, int64_t V) {
    /* eight running lanes for the max and the sums (vectorised without reassociating a single
       sum), lanes combined in a fixed order */
    float mx[8], sm[8], pxs[8];
    for (int l = 0; l < 8; l++) { mx[l] = -INFINITY; sm[l] = 0.0f; pxs[l] = 0.0f; }
    int64_t v8 = V - V % 8, v;
    for (v = 0; v < v8; v += 8)
        for (int l = 0; l < 8; l++) mx[l] = xr[v + l] > mx[l] ? xr[v + l] : mx[l];
    float m = mx[0];
    for (int l = 1; l < 8; l++) m = mx[l] > m ? mx[l] : m;
    for (; v < V; v++) m = xr[v] > m ? xr[v] : m;
    for (v = 0; v < v8; v += 8)
        for (int l = 0; l < 8; l++) {
            float d = xr[v + l] - m, e = exp_any(d);
            gr[v + l] = e;
            sm[l] += e;
            pxs[l] = __builtin_fmaf(pr[v + l], d, pxs[l]);
        }
    float sum = 0.0f, px = 0.0f;
    for (int l = 0; l < 8; l++) { sum += sm[l]; px += pxs[l]; }
    for (; v < V; v++) {
        float d = xr[v] - m, e = exp_any(d);
        gr[v] = e;
        sum += e;
        px = __builtin_fmaf(pr[v], d, px);
    }
    float ls = logf(sum), c = psr / sum;
    for (v = 0; v < V; v++) gr[v] = __builtin_fmaf(gr[v], c, -pr[v]);
    return (double)px - (double)ls * (double)psr;
}

/* bf16 = x (fp32 in, nt threads): 1 on success, 0 when a thread's row buffer could not be had. */
static int kl_rows_any(const float *x32, const uint16_t *x16, const float *p, const float *psum, float *g,
                       double *totals, int64_t n, int64_t rows, int64_t V, int nt) {
    double part[64 * 64];
    int failed = 0;
    nt = nt < 1 ? 1 : (nt > 64 ? 64 : nt);
    int64_t all = n * rows;
    memset(part, 0, sizeof(part));
    #pragma omp parallel num_threads(nt) reduction(|:failed)
    {
        int tid = omp_get_thread_num(), used = omp_get_num_threads();
        int64_t lo = all * tid / used, hi = all * (tid + 1) / used;
        float *buf = x16 != NULL && hi > lo ? (float *)malloc(sizeof(float) * (size_t)V) : NULL;
        if (x16 != NULL && hi > lo && buf == NULL) failed = 1;
        else
            for (int64_t i = lo; i < hi; i++) {
                int64_t k = i / rows, r = i % rows;
                const float *xr = x32 + i * V;
                if (x16 != NULL) {
                    const uint16_t *restrict src = x16 + i * V;
                    uint32_t *restrict dst = (uint32_t *)buf;
                    for (int64_t v = 0; v < V; v++) dst[v] = (uint32_t)src[v] << 16;
                    xr = buf;
                }
                double t = kl_row(xr, p + r * V, psum[r], g + i * V, V);
                if (k < 64) part[tid * 64 + k] += t;
            }
        free(buf);
    }
    for (int64_t k = 0; k < n && k < 64; k++) {
        double t = 0.0;
        for (int j = 0; j < nt; j++) t += part[j * 64 + k];
        totals[k] = t;
    }
    return !failed;
}

void tspd_kl_rows(const float *x, const float *p, const float *psum, float *g, double *totals,
                  int64_t n, int64_t rows, int64_t V, int nt) {
    kl_rows_any(x, NULL, p, psum, g, totals, n, rows, V, nt);
}

int tspd_kl_rows_bf16(const uint16_t *x, const float *p, const float *psum, float *g, double *totals,
                      int64_t n, int64_t rows, int64_t V, int nt) {
    return kl_rows_any(NULL, x, p, psum, g, totals, n, rows, V, nt);
}
"""

# -fopenmp: tspd_kl_rows runs on torch's OpenMP threads (the library links libgomp.so.1, the runtime
# torch has loaded already, as torch.compile's CPU kernels do). -ffp-contract=off: no fused
# multiply-adds but the ones written (the random stream is exact integer work either way).
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-strict-aliasing", "-ffp-contract=off", "-shared", "-fPIC", "-lm"]


def enabled() -> bool:
    return os.environ.get("TSPD_NATIVE", "1").strip() not in ("0", "false", "no", "off")


@functools.cache
def _cpu_identity() -> str | None:
    """The CPU's model and feature lines from /proc/cpuinfo (x86 `flags`, arm64 `Features`), or
    None where there is no such file: then the library is built without -march=native, so one
    built for another CPU (a cache folder shared across machines) can never be loaded here."""
    try:
        with open("/proc/cpuinfo") as f:
            keys = ("flags", "Features", "model name", "CPU implementer", "CPU part", "vendor_id")
            lines = sorted({line.strip() for line in f if line.split(":")[0].strip() in keys})
    except OSError:
        return None
    return "\n".join(lines) if any(line.startswith(("flags", "Features")) for line in lines) else None


def _flags() -> list[str]:
    return FLAGS if _cpu_identity() is not None else [f for f in FLAGS if f != "-march=native"]


def _build_flag_sets() -> list[list[str]]:
    """The flags to try, best first: as `_flags()`, then without -march=native, then without
    OpenMP (a compiler with no omp.h or libgomp; the loops then run on one thread) with and without
    -march=native."""
    sets = [_flags(), [f for f in FLAGS if f != "-march=native"], [f for f in _flags() if f != "-fopenmp"],
            [f for f in FLAGS if f not in ("-march=native", "-fopenmp")]]
    return [f for i, f in enumerate(sets) if f not in sets[:i]]


def _machine_key() -> str:
    """What the compiled library depends on: the source, the flags and (for -march=native) the CPU."""
    parts = [SOURCE, " ".join(_flags()), platform.machine(), _cpu_identity() or "", sys.platform]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class _BuildFailed(Exception):
    pass


def _build(folder: Path) -> Path | None:
    """The library's path in `folder`, compiled there if absent (in a cache entry that
    `tspd.cache.building` renames into place when complete); None without a compiler or build."""
    entry = folder / f"mt19937-{_machine_key()}"
    lib = entry / "mt19937.so"
    if lib.is_file():
        return lib
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    try:
        with building(entry, "mt19937.so") as tmp:
            src = tmp / "mt19937.c"
            src.write_text(SOURCE)
            for flags in _build_flag_sets():
                r = subprocess.run([cc, *flags, "-o", str(tmp / "mt19937.so"), str(src)], capture_output=True, timeout=120)
                if r.returncode == 0:
                    break
            else:
                raise _BuildFailed
    except _BuildFailed:
        return None
    return lib if lib.is_file() else None


def _private(folder: Path, uid: int) -> bool:
    """`folder` exists (made now if absent, mode 0700), is a real folder owned by this user and is
    not writable by group or others."""
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and (not hasattr(os, "getuid") or st.st_uid == uid) and not st.st_mode & 0o022


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _rng_matches(lib: ctypes.CDLL) -> bool:
    """The library's draws and generator states equal torch's own on a few sizes (1-5 values,
    a twist boundary crossed, 409600 values; a state part-way through a twist block)."""
    from tspd.masks import torch_uniform

    for seed, sizes in ((0, [1, 2, 3, 5, 4096, 2500, 409600]), (12345, [7, 1251, 640])):
        a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        torch.rand(3, generator=a), torch.rand(3, generator=b)
        for n in sizes:
            ours = _draw(lib, n, a)
            if ours is None or not torch.equal(ours, torch_uniform((n,), b, torch.float32, "cpu")):
                return False
        if not torch.equal(a.get_state(), b.get_state()):
            return False
    return True


def _draw(lib: ctypes.CDLL, n: int, gen: torch.Generator) -> torch.Tensor | None:
    st = gen.get_state()
    if st.numel() != STATE_BYTES or not st.is_contiguous():
        return None
    out = torch.empty(n, dtype=torch.float32, device="cpu")
    if lib.tspd_uniform16(_ptr(st), _ptr(out), n) != 0:
        return None
    gen.set_state(st)
    return out


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled library (unchecked), or None (see the module docstring for when)."""
    if not enabled() or sys.byteorder != "little":
        return None

    uid = os.getuid() if hasattr(os, "getuid") else 0
    for folder in (cache_dir() / "native", Path(tempfile.gettempdir()) / f"tspd-native-{uid}"):
        try:
            if folder.parent == Path(tempfile.gettempdir()) and not _private(folder, uid):
                continue  # a shared temp folder: only one this user owns and no one else can write to
            path = _build(folder)
            if path is None:
                return None
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError):
            continue
        return _declare(lib)
    return None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` with its functions' argument and result types set."""
    P, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.tspd_uniform16.restype = ctypes.c_int
    lib.tspd_uniform16.argtypes = [P, P, I]
    lib.tspd_words_to_uniform.restype = None
    lib.tspd_words_to_uniform.argtypes = [P, I, P, I]
    lib.tspd_kl_rows.restype = None
    lib.tspd_kl_rows.argtypes = [P, P, P, P, P, I, I, I, ctypes.c_int]
    lib.tspd_kl_rows_bf16.restype = ctypes.c_int
    lib.tspd_kl_rows_bf16.argtypes = [P, P, P, P, P, I, I, I, ctypes.c_int]
    lib.tspd_ci_min.restype = None
    lib.tspd_ci_min.argtypes = [P, P, P, P, I, F, F, F, ctypes.c_int]
    return lib


def _checked(part: str, check) -> ctypes.CDLL | None:
    lib = library()
    if lib is None:
        return None
    if check(lib):
        return lib
    warnings.warn(f"tspd.native: the compiled {part} differs from torch's on this machine; torch's ops run instead "
                  "(the same numbers, slower)", stacklevel=3)
    return None


@functools.cache
def rng_library() -> ctypes.CDLL | None:
    """The library where its random stream passed its check, else None."""
    return _checked("random stream", _rng_matches)


def _kl_matches(lib: ctypes.CDLL) -> bool:
    """The library's KL values and gradients agree with torch's log_softmax to fp32 rounding (the
    loop's exp is its own, ~1e-7 relative, so agreement, not equality, is checked), for fp32 and
    bf16 logits (the latter against torch on the same values widened to fp64)."""
    gen = torch.Generator().manual_seed(0)
    for rows, V, n, scale, dtype in ((5, 3, 2, 1.0, torch.float32), (37, 130, 3, 4.0, torch.float32),
                                     (8, 1024, 2, 30.0, torch.float32), (37, 130, 3, 4.0, torch.bfloat16)):
        target = torch.randn(rows, V, generator=gen, dtype=torch.float32).mul(scale).log_softmax(-1).exp()
        x = torch.randn(n * rows, V, generator=gen, dtype=torch.float32).mul(scale).to(dtype)
        x[0, 0] = -200.0  # an exp that underflows
        got = _kl_rows(lib, x, target, target.sum(-1), n)
        if got is None:
            return False
        totals, g = got
        x64, p64 = x.double().view(n, rows, V), target.double()
        lsm = x64.log_softmax(-1)
        want_t = (p64 * lsm).sum((-1, -2))
        want_g = lsm.exp() * p64.sum(-1, keepdim=True) - p64
        if not torch.allclose(totals, want_t, rtol=1e-5, atol=1e-5 * rows) or not torch.allclose(
            g.double().view(n, rows, V), want_g, rtol=1e-4, atol=1e-6
        ):
            return False
    return True


def _threads() -> int:
    """The loops' thread count: torch's, passed in (whatever OpenMP runtime the library loaded)."""
    return max(1, torch.get_num_threads())


def _kl_rows(lib: ctypes.CDLL, x: torch.Tensor, p: torch.Tensor, psum: torch.Tensor, n: int):
    if n > 64:
        return None
    g = torch.empty(x.shape, dtype=torch.float32)
    totals = torch.empty(n, dtype=torch.float64)
    args = (_ptr(x), _ptr(p), _ptr(psum), _ptr(g), _ptr(totals), n, p.shape[0], p.shape[1], _threads())
    if x.dtype == torch.bfloat16:
        return (totals, g) if lib.tspd_kl_rows_bf16(*args) == 1 else None  # 0: no memory for a row buffer
    lib.tspd_kl_rows(*args)
    return totals, g


@functools.cache
def kl_library() -> ctypes.CDLL | None:
    """The library where its KL loop passed its check, else None."""
    return _checked("KL loop", _kl_matches)


def kl_rows(x: torch.Tensor, p: torch.Tensor, psum: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For logits `x` ((n rows) x V) of n passes stacked and target probabilities `p` (rows x V, row
    sums `psum`): (totals, g) with totals[k] = sum over pass k's rows of sum_v p log_softmax(x) (fp64)
    and g = psum softmax(x) - p (fp32), the gradient of -sum p log_softmax(x) with respect to x.float();
    one exp per value. x may be fp32 or bf16 (the logits under bf16 autocast; read as x.float()),
    p and psum fp32. None where the loop does not apply (not contiguous CPU tensors of these shapes
    and dtypes, more than 64 passes) or is unavailable."""
    lib = kl_library() if x.device.type == "cpu" else None
    ok = (
        lib is not None
        and x.dtype in (torch.float32, torch.bfloat16) and p.dtype == psum.dtype == torch.float32
        and x.dim() == p.dim() == 2 and psum.dim() == 1
        and all(t.is_contiguous() and t.device.type == "cpu" for t in (x, p, psum))
        and x.shape == (n * p.shape[0], p.shape[1]) and psum.shape[0] == p.shape[0] and p.shape[1] > 0
    )
    return _kl_rows(lib, x, p, psum, n) if ok else None


def _ci_min_reference(z: torch.Tensor, leak: float, eps: float, p: float) -> tuple[torch.Tensor, float, torch.Tensor]:
    """The chain's torch form (`tspd.losses._ci_min_forward`) in fp64 on a 1-D z: (lower, sum, q)."""
    from tspd.losses import _ci_min_forward

    lower, total, q = _ci_min_forward(z.double(), leak, eps, torch.tensor(p, dtype=torch.float64))
    return lower, float(total), q


def _ci_min_matches(lib: ctypes.CDLL) -> bool:
    """The library's CI chain agrees with fp64 torch to fp32 rounding on values across the
    sigmoid's pieces (below 0, inside, above 1, the boundaries) and a few p, leak and eps, and
    gives NaN and inf where torch does (elementwise, and in the sum)."""
    gen = torch.Generator().manual_seed(0)
    finite = torch.cat([torch.randn(5000, generator=gen, dtype=torch.float32) * 3,
                        torch.tensor([0.0, 1.0, -0.0, 1e-30, 1e-7, 300.0, -1e4], dtype=torch.float32)])
    for z in (finite, torch.tensor([math.inf, -math.inf, math.nan, 0.5], dtype=torch.float32)):
        for leak, eps, p in ((0.01, 1e-12, 0.9), (0.0, 1e-6, 0.1), (0.05, 1e-3, 2.0), (0.01, 1e-12, 1.0)):
            lower, total, q = _ci_min(lib, z, leak, eps, p)
            w_lower, w_total, w_q = _ci_min_reference(z, leak, eps, p)
            same_total = (math.isnan(total) and math.isnan(w_total)) or total == w_total or (
                math.isfinite(w_total) and abs(total - w_total) <= 1e-6 * abs(w_total) + 1e-6
            )
            if not same_total or not torch.allclose(lower.double(), w_lower, rtol=0.0, atol=0.0, equal_nan=True):
                return False
            if not torch.allclose(q.double(), w_q, rtol=2e-6, atol=0.0, equal_nan=True):
                return False
    # base^p just below fp32's largest finite value stays finite (exp(p log base) carries fp32's
    # rounding of p log base ~ 88.7: ~5e-6 relative), one value per call so no lane sums two
    for z, p in ((2.2e38, 1.0), (3.3e38, 1.0), (1.3e5, 8.0)):
        zt = torch.tensor([z], dtype=torch.float32)
        _, total, q = _ci_min(lib, zt, 1.0 if p == 1.0 else 0.5, 1e-3, p)
        _, w_total, w_q = _ci_min_reference(zt, 1.0 if p == 1.0 else 0.5, 1e-3, p)
        if not (math.isfinite(total) and abs(total - w_total) <= 2e-5 * w_total):
            return False
        if p == 1.0 and not torch.allclose(q.double(), w_q, rtol=2e-5, atol=0.0):  # (p=8: p base^p overflows, as in torch's fp32 form)
            return False
    return True


def _ci_min(lib: ctypes.CDLL, z: torch.Tensor, leak: float, eps: float, p: float):
    lower, q = torch.empty_like(z), torch.empty_like(z)
    total = torch.zeros(1, dtype=torch.float64)
    lib.tspd_ci_min(_ptr(z), _ptr(lower), _ptr(q), _ptr(total), z.numel(), leak, eps, p, _threads())
    return lower, float(total), q


@functools.cache
def ci_min_library() -> ctypes.CDLL | None:
    """The library where its CI chain passed its check, else None."""
    return _checked("CI chain", _ci_min_matches)


def ci_min(z: torch.Tensor, leak: float, eps: float, p: float) -> tuple[torch.Tensor, float, torch.Tensor] | None:
    """One site's CI chain forward (`tspd.losses._ci_min_forward`) on CPU fp32 logits z: (lower,
    sum of (upper + eps)^p in fp64, q = p (upper + eps)^p / (upper + eps)), with this library's own
    log and exp (~1e-7 relative). None where it does not apply (not a contiguous fp32 CPU tensor,
    eps below fp32's smallest normal number, p beyond [0, 8]) or is unavailable."""
    ok = (
        z.device.type == "cpu" and z.dtype == torch.float32 and z.is_contiguous()
        and eps >= 1.2e-38 and 0.0 <= p <= 8.0 and 0.0 <= leak < 1.0
        and p * math.log(eps) > -87.0  # base^p >= eps^p stays above exp's floor (else exactly as torch: the compiled chain)
    )
    lib = ci_min_library() if ok else None
    return _ci_min(lib, z, leak, eps, p) if lib is not None else None


def clear() -> None:
    """Forget the loaded library and checks (after changing TSPD_NATIVE)."""
    library.cache_clear(), rng_library.cache_clear(), kl_library.cache_clear(), ci_min_library.cache_clear()


def uniform16(n: int, gen: torch.Generator) -> torch.Tensor | None:
    """`tspd.masks.uniform`'s n fp32 values from CPU generator `gen` (advanced exactly as torch's
    draw would), or None where the compiled stream is unavailable. Unlike torch's own draw it does
    not lock the generator: do not draw from one generator on two threads at once."""
    if gen.device.type != "cpu":
        return None
    lib = rng_library()
    return _draw(lib, n, gen) if lib is not None else None
