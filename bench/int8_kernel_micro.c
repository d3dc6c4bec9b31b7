/* Microbenchmark for issue 26's int8 kernel design (run through bench/int8_kernel_micro.py).
 *
 * One pattern-sparse 3x3 conv layer (4-of-9 patterns from a library of 8, 1/3.6 of the kernels kept), one thread:
 *  - fp32: the engine's flat-tiled structure (vectors along the flattened padded plane, T accumulators per
 *    filter, one broadcast weight and one input load per FMA);
 *  - int8 (AVX512-VNNI): per tile, every (input channel, pattern) pair in use is packed once into "tap quads"
 *    (the 4 uint8 inputs of the pattern's taps side by side, 4 bytes per position), then every filter runs one
 *    vpdpbusd per kept kernel and 16 positions: 64 useful MACs per instruction and one aligned load, exact
 *    int32 accumulation, then the requantization epilogue (float32 multiply, round half to even, clamp, uint8).
 * Prints times and checks the int8 output against a scalar integer reference at sampled points. */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
#define MAXK 8
int H,W,C,F,RS,PL,P0,NV,T;
int pat[8][4];
int nk; int *kf,*kc,*kp; int *fbeg; // kernels sorted by filter
float *wf; int32_t *wq; // per kernel 4 weights
int main(int argc,char**argv){
  H=atoi(argv[1]);W=H;C=atoi(argv[2]);F=C;T=atoi(argv[3]); double keep=1/3.6; int reps=atoi(argv[4]);
  RS=W+2;PL=(H+2)*RS;P0=RS+1;int n=RS*H+W-P0+1;NV=(n+15)/16; int ntile=(NV+T-1)/T;
  srand(1);
  int others[8]={0,1,2,3,5,6,7,8};
  for(int k=0;k<8;k++){ // random distinct-ish patterns: centre + 3 of others
    int a=others[k],b=others[(k+3)%8],c2=others[(k+5)%8]; pat[k][0]=a;pat[k][1]=b;pat[k][2]=4;pat[k][3]=c2;}
  kf=malloc(sizeof(int)*F*C);kc=malloc(sizeof(int)*F*C);kp=malloc(sizeof(int)*F*C);fbeg=malloc(sizeof(int)*(F+1));
  nk=0; for(int f=0;f<F;f++){fbeg[f]=nk; for(int c=0;c<C;c++) if(rand()<keep*RAND_MAX){kf[nk]=f;kc[nk]=c;kp[nk]=rand()%8;nk++;}} fbeg[F]=nk;
  wf=malloc(4*4*nk); wq=malloc(4*nk); int8_t* w8=(int8_t*)wq;
  for(int i=0;i<4*nk;i++){int v=rand()%255-127; w8[i]=v; wf[i]=v*0.01f;}
  size_t insz=(size_t)C*PL+1024;
  float* inf=aligned_alloc(64,insz*4); uint8_t* in8=aligned_alloc(64,insz+64);
  for(size_t i=0;i<insz;i++){uint8_t v=rand()%256; in8[i]=v; inf[i]=v;}
  float* outf=aligned_alloc(64,((size_t)F*PL+1024)*4); uint8_t* out8=aligned_alloc(64,(size_t)F*PL+1024);
  int off[9]; for(int t=0;t<9;t++) off[t]=(t/3-1)*RS+(t%3-1);
  // ---- fp32
  double best32=1e9;
  for(int r=0;r<reps;r++){ double t0=now();
    for(int ti=0;ti<ntile;ti++){ int v0=ti*T; int tv=NV-v0<T?NV-v0:T; if(tv<T) v0=NV-T;
      for(int f=0;f<F;f++){ __m512 acc[16]; for(int v=0;v<T;v++) acc[v]=_mm512_setzero_ps();
        for(int k=fbeg[f];k<fbeg[f+1];k++){ const float* base=inf+(size_t)kc[k]*PL+P0+v0*16; const float* w=wf+4*k; int*pp=pat[kp[k]];
          for(int t=0;t<4;t++){ __m512 wv=_mm512_set1_ps(w[t]); const float* p=base+off[pp[t]];
            for(int v=0;v<T;v++) acc[v]=_mm512_fmadd_ps(wv,_mm512_loadu_ps(p+v*16),acc[v]); } }
        float* o=outf+(size_t)f*PL+P0+v0*16; for(int v=0;v<T;v++) _mm512_storeu_ps(o+v*16,_mm512_max_ps(acc[v],_mm512_setzero_ps())); } }
    double dt=now()-t0; if(dt<best32)best32=dt; }
  // ---- int8 vnni with quad packing per tile
  uint8_t* Q=aligned_alloc(64,(size_t)C*8*T*64);
  unsigned char* used=calloc(C*8,1); for(int k=0;k<nk;k++) used[kc[k]*8+kp[k]]=1;
  double best8=1e9; __m512 sc=_mm512_set1_ps(0.001f);
  for(int r=0;r<reps;r++){ double t0=now();
    for(int ti=0;ti<ntile;ti++){ int v0=ti*T; int tv=NV-v0<T?NV-v0:T; if(tv<T) v0=NV-T;
      for(int c=0;c<C;c++){ const uint8_t* base=in8+(size_t)c*PL+P0+v0*16;
        for(int k=0;k<8;k++){ if(!used[c*8+k]) continue; int*pp=pat[k]; uint8_t* q=Q+((size_t)c*8+k)*T*64;
          for(int v=0;v<T;v++){ const uint8_t* b=base+v*16;
            __m128i x0=_mm_loadu_si128((const __m128i*)(b+off[pp[0]])),x1=_mm_loadu_si128((const __m128i*)(b+off[pp[1]]));
            __m128i x2=_mm_loadu_si128((const __m128i*)(b+off[pp[2]])),x3=_mm_loadu_si128((const __m128i*)(b+off[pp[3]]));
            __m128i a=_mm_unpacklo_epi8(x0,x1),bb=_mm_unpackhi_epi8(x0,x1),cc=_mm_unpacklo_epi8(x2,x3),d=_mm_unpackhi_epi8(x2,x3);
            _mm_store_si128((__m128i*)(q+v*64),_mm_unpacklo_epi16(a,cc)); _mm_store_si128((__m128i*)(q+v*64+16),_mm_unpackhi_epi16(a,cc));
            _mm_store_si128((__m128i*)(q+v*64+32),_mm_unpacklo_epi16(bb,d)); _mm_store_si128((__m128i*)(q+v*64+48),_mm_unpackhi_epi16(bb,d)); } } }
      for(int f=0;f<F;f++){ __m512i acc[16]; for(int v=0;v<T;v++) acc[v]=_mm512_setzero_si512();
        for(int k=fbeg[f];k<fbeg[f+1];k++){ __m512i w4=_mm512_set1_epi32(wq[k]); const uint8_t* q=Q+((size_t)kc[k]*8+kp[k])*T*64;
          for(int v=0;v<T;v++) acc[v]=_mm512_dpbusd_epi32(acc[v],_mm512_load_si512((const void*)(q+v*64)),w4); }
        uint8_t* o=out8+(size_t)f*PL+P0+v0*16;
        for(int v=0;v<T;v++){ __m512i y=_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[v]),sc)); y=_mm512_max_epi32(y,_mm512_setzero_si512());
          _mm_storeu_si128((__m128i*)(o+v*16),_mm512_cvtusepi32_epi8(y)); } } }
    double dt=now()-t0; if(dt<best8)best8=dt; }
  // check one value: filter 0 at first interior position, int8 exact vs scalar
  double macs=(double)nk*4*H*W;
  printf("{\"H\": %d, \"C\": %d, \"T\": %d, \"kernels\": %d, \"fp32_ms\": %.4f, \"int8_ms\": %.4f, \"fp32_gmacs\": %.2f, \"int8_gmacs\": %.2f, \"speedup\": %.3f, ",H,C,T,nk,best32*1e3,best8*1e3,macs/best32/1e9,macs/best8/1e9,best32/best8);
  // correctness of int8 at a few points
  int bad=0; for(int f=0;f<F;f+=37){ for(int p=P0;p<P0+W;p++){ int64_t acc=0; for(int k=fbeg[f];k<fbeg[f+1];k++) for(int t=0;t<4;t++) acc+=(int64_t)w8[4*k+t]*in8[(size_t)kc[k]*PL+p+off[pat[kp[k]][t]]];
     float y=(float)acc*0.001f; int yi=(int)__builtin_rintf(y); if(yi<0)yi=0; if(yi>255)yi=255; if(out8[(size_t)f*PL+p]!=yi) bad++; } }
  printf("\"int8_mismatches\": %d}\n",bad);
  return 0; }
