"""The int8 engine's other ops in C, and the program runner that runs a stretch of native ops in one call.

Why: with only the convs native, every other op (depthwise convs, pools, the global pool, linear layers, adds,
lookup-table activations, concat) ran through the integer reference in PyTorch, and each crossing between the
two converted a value between byte planes and int32 tensors; the per-op Python loop alone cost more than
onnxruntime's whole int8 inference on CIFAR ResNet-56, and MobileNetV2 (17 depthwise convs) ran 5x slower than
onnxruntime int8. Now every op below runs on the byte planes in C, and the engine calls C once per stretch of
native ops (``sf_q8_run``), in Python only around an op that still needs the reference.

Every op is the integer reference's arithmetic (``engine/quant.py``), operation for operation: exact int32 sums,
``float32(acc) * M`` (and ``+ float32(r) * M_r``, products and sum each rounded: the source turns off contraction),
round half to even (``rintf`` in the default rounding mode), clamp. Depthwise sums run in float32, exact: every
product and partial sum is an integer below 2^24 (|w| <= 127, |x| <= 255, k x k <= 9 taps).

A value is addressed through a *view*: channel plane size, row stride, the offset of its (0, 0) element, and
whether its bytes are int8 or uint8. A map's planes carry a one-pixel zero border ((H + 2) x (W + 2) bytes); a
vector (F,) is F bytes (a float output: F float32).
"""

from __future__ import annotations

import ctypes

import numpy as np

K_CONV, K_DW, K_MAXPOOL, K_AVGPOOL, K_GAP, K_LINEAR, K_ADD, K_LUT, K_MUL, K_AFFINE, K_COPY, K_PHASE = range(12)

NI = 40          # int parameters per op
NP = 10          # pointers per op


class Q8Op(ctypes.Structure):
    """One native op: value slots (inputs a, b and output), int parameters, two floats, pointers to its arrays.

    Int slots 0-11 are the views of a, b and the output (plane, row stride, origin, signed); 12-14 the output's
    (C, H, W); 16.. the op's own."""

    _fields_ = [("kind", ctypes.c_int32), ("a", ctypes.c_int32), ("b", ctypes.c_int32), ("out", ctypes.c_int32),
                ("i", ctypes.c_int32 * NI), ("f", ctypes.c_float * 2), ("p", ctypes.c_void_p * NP)]


OPS_SOURCE = r"""
/* ---- the other ops, on byte planes (see engine/int8_ops.py) ---- */
typedef struct { int32_t kind, a, b, out; int32_t i[@NI@]; float f[2]; const void* p[@NP@]; } sf_q8op;

#define VA_PL o->i[0]
#define VA_RS o->i[1]
#define VA_O0 o->i[2]
#define VA_SG o->i[3]
#define VB_PL o->i[4]
#define VB_RS o->i[5]
#define VB_O0 o->i[6]
#define VB_SG o->i[7]
#define VO_PL o->i[8]
#define VO_RS o->i[9]
#define VO_O0 o->i[10]
#define OC o->i[12]
#define OH o->i[13]
#define OW o->i[14]

static inline int32_t ldq(const uint8_t* p, int sg) { return sg ? (int32_t)(int8_t)*p : (int32_t)*p; }
static inline uint8_t rq(float v, int lo, int hi) {
  v = rintf(v);
  return (uint8_t)(int32_t)(v < (float)lo ? (float)lo : (v > (float)hi ? (float)hi : v));
}

/* a depthwise filter's kept taps: weights and input offsets (rows of rs bytes; shift: the stored border minus the
   padding) */
static inline int dw_taps(const float* wc, int k, int shift, int rs, int* toff, float* tw) {
  int nt = 0;
  for (int t = 0; t < k * k; t++)
    if (wc[t] != 0.0f) {
      tw[nt] = wc[t];
      toff[nt++] = (t / k + shift) * rs + t % k + shift;
    }
  return nt;
}

#ifdef SF_VNNI
/* 16 output values from float sums (exact integers): + bias, * mult, clamped, rounded half to even, stored as
   bytes in the lanes of km */
static inline void dw_store(__m512 acc, __m512i bias, __m512 m, __m512 vlo, __m512 vhi, uint8_t* dst, __mmask16 km) {
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_cvttps_epi32(acc), bias)), m);
  y = _mm512_min_ps(_mm512_max_ps(y, vlo), vhi);            /* clamp first: no int32 overflow in the convert */
  _mm_mask_storeu_epi8(dst, km, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(y)));
}

/* 16 input bytes as float: at p (stride 1), or every other byte from p (stride 2) */
static inline __m512 dw_load(const uint8_t* p, int s, int sg) {
  __m512i v;
  if (s == 1) {
    __m128i b = _mm_loadu_si128((const __m128i*)p);
    v = sg ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
  } else {
    v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    v = sg ? _mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24) : _mm512_and_si512(v, _mm512_set1_epi32(0xFF));
  }
  return _mm512_cvtepi32_ps(v);
}

/* AVX-512 depthwise. Stride 1: the plane's flat positions y * rs + x, junk columns masked at the store (the
   output plane has the input's geometry), so a narrow map fills whole vectors; stride 2: 16 outputs of a row
   from 32 input bytes. Sums in float32 with fused multiply-adds: exact (integers below 2^24). */
static int q8_dw_avx512(const sf_q8op* o, const uint8_t* A, uint8_t* O, int tid, int nth) {
  const int k = o->i[16], s = o->i[17], shift = o->i[18], lo = o->i[19], hi = o->i[20];
  const int C = OC, H = OH, W = OW, sg = VA_SG, rs = VA_RS;
  const int flat = s == 1 && VO_RS == rs && VO_PL == VA_PL;
  if (s > 2 || (s == 1 && !flat)) return 0;
  const float* w = (const float*)o->p[0];
  const int32_t* bias = (const int32_t*)o->p[1];
  const float* mult = (const float*)o->p[2];
  const int P = flat ? (H - 1) * rs + W : 0, NV = (P + 15) / 16;
  __mmask16 kms[NV > 0 ? NV : 1];          /* per flat vector: the lanes that are outputs (not junk columns) */
  for (int v = 0; v < NV; v++) {
    __mmask16 km = 0;
    for (int j = 0; j < 16; j++) { int p = 16 * v + j; if (p < P && p % rs < W) km |= (__mmask16)(1u << j); }
    kms[v] = km;
  }
  for (int c = C * tid / nth; c < C * (tid + 1) / nth; c++) {
    const uint8_t* ip = A + (size_t)c * VA_PL;
    uint8_t* op = O + (size_t)c * VO_PL + VO_O0;
    int toff[9];
    float tw[9];
    const int nt = dw_taps(w + (size_t)c * k * k, k, shift, rs, toff, tw);
    __m512 wv[9];
    for (int t = 0; t < nt; t++) wv[t] = _mm512_set1_ps(tw[t]);
    const __m512i bv = _mm512_set1_epi32(bias[c]);
    const __m512 m = _mm512_set1_ps(mult[c]), vlo = _mm512_set1_ps((float)lo), vhi = _mm512_set1_ps((float)hi);
    if (flat) {
      for (int v = 0; v < NV; v++) {
        const int p0 = 16 * v;
        __m512 acc = _mm512_setzero_ps();
        for (int t = 0; t < nt; t++) acc = _mm512_fmadd_ps(wv[t], dw_load(ip + p0 + toff[t], 1, sg), acc);
        dw_store(acc, bv, m, vlo, vhi, op + p0, kms[v]);
      }
    } else {
      for (int y = 0; y < H; y++)
        for (int x0 = 0; x0 < W; x0 += 16) {
          __m512 acc = _mm512_setzero_ps();
          const uint8_t* r = ip + (size_t)y * s * rs + (size_t)x0 * s;
          for (int t = 0; t < nt; t++) acc = _mm512_fmadd_ps(wv[t], dw_load(r + toff[t], s, sg), acc);
          __mmask16 km = W - x0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (W - x0)) - 1);
          dw_store(acc, bv, m, vlo, vhi, op + (size_t)y * VO_RS + x0, km);
        }
    }
  }
  return 1;
}
#endif

#ifdef SF_AVX2
/* AVX2 helpers, 8 lanes (low_bytes8 and store8 come with the conv kernel): 8 input bytes as float (stride 1),
   or every other byte of 16 (stride 2) */
static inline __m256 load8f(const uint8_t* p, int s, int sg) {
  __m128i b = s == 1 ? _mm_loadl_epi64((const __m128i*)p)
                     : _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)p),
                                        _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1));
  return _mm256_cvtepi32_ps(sg ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
}


/* depthwise as q8_dw_avx512 in 8 lanes; stride 1 over flat positions stores whole vectors with the junk-column
   lanes 0 (the output plane's zero border columns), only the last vector partially */
static int q8_dw_avx2(const sf_q8op* o, const uint8_t* A, uint8_t* O, int tid, int nth) {
  const int k = o->i[16], s = o->i[17], shift = o->i[18], lo = o->i[19], hi = o->i[20];
  const int C = OC, H = OH, W = OW, sg = VA_SG, rs = VA_RS;
  const int flat = s == 1 && VO_RS == rs && VO_PL == VA_PL && VO_O0 == rs + 1;
  if (s > 2 || (s == 1 && !flat)) return 0;
  const float* w = (const float*)o->p[0];
  const int32_t* bias = (const int32_t*)o->p[1];
  const float* mult = (const float*)o->p[2];
  const int P = flat ? (H - 1) * rs + W : 0;
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), vrs = _mm256_set1_epi32(rs);
  const __m256i vrs1 = _mm256_set1_epi32(rs - 1), vW = _mm256_set1_epi32(W);
  for (int c = C * tid / nth; c < C * (tid + 1) / nth; c++) {
    const uint8_t* ip = A + (size_t)c * VA_PL;
    uint8_t* op = O + (size_t)c * VO_PL + VO_O0;
    int toff[9];
    float tw[9];
    const int nt = dw_taps(w + (size_t)c * k * k, k, shift, rs, toff, tw);
    __m256 wv[9];
    for (int t = 0; t < nt; t++) wv[t] = _mm256_set1_ps(tw[t]);
    const __m256i bv = _mm256_set1_epi32(bias[c]);
    const __m256 m = _mm256_set1_ps(mult[c]), vlo = _mm256_set1_ps((float)lo), vhi = _mm256_set1_ps((float)hi);
#define SF_DW_OUT(acc) _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_cvtepi32_ps( \
                         _mm256_add_epi32(_mm256_cvttps_epi32(acc), bv)), m), vlo), vhi))
    if (flat) {
      for (int p0 = 0; p0 < P; p0 += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int t = 0; t < nt; t++) acc = _mm256_fmadd_ps(wv[t], load8f(ip + p0 + toff[t], 1, sg), acc);
        /* lane x = (p0 + j) % rs, by three conditional subtractions (rs >= 3: 8 lanes wrap at most 3 times) */
        __m256i x = _mm256_add_epi32(_mm256_set1_epi32(p0 % rs), iota);
        for (int r = 0; r < 3; r++) x = _mm256_sub_epi32(x, _mm256_and_si256(_mm256_cmpgt_epi32(x, vrs1), vrs));
        store8(op + p0, low_bytes8(_mm256_and_si256(SF_DW_OUT(acc), _mm256_cmpgt_epi32(vW, x))), P - p0);
      }
    } else {
      for (int y = 0; y < H; y++)
        for (int x0 = 0; x0 < W; x0 += 8) {
          __m256 acc = _mm256_setzero_ps();
          const uint8_t* r = ip + (size_t)y * s * rs + (size_t)x0 * s;
          for (int t = 0; t < nt; t++) acc = _mm256_fmadd_ps(wv[t], load8f(r + toff[t], s, sg), acc);
          store8(op + (size_t)y * VO_RS + x0, low_bytes8(SF_DW_OUT(acc)), W - x0);
        }
    }
#undef SF_DW_OUT
  }
  return 1;
}
#endif

/* depthwise k x k (k <= 3, padding <= 1, any stride): out(c) = rq(float(sum + bias[c]) * mult[c]) */
static void q8_dw(const sf_q8op* o, const uint8_t* A, uint8_t* O, int tid, int nth) {
  const int k = o->i[16], s = o->i[17], shift = o->i[18], lo = o->i[19], hi = o->i[20];
  const float* w = (const float*)o->p[0];
  const int32_t* bias = (const int32_t*)o->p[1];
  const float* mult = (const float*)o->p[2];
  const int C = OC, H = OH, W = OW, sg = VA_SG;
#ifdef SF_VNNI
  if (q8_dw_avx512(o, A, O, tid, nth)) return;
#elif defined(SF_AVX2)
  if (q8_dw_avx2(o, A, O, tid, nth)) return;
#endif
  for (int c = C * tid / nth; c < C * (tid + 1) / nth; c++) {
    float acc[W];
    const uint8_t* ip = A + (size_t)c * VA_PL;
    uint8_t* op = O + (size_t)c * VO_PL + VO_O0;
    const float* wc = w + (size_t)c * k * k;
    for (int y = 0; y < H; y++) {
      for (int x = 0; x < W; x++) acc[x] = 0.0f;
      for (int dy = 0; dy < k; dy++)
        for (int dx = 0; dx < k; dx++) {
          const float wv = wc[dy * k + dx];
          if (wv == 0.0f) continue;
          const uint8_t* r = ip + (size_t)(y * s + dy + shift) * VA_RS + dx + shift;
          if (sg) { const int8_t* rs_ = (const int8_t*)r; for (int x = 0; x < W; x++) acc[x] += wv * (float)rs_[x * s]; }
          else { for (int x = 0; x < W; x++) acc[x] += wv * (float)r[x * s]; }
        }
      const float m = mult[c];
      const int32_t b = bias[c];
      for (int x = 0; x < W; x++) op[(size_t)y * VO_RS + x] = rq((float)((int32_t)acc[x] + b) * m, lo, hi);
    }
  }
}

#ifdef SF_VNNI
/* max pool in vectors of 16 outputs of a row (stride 1 or 2, padding <= 1): rows outside the map are skipped;
   a padded column reads the zero border, which never wins over uint8 values (signed inputs with padding take the
   scalar loop) */
static int q8_maxpool_avx512(const sf_q8op* o, const uint8_t* A, uint8_t* O, int tid, int nth) {
  const int k = o->i[16], s = o->i[17], pad = o->i[18], IH = o->i[19];
  const int C = OC, H = OH, W = OW, sg = VA_SG;
  if (s > 2 || pad > 1 || (sg && pad > 0)) return 0;
  for (int c = C * tid / nth; c < C * (tid + 1) / nth; c++) {
    const uint8_t* ip = A + (size_t)c * VA_PL + VA_O0;
    uint8_t* op = O + (size_t)c * VO_PL + VO_O0;
    for (int y = 0; y < H; y++)
      for (int x0 = 0; x0 < W; x0 += 16) {
        __m512i m = _mm512_set1_epi32(-1000000);
        for (int dy = 0; dy < k; dy++) {
          int iy = y * s - pad + dy;
          if (iy < 0 || iy >= IH) continue;
          const uint8_t* r = ip + (ptrdiff_t)iy * VA_RS + (ptrdiff_t)x0 * s - pad;
          for (int dx = 0; dx < k; dx++) {
            __m512i v;
            if (s == 1) {
              __m128i b = _mm_loadu_si128((const __m128i*)(r + dx));
              v = sg ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
            } else {
              v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r + dx)));
              v = sg ? _mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24) : _mm512_and_si512(v, _mm512_set1_epi32(0xFF));
            }
            m = _mm512_max_epi32(m, v);
          }
        }
        __mmask16 km = W - x0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (W - x0)) - 1);
        _mm_mask_storeu_epi8(op + (size_t)y * VO_RS + x0, km, _mm512_cvtepi32_epi8(m));
      }
  }
  return 1;
}
#endif

#ifdef SF_AVX2
/* max pool as q8_maxpool_avx512, in 8 lanes */
static int q8_maxpool_avx2(const sf_q8op* o, const uint8_t* A, uint8_t* O, int tid, int nth) {
  const int k = o->i[16], s = o->i[17], pad = o->i[18], IH = o->i[19];
  const int C = OC, H = OH, W = OW, sg = VA_SG;
  if (s > 2 || pad > 1 || (sg && pad > 0)) return 0;
  for (int c = C * tid / nth; c < C * (tid + 1) / nth; c++) {
    const uint8_t* ip = A + (size_t)c * VA_PL + VA_O0;
    uint8_t* op = O + (size_t)c * VO_PL + VO_O0;
    for (int y = 0; y < H; y++)
      for (int x0 = 0; x0 < W; x0 += 8) {
        __m256 m = _mm256_set1_ps(-1000000.0f);
        for (int dy = 0; dy < k; dy++) {
          int iy = y * s - pad + dy;
          if (iy < 0 || iy >= IH) continue;
          const uint8_t* r = ip + (ptrdiff_t)iy * VA_RS + (ptrdiff_t)x0 * s - pad;
          for (int dx = 0; dx < k; dx++) m = _mm256_max_ps(m, load8f(r + dx, s, sg));
        }
        store8(op + (size_t)y * VO_RS + x0, low_bytes8(_mm256_cvttps_epi32(m)), W - x0);
      }
  }
  return 1;
}
#endif

/* max pool, padded positions never win; avg pool: exact sum / count (count_include_pad or the valid count) */
static void q8_pool(const sf_q8op* o, const uint8_t* A, uint8_t* O, int tid, int nth, int avg) {
  const int k = o->i[16], s = o->i[17], pad = o->i[18], IH = o->i[19], IW = o->i[20], incl = o->i[21];
  const int lo = o->i[22], hi = o->i[23];
  const int C = OC, H = OH, W = OW, sg = VA_SG;
#ifdef SF_VNNI
  if (!avg && q8_maxpool_avx512(o, A, O, tid, nth)) return;
#elif defined(SF_AVX2)
  if (!avg && q8_maxpool_avx2(o, A, O, tid, nth)) return;
#endif
  for (int c = C * tid / nth; c < C * (tid + 1) / nth; c++) {
    const uint8_t* ip = A + (size_t)c * VA_PL + VA_O0;
    uint8_t* op = O + (size_t)c * VO_PL + VO_O0;
    for (int y = 0; y < H; y++)
      for (int x = 0; x < W; x++) {
        int32_t m = -1000000, sum = 0, n = 0;
        for (int dy = 0; dy < k; dy++) {
          int iy = y * s - pad + dy;
          if (iy < 0 || iy >= IH) continue;
          for (int dx = 0; dx < k; dx++) {
            int ix = x * s - pad + dx;
            if (ix < 0 || ix >= IW) continue;
            int32_t v = ldq(ip + (size_t)iy * VA_RS + ix, sg);
            m = v > m ? v : m; sum += v; n++;
          }
        }
        if (avg) op[(size_t)y * VO_RS + x] = rq((float)sum / (float)(incl ? k * k : n), lo, hi);
        else op[(size_t)y * VO_RS + x] = (uint8_t)m;
      }
  }
}

/* phase split (space-to-depth with zero padding; the int8 engine's lowering of strided and widely padded convs
   to stride-1 convs, as plan.lower does for fp32): output channel (c * s + py) * s + px, pixel (i, j) = input
   (s * i + py - pad, s * j + px - pad) of channel c, 0 outside the map. Rows whose every column lies in the
   stored border's reach are copied in vectors (even bytes of 32 at stride 2); the rest per byte. */
static void q8_phase(const sf_q8op* o, const uint8_t* A, uint8_t* O, int tid, int nth) {
  const int s = o->i[16], pad = o->i[17], IH = o->i[18], IW = o->i[19];
  const int C = OC, H = OH, W = OW;
  for (int co = C * tid / nth; co < C * (tid + 1) / nth; co++) {
    const int c = co / (s * s), py = (co / s) % s, px = co % s;
    const uint8_t* ip = A + (size_t)c * VA_PL + VA_O0;
    uint8_t* op = O + (size_t)co * VO_PL + VO_O0;
    const int x0 = px - pad, x1 = s * (W - 1) + px - pad;
    for (int i = 0; i < H; i++) {
      const int iy = s * i + py - pad;
      uint8_t* orow = op + (size_t)i * VO_RS;
      if (iy < 0 || iy >= IH) { memset(orow, 0, (size_t)W); continue; }
      const uint8_t* r = ip + (ptrdiff_t)iy * VA_RS;
      int j = 0;
#if defined(SF_VNNI) || defined(SF_AVX2)
      if (x0 >= -1 && x1 <= IW && VA_O0 >= VA_RS + 1) {    /* every column within the one-pixel border */
        if (s == 2)
          for (; j + 16 <= W; j += 16) {
#ifdef SF_VNNI
            _mm_storeu_si128((__m128i*)(orow + j),
                             _mm256_cvtepi16_epi8(_mm256_loadu_si256((const __m256i*)(r + x0 + 2 * j))));
#else
            const __m256i ev = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1,
                                                0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
            const __m256i v = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)(r + x0 + 2 * j)), ev);
            _mm_storeu_si128((__m128i*)(orow + j), _mm256_castsi256_si128(_mm256_permute4x64_epi64(v, 0x08)));
#endif
          }
        else if (s == 1)
          for (; j + 16 <= W; j += 16) _mm_storeu_si128((__m128i*)(orow + j), _mm_loadu_si128((const __m128i*)(r + x0 + j)));
      }
#endif
      for (; j < W; j++) {
        const int ix = s * j + x0;
        orow[j] = (ix >= 0 && ix < IW) ? r[ix] : 0;
      }
    }
  }
}

/* global average pool: the exact sum over the map / (H * W), rounded; output (C, 1, 1) or (C,) */
static void q8_gap(const sf_q8op* o, const uint8_t* A, uint8_t* O, int tid, int nth) {
  const int IH = o->i[16], IW = o->i[17], lo = o->i[18], hi = o->i[19];
  const int C = OC, sg = VA_SG;
  for (int c = C * tid / nth; c < C * (tid + 1) / nth; c++) {
    const uint8_t* ip = A + (size_t)c * VA_PL + VA_O0;
    int64_t sum = 0;
    for (int y = 0; y < IH; y++) {
      const uint8_t* r = ip + (size_t)y * VA_RS;
      int32_t rsum = 0;
      if (sg) { for (int x = 0; x < IW; x++) rsum += (int8_t)r[x]; }
      else { for (int x = 0; x < IW; x++) rsum += r[x]; }
      sum += rsum;
    }
    O[(size_t)c * VO_PL + VO_O0] = rq((float)sum / (float)(IH * IW), lo, hi);
  }
}

/* linear: acc = sum w * x (exact) + bias, clamped to int32; then float(acc) * mult[o], rounded to the output's
   bytes, or kept as float32 (a graph output). Input gathered to F contiguous bytes (+128 if int8: uint8 for
   vpdpbusd, the bias carries -128 * sum(w)); weight rows padded to a multiple of 64 with zeros. */
static void q8_linear(const sf_q8op* o, const uint8_t* A, uint8_t* O, uint8_t* scratch, int tid, int nth) {
  const int F = o->i[16], G = o->i[17], FP = o->i[18], lo = o->i[19], hi = o->i[20], fout = o->i[21];
  const int8_t* w = (const int8_t*)o->p[0];
  const int32_t* bias = (const int32_t*)o->p[1];
  const float* mult = (const float*)o->p[2];
  uint8_t* xb = scratch;
  const uint8_t xr = VA_SG ? 0x80 : 0;
  for (int j = 0; j < F; j++) xb[j] = A[(size_t)j * VA_PL + VA_O0] ^ xr;
  for (int j = F; j < FP; j++) xb[j] = 0;
#ifdef SF_AVX2
  /* AVX2 has no byte dot product that cannot saturate: the input as int16 once, each weight row widened to
     int16 and multiplied by vpmaddwd (pairs summed into int32, exact) */
  int16_t* x16 = (int16_t*)(scratch + ((FP + 63) & ~63));
  for (int j = 0; j < FP; j++) x16[j] = xb[j];
#endif
  for (int g = G * tid / nth; g < G * (tid + 1) / nth; g++) {
    const int8_t* wr = w + (size_t)g * FP;
    int64_t acc;
#ifdef SF_VNNI
    __m512i a = _mm512_setzero_si512();
    for (int j = 0; j < FP; j += 64)
      a = _mm512_dpbusd_epi32(a, _mm512_loadu_si512((const void*)(xb + j)), _mm512_loadu_si512((const void*)(wr + j)));
    acc = (int64_t)(int32_t)_mm512_reduce_add_epi32(a);
#elif defined(SF_AVX2)
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
    for (int j = 0; j < FP; j += 32) {
      a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(x16 + j)),
                                                  _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wr + j)))));
      a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(x16 + j + 16)),
                                                  _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wr + j + 16)))));
    }
    a0 = _mm256_add_epi32(a0, a1);
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(a0), _mm256_extracti128_si256(a0, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
    acc = (int64_t)_mm_cvtsi128_si32(h);
#else
    int32_t s = 0;
    for (int j = 0; j < F; j++) s += (int32_t)wr[j] * (int32_t)xb[j];
    acc = s;
#endif
    acc += bias[g];
    if (acc > 2147483647LL) acc = 2147483647LL;
    if (acc < -2147483648LL) acc = -2147483648LL;
    float y = (float)(int32_t)acc * mult[g];
    if (fout) ((float*)O)[g] = y;
    else O[(size_t)g * VO_PL + VO_O0] = rq(y, lo, hi);
  }
}

/* element-wise over (C, H, W) views: add (two scales), lookup table, multiply (b broadcast over H and W: its
   row stride and column step 0), affine (per-channel integer scale and shift), copy (with an optional rescale) */
static void q8_eltwise(const sf_q8op* o, const uint8_t* A, const uint8_t* B, uint8_t* O, int tid, int nth) {
  const int C = OC, H = OH, W = OW, lo = o->i[16], hi = o->i[17], percm = o->i[18], inlo = o->i[19];
  const int rescale = o->i[20], coff = o->i[21], bxs = o->i[22];
  const float m = o->f[0], mr = o->f[1];
  const float* mc = (const float*)o->p[1];
  const int32_t* tab = (const int32_t*)o->p[0];
  for (int c = C * tid / nth; c < C * (tid + 1) / nth; c++) {
    const uint8_t* ap = A + (size_t)c * VA_PL + VA_O0;
    const uint8_t* bp = B ? B + (size_t)c * VB_PL + VB_O0 : 0;
    uint8_t* op = O + (size_t)(c + coff) * VO_PL + VO_O0;
    const float mm = percm ? mc[c] : m;
    for (int y = 0; y < H; y++) {
      const uint8_t* ar = ap + (size_t)y * VA_RS;
      const uint8_t* br = bp ? bp + (size_t)y * VB_RS : 0;
      uint8_t* orow = op + (size_t)y * VO_RS;
      switch (o->kind) {
        case @K_ADD@:
          for (int x = 0; x < W; x++)
            orow[x] = rq((float)ldq(ar + x, VA_SG) * m + (float)ldq(br + x * bxs, VB_SG) * mr, lo, hi);
          break;
        case @K_LUT@:
          for (int x = 0; x < W; x++) orow[x] = (uint8_t)tab[ldq(ar + x, VA_SG) - inlo];
          break;
        case @K_MUL@:
          for (int x = 0; x < W; x++)
            orow[x] = rq((float)(ldq(ar + x, VA_SG) * ldq(br + x * bxs, VB_SG)) * mm, lo, hi);
          break;
        case @K_AFFINE@: {
          const int32_t ws = ((const int32_t*)o->p[2])[c], bs = ((const int32_t*)o->p[3])[c];
          for (int x = 0; x < W; x++) orow[x] = rq((float)(ldq(ar + x, VA_SG) * ws + bs) * mm, lo, hi);
          break;
        }
        default:   /* copy */
          if (rescale) for (int x = 0; x < W; x++) orow[x] = rq((float)ldq(ar + x, VA_SG) * m, lo, hi);
          else for (int x = 0; x < W; x++) orow[x] = ar[x];
      }
    }
  }
}

/* a stretch of native ops over n images: value v of image j is at buf[v] + j * bstride[v]. Every thread runs
   every op on its share (ops split their channels, filters or tiles by thread), a barrier between ops; on
   Linux in the engine's own pool (see POOL in codegen.py: waits spin at most 1 ms, then sleep), elsewhere in an
   OpenMP region */
typedef struct {
  sf_ctx c;                  /* first: the pool hands the body this struct's address */
  const sf_q8op* ops; int nops; uint8_t* const* buf; const int64_t* bstride; int n; uint8_t* Q; int64_t qstride;
  int64_t* tns;              /* profiling: when every thread had finished op k (ns), or NULL */
} q8_job;

static inline int64_t q8_now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }

/* the barrier a conv's split quads need between its partial sums and their totals (see sf_conv_q8) */
static void q8_sync(void* cx, int nth) { sf_barrier(&((sf_ctx*)cx)->bar, nth); }

static void q8_body(sf_ctx* cx, int tid_, int nth0) {
  const q8_job* jb = (const q8_job*)cx;
  uint8_t* Q = jb->Q + (size_t)tid_ * jb->qstride;
  /* whole rounds of images run one image per thread through every op of the stretch (its maps then stay in its
     own L2 from op to op, as in the fp32 engine); the images left over are split across the threads op by op */
  const int Nf = jb->n - jb->n % nth0;
  for (int k = 0; k < jb->nops; k++) {
    const sf_q8op* o = jb->ops + k;
    for (int j = 0; j < jb->n; j++) {
      const int own = j < Nf;
      if (own && j % nth0 != tid_) continue;
      const int tid = own ? 0 : tid_, nth = own ? 1 : nth0;
      const uint8_t* A = jb->buf[o->a] + (size_t)j * jb->bstride[o->a];
      const uint8_t* B = o->b >= 0 ? jb->buf[o->b] + (size_t)j * jb->bstride[o->b] : 0;
      uint8_t* O = jb->buf[o->out] + (size_t)j * jb->bstride[o->out];
      const int* I = o->i + 16;
      switch (o->kind) {
        case @K_CONV@:
          sf_conv_q8(A, I[0], (const int32_t*)o->p[0], I[1], I[2], I[3], I[4], I[5], I[6], (const int32_t*)o->p[1],
                     (const int32_t*)o->p[2], (const int32_t*)o->p[3], (const int32_t*)o->p[4],
                     (const int32_t*)o->p[5], (const float*)o->p[6], B, I[7], I[8], I[9], I[10], I[11], I[12],
                     o->f[0], I[13], I[14], O, I[15], I[16], (const int32_t*)o->p[7], (const uint8_t*)o->p[8], I[17],
                     I[18], (const int32_t*)o->p[9], I[19], jb->qstride, q8_sync, cx, j, Q, tid, nth);
          break;
        case @K_DW@: q8_dw(o, A, O, tid, nth); break;
        case @K_MAXPOOL@: q8_pool(o, A, O, tid, nth, 0); break;
        case @K_AVGPOOL@: q8_pool(o, A, O, tid, nth, 1); break;
        case @K_GAP@: q8_gap(o, A, O, tid, nth); break;
        case @K_LINEAR@: q8_linear(o, A, O, Q, tid, nth); break;
        case @K_PHASE@: q8_phase(o, A, O, tid, nth); break;
        default: q8_eltwise(o, A, B, O, tid, nth);
      }
    }
    /* images are independent: one barrier per op, after its last image; none when every image ran whole on
       one thread (the profile keeps them, for its stamps) */
    if (nth0 > 1 && (jb->tns || (k < jb->nops - 1 && Nf < jb->n))) sf_barrier(&cx->bar, nth0);
    if (jb->tns && tid_ == 0) jb->tns[k] = q8_now();
  }
}

void sf_q8_run(const sf_q8op* ops, int nops, uint8_t* const* buf, const int64_t* bstride, int n, uint8_t* Q,
               int64_t qstride, int nth, int64_t* tns) {
  q8_job jb;
  memset(&jb, 0, sizeof jb);
  jb.ops = ops; jb.nops = nops; jb.buf = buf; jb.bstride = bstride; jb.n = n; jb.Q = Q; jb.qstride = qstride;
  jb.tns = tns;
  if (tns) tns[-1] = q8_now();
#ifdef SF_POOL
  sf_run(q8_body, &jb.c, nth, 0);
#else
  if (nth > 1) {
    #pragma omp parallel num_threads(nth)
    q8_body(&jb.c, omp_get_thread_num(), omp_get_num_threads());
  } else {
    q8_body(&jb.c, 0, 1);
  }
#endif
}
"""


def ops_source() -> str:
    from .codegen import thread_pool_source
    from .plan import DEFAULT_OPTIONS
    s = ("#ifndef SF_SYNC\n#define SF_SYNC __attribute__((aligned(128)))\n#endif\n" + thread_pool_source(DEFAULT_OPTIONS)
         + OPS_SOURCE.replace("@NI@", str(NI)).replace("@NP@", str(NP)))
    for name, v in (("K_CONV", K_CONV), ("K_DW", K_DW), ("K_MAXPOOL", K_MAXPOOL), ("K_AVGPOOL", K_AVGPOOL),
                    ("K_GAP", K_GAP), ("K_LINEAR", K_LINEAR), ("K_ADD", K_ADD), ("K_LUT", K_LUT), ("K_MUL", K_MUL),
                    ("K_AFFINE", K_AFFINE), ("K_PHASE", K_PHASE)):
        s = s.replace(f"@{name}@", str(v))
    return s


def make_op(kind: int, a: int, b: int, out: int, views: list[tuple[int, int, int, int]], chw: tuple[int, int, int],
            ints: list[int], floats: tuple[float, float] = (0.0, 0.0), arrays: list[np.ndarray | None] = ()) -> Q8Op:
    """``views``: (plane, row stride, origin, signed) of a, b and the output (missing ones zero)."""
    o = Q8Op()
    o.kind, o.a, o.b, o.out = kind, a, b, out
    flat = [x for v in (list(views) + [(0, 0, 0, 0)] * (3 - len(views))) for x in v]
    for j, x in enumerate(flat):
        o.i[j] = int(x)
    for j, x in enumerate(chw):
        o.i[12 + j] = int(x)
    if len(ints) > NI - 16:
        raise ValueError("too many op parameters")
    for j, x in enumerate(ints):
        o.i[16 + j] = int(x)
    o.f[0], o.f[1] = floats
    for j, arr in enumerate(arrays):
        o.p[j] = arr.ctypes.data if arr is not None else None
    return o
