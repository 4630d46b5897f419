/*
 * shadowtrace: the output pipeline (chunks, encoder threads, writer)
 *
 * The vCPU side fills one chunk at a time (output.h) and hands full ones
 * over through chunk_queue. Each of 2..MAX_ENCODERS encoder threads takes
 * the oldest filled chunk, encodes it into its own buffer (u8 columns as
 * they are, u64 columns as byte planes of zigzag deltas, then every column
 * zstd compressed and the whole chunk packed as msgpack) and waits for its
 * turn (chunk seq == next_write) to append it to the file, so that chunks
 * are written in the order they were filled; then the chunk buffer goes
 * back to the free list. The header is written at open, the footer (the
 * counts of what was written) at close.
 */

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <glib.h>
#include <msgpack.h>
#include <msgpack/fbuffer.h>
#include <zstd.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include <qemu-plugin.h>

#include "trace_format.h"
#include "output.h"

#define MAX_ENCODERS    4

/* Chunk hand-off between the vCPU side and the encoder threads. */
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t full_cond;   /* a chunk to encode, or stop */
    pthread_cond_t free_cond;   /* a chunk buffer came back */
    pthread_cond_t turn_cond;   /* next_write moved on */
    Chunk *head, *tail;         /* filled, oldest first */
    Chunk *free;                /* empty */
    uint64_t next_seq;          /* seq of the next chunk handed off */
    uint64_t next_write;        /* seq of the next chunk to write */
    bool stop;
} __attribute__((aligned(CACHE_LINE))) ChunkQueue;

/*
 * An encoder thread: chunks are encoded and compressed in parallel, each
 * into its encoder's buffer, and written to the file strictly in order.
 */
typedef struct {
    pthread_t thread;
    bool running;
    ZSTD_CCtx *cctx;
    uint8_t *planes;            /* byte planes of a u64 column */
    uint8_t *zbuf;              /* compressed output */
    size_t zbuf_cap;
    uint32_t hist[256];         /* events per kind of the chunk */
    msgpack_sbuffer sbuf;       /* the packed chunk */
    msgpack_packer pk;
} __attribute__((aligned(CACHE_LINE))) Encoder;

/* What was written: updated by the encoder whose turn it is to write. */
typedef struct {
    bool failed;
    uint64_t chunks, events, dropped;
    uint64_t by_kind[256];
} __attribute__((aligned(CACHE_LINE))) OutStats;

Chunk *out_chunk;

static ChunkQueue chunk_queue = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .full_cond = PTHREAD_COND_INITIALIZER,
    .free_cond = PTHREAD_COND_INITIALIZER,
    .turn_cond = PTHREAD_COND_INITIALIZER,
};
static Encoder *encoders;
static unsigned int n_encoders;
static OutStats out_stats;

static const char *out_path;
static int out_level = 1;           /* zstd level */
static FILE *out_file;
static msgpack_packer file_pk;      /* header and footer, into out_file */

/* ---------------------------------------------------------------------- */
/* Chunk hand-off (vCPU side)                                             */

void out_chunk_submit(void)
{
    ChunkQueue *q = &chunk_queue;
    Chunk *c = out_chunk;

    pthread_mutex_lock(&q->lock);
    c->next = NULL;
    c->seq = q->next_seq++;
    if (q->tail) {
        q->tail->next = c;
    } else {
        q->head = c;
    }
    q->tail = c;
    pthread_cond_signal(&q->full_cond);
    /*
     * Block rather than drop when the encoders are behind. Under MTTCG the
     * caller holds the plugin's trace_lock while it waits here, so every
     * other vCPU that records waits too; that cannot deadlock, because the
     * encoders that free chunk buffers only ever take chunk_queue.lock
     * (never trace_lock), and a chunk in the queue is always taken by one
     * of them: they run until stop, which is set only after the last
     * submit (out_close).
     */
    while (!q->free) {
        pthread_cond_wait(&q->free_cond, &q->lock);
    }
    c = q->free;
    q->free = c->next;
    pthread_mutex_unlock(&q->lock);
    c->n = c->n_pages = c->n_markers = 0;
    out_chunk = c;
}

void out_flush(void)
{
    if (out_chunk->n) {
        out_chunk_submit();
    }
}

/* ---------------------------------------------------------------------- */
/* Encoding                                                               */

static bool pack_str(msgpack_packer *p, const char *s)
{
    size_t len = strlen(s);

    /* fbuffer_write fails on zero bytes (fwrite returns 0 items). */
    return msgpack_pack_str(p, len) == 0 &&
           (len == 0 || msgpack_pack_str_body(p, s, len) == 0);
}

/* Compress len bytes and pack them as a msgpack bin. */
static bool pack_zstd(Encoder *e, const void *data, size_t len)
{
    size_t z = ZSTD_compressCCtx(e->cctx, e->zbuf, e->zbuf_cap, data, len,
                                 out_level);

    if (ZSTD_isError(z)) {
        fprintf(stderr, "shadowtrace plugin: zstd: %s\n", ZSTD_getErrorName(z));
        return false;
    }
    return msgpack_pack_bin(&e->pk, z) == 0 &&
           msgpack_pack_bin_body(&e->pk, e->zbuf, z) == 0;
}

static inline uint64_t zigzag_delta(uint64_t v, uint64_t prev)
{
    uint64_t d = v - prev;

    return (d << 1) ^ (uint64_t)((int64_t)d >> 63);
}

#ifdef __SSE2__
/* Zigzag of (cur - prev) in both 64-bit lanes (SSE2 has no 64-bit sra). */
static inline __m128i zigzag_delta2(__m128i cur, __m128i prev)
{
    __m128i d = _mm_sub_epi64(cur, prev);
    __m128i sign = _mm_srai_epi32(_mm_shuffle_epi32(d, 0xf5), 31);

    return _mm_xor_si128(_mm_slli_epi64(d, 1), sign);
}

/*
 * Interleave the bytes of register k with those of register k + 4 (k < 4):
 * over 8 registers (128 bytes) that is a perfect shuffle, rotating the 7
 * bits of a byte's index left by one. Written out so that the 16 values
 * stay in registers.
 */
#define PERFECT_SHUFFLE(o, i) do {                                       \
        o##0 = _mm_unpacklo_epi8(i##0, i##4);                           \
        o##1 = _mm_unpackhi_epi8(i##0, i##4);                           \
        o##2 = _mm_unpacklo_epi8(i##1, i##5);                           \
        o##3 = _mm_unpackhi_epi8(i##1, i##5);                           \
        o##4 = _mm_unpacklo_epi8(i##2, i##6);                           \
        o##5 = _mm_unpackhi_epi8(i##2, i##6);                           \
        o##6 = _mm_unpacklo_epi8(i##3, i##7);                           \
        o##7 = _mm_unpackhi_epi8(i##3, i##7);                           \
    } while (0)

/* Zigzag deltas of values k*2 and k*2+1 of the block at s. */
#define LOAD_ZIGZAG(s, k)                                                \
    zigzag_delta2(_mm_loadu_si128((const __m128i *)((s) + 2 * (k))),    \
                  _mm_loadu_si128((const __m128i *)((s) + 2 * (k) - 1)))
#endif

/*
 * u64 column to byte planes (see replay/columns.py): delta against the
 * previous value, zigzag, then plane b holds byte b of every value.
 */
static void encode_planes(const uint64_t *v, uint8_t *p, uint32_t n)
{
    uint32_t i = 0;

#ifdef __SSE2__
    /*
     * 16 values at a time: 128 bytes indexed (value, byte); four perfect
     * shuffles make that (byte, value), so register b holds plane b.
     */
    for (; i + 16 <= n; i += 16) {
        const uint64_t *s = v + i;
        uint8_t *o = p + i;
        __m128i r0, r1, r2, r3, r4, r5, r6, r7;
        __m128i t0, t1, t2, t3, t4, t5, t6, t7;

        r0 = i ? LOAD_ZIGZAG(s, 0) :
             zigzag_delta2(_mm_loadu_si128((const __m128i *)s),
                           _mm_set_epi64x((long long)s[0], 0));
        r1 = LOAD_ZIGZAG(s, 1);
        r2 = LOAD_ZIGZAG(s, 2);
        r3 = LOAD_ZIGZAG(s, 3);
        r4 = LOAD_ZIGZAG(s, 4);
        r5 = LOAD_ZIGZAG(s, 5);
        r6 = LOAD_ZIGZAG(s, 6);
        r7 = LOAD_ZIGZAG(s, 7);
        PERFECT_SHUFFLE(t, r);
        PERFECT_SHUFFLE(r, t);
        PERFECT_SHUFFLE(t, r);
        PERFECT_SHUFFLE(r, t);
        _mm_storeu_si128((__m128i *)o, r0);
        _mm_storeu_si128((__m128i *)(o + (size_t)n), r1);
        _mm_storeu_si128((__m128i *)(o + 2 * (size_t)n), r2);
        _mm_storeu_si128((__m128i *)(o + 3 * (size_t)n), r3);
        _mm_storeu_si128((__m128i *)(o + 4 * (size_t)n), r4);
        _mm_storeu_si128((__m128i *)(o + 5 * (size_t)n), r5);
        _mm_storeu_si128((__m128i *)(o + 6 * (size_t)n), r6);
        _mm_storeu_si128((__m128i *)(o + 7 * (size_t)n), r7);
    }
#endif
    for (; i < n; i++) {
        uint64_t z = zigzag_delta(v[i], i ? v[i - 1] : 0);

        for (int b = 0; b < 8; b++) {
            p[(size_t)b * n + i] = (uint8_t)(z >> (8 * b));
        }
    }
}

/* Pack one marker text as a list of strings split on spaces. */
static bool pack_marker(msgpack_packer *p, const char *text)
{
    gchar **parts = g_strsplit(text, " ", -1);
    guint n = 0;
    bool ok;

    for (gchar **s = parts; *s; s++) {
        n += **s != '\0';
    }
    if (n == 0) {
        /* The reader wants a non-empty list: an empty marker is [""]. */
        ok = msgpack_pack_array(p, 1) == 0 && pack_str(p, "");
    } else {
        ok = msgpack_pack_array(p, n) == 0;
        for (gchar **s = parts; ok && *s; s++) {
            if (**s) {
                ok = pack_str(p, *s);
            }
        }
    }
    g_strfreev(parts);
    return ok;
}

/* Encode a chunk into the encoder's buffer. */
static bool encode_chunk(Encoder *e, const Chunk *c)
{
    const uint8_t *u8cols[ST_N_U8_COLUMNS] = { c->kind, c->vcpu, c->info };
    const uint64_t *u64cols[ST_N_U64_COLUMNS] = { c->va, c->pa, c->pc, c->val };
    msgpack_packer *p = &e->pk;
    bool ok;

    e->sbuf.size = 0;
    ok = msgpack_pack_map(p, 6) == 0 &&
         pack_str(p, ST_KEY_TYPE) && pack_str(p, ST_TYPE_CHUNK) &&
         pack_str(p, "seq") && msgpack_pack_uint64(p, c->seq) == 0 &&
         pack_str(p, "n") && msgpack_pack_uint64(p, c->n) == 0 &&
         pack_str(p, "cols") &&
         msgpack_pack_map(p, ST_N_U8_COLUMNS + ST_N_U64_COLUMNS) == 0;
    for (int i = 0; ok && i < ST_N_U8_COLUMNS; i++) {
        ok = pack_str(p, st_u8_columns[i]) && pack_zstd(e, u8cols[i], c->n);
    }
    for (int i = 0; ok && i < ST_N_U64_COLUMNS; i++) {
        encode_planes(u64cols[i], e->planes, c->n);
        ok = pack_str(p, st_u64_columns[i]) &&
             pack_zstd(e, e->planes, (size_t)c->n * 8);
    }
    ok = ok && pack_str(p, "pages") &&
         pack_zstd(e, c->pages, (size_t)c->n_pages * ST_PAGE_SIZE);
    ok = ok && pack_str(p, "markers") &&
         msgpack_pack_array(p, c->n_markers) == 0;
    for (uint32_t i = 0; ok && i < c->n_markers; i++) {
        ok = pack_marker(p, c->markers[i]);
    }

    /* Events per kind, four histograms so neighbours do not serialise. */
    {
        uint32_t h[4][256];
        uint32_t i = 0;

        memset(h, 0, sizeof(h));
        for (; i + 4 <= c->n; i += 4) {
            h[0][c->kind[i]]++;
            h[1][c->kind[i + 1]]++;
            h[2][c->kind[i + 2]]++;
            h[3][c->kind[i + 3]]++;
        }
        for (; i < c->n; i++) {
            h[0][c->kind[i]]++;
        }
        for (int k = 0; k < 256; k++) {
            e->hist[k] = h[0][k] + h[1][k] + h[2][k] + h[3][k];
        }
    }
    return ok;
}

/* ---------------------------------------------------------------------- */
/* Encoder threads and the writer                                         */

/* Write an encoded chunk (our turn) and count it, or count it dropped. */
static void write_chunk(Encoder *e, const Chunk *c, bool encoded)
{
    OutStats *s = &out_stats;

    if (!s->failed &&
        (!encoded ||
         fwrite(e->sbuf.data, 1, e->sbuf.size, out_file) != e->sbuf.size)) {
        s->failed = true;
        fprintf(stderr, "shadowtrace plugin: writing %s failed (%s): "
                "events from now on are dropped\n", out_path,
                encoded ? strerror(errno) : "encoding error");
    }
    if (s->failed) {
        s->dropped += c->n;
        return;
    }
    s->chunks++;
    s->events += c->n;
    for (int k = 0; k < 256; k++) {
        s->by_kind[k] += e->hist[k];
    }
}

static void *encoder_main(void *arg)
{
    ChunkQueue *q = &chunk_queue;
    Encoder *e = arg;

    for (;;) {
        Chunk *c;
        bool encoded;

        pthread_mutex_lock(&q->lock);
        while (!q->head && !q->stop) {
            pthread_cond_wait(&q->full_cond, &q->lock);
        }
        c = q->head;
        if (!c) {
            pthread_mutex_unlock(&q->lock);
            break;
        }
        q->head = c->next;
        if (!q->head) {
            q->tail = NULL;
        }
        pthread_mutex_unlock(&q->lock);

        encoded = encode_chunk(e, c);

        /* Chunks are taken in order; wait for the earlier ones' writes. */
        pthread_mutex_lock(&q->lock);
        while (q->next_write != c->seq) {
            pthread_cond_wait(&q->turn_cond, &q->lock);
        }
        pthread_mutex_unlock(&q->lock);

        write_chunk(e, c, encoded);

        pthread_mutex_lock(&q->lock);
        q->next_write++;
        pthread_cond_broadcast(&q->turn_cond);
        c->next = q->free;
        q->free = c;
        pthread_cond_signal(&q->free_cond);
        pthread_mutex_unlock(&q->lock);
    }
    return NULL;
}

/* Stop the encoders once the queue is empty and wait for them. */
static void stop_encoders(void)
{
    pthread_mutex_lock(&chunk_queue.lock);
    chunk_queue.stop = true;
    pthread_cond_broadcast(&chunk_queue.full_cond);
    pthread_mutex_unlock(&chunk_queue.lock);
    for (unsigned int i = 0; i < n_encoders; i++) {
        if (encoders[i].running) {
            pthread_join(encoders[i].thread, NULL);
            encoders[i].running = false;
        }
    }
}

/* ---------------------------------------------------------------------- */
/* Header and footer                                                      */

static bool write_header(const TraceHeader *h)
{
    msgpack_packer *p = &file_pk;
    bool ok = msgpack_pack_map(p, 9) == 0 &&
              pack_str(p, ST_KEY_TYPE) && pack_str(p, ST_TYPE_HEADER) &&
              pack_str(p, "magic") && pack_str(p, ST_MAGIC) &&
              pack_str(p, "version") && msgpack_pack_uint64(p, ST_VERSION) == 0 &&
              pack_str(p, "qemu") && pack_str(p, h->qemu) &&
              pack_str(p, "options") &&
              msgpack_pack_map(p, h->options->len / 2) == 0;
    for (guint j = 0; ok && j < h->options->len; j++) {
        ok = pack_str(p, g_ptr_array_index(h->options, j));
    }
    ok = ok &&
         pack_str(p, "kernel") && pack_str(p, h->kernel) &&
         pack_str(p, "ram_bytes") && msgpack_pack_uint64(p, h->ram_bytes) == 0 &&
         pack_str(p, "vcpus") && msgpack_pack_int64(p, h->vcpus) == 0 &&
         pack_str(p, "scenario") && pack_str(p, h->scenario);
    return ok && fflush(out_file) == 0;
}

static bool write_footer(uint64_t seen, uint64_t dedup)
{
    const OutStats *s = &out_stats;
    msgpack_packer *p = &file_pk;
    unsigned int kinds = 0;
    uint64_t n_recorded, n_tables;

    n_recorded = s->by_kind[ST_KIND_READ] + s->by_kind[ST_KIND_WRITE] +
                 s->by_kind[ST_KIND_FETCH];
    n_tables = s->by_kind[ST_KIND_SNAPSHOT];
    for (unsigned int k = 0; k < 256; k++) {
        kinds += s->by_kind[k] != 0;
    }
    bool ok = msgpack_pack_map(p, 9) == 0 &&
              pack_str(p, ST_KEY_TYPE) && pack_str(p, ST_TYPE_FOOTER) &&
              pack_str(p, "chunks") && msgpack_pack_uint64(p, s->chunks) == 0 &&
              pack_str(p, "events") && msgpack_pack_uint64(p, s->events) == 0 &&
              pack_str(p, "by_kind") && msgpack_pack_map(p, kinds) == 0;
    for (unsigned int k = 0; ok && k < 256; k++) {
        if (s->by_kind[k]) {
            ok = msgpack_pack_uint64(p, k) == 0 &&
                 msgpack_pack_uint64(p, s->by_kind[k]) == 0;
        }
    }
    ok = ok &&
         pack_str(p, "seen") && msgpack_pack_uint64(p, seen) == 0 &&
         pack_str(p, "recorded") && msgpack_pack_uint64(p, n_recorded) == 0 &&
         pack_str(p, "deduplicated") && msgpack_pack_uint64(p, dedup) == 0 &&
         pack_str(p, "dropped") && msgpack_pack_uint64(p, s->dropped) == 0 &&
         pack_str(p, "tables") && msgpack_pack_uint64(p, n_tables) == 0;
    {
        g_autofree gchar *msg = g_strdup_printf(
            "shadowtrace: %" PRIu64 " events in %" PRIu64 " chunks, %" PRIu64
            " accesses seen, %" PRIu64 " recorded, %" PRIu64 " deduplicated, %"
            PRIu64 " dropped, %" PRIu64 " tables\n", s->events, s->chunks, seen,
            n_recorded, dedup, s->dropped, n_tables);
        qemu_plugin_outs(msg);
    }
    return ok;
}

/* ---------------------------------------------------------------------- */
/* Open and close                                                         */

/* Free what out_open made (encoders already stopped) and close the file. */
static void free_all(void)
{
    for (unsigned int i = 0; i < n_encoders; i++) {
        Encoder *e = &encoders[i];

        ZSTD_freeCCtx(e->cctx);
        g_free(e->planes);
        g_free(e->zbuf);
        msgpack_sbuffer_destroy(&e->sbuf);
    }
    g_free(encoders);
    encoders = NULL;
    n_encoders = 0;
    while (chunk_queue.free) {
        Chunk *c = chunk_queue.free;

        chunk_queue.free = c->next;
        g_free(c);
    }
    g_free(out_chunk);
    out_chunk = NULL;
    if (out_file) {
        fclose(out_file);
        out_file = NULL;
    }
}

char *out_open(const char *path, int level, const TraceHeader *h)
{
    size_t u64_cap = (size_t)ST_CHUNK_EVENTS * 8;
    long ncpu;

    out_path = path;
    out_level = level;
    out_file = fopen(path, "wb");
    if (!out_file) {
        return g_strdup_printf("cannot open out=%s: %s", path, strerror(errno));
    }
    msgpack_packer_init(&file_pk, out_file, msgpack_fbuffer_write);
    if (!write_header(h)) {
        char *msg = g_strdup_printf("cannot write out=%s: %s", path,
                                    strerror(errno));
        free_all();
        return msg;
    }

    /*
     * One encoder per CPU (2..MAX_ENCODERS: even on two CPUs a second one
     * uses the time the vCPU thread waits), two spare chunks.
     */
    ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    n_encoders = (unsigned int)CLAMP(ncpu, 2, MAX_ENCODERS);
    for (unsigned int i = 0; i < n_encoders + 2; i++) {
        Chunk *c = g_new(Chunk, 1);
        c->n = c->n_pages = c->n_markers = 0;
        c->next = chunk_queue.free;
        chunk_queue.free = c;
    }
    out_chunk = chunk_queue.free;
    chunk_queue.free = out_chunk->next;
    encoders = g_new0(Encoder, n_encoders);
    for (unsigned int i = 0; i < n_encoders; i++) {
        Encoder *e = &encoders[i];

        e->cctx = ZSTD_createCCtx();
        e->planes = g_malloc(u64_cap);
        e->zbuf_cap = ZSTD_compressBound(MAX(u64_cap,
                                             (size_t)CHUNK_PAGES * ST_PAGE_SIZE));
        e->zbuf = g_malloc(e->zbuf_cap);
        msgpack_sbuffer_init(&e->sbuf);
        msgpack_packer_init(&e->pk, &e->sbuf, msgpack_sbuffer_write);
        if (!e->cctx || pthread_create(&e->thread, NULL, encoder_main, e) != 0) {
            stop_encoders();
            free_all();
            return g_strdup("cannot start the encoder threads");
        }
        e->running = true;
    }
    return NULL;
}

void out_drain(void)
{
    stop_encoders();
}

void out_close(uint64_t seen, uint64_t deduplicated)
{
    if (out_stats.failed) {
        fprintf(stderr, "shadowtrace plugin: %s has no footer (write error "
                "above): the trace is truncated\n", out_path);
    } else if (!write_footer(seen, deduplicated) || fflush(out_file) != 0) {
        fprintf(stderr, "shadowtrace plugin: writing the footer of %s "
                "failed: %s\n", out_path, strerror(errno));
    }
    fclose(out_file);
    out_file = NULL;
}
