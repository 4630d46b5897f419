/*
 * shadowtrace: the output pipeline
 *
 * Events go into one chunk buffer (out_chunk): one total order. A full
 * chunk is handed to encoder threads that delta/zigzag/byte-plane encode
 * and zstd compress its columns in parallel and append the packed chunks
 * to the trace strictly in order (replay/format.py, docs/trace-format.md).
 * When no chunk buffer is free the recording side waits rather than
 * dropping events; it never allocates.
 *
 * The recording side (out_emit, out_add_page, out_add_marker,
 * out_chunk_submit, out_flush) must be serialised by the caller: the
 * plugin's trace_lock under MTTCG, QEMU's one vCPU thread otherwise.
 */

#ifndef SHADOWTRACE_OUTPUT_H
#define SHADOWTRACE_OUTPUT_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include <glib.h>

#include "trace_format.h"

#define CACHE_LINE      64

/* Chunk buffers */
#define CHUNK_PAGES     1024    /* snapshots per chunk, 4 MiB */
#define CHUNK_MARKERS   64

/* One chunk of events, columns as arrays. */
typedef struct Chunk {
    struct Chunk *next;
    uint64_t seq;
    uint32_t n, n_pages, n_markers;
    uint8_t kind[ST_CHUNK_EVENTS];
    uint8_t vcpu[ST_CHUNK_EVENTS];
    uint8_t info[ST_CHUNK_EVENTS];
    uint64_t va[ST_CHUNK_EVENTS];
    uint64_t pa[ST_CHUNK_EVENTS];
    uint64_t pc[ST_CHUNK_EVENTS];
    uint64_t val[ST_CHUNK_EVENTS];
    char markers[CHUNK_MARKERS][ST_MARKER_MAX_LEN + 1];
    uint8_t pages[CHUNK_PAGES * ST_PAGE_SIZE];
} Chunk;

/* What the trace header says besides magic and version. */
typedef struct {
    const char *qemu, *kernel, *scenario;
    int64_t vcpus;
    uint64_t ram_bytes;
    const GPtrArray *options;   /* key, value, key, value, ... */
} TraceHeader;

/* The chunk being filled (recording side only). */
extern Chunk *out_chunk;

/*
 * Create the trace at path, write its header, start the encoders (zstd
 * level `level`). NULL on success, else a message (g_free it); then
 * nothing is left running.
 */
char *out_open(const char *path, int level, const TraceHeader *h);

/* Hand the current chunk to the encoders and take a free one (may wait). */
void out_chunk_submit(void);

/* Submit the current chunk if it holds anything (at exit). */
void out_flush(void);

/*
 * At exit, after out_flush (from any thread): wait until the encoders
 * have written every submitted chunk and stop them.
 */
void out_drain(void);

/*
 * Then write the footer (seen/deduplicated: the vCPUs' access counts) and
 * close the trace.
 */
void out_close(uint64_t seen, uint64_t deduplicated);

/* Append one event. Always has room: a full chunk is submitted. */
static inline void out_emit(uint8_t kind, unsigned int vcpu, uint8_t info,
                            uint64_t va, uint64_t pa, uint64_t pc,
                            uint64_t val)
{
    Chunk *c = out_chunk;
    uint32_t i = c->n;

    c->kind[i] = kind;
    c->vcpu[i] = (uint8_t)vcpu;
    c->info[i] = info;
    c->va[i] = va;
    c->pa[i] = pa;
    c->pc[i] = pc;
    c->val[i] = val;
    c->n = i + 1;
    if (c->n == ST_CHUNK_EVENTS) {
        out_chunk_submit();
    }
}

/*
 * Copy one page into the current chunk (submitting it first when its
 * pages are full); *idx is its index there, for the SNAPSHOT event that
 * must follow. Returns the copy, which stays valid until that event.
 */
static inline const uint8_t *out_add_page(const uint8_t *src, uint32_t *idx)
{
    uint8_t *dst;

    if (out_chunk->n_pages == CHUNK_PAGES) {
        out_chunk_submit();
    }
    *idx = out_chunk->n_pages++;
    dst = out_chunk->pages + (size_t)*idx * ST_PAGE_SIZE;
    memcpy(dst, src, ST_PAGE_SIZE);
    return dst;
}

/* Copy one marker text into the current chunk; returns its index. */
static inline uint32_t out_add_marker(const char text[ST_MARKER_MAX_LEN + 1])
{
    if (out_chunk->n_markers == CHUNK_MARKERS) {
        out_chunk_submit();
    }
    memcpy(out_chunk->markers[out_chunk->n_markers], text,
           ST_MARKER_MAX_LEN + 1);
    return out_chunk->n_markers++;
}

#endif
