// e^x over a register of floats, written once for every width: common.h's exp8 (AVX2) and
// attention_avx512.cpp's exp16 instantiate it with their own lane type. Cephes' expf: x = n ln2 + r
// (ln2 in two parts, for precision), e^r by a degree-6 polynomial, 2^n through the exponent bits.
// Plain intrinsics only, no standard-library template: the two instantiations are compiled for
// different instruction sets, and must not share a symbol the linker could pick for the other.

#pragma once

// V: a struct of static functions over its register type V::f (set, min, max, round to nearest, mul,
// add, fma(a, b, c) = a * b + c, fnmadd(a, b, c) = c - a * b, pow2(n) = 2^n for integral n), as
// SERVE_FLOAT_LANES below makes for one width: PREFIX _mm256 or _mm512, SI the integer register's width
// (256, 512), ROUND that width's rounding intrinsic.
#define SERVE_FLOAT_LANES(NAME, F, PREFIX, SI, ROUND)                                                        \
  struct NAME {                                                                                            \
    using f = F;                                                                                           \
    static f set(float v) { return PREFIX##_set1_ps(v); }                                                  \
    static f min(f a, f b) { return PREFIX##_min_ps(a, b); }                                               \
    static f max(f a, f b) { return PREFIX##_max_ps(a, b); }                                               \
    static f round(f a) { return ROUND(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }                \
    static f mul(f a, f b) { return PREFIX##_mul_ps(a, b); }                                               \
    static f add(f a, f b) { return PREFIX##_add_ps(a, b); }                                               \
    static f fma(f a, f b, f c) { return PREFIX##_fmadd_ps(a, b, c); }                                     \
    static f fnmadd(f a, f b, f c) { return PREFIX##_fnmadd_ps(a, b, c); }                                 \
    static f pow2(f n) {                                                                                   \
      return PREFIX##_castsi##SI##_ps(PREFIX##_slli_epi32(PREFIX##_add_epi32(PREFIX##_cvtps_epi32(n), PREFIX##_set1_epi32(127)), 23)); \
    }                                                                                                      \
  }
template <class V>
inline typename V::f exp_lanes(typename V::f x) {
  using f = typename V::f;
  constexpr float poly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  x = V::min(V::max(x, V::set(-87.3f)), V::set(88.3f));
  const f n = V::round(V::mul(x, V::set(1.44269504088896341f)));
  f r = V::fnmadd(n, V::set(0.693359375f), x);
  r = V::fnmadd(n, V::set(-2.12194440e-4f), r);
  f p = V::set(poly[0]);
  for (int i = 1; i < 6; ++i) p = V::fma(p, r, V::set(poly[i]));
  p = V::fma(p, V::mul(r, r), V::add(r, V::set(1.0f)));
  return V::mul(p, V::pow2(n));
}
