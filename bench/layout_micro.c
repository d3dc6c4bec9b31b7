/* Does a blocked channel layout remove the engine's network-order penalty? (docs/ARCHITECTURE.md, session 23)
   A chain of dense 1x1 convs as in ResNet-50's layer1 (256->64, 64->256, x3) at HxW, one thread, in the engine's
   padded planar layout (its flat-gemm kernel: 6 filters x 4 pixel vectors) vs nChw16c (4 output-channel vectors x 6
   pixels, the layout onnxruntime and oneDNN use). Per layer: isolated (the layer repeated, warm) and in chain order. */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
typedef float v16 __attribute__((vector_size(64)));
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
static int H, W, RS; static long PL;
/* planar: in[c*PL + (y+1)*RS + x+1]; flat span from row 1 col 0 over H*RS positions */
static void conv_planar(const float* in, float* out, const float* Wt, const float* b, int cin, int o) {
  int nv = H * RS / 16, TV = 4, MR = 6; int nt = nv / TV, nb = (o + MR - 1) / MR;
  for (int tt = 0; tt < nt; tt++) for (int fb = 0; fb < nb; fb++) {
    long pb = RS + (long)tt * TV * 16; const float* w = Wt + (long)fb * cin * MR; const float* ip = in + pb;
    v16 a[6][4]; for (int m = 0; m < 6; m++) for (int j = 0; j < 4; j++) a[m][j] = (v16)_mm512_set1_ps(b[fb*6+m]);
    for (int c = 0; c < cin; c++, ip += PL, w += MR) {
      v16 x0 = *(const v16*)ip, x1 = *(const v16*)(ip+16), x2 = *(const v16*)(ip+32), x3 = *(const v16*)(ip+48);
#pragma GCC unroll 6
      for (int m = 0; m < 6; m++) { v16 k = (v16)_mm512_set1_ps(w[m]); a[m][0] += k*x0; a[m][1] += k*x1; a[m][2] += k*x2; a[m][3] += k*x3; }
    }
    for (int m = 0; m < 6; m++) for (int j = 0; j < 4; j++)
      *(v16*)(out + (long)(fb*6+m) * PL + pb + 16*j) = (v16)_mm512_max_ps((__m512)a[m][j], _mm512_setzero_ps());
  }
}
/* blocked: in[(c/16)*H*W*16 + p*16 + c%16]; out block of 4 oc-vectors x 6 pixels; W packed [ocb4][c][64] */
static void conv_blocked(const float* in, float* out, const float* Wt, const float* b, int cin, int o) {
  int P = H * W, NP = 6, OB = 4; long CS = (long)P * 16;
  for (int ob = 0; ob < o / (16 * OB); ob++) for (int p0 = 0; p0 < P; p0 += NP) {
    int np = P - p0 < NP ? P - p0 : NP;
    v16 a[4][6]; for (int q = 0; q < OB; q++) for (int j = 0; j < NP; j++) a[q][j] = *(const v16*)(b + (ob*OB+q)*16);
    const float* w = Wt + (long)ob * cin * 64;
    for (int cb = 0; cb < cin / 16; cb++) {
      const float* ip = in + cb * CS + (long)p0 * 16;
      for (int ci = 0; ci < 16; ci++, w += 64) {
        v16 w0 = *(const v16*)w, w1 = *(const v16*)(w+16), w2 = *(const v16*)(w+32), w3 = *(const v16*)(w+48);
#pragma GCC unroll 6
        for (int j = 0; j < 6; j++) { v16 x = (v16)_mm512_set1_ps(ip[j*16+ci]); a[0][j] += w0*x; a[1][j] += w1*x; a[2][j] += w2*x; a[3][j] += w3*x; }
      }
    }
    for (int q = 0; q < OB; q++) for (int j = 0; j < np; j++)
      *(v16*)(out + (long)(ob*OB+q) * CS + (long)(p0+j)*16) = (v16)_mm512_max_ps((__m512)a[q][j], _mm512_setzero_ps());
  }
}
int main(int argc, char** argv) {
  H = W = atoi(argv[1]); RS = (W + 2 + 15) / 16 * 16; PL = (long)(H + 2) * RS + 64;
  int chans[] = {256, 64, 256, 64, 256, 64, 256}; int nl = 6;
  long PB = (long)H * W * 16 + 16 * 6;   /* blocked plane of 16 channels, + slack for the last pixel group */
  size_t big = (size_t)256 * (PL > PB ? PL : PB) * 4 + 4096;
  float* buf[7]; for (int i = 0; i < 7; i++) { buf[i] = aligned_alloc(64, big); memset(buf[i], 0, big); for (size_t k = 0; k < big/4; k += 7) buf[i][k] = 0.01f * (k % 13); }
  float* Wt[6]; float* bias = aligned_alloc(64, 4096 * 4); for (int i = 0; i < 4096; i++) bias[i] = 0.01f;
  for (int l = 0; l < nl; l++) { size_t n = (size_t)(chans[l] + 64) * (chans[l+1] + 64); Wt[l] = aligned_alloc(64, n * 4); for (size_t k = 0; k < n; k++) Wt[l][k] = 0.001f * (k % 17); }
  for (int mode = 0; mode < 2; mode++) {
    double iso = 0, chain = 1e9;
    for (int l = 0; l < nl; l++) {      /* isolated: layer repeated, best of 10 */
      double best = 1e9;
      for (int r = 0; r < 10; r++) { double t = now(); if (mode == 0) conv_planar(buf[l], buf[l+1], Wt[l], bias, chans[l], chans[l+1]); else conv_blocked(buf[l], buf[l+1], Wt[l], bias, chans[l], chans[l+1]); t = now() - t; if (t < best) best = t; }
      iso += best;
    }
    for (int r = 0; r < 10; r++) {
      double t = now();
      for (int l = 0; l < nl; l++) { if (mode == 0) conv_planar(buf[l], buf[l+1], Wt[l], bias, chans[l], chans[l+1]); else conv_blocked(buf[l], buf[l+1], Wt[l], bias, chans[l], chans[l+1]); }
      t = now() - t; if (t < chain) chain = t;
    }
    double macs = 0; for (int l = 0; l < nl; l++) macs += (double)chans[l] * chans[l+1] * H * W;
    printf("%s %dx%d: isolated sum %.0f us, chain %.0f us (%.2fx), chain %.1f GMAC/s\n", mode ? "blocked" : "planar ", H, W, iso * 1e6, chain * 1e6, chain / iso, macs / chain / 1e9);
  }
}
