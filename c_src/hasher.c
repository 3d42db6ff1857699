/*
 * Block hasher: out[i] = XXH3-64 of prefix || tokens[0 .. (i+1)*T), bit-exact with xxHash.
 *
 * Taking a digest from a streaming XXH3 state after every block re-hashes the state's buffered
 * stripes each time. Instead this file runs XXH3's long-input loop once over the whole stream and,
 * at every block end L, finishes a copy of the accumulators exactly as the one-shot XXH3_64bits()
 * of the first L bytes would: the floor((L-1)/64) full stripes before it are already accumulated
 * (scrambled after every 16th), so only the 64 bytes ending at L ("last stripe", own secret
 * offset) and the merge remain. Lengths of at most 240 bytes use xxHash's own short-input path.
 * The stripe code has SSE2, AVX2 and AVX-512 versions picked at run time, plus portable C.
 */
#define XXH_INLINE_ALL
#include <errno.h>
#include <string.h>
#include <xxhash.h>

#include "hasher.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(FLEXKV_NO_SIMD)
#define FLEXKV_X86 1
#include <immintrin.h>
#endif

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the block hasher assumes a little-endian CPU"
#endif

/* XXH3 long-input layout (xxHash spec, "XXH3 algorithm"), for the 192-byte default secret. */
#define STRIPE_LEN 64
#define SECRET_SIZE XXH3_SECRET_DEFAULT_SIZE
#define STRIPES_PER_SCRAMBLE ((SECRET_SIZE - STRIPE_LEN) / 8)
#define SCRAMBLE_KEY (XXH3_kSecret + SECRET_SIZE - STRIPE_LEN)
#define LAST_STRIPE_KEY (XXH3_kSecret + SECRET_SIZE - STRIPE_LEN - 7)
#define MERGE_KEY (XXH3_kSecret + 11)
#define SHORT_MAX 240
#define ALWAYS_INLINE inline __attribute__((always_inline))

/* The eight XXH3 accumulators; each implementation touches them through one member only. */
union acc {
	uint64_t u64[8];
#ifdef FLEXKV_X86
	__m128i x[4];
	__m256i y[2];
	__m512i z;
#endif
};

typedef void (*accumulate_fn)(union acc *acc, const uint8_t *in, const uint8_t *key);
typedef void (*scramble_fn)(union acc *acc);
typedef uint64_t (*digest_fn)(const union acc *acc, const uint8_t *last, uint64_t len);

/* prefix || tokens as one byte stream, read 64 bytes at a time. */
struct stream {
	const uint8_t *prefix;
	size_t prefix_len;
	const uint8_t *tokens;
	uint8_t straddle[STRIPE_LEN];
};

/* The 64 bytes at stream offset `off`; valid until the next call. */
static ALWAYS_INLINE const uint8_t *stream_stripe(struct stream *s, size_t off)
{
	size_t head;

	if (off >= s->prefix_len)
		return s->tokens + (off - s->prefix_len);
	if (off + STRIPE_LEN <= s->prefix_len)
		return s->prefix + off;
	head = s->prefix_len - off;
	memcpy(s->straddle, s->prefix + off, head);
	memcpy(s->straddle + head, s->tokens, STRIPE_LEN - head);
	return s->straddle;
}

/* XXH3-64 of the first len <= 240 stream bytes (xxHash's short path needs them contiguous). */
static uint64_t short_hash(const struct stream *s, size_t len)
{
	uint8_t buf[SHORT_MAX];
	size_t head = s->prefix_len < len ? s->prefix_len : len;

	if (head)
		memcpy(buf, s->prefix, head);
	if (len > head)
		memcpy(buf + head, s->tokens, len - head);
	return XXH3_64bits(buf, len);
}

static inline uint64_t read64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, sizeof(v));
	return v;
}

static inline uint64_t fold128(uint64_t a, uint64_t b)
{
	__uint128_t p = (__uint128_t)a * b;

	return (uint64_t)p ^ (uint64_t)(p >> 64);
}

/* Merge accumulators already xor-ed with MERGE_KEY, then avalanche. */
static ALWAYS_INLINE uint64_t merge(const uint64_t *keyed, uint64_t len)
{
	uint64_t h = len * XXH_PRIME64_1;
	int i;

	for (i = 0; i < 4; i++)
		h += fold128(keyed[2 * i], keyed[2 * i + 1]);
	h ^= h >> 37;
	h *= 0x165667919E3779F9ULL;
	return h ^ (h >> 32);
}

/* ---- portable C ------------------------------------------------------------------------- */

static ALWAYS_INLINE void accumulate_scalar(union acc *acc, const uint8_t *in, const uint8_t *key)
{
	int i;

	for (i = 0; i < 8; i += 2) {
		uint64_t d0 = read64(in + 8 * i), d1 = read64(in + 8 * i + 8);
		uint64_t k0 = d0 ^ read64(key + 8 * i), k1 = d1 ^ read64(key + 8 * i + 8);

		/* lane i gains its neighbour's data and its own 32x32-bit product */
		acc->u64[i] += d1 + (k0 & 0xFFFFFFFFu) * (k0 >> 32);
		acc->u64[i + 1] += d0 + (k1 & 0xFFFFFFFFu) * (k1 >> 32);
	}
}

static ALWAYS_INLINE void scramble_scalar(union acc *acc)
{
	int i;

	for (i = 0; i < 8; i++) {
		uint64_t a = acc->u64[i] ^ (acc->u64[i] >> 47);

		acc->u64[i] = (a ^ read64(SCRAMBLE_KEY + 8 * i)) * XXH_PRIME32_1;
	}
}

static ALWAYS_INLINE uint64_t digest_scalar(const union acc *acc, const uint8_t *last, uint64_t len)
{
	union acc t = *acc;
	int i;

	accumulate_scalar(&t, last, LAST_STRIPE_KEY);
	for (i = 0; i < 8; i++)
		t.u64[i] ^= read64(MERGE_KEY + 8 * i);
	return merge(t.u64, len);
}

/* ---- x86 SIMD: the same three steps on 128/256/512-bit lanes ---------------------------- */
#ifdef FLEXKV_X86
#define SSE2 __attribute__((target("sse2")))
#define AVX2 __attribute__((target("avx2")))
#define AVX512 __attribute__((target("avx512f")))
#define SWAP64 0x4E /* _MM_SHUFFLE(1, 0, 3, 2): swap the 64-bit halves of each 128-bit lane */

static ALWAYS_INLINE SSE2 __m128i stripe_sse2(__m128i acc, const uint8_t *in, const uint8_t *key)
{
	__m128i data = _mm_loadu_si128((const __m128i *)in);
	__m128i dk = _mm_xor_si128(data, _mm_loadu_si128((const __m128i *)key));
	__m128i prod = _mm_mul_epu32(dk, _mm_srli_epi64(dk, 32));

	return _mm_add_epi64(acc, _mm_add_epi64(prod, _mm_shuffle_epi32(data, SWAP64)));
}

static ALWAYS_INLINE SSE2 void accumulate_sse2(union acc *acc, const uint8_t *in, const uint8_t *key)
{
	int j;

	for (j = 0; j < 4; j++)
		acc->x[j] = stripe_sse2(acc->x[j], in + 16 * j, key + 16 * j);
}

static ALWAYS_INLINE SSE2 void scramble_sse2(union acc *acc)
{
	const __m128i prime = _mm_set1_epi32((int)XXH_PRIME32_1);
	int j;

	for (j = 0; j < 4; j++) {
		__m128i v = _mm_xor_si128(acc->x[j], _mm_srli_epi64(acc->x[j], 47));

		v = _mm_xor_si128(v, _mm_loadu_si128((const __m128i *)SCRAMBLE_KEY + j));
		acc->x[j] = _mm_add_epi64(_mm_mul_epu32(v, prime),
					  _mm_slli_epi64(_mm_mul_epu32(_mm_srli_epi64(v, 32), prime), 32));
	}
}

static ALWAYS_INLINE SSE2 uint64_t digest_sse2(const union acc *acc, const uint8_t *last, uint64_t len)
{
	uint64_t keyed[8];
	int j;

	for (j = 0; j < 4; j++) {
		__m128i t = stripe_sse2(acc->x[j], last + 16 * j, LAST_STRIPE_KEY + 16 * j);

		t = _mm_xor_si128(t, _mm_loadu_si128((const __m128i *)MERGE_KEY + j));
		_mm_storeu_si128((__m128i *)keyed + j, t);
	}
	return merge(keyed, len);
}

static ALWAYS_INLINE AVX2 __m256i stripe_avx2(__m256i acc, const uint8_t *in, const uint8_t *key)
{
	__m256i data = _mm256_loadu_si256((const __m256i *)in);
	__m256i dk = _mm256_xor_si256(data, _mm256_loadu_si256((const __m256i *)key));
	__m256i prod = _mm256_mul_epu32(dk, _mm256_srli_epi64(dk, 32));

	return _mm256_add_epi64(acc, _mm256_add_epi64(prod, _mm256_shuffle_epi32(data, SWAP64)));
}

static ALWAYS_INLINE AVX2 void accumulate_avx2(union acc *acc, const uint8_t *in, const uint8_t *key)
{
	acc->y[0] = stripe_avx2(acc->y[0], in, key);
	acc->y[1] = stripe_avx2(acc->y[1], in + 32, key + 32);
}

static ALWAYS_INLINE AVX2 void scramble_avx2(union acc *acc)
{
	const __m256i prime = _mm256_set1_epi32((int)XXH_PRIME32_1);
	int j;

	for (j = 0; j < 2; j++) {
		__m256i v = _mm256_xor_si256(acc->y[j], _mm256_srli_epi64(acc->y[j], 47));

		v = _mm256_xor_si256(v, _mm256_loadu_si256((const __m256i *)SCRAMBLE_KEY + j));
		acc->y[j] = _mm256_add_epi64(_mm256_mul_epu32(v, prime),
					     _mm256_slli_epi64(_mm256_mul_epu32(_mm256_srli_epi64(v, 32), prime), 32));
	}
}

static ALWAYS_INLINE AVX2 uint64_t digest_avx2(const union acc *acc, const uint8_t *last, uint64_t len)
{
	uint64_t keyed[8];
	int j;

	for (j = 0; j < 2; j++) {
		__m256i t = stripe_avx2(acc->y[j], last + 32 * j, LAST_STRIPE_KEY + 32 * j);

		t = _mm256_xor_si256(t, _mm256_loadu_si256((const __m256i *)MERGE_KEY + j));
		_mm256_storeu_si256((__m256i *)keyed + j, t);
	}
	return merge(keyed, len);
}

static ALWAYS_INLINE AVX512 __m512i stripe_avx512(__m512i acc, const uint8_t *in, const uint8_t *key)
{
	__m512i data = _mm512_loadu_si512(in);
	__m512i dk = _mm512_xor_si512(data, _mm512_loadu_si512(key));
	__m512i prod = _mm512_mul_epu32(dk, _mm512_srli_epi64(dk, 32));

	return _mm512_add_epi64(acc, _mm512_add_epi64(prod, _mm512_shuffle_epi32(data, (_MM_PERM_ENUM)SWAP64)));
}

static ALWAYS_INLINE AVX512 void accumulate_avx512(union acc *acc, const uint8_t *in, const uint8_t *key)
{
	acc->z = stripe_avx512(acc->z, in, key);
}

static ALWAYS_INLINE AVX512 void scramble_avx512(union acc *acc)
{
	const __m512i prime = _mm512_set1_epi32((int)XXH_PRIME32_1);
	__m512i v = _mm512_xor_si512(acc->z, _mm512_srli_epi64(acc->z, 47));

	v = _mm512_xor_si512(v, _mm512_loadu_si512(SCRAMBLE_KEY));
	acc->z = _mm512_add_epi64(_mm512_mul_epu32(v, prime),
				  _mm512_slli_epi64(_mm512_mul_epu32(_mm512_srli_epi64(v, 32), prime), 32));
}

static ALWAYS_INLINE AVX512 uint64_t digest_avx512(const union acc *acc, const uint8_t *last, uint64_t len)
{
	uint64_t keyed[8];
	__m512i t = stripe_avx512(acc->z, last, LAST_STRIPE_KEY);

	_mm512_storeu_si512(keyed, _mm512_xor_si512(t, _mm512_loadu_si512(MERGE_KEY)));
	return merge(keyed, len);
}
#endif /* FLEXKV_X86 */

/* ---- the block loop, instantiated once per instruction set ------------------------------ */

static const union acc acc_init = { .u64 = XXH3_INIT_ACC };

static ALWAYS_INLINE void hash_stream(const struct stream *in, size_t block_bytes, size_t num_blocks,
				      uint64_t *out, accumulate_fn accumulate, scramble_fn scramble,
				      digest_fn digest)
{
	struct stream s = *in; /* a local copy the compiler keeps in registers */
	union acc acc = acc_init;
	size_t len = s.prefix_len, done = 0, i;

	for (i = 0; i < num_blocks; i++) {
		len += block_bytes;
		if (len <= SHORT_MAX) {
			out[i] = short_hash(&s, len);
			continue;
		}
		/* the one-shot hash of len bytes accumulates every full stripe before byte len-1 */
		for (; done < (len - 1) / STRIPE_LEN; done++) {
			accumulate(&acc, stream_stripe(&s, done * STRIPE_LEN),
				   XXH3_kSecret + 8 * (done % STRIPES_PER_SCRAMBLE));
			if (done % STRIPES_PER_SCRAMBLE == STRIPES_PER_SCRAMBLE - 1)
				scramble(&acc);
		}
		out[i] = digest(&acc, stream_stripe(&s, len - STRIPE_LEN), len);
	}
}

static void hash_scalar(const struct stream *s, size_t block_bytes, size_t num_blocks, uint64_t *out)
{
	hash_stream(s, block_bytes, num_blocks, out, accumulate_scalar, scramble_scalar, digest_scalar);
}

#ifdef FLEXKV_X86
static SSE2 void hash_sse2(const struct stream *s, size_t block_bytes, size_t num_blocks, uint64_t *out)
{
	hash_stream(s, block_bytes, num_blocks, out, accumulate_sse2, scramble_sse2, digest_sse2);
}

static AVX2 void hash_avx2(const struct stream *s, size_t block_bytes, size_t num_blocks, uint64_t *out)
{
	hash_stream(s, block_bytes, num_blocks, out, accumulate_avx2, scramble_avx2, digest_avx2);
}

static AVX512 void hash_avx512(const struct stream *s, size_t block_bytes, size_t num_blocks, uint64_t *out)
{
	hash_stream(s, block_bytes, num_blocks, out, accumulate_avx512, scramble_avx512, digest_avx512);
}
#endif

/* ---- implementations and dispatch ------------------------------------------------------- */

struct hash_impl {
	const char *name;
	void (*run)(const struct stream *s, size_t block_bytes, size_t num_blocks, uint64_t *out);
};

enum { IMPL_SCALAR, IMPL_SSE2, IMPL_AVX2, IMPL_AVX512 };

/* Slowest first; flexkv_hash_blocks() uses the last one this CPU supports. */
static const struct hash_impl impls[] = {
	[IMPL_SCALAR] = { "scalar", hash_scalar },
#ifdef FLEXKV_X86
	[IMPL_SSE2] = { "sse2", hash_sse2 },
	[IMPL_AVX2] = { "avx2", hash_avx2 },
	[IMPL_AVX512] = { "avx512", hash_avx512 },
#endif
};
#define NUM_IMPLS ((int)(sizeof(impls) / sizeof(impls[0])))

static int impl_supported(int impl)
{
#ifdef FLEXKV_X86
	__builtin_cpu_init();
	if (impl == IMPL_AVX2)
		return !!__builtin_cpu_supports("avx2");
	if (impl == IMPL_AVX512)
		return !!__builtin_cpu_supports("avx512f");
#endif
	return impl >= 0 && impl < NUM_IMPLS;
}

static int best_impl(void)
{
	static int best = -1; /* racing first calls all store the same value */
	int impl = __atomic_load_n(&best, __ATOMIC_RELAXED);

	if (impl < 0) {
		for (impl = NUM_IMPLS - 1; impl > 0 && !impl_supported(impl); impl--)
			;
		__atomic_store_n(&best, impl, __ATOMIC_RELAXED);
	}
	return impl;
}

const char *flexkv_hash_impl_name(int impl)
{
	return impl >= 0 && impl < NUM_IMPLS ? impls[impl].name : NULL;
}

int flexkv_hash_impl_supported(int impl)
{
	if (impl < 0 || impl >= NUM_IMPLS)
		return -EINVAL;
	return impl_supported(impl);
}

int64_t flexkv_hash_blocks_impl(int impl, const int64_t *tokens, size_t num_tokens, size_t tokens_per_block,
				const uint8_t *prefix, size_t prefix_len, uint64_t *out)
{
	struct stream s = { .prefix = prefix, .prefix_len = prefix_len, .tokens = (const uint8_t *)tokens };
	size_t num_blocks;

	if (impl < 0 || impl >= NUM_IMPLS)
		return -EINVAL;
	if (!impl_supported(impl))
		return -EOPNOTSUPP;
	if (tokens_per_block == 0 || (num_tokens && !tokens) || (prefix_len && !prefix))
		return -EINVAL;
	num_blocks = num_tokens / tokens_per_block;
	if (num_blocks && !out)
		return -EINVAL;
	/* stream offsets (prefix_len + tokens bytes) must fit in size_t */
	if (num_tokens > SIZE_MAX / 4 / sizeof(int64_t) || prefix_len > SIZE_MAX / 4)
		return -EOVERFLOW;
	impls[impl].run(&s, tokens_per_block * sizeof(int64_t), num_blocks, out);
	return (int64_t)num_blocks;
}

int64_t flexkv_hash_blocks(const int64_t *tokens, size_t num_tokens, size_t tokens_per_block,
			   const uint8_t *prefix, size_t prefix_len, uint64_t *out)
{
	return flexkv_hash_blocks_impl(best_impl(), tokens, num_tokens, tokens_per_block, prefix, prefix_len,
				       out);
}
