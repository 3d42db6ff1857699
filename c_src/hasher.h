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
 * entries), or -EINVAL / -ENOMEM.
 */
int64_t flexkv_hash_blocks(const int64_t *tokens, size_t num_tokens, size_t tokens_per_block,
                           const uint8_t *prefix, size_t prefix_len, uint64_t *out);

#endif
