/* Block hasher: chained prefix hashes over int64 token ids. */
#ifndef FLEXKV_HASHER_H
#define FLEXKV_HASHER_H
#include <stddef.h>
#include <stdint.h>

/*
 * Hash every whole block of `tokens`: out[i] is the XXH3-64 digest of
 * prefix || tokens[0 .. (i+1)*tokens_per_block) taken from one streaming state, so block i's hash
 * names the whole prefix up to the end of block i. The trailing partial block is not hashed.
 * `prefix` (the encoded namespace, may be NULL when prefix_len is 0) is fed first.
 * Returns the number of blocks written to `out` (it must hold num_tokens / tokens_per_block
 * entries), or -EINVAL / -EOVERFLOW. Uses the fastest implementation this CPU supports.
 */
int64_t flexkv_hash_blocks(const int64_t *tokens, size_t num_tokens, size_t tokens_per_block,
                           const uint8_t *prefix, size_t prefix_len, uint64_t *out);

/*
 * The same with implementation number `impl` (0 = portable C, then SIMD ones, fastest last), for
 * tests and benchmarks. All implementations give identical output. Returns -EINVAL for an unknown
 * number and -EOPNOTSUPP when this CPU lacks the instructions it needs.
 */
int64_t flexkv_hash_blocks_impl(int impl, const int64_t *tokens, size_t num_tokens, size_t tokens_per_block,
                                const uint8_t *prefix, size_t prefix_len, uint64_t *out);

/* Name of implementation `impl` ("scalar", "sse2", "avx2", "avx512"), NULL past the last one. */
const char *flexkv_hash_impl_name(int impl);

/* 1 when this CPU can run implementation `impl`, 0 when not, -EINVAL for an unknown number. */
int flexkv_hash_impl_supported(int impl);

#endif
