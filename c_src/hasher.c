#define XXH_INLINE_ALL
#include <errno.h>
#include <xxhash.h>

#include "hasher.h"

int64_t flexkv_hash_blocks(const int64_t *tokens, size_t num_tokens, size_t tokens_per_block,
                           const uint8_t *prefix, size_t prefix_len, uint64_t *out)
{
	XXH3_state_t state;
	size_t num_blocks, i;
	const size_t block_bytes = tokens_per_block * sizeof(int64_t);

	if (tokens_per_block == 0 || (num_tokens && !tokens) || (prefix_len && !prefix))
		return -EINVAL;
	num_blocks = num_tokens / tokens_per_block;
	if (num_blocks && !out)
		return -EINVAL;
	if (XXH3_64bits_reset(&state) != XXH_OK)
		return -ENOMEM;
	if (prefix_len && XXH3_64bits_update(&state, prefix, prefix_len) != XXH_OK)
		return -EINVAL;
	for (i = 0; i < num_blocks; i++) {
		if (XXH3_64bits_update(&state, tokens + i * tokens_per_block, block_bytes) != XXH_OK)
			return -EINVAL;
		out[i] = XXH3_64bits_digest(&state);
	}
	return (int64_t)num_blocks;
}
