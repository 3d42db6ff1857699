// SPDX-License-Identifier: Apache-2.0
/*
 * Block I/O engine on liburing. One context per in-flight I/O rides in the SQE's user_data; a
 * context stays owned by its request until the request finished (all bytes moved, or failed), so
 * short transfers and -EAGAIN are resubmitted from the same context. At most `depth` contexts
 * exist, so neither the SQ (depth entries) nor the CQ (2 * depth) can overflow.
 */
#include <errno.h>
#include <liburing.h>
#include <stdlib.h>
#include <string.h>

#include "uring.h"

#define MAX_RETRIES 64 /* -EAGAIN / -EINTR resubmissions without progress, per request */

struct io_ctx {
	uint64_t done; /* bytes moved so far */
	size_t index; /* request index in the batch */
	uint32_t retries; /* resubmissions since the last progress */
};

struct flexkv_uring {
	struct io_uring ring;
	uint32_t depth;
	int broken; /* a failed io_uring_enter left the ring in an unknown state */
	uint32_t num_files; /* registered file table size, 0 when none */
	struct io_ctx *ctxs;
	struct io_ctx **idle; /* stack of idle contexts */
	uint32_t num_idle;
	struct io_ctx **requeue; /* contexts whose remainder must be resubmitted */
	uint32_t num_requeue;
};

struct batch {
	uint32_t op;
	size_t n;
	size_t next; /* next request to start */
	const int *fds;
	const uint64_t *offsets;
	const uint64_t *addrs;
	uint64_t len;
	int32_t *results;
	int64_t num_failed;
};

int flexkv_uring_create(uint32_t depth, uint32_t setup_flags, struct flexkv_uring **out)
{
	struct flexkv_uring *r;
	uint32_t i;
	int ret;

	if (!out || depth == 0 || depth > FLEXKV_URING_MAX_DEPTH)
		return -EINVAL;
	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->ctxs = calloc(depth, sizeof(*r->ctxs));
	r->idle = calloc(depth, sizeof(*r->idle));
	r->requeue = calloc(depth, sizeof(*r->requeue));
	if (!r->ctxs || !r->idle || !r->requeue) {
		ret = -ENOMEM;
		goto err_free;
	}
	ret = io_uring_queue_init(depth, &r->ring, setup_flags);
	if (ret < 0)
		goto err_free;
	r->depth = depth;
	for (i = 0; i < depth; i++)
		r->idle[i] = &r->ctxs[i];
	r->num_idle = depth;
	*out = r;
	return 0;

err_free:
	free(r->requeue);
	free(r->idle);
	free(r->ctxs);
	free(r);
	return ret;
}

void flexkv_uring_destroy(struct flexkv_uring *r)
{
	if (!r)
		return;
	io_uring_queue_exit(&r->ring);
	free(r->requeue);
	free(r->idle);
	free(r->ctxs);
	free(r);
}

int flexkv_uring_register_files(struct flexkv_uring *r, const int *fds, uint32_t n)
{
	int ret;

	if (!r || !fds || n == 0)
		return -EINVAL;
	if (r->broken)
		return -EIO;
	if (r->num_files) {
		ret = io_uring_unregister_files(&r->ring);
		if (ret < 0)
			return ret;
		r->num_files = 0;
	}
	ret = io_uring_register_files(&r->ring, fds, n);
	if (ret < 0)
		return ret;
	r->num_files = n;
	return 0;
}

int flexkv_uring_unregister_files(struct flexkv_uring *r)
{
	int ret;

	if (!r)
		return -EINVAL;
	if (!r->num_files)
		return 0;
	ret = io_uring_unregister_files(&r->ring);
	if (ret < 0)
		return ret;
	r->num_files = 0;
	return 0;
}

static void finish(struct flexkv_uring *r, struct batch *b, struct io_ctx *ctx, int err)
{
	b->results[ctx->index] = err;
	if (err)
		b->num_failed++;
	r->idle[r->num_idle++] = ctx;
}

/* Queue one SQE for the remainder of ctx's request. The SQ never runs out (see top comment). */
static void prep_one(struct flexkv_uring *r, const struct batch *b, struct io_ctx *ctx)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
	const size_t i = ctx->index;
	void *addr = (void *)(uintptr_t)(b->addrs[i] + ctx->done);
	const unsigned int nbytes = (unsigned int)(b->len - ctx->done);
	const uint64_t offset = b->offsets[i] + ctx->done;

	if (b->op & FLEXKV_URING_WRITE)
		io_uring_prep_write(sqe, b->fds[i], addr, nbytes, offset);
	else
		io_uring_prep_read(sqe, b->fds[i], addr, nbytes, offset);
	if (b->op & FLEXKV_URING_FIXED_FILE)
		sqe->flags |= IOSQE_FIXED_FILE;
	io_uring_sqe_set_data(sqe, ctx);
}

static int bad_fd(const struct flexkv_uring *r, const struct batch *b, size_t i)
{
	if (b->fds[i] < 0)
		return 1;
	return (b->op & FLEXKV_URING_FIXED_FILE) && (uint32_t)b->fds[i] >= r->num_files;
}

/* Resubmit requeued remainders first, then start new requests while contexts are idle. */
static void fill(struct flexkv_uring *r, struct batch *b)
{
	struct io_ctx *ctx;

	while (r->num_requeue)
		prep_one(r, b, r->requeue[--r->num_requeue]);
	while (b->next < b->n && r->num_idle) {
		ctx = r->idle[--r->num_idle];
		ctx->index = b->next++;
		ctx->done = 0;
		ctx->retries = 0;
		if (bad_fd(r, b, ctx->index)) {
			finish(r, b, ctx, -EBADF);
			continue;
		}
		prep_one(r, b, ctx);
	}
}

static void complete_one(struct flexkv_uring *r, struct batch *b, struct io_ctx *ctx, int res)
{
	if (res > 0) {
		ctx->done += (uint64_t)res;
		ctx->retries = 0;
		if (ctx->done >= b->len)
			finish(r, b, ctx, 0);
		else
			r->requeue[r->num_requeue++] = ctx; /* short I/O: move the rest */
	} else if (res == 0) {
		finish(r, b, ctx, (b->op & FLEXKV_URING_WRITE) ? -EIO : -ENODATA);
	} else if ((res == -EAGAIN || res == -EINTR) && ++ctx->retries <= MAX_RETRIES) {
		r->requeue[r->num_requeue++] = ctx;
	} else {
		finish(r, b, ctx, res);
	}
}

static unsigned int reap(struct flexkv_uring *r, struct batch *b)
{
	struct io_uring_cqe *cqe;
	unsigned int head, count = 0;

	io_uring_for_each_cqe(&r->ring, head, cqe) {
		complete_one(r, b, io_uring_cqe_get_data(cqe), cqe->res);
		count++;
	}
	io_uring_cq_advance(&r->ring, count);
	return count;
}

static int check_args(const struct flexkv_uring *r, uint32_t op, size_t n, const int *fds,
		      const uint64_t *offsets, const uint64_t *addrs, uint64_t len, int32_t *results)
{
	if (!r || (op & ~(FLEXKV_URING_WRITE | FLEXKV_URING_FIXED_FILE)))
		return -EINVAL;
	if (r->broken)
		return -EIO;
	if (n && (!fds || !offsets || !addrs || !results))
		return -EINVAL;
	if (len == 0 || len > UINT32_MAX)
		return -EINVAL;
	return 0;
}

int64_t flexkv_uring_rw(struct flexkv_uring *r, uint32_t op, size_t n, const int *fds,
			const uint64_t *offsets, const uint64_t *addrs, uint64_t len, int32_t *results)
{
	struct batch b = {
		.op = op, .n = n, .fds = fds, .offsets = offsets, .addrs = addrs,
		.len = len, .results = results,
	};
	int ret = check_args(r, op, n, fds, offsets, addrs, len, results);

	if (ret < 0)
		return ret;
	for (;;) {
		fill(r, &b);
		if (r->num_idle == r->depth)
			break; /* nothing in flight and nothing left to start */
		ret = io_uring_submit_and_wait(&r->ring, 1);
		if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
			r->broken = 1;
			return ret;
		}
		reap(r, &b);
	}
	return b.num_failed;
}
