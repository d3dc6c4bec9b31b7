static void op1(OPARGS) {
  const float* in = B[1]; float* out = B[6];
  const int* ix = g_i + 0;
  const int Nf = N - N % nth;
  for (int q = 0; q < N * 2; q++) {
    const int n = q / 2, ch = q % 2; (void)ch;
    if (n < Nf ? n % nth != tid : !(g_i[2 + ch] % nth == tid)) continue;
    memcpy(out + (long)n * 84 + (long)ch * 42 + (long)(-1 + 1) * 6 + (-1 + 1), in + (long)n * 168 + (long)ix[ch] * 42 + (long)(-1 + 1) * 6 + (-1 + 1), 168);
  }
}

static void op2(OPARGS) {
  const float* in = B[1]; float* out = B[7];
  const int* ix = g_i + 4;
  const int Nf = N - N % nth;
  for (int q = 0; q < N * 2; q++) {
    const int n = q / 2, ch = q % 2; (void)ch;
    if (n < Nf ? n % nth != tid : !(g_i[6 + ch] % nth == tid)) continue;
    memcpy(out + (long)n * 84 + (long)ch * 42 + (long)(-1 + 1) * 6 + (-1 + 1), in + (long)n * 168 + (long)ix[ch] * 42 + (long)(-1 + 1) * 6 + (-1 + 1), 168);
  }
}

static void op3(OPARGS) {
  const float* in = B[6]; float* out = B[8];
  const int* ty = g_i + 8; const int* tx = g_i + 18;
  const float* wy = g_w + 304; const float* wx = g_w + 305; (void)wy; (void)wx;
  const int Nf = N - N % nth;
  for (int q = 0; q < N * 2; q++) {
    const int n = q / 2, ch = q % 2; (void)ch;
    if (n < Nf ? n % nth != tid : !(g_i[26 + ch] % nth == tid)) continue;
    const float* restrict ip = in + (long)n * 84 + (long)ch * 42 + (long)(0 + 1) * 6 + (0 + 1);
    for (int y = 0; y < 10; y++) {
      float* restrict oa = out + (long)n * 768 + (long)ch * 192 + (long)(y + 1) * 16 + (0 + 1);
      const float* restrict r = ip + (long)ty[y] * 6;
      for (int x = 0; x < 8; x++) oa[x] = r[tx[x]];
    }
  }
}

static void op4(OPARGS) {
  const float* in = B[7]; float* out = B[9];
  const int* ty = g_i + 28; const int* tx = g_i + 48;
  const float* wy = g_w + 306; const float* wx = g_w + 326; (void)wy; (void)wx;
  const int Nf = N - N % nth;
  for (int q = 0; q < N * 2; q++) {
    const int n = q / 2, ch = q % 2; (void)ch;
    if (n < Nf ? n % nth != tid : !(g_i[64 + ch] % nth == tid)) continue;
    const float* restrict ip = in + (long)n * 84 + (long)ch * 42 + (long)(0 + 1) * 6 + (0 + 1);
    for (int y = 0; y < 10; y++) {
      float* restrict oa = out + (long)n * 768 + (long)ch * 192 + (long)(y + 1) * 16 + (0 + 1);
      const float* restrict r0 = ip + (long)ty[2 * y] * 6; const float* restrict r1 = ip + (long)ty[2 * y + 1] * 6;
      const float h0 = wy[2 * y], h1 = wy[2 * y + 1];
      for (int x = 0; x < 8; x++) {
        const int a = tx[2 * x], b = tx[2 * x + 1]; const float w0 = wx[2 * x], w1 = wx[2 * x + 1];
        oa[x] = (r0[a] * w0 + r0[b] * w1) * h0 + (r1[a] * w0 + r1[b] * w1) * h1;
      }
    }
  }
}
