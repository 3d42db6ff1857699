/*
 * SM copy kernel for flexkv's STAGED and KERNEL paths (compiled to PTX at build time, loaded with
 * cuModuleLoadData at run time; see c_src/cudacopy_kernels.c).
 *
 * Work item = (pair i, chunk c). The engine chunk lives at bases[c] + engine_ids[i] * block_stride;
 * the pool chunk at pool_base + slot * pool_block_bytes + offsets[c], where slot = pool_ids[i], or i
 * when pool_ids is 0 (a staging buffer packed in pair order). Items are spread over a persistent
 * grid; each CTA moves one chunk at a time in 16-byte words, four loads in flight per thread, so
 * reads of host memory over PCIe overlap. Every address and chunk_bytes must be 16-byte aligned
 * (the Python wrapper checks this before choosing a kernel path).
 */
#include <stdint.h>

#define UNROLL 4

__device__ __forceinline__ void copy_chunk(uint4 *__restrict__ dst, const uint4 *__restrict__ src, uint64_t words)
{
	const uint64_t step = (uint64_t)blockDim.x * UNROLL;

	for (uint64_t base = threadIdx.x; base < words; base += step) {
		uint4 v[UNROLL];
#pragma unroll
		for (int k = 0; k < UNROLL; k++) {
			uint64_t w = base + (uint64_t)k * blockDim.x;
			if (w < words)
				v[k] = src[w];
		}
#pragma unroll
		for (int k = 0; k < UNROLL; k++) {
			uint64_t w = base + (uint64_t)k * blockDim.x;
			if (w < words)
				dst[w] = v[k];
		}
	}
}

extern "C" __global__ void fkv_copy_chunks(uint64_t bases, uint64_t offsets, uint64_t engine_ids,
					   uint64_t pool_ids, uint64_t num_chunks, uint64_t num_pairs,
					   uint64_t block_stride, uint64_t chunk_bytes, uint64_t pool_base,
					   uint64_t pool_block_bytes, int to_pool)
{
	const uint64_t *base_of = (const uint64_t *)bases;
	const uint64_t *off_of = (const uint64_t *)offsets;
	const int64_t *eng = (const int64_t *)engine_ids;
	const int64_t *slot_of = (const int64_t *)pool_ids;
	const uint64_t items = num_pairs * num_chunks;
	const uint64_t words = chunk_bytes / 16;

	for (uint64_t item = blockIdx.x; item < items; item += gridDim.x) {
		uint64_t i = item / num_chunks, c = item % num_chunks;
		uint64_t slot = slot_of ? (uint64_t)slot_of[i] : i;
		uint64_t e = base_of[c] + (uint64_t)eng[i] * block_stride;
		uint64_t p = pool_base + slot * pool_block_bytes + off_of[c];

		if (to_pool)
			copy_chunk((uint4 *)p, (const uint4 *)e, words);
		else
			copy_chunk((uint4 *)e, (const uint4 *)p, words);
	}
}
