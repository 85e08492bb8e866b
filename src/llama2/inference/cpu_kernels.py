"""Small C kernels for CPU decoding: y = x @ W.T with W stored as int8 in blocks of 32 with fp16 scales
(`q8_matmul`), and the fp32 matrix-vector product of batch-1 steps (`f32_matvec`, see fastlinear.py).

Decoding one token is a matrix-vector product per layer, bound by how many weight bytes are read. PyTorch has
no fast weight-only int8 matrix-vector product for AVX2 CPUs (its compiled and `_weight_int8pack_mm` paths
run at under a tenth of memory bandwidth here), so this module compiles one with the system C compiler on
first use (about a second; cached under ~/.cache/llama2/kernels) and calls it through ctypes, which releases
the GIL. Inside the kernel the activations are quantised to int8 in blocks of 32 as well (llama.cpp's q8_0
scheme), so each 32-element block is an exact int32 dot product scaled by the two block scales; on CPUs with
AVX-512 VNNI (detected at run time; LLAMA2_NO_VNNI=1 turns it off) each block's products are summed by one
`vpdpbusd` instead of two instructions, with the same integer results.
The fp32 kernel exists because PyTorch's batch-1 path (MKL sgemv) reads fp32 weights at about half the
bandwidth one core reaches and gets nothing from more threads.
`available()` is False where no compiler or no AVX2/FMA is found; callers then fall back to PyTorch ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from ..cpu import cpu_flags
from ..paths import cache_dir

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <math.h>

#define QK 32    /* weights and activations are quantised in blocks of 32 along K */

/* One row of activations -> int8 blocks q with one fp32 scale per block (symmetric, round to nearest). */
static void quantize_row(const float* x, int8_t* q, float* d, int64_t K) {
    for (int64_t b = 0; b < K / QK; b++) {
        const float* xb = x + b * QK;
        float amax = 0.f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        d[b] = scale;
        for (int i = 0; i < QK; i++) q[b * QK + i] = (int8_t)lrintf(xb[i] * inv);
    }
}

/* Sum of 32 int8 products as 8 int32 lanes. |w| <= 127, so the int16 pair sums cannot saturate. */
static inline __m256i dot32(const int8_t* w, __m256i x) {
    __m256i a = _mm256_loadu_si256((const __m256i*)w);
#ifdef LLAMA2_VNNI  /* one instruction for the same sums of four products (AVX-512 VNNI on 256-bit lanes) */
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(a, a), _mm256_sign_epi8(x, a));
#else
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(x, a));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* y (M, N) = x (M, K) @ W.T, W (N, K) int8 in blocks of 32 with fp16 scales ws (N, K/32); K % 32 == 0.
   xq/xd: scratch for the quantised activations, M*K int8 and M*K/32 floats.
   One output at a time; 8 block scales are converted and multiplied at once, then taken lane by lane. */
void q8_matmul(const float* x, const int8_t* w, const uint16_t* ws, float* y, int8_t* xq, float* xd,
               int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t nb = K / QK;
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, xq + m * K, xd + m * nb, K);
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t n = 0; n < N; n++) {
        const int8_t* wn = w + n * K;
        const uint16_t* sn = ws + n * nb;
        for (int64_t m = 0; m < M; m++) {
            const int8_t* qm = xq + m * K;
            const float* dm = xd + m * nb;
            __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
            int64_t b = 0;
            for (; b + 8 <= nb; b += 8) {
                __m256 d8 = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sn + b))),
                                          _mm256_loadu_ps(dm + b));
                for (int j = 0; j < 8; j += 2) {
                    __m256i p0 = dot32(wn + (b + j) * QK, _mm256_loadu_si256((const __m256i*)(qm + (b + j) * QK)));
                    __m256i p1 = dot32(wn + (b + j + 1) * QK,
                                       _mm256_loadu_si256((const __m256i*)(qm + (b + j + 1) * QK)));
                    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0),
                                           _mm256_permutevar8x32_ps(d8, _mm256_set1_epi32(j)), acc0);
                    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1),
                                           _mm256_permutevar8x32_ps(d8, _mm256_set1_epi32(j + 1)), acc1);
                }
            }
            for (; b < nb; b++) {
                __m256 d = _mm256_set1_ps(_cvtsh_ss(sn[b]) * dm[b]);
                __m256i p = dot32(wn + b * QK, _mm256_loadu_si256((const __m256i*)(qm + b * QK)));
                acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc0);
            }
            y[m * N + n] = hsum(_mm256_add_ps(acc0, acc1));
        }
    }
}

/* y (N) = W (N, K) @ x (K), all fp32, W row-major. Rows go to threads in contiguous chunks and each row is
   read as one sequential stream (interleaving several rows measured slower here: the hardware prefetcher
   keeps up with one stream per core best), with four independent accumulators, a software prefetch 256
   bytes ahead, then 8-wide and scalar tails along K. */
void f32_matvec(const float* x, const float* w, float* y, int64_t N, int64_t K, int threads) {
    const int64_t K32 = K & ~(int64_t)31, K8 = K & ~(int64_t)7;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t n = 0; n < N; n++) {
        const float* wn = w + n * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k < K32; k += 32) {
            _mm_prefetch((const char*)(wn + k + 64), _MM_HINT_T0);  /* never faults, even past the end */
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wn + k), _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wn + k + 8), _mm256_loadu_ps(x + k + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wn + k + 16), _mm256_loadu_ps(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wn + k + 24), _mm256_loadu_ps(x + k + 24), a3);
        }
        for (; k < K8; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wn + k), _mm256_loadu_ps(x + k), a0);
        float t = 0.f;
        for (; k < K; k++) t += wn[k] * x[k];
        y[n] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + t;
    }
}

/* y (M, N) = x (M, K) @ W (N, K)^T for a few rows M (a short prompt, a few requests decoded together), all
   fp32, each weight row read from memory once. Two or three rows (bound by memory): one weight row at a time,
   multiplied by the rows of x four at a time (the weight row stays in L1 for the later groups); one accumulator
   per row of x, a software prefetch as above. */
static void f32_rows_stream(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K,
                            int threads) {
    const int64_t K8 = K & ~(int64_t)7;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t n = 0; n < N; n++) {
        const float* wn = w + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t R = M - m0 < 4 ? M - m0 : 4;
            const float* x0 = x + m0 * K;  /* rows past the last repeat the last one (their sums are dropped) */
            const float* x1 = x0 + (R > 1 ? K : 0);
            const float* x2 = x0 + (R > 2 ? 2 * K : 0);
            const float* x3 = x0 + (R > 3 ? 3 * K : 0);
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
                   a3 = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k < K8; k += 8) {
                if (m0 == 0) _mm_prefetch((const char*)(wn + k + 64), _MM_HINT_T0);
                const __m256 wv = _mm256_loadu_ps(wn + k);
                a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + k), a0);
                a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1 + k), a1);
                a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x2 + k), a2);
                a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x3 + k), a3);
            }
            float t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;
            for (; k < K; k++) {
                t0 += wn[k] * x0[k]; t1 += wn[k] * x1[k]; t2 += wn[k] * x2[k]; t3 += wn[k] * x3[k];
            }
            float* yn = y + m0 * N + n;
            yn[0] = hsum(a0) + t0;
            if (R > 1) yn[N] = hsum(a1) + t1;
            if (R > 2) yn[2 * N] = hsum(a2) + t2;
            if (R > 3) yn[3 * N] = hsum(a3) + t3;
        }
    }
}

/* Four or more rows (bound by arithmetic): tiles of two weight rows by four rows of x, eight accumulators, so
   each weight vector loaded feeds four FMAs and each x vector two (the one-row-at-a-time loop above is bound by
   its loads there); prefetch 2 KiB ahead on both weight streams (measured best of 0.25-4 KiB). 1.3-2.2x the loop above from 4 to 16 rows. */
static void f32_rows_tiled(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K,
                           int threads) {
    const int64_t K8 = K & ~(int64_t)7;
    const int64_t tiles = (N + 1) / 2;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = 2 * t;
        const int C = N - n0 < 2 ? 1 : 2;
        const float* wa = w + n0 * K;
        const float* wb = wa + (C > 1 ? K : 0);  /* a last odd row is paired with itself (its copy is dropped) */
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t R = M - m0 < 4 ? M - m0 : 4;
            const float* x0 = x + m0 * K;
            const float* x1 = x0 + (R > 1 ? K : 0);
            const float* x2 = x0 + (R > 2 ? 2 * K : 0);
            const float* x3 = x0 + (R > 3 ? 3 * K : 0);
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
                   a3 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(),
                   b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k < K8; k += 8) {
                if (m0 == 0) {
                    _mm_prefetch((const char*)(wa + k + 512), _MM_HINT_T0);
                    _mm_prefetch((const char*)(wb + k + 512), _MM_HINT_T0);
                }
                const __m256 va = _mm256_loadu_ps(wa + k), vb = _mm256_loadu_ps(wb + k);
                __m256 xv = _mm256_loadu_ps(x0 + k);
                a0 = _mm256_fmadd_ps(va, xv, a0); b0 = _mm256_fmadd_ps(vb, xv, b0);
                xv = _mm256_loadu_ps(x1 + k);
                a1 = _mm256_fmadd_ps(va, xv, a1); b1 = _mm256_fmadd_ps(vb, xv, b1);
                xv = _mm256_loadu_ps(x2 + k);
                a2 = _mm256_fmadd_ps(va, xv, a2); b2 = _mm256_fmadd_ps(vb, xv, b2);
                xv = _mm256_loadu_ps(x3 + k);
                a3 = _mm256_fmadd_ps(va, xv, a3); b3 = _mm256_fmadd_ps(vb, xv, b3);
            }
            float ta[4] = {0.f, 0.f, 0.f, 0.f}, tb[4] = {0.f, 0.f, 0.f, 0.f};
            for (; k < K; k++) {
                ta[0] += wa[k] * x0[k]; ta[1] += wa[k] * x1[k]; ta[2] += wa[k] * x2[k]; ta[3] += wa[k] * x3[k];
                tb[0] += wb[k] * x0[k]; tb[1] += wb[k] * x1[k]; tb[2] += wb[k] * x2[k]; tb[3] += wb[k] * x3[k];
            }
            const float ra[4] = {hsum(a0) + ta[0], hsum(a1) + ta[1], hsum(a2) + ta[2], hsum(a3) + ta[3]};
            const float rb[4] = {hsum(b0) + tb[0], hsum(b1) + tb[1], hsum(b2) + tb[2], hsum(b3) + tb[3]};
            float* yn = y + m0 * N + n0;
            for (int64_t r = 0; r < R; r++) {
                yn[r * N] = ra[r];
                if (C > 1) yn[r * N + 1] = rb[r];
            }
        }
    }
}

void f32_rows(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K, int threads) {
    if (M < 4) f32_rows_stream(x, w, y, M, N, K, threads);
    else f32_rows_tiled(x, w, y, M, N, K, threads);
}
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    return Path(os.environ.get("LLAMA2_KERNEL_CACHE") or cache_dir() / "kernels")


def has_vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI on 256-bit lanes (the int8 kernel's dot products then take it)."""
    return {"avx512_vnni", "avx512vl"} <= cpu_flags() and not os.environ.get("LLAMA2_NO_VNNI")


def build(vnni: bool | None = None) -> ctypes.CDLL | None:
    """Compile (once; cached by source, flags and compiler) and load the kernels; vnni: the int8 dot products with
    AVX-512 VNNI (default: when the CPU has it); None where no compiler or no AVX2/FMA/F16C is found."""
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma", "f16c"} <= cpu_flags():
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
    if has_vnni() if vnni is None else vnni:
        flags += ["-mavx512vnni", "-mavx512vl", "-DLLAMA2_VNNI"]
    key = hashlib.sha256((SOURCE + " ".join(flags) + cc).encode()).hexdigest()[:16]
    target = _cache_dir() / f"q8_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / "q8.c", Path(tmp) / "q8.so"
            src.write_text(SOURCE)
            done = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, timeout=120)
            if done.returncode != 0:
                return None
            os.replace(out, target)  # atomic: concurrent builders each publish a complete file
    torch.get_num_threads()  # make sure PyTorch's OpenMP runtime is loaded first, so the kernel shares it
    lib = ctypes.CDLL(str(target))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.q8_matmul.argtypes = [p, p, p, p, p, p, i64, i64, i64, ctypes.c_int]
    lib.q8_matmul.restype = None
    lib.f32_matvec.argtypes = [p, p, p, i64, i64, ctypes.c_int]
    lib.f32_matvec.restype = None
    lib.f32_rows.argtypes = [p, p, p, i64, i64, i64, ctypes.c_int]
    lib.f32_rows.restype = None
    return lib


def _library() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = None if os.environ.get("LLAMA2_NO_KERNELS") else build()
                except (OSError, subprocess.SubprocessError):
                    _lib = None
                _tried = True
    return _lib


def available() -> bool:
    """True when the kernels are compiled and loadable on this machine."""
    return _library() is not None


BLOCK = 32


def quantize_blocks(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (N, K) float, K % 32 == 0 -> (int8 (N, K), fp16 scales (N, K / 32)), symmetric per block of 32."""
    N, K = w.shape
    blocks = w.detach().float().reshape(N, K // BLOCK, BLOCK)
    scale = (blocks.abs().amax(dim=-1) / 127.0).half()
    inv = torch.where(scale > 0, 1.0 / scale.float(), torch.zeros((), dtype=torch.float32))
    q = torch.round(blocks * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(N, K).contiguous(), scale.contiguous()


def dequantize_blocks(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    N, K = q.shape
    return (q.reshape(N, K // BLOCK, BLOCK).float() * scale.float()[..., None]).reshape(N, K).to(dtype)


def q8_matmul(x: Tensor, w: Tensor, scale: Tensor, lib: ctypes.CDLL | None = None) -> Tensor:
    """x (M, K) fp32 contiguous, w (N, K) int8 and scale (N, K/32) fp16 from quantize_blocks -> (M, N) fp32.
    lib: a library from build() (default: the one this process loaded)."""
    lib = lib or _library()
    assert lib is not None, "call available() first"
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    xq = torch.empty(M, K, dtype=torch.int8)
    xd = torch.empty(M, K // BLOCK, dtype=torch.float32)
    threads = torch.get_num_threads() if N * K >= 1 << 20 else 1  # small products: no fork/join cost
    lib.q8_matmul(x.data_ptr(), w.data_ptr(), scale.data_ptr(), y.data_ptr(), xq.data_ptr(), xd.data_ptr(),
                  M, N, K, threads)
    return y


MATVEC_THREADS_MIN = 1 << 18  # weights below this many elements run on one thread: no fork/join cost


def f32_matvec(x: Tensor, w: Tensor) -> Tensor:
    """x (1, K) fp32 contiguous, w (N, K) fp32 contiguous -> x @ w.T (1, N) fp32 (shapes are the caller's to
    check: this sits on the decoding hot path). Exact fp32 products and sums, only in another order than
    F.linear's; rows split over torch.get_num_threads() threads when w is large."""
    lib = _lib if _tried else _library()
    assert lib is not None, "call available() first"
    N, K = w.shape
    y = torch.empty((1, N), dtype=torch.float32)
    lib.f32_matvec(x.data_ptr(), w.data_ptr(), y.data_ptr(), N, K,
                   torch.get_num_threads() if N * K >= MATVEC_THREADS_MIN else 1)
    return y


def f32_rows(x: Tensor, w: Tensor) -> Tensor:
    """x (M, K) fp32 contiguous, w (N, K) fp32 contiguous -> x @ w.T (M, N) fp32, for a few rows M (each weight
    row is read once for all of them). Exact fp32 products and sums, in another order than F.linear's."""
    lib = _lib if _tried else _library()
    assert lib is not None, "call available() first"
    M = x.shape[0]
    if M == 1:
        return f32_matvec(x, w)
    N, K = w.shape
    y = torch.empty((M, N), dtype=torch.float32)
    lib.f32_rows(x.data_ptr(), w.data_ptr(), y.data_ptr(), M, N, K,
                 torch.get_num_threads() if N * K >= MATVEC_THREADS_MIN else 1)
    return y
