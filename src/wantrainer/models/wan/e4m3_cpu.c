/* e4m3 (float8_e4m3fn) weight rows -> float32 times a per-row factor, for the CPU upcast of fp8 block Linears.
 *
 * Built at first use by cpu_kernels.py with the machine's own instruction set (-march=native), with OpenMP linked
 * to the runtime torch has loaded (so its threads are torch's, not a second pool spinning against them), and
 * loaded with ctypes; without AVX2 + F16C it reports a width of 0 and is not used. Each byte is sign-extended to
 * 16 bits and shifted left by 7, which puts its exponent and mantissa where an IEEE half keeps them (bit 14, the
 * sign's copy, is then cleared): that half is the e4m3 value / 256, subnormals included, and the CPU's half -> float
 * instruction converts it exactly. The caller's factor (scale * 256) restores the value in one rounding, so the
 * result equals torch's weight.float() * scale[:, None] (NaN codes aside).
 */
#include <stdint.h>
#if defined(__x86_64__) && defined(__AVX2__) && defined(__F16C__)
#define WT_VECTOR 1
#include <immintrin.h>
#else
#define WT_VECTOR 0
#endif

#if WT_VECTOR
static inline float wt_scalar(int8_t code) {
  return _cvtsh_ss((unsigned short)(((int)code << 7) & 0xBFFF));
}

/* Rows first..last-1 of a row-major weight of `cols` columns. */
static void wt_rows(const int8_t *weight, const float *factors, float *out, int64_t first, int64_t last,
                    int64_t cols) {
  for (int64_t r = first; r < last; ++r) {
    const int8_t *src = weight + r * cols;
    float *dst = out + r * cols;
    const float factor = factors[r];
    int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m256i keep16 = _mm256_set1_epi16((short)0xBFFF);
    const __m512 factor16 = _mm512_set1_ps(factor);
    for (; c + 16 <= cols; c += 16) {
      __m256i half = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(src + c)));
      half = _mm256_and_si256(_mm256_slli_epi16(half, 7), keep16);
      _mm512_storeu_ps(dst + c, _mm512_mul_ps(_mm512_cvtph_ps(half), factor16));
    }
#else
    const __m128i keep8 = _mm_set1_epi16((short)0xBFFF);
    const __m256 factor8 = _mm256_set1_ps(factor);
    for (; c + 8 <= cols; c += 8) {
      __m128i half = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(src + c)));
      half = _mm_and_si128(_mm_slli_epi16(half, 7), keep8);
      _mm256_storeu_ps(dst + c, _mm256_mul_ps(_mm256_cvtph_ps(half), factor8));
    }
#endif
    for (; c < cols; ++c) dst[c] = wt_scalar(src[c]) * factor;
  }
}
#else
static void wt_rows(const int8_t *weight, const float *factors, float *out, int64_t first, int64_t last,
                    int64_t cols) {
  (void)weight, (void)factors, (void)out, (void)first, (void)last, (void)cols;
}
#endif

/* Lanes of the vector path this build has: 16 (AVX-512), 8 (AVX2 + F16C) or 0 (none: not used). */
int wt_e4m3_width(void) {
#if WT_VECTOR && defined(__AVX512F__) && defined(__AVX512BW__)
  return 16;
#elif WT_VECTOR
  return 8;
#else
  return 0;
#endif
}

/* 1 where built with OpenMP (the threads are then those of the process's OpenMP runtime: torch's). */
int wt_e4m3_threaded(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

/* out[r, c] = e4m3(weight[r, c]) / 256 * factor[r] for a row-major [rows, cols] weight; blocks of 16 rows are
 * shared by up to `threads` OpenMP threads (one thread without OpenMP). */
int wt_e4m3_rows(const int8_t *weight, const float *factor, float *out, int64_t rows, int64_t cols, int threads) {
  const int64_t block = 16, blocks = (rows + block - 1) / block;
  if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b)
    wt_rows(weight, factor, out, b * block, (b + 1) * block < rows ? (b + 1) * block : rows, cols);
  return 0;
}
