/*
 * shadowtrace: record guest memory accesses and page-table state
 *
 * A QEMU TCG plugin (system emulation, x86-64 guests) that writes what a
 * Linux guest does to memory and to its page tables, so that the Python
 * replayer (replay/) can run the trace through a model of Xen's shadow
 * paging. The trace format is defined once, in replay/format.py; this file
 * only uses the ST_* constants of the header generated from it.
 *
 * The model
 * ---------
 * Capture window. Recording happens inside a window: window=all opens it
 * when the first vCPU runs and never closes it; window=markers opens it at
 * the guest's "start" marker and closes it at "stop". While the window is
 * closed no memory callback is registered at all, so the guest runs at
 * nearly plain TCG speed: only the rare instructions we must always follow
 * (mov to CR0/CR3/CR4, CPUID, INVLPG, INVPCID) get an execution callback.
 * Opening or closing the window calls qemu_plugin_reset(), which flushes
 * the translation cache; vcpu_tb_trans() then re-instruments every block
 * for the new state. A few instructions right after the marker run from
 * blocks translated for the old state: that is accepted.
 *
 * Events. Inside the window every load and store becomes a READ or WRITE
 * event (va; pa from QEMU's own translation; pc of the instruction), every
 * executed block a FETCH of the page it starts on (and one more when it
 * ends on the next page), with the pa from our own walk of the guest page
 * tables. "User mode" is decided from the pc: Linux keeps user code in the
 * lower half of the address space (pc < 0x0000800000000000).
 *
 * Page tables. Guest RAM is a memory-backend-file that we mmap read-only:
 * a file offset is a guest-physical address, so we can walk the guest's
 * 4-level tables ourselves. A bitmap marks the frames we track as tables.
 * A root (CR3) is snapshotted with its whole reachable tree the first time
 * we see it in the window; every recorded access walks its VA again and
 * snapshots any frame found untracked on the path. A store into a tracked
 * frame is followed by one TABLE_WRITE per 8-byte entry it touched, read
 * back from RAM (memory callbacks run after the access); an entry that
 * becomes present and points to an untracked table gets its subtree
 * snapshotted. The bitmap is cleared whenever a window opens, since the
 * replayer then forgets everything it knew. Walks are only made once a
 * vCPU runs in long mode (followed through CR0 writes and EFER), since
 * before that CR3 does not point at 4-level tables.
 *
 * Dedup. With dedup=on an access is dropped when the same vCPU already made
 * one of the same kind (READ/WRITE/FETCH, user/kernel) to the same 4 KiB
 * page within the current epoch. A global epoch is bumped by every event
 * that can change a translation: CR3 writes on any vCPU, TABLE_WRITEs,
 * INVLPG, INVPCID, CR0/CR4 writes and window changes. Each vCPU has a
 * direct-mapped cache of (page, kind) -> epoch; a miss only records.
 * Stores into tracked frames are never dropped.
 *
 * Two QEMU 10.0 facts the plugin API does not hide:
 *  - Blocks are position independent on x86-64 (CF_PCREL): one translation
 *    serves every virtual address of its physical code, and the addresses
 *    given at translation are those of the first. block_pc() finds the
 *    address a block really runs at (see there), and the pc of every event
 *    is corrected by the same delta.
 *  - With -accel tcg,thread=single and -smp > 1 the vcpu_index passed to
 *    callbacks is that of the vCPU that translated the block, not of the
 *    one running it. cur_vcpu() works around it (see there).
 *
 * Output. Events go into one global chunk buffer: one total order. Its
 * lock, trace_lock, is taken whenever the machine has more than one vCPU,
 * decided at install before any vCPU runs; with one vCPU callbacks are
 * serialised already. A full chunk is handed
 * to encoder threads that delta/zigzag/byte-plane encode and zstd compress
 * the columns in parallel and append the packed chunks to the file in
 * order. When no chunk buffer is free the vCPU waits rather than dropping
 * events. Execution callbacks never allocate.
 */

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
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

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

/* x86-64 paging */
#define PTE_P           0x1ULL
#define PTE_PS          0x80ULL
#define PTE_ADDR        0x000ffffffffff000ULL
#define PTE_ADDR_1G     0x000fffffc0000000ULL
#define PTE_ADDR_2M     0x000fffffffe00000ULL
#define CR0_PG          (1ULL << 31)
#define EFER_LME        (1ULL << 8)
#define EFER_LMA        (1ULL << 10)
#define PAGE_SHIFT      12
#define PAGE_MASK       (~(uint64_t)(ST_PAGE_SIZE - 1))
/* Linux puts user space in the lower half: our user-mode test. */
#define USER_TOP        0x0000800000000000ULL
/* Guest RAM readable through the backend file: the pc machine keeps it
 * below 3 GiB (file offset == guest-physical address). */
#define LOW_RAM_LIMIT   0xc0000000ULL
/* pa of a FETCH whose page our walk could not translate */
#define PA_UNKNOWN      UINT64_MAX

/* Chunk buffers */
#define MAX_ENCODERS    4
#define CHUNK_PAGES     1024    /* snapshots per chunk, 4 MiB */
#define CHUNK_MARKERS   64

#define CACHE_LINE      64

/* Dedup cache per vCPU */
#define DEDUP_BITS      12
#define DEDUP_SLOTS     (1u << DEDUP_BITS)
#define FETCH_SLOTS     64
#define PC_SLOTS        256

/* Instruction kinds that get an execution callback */
enum { OP_CPUID = 1, OP_MOV_CR, OP_INVLPG, OP_INVPCID };
#define BASE_NONE       (-1)
#define BASE_RIP        16
enum { SEG_NONE = 0, SEG_FS, SEG_GS };

/* Decoded special instruction (interned, passed as callback userdata). */
typedef struct {
    uint64_t pc;        /* the instruction */
    int32_t disp;
    uint8_t len;        /* instruction length, for RIP-relative operands */
    uint8_t op;
    uint8_t cr;         /* OP_MOV_CR: control register number */
    int8_t reg;         /* GPR: mov source, INVPCID type */
    int8_t base;        /* memory operand: GPR, BASE_RIP or BASE_NONE */
    int8_t index;       /* GPR or BASE_NONE */
    uint8_t scale;
    uint8_t addr32;
    uint8_t seg;
} InsnDesc;

/* A translated block (interned, passed as callback userdata). */
typedef struct {
    uint64_t va;        /* virtual address at translation */
    uint64_t pa;        /* its guest-physical address, PA_UNKNOWN if not RAM */
    uint64_t pa2;       /* that of its last instruction */
    bool two_pages;     /* ends on the next page */
} TbDesc;

typedef struct {
    const TbDesc *tb;
    uint64_t epoch;
    uint64_t delta;     /* run-time minus translation-time address */
} PcSlot;

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

typedef struct {
    uint64_t page;      /* page + 1; 0 = empty */
    uint64_t epoch;
    uint64_t pa;
} FetchSlot;

typedef struct {
    uint64_t key;       /* page | kind << 1 | user; 0 = empty */
    uint64_t epoch;
} DedupSlot;

typedef struct {
    struct qemu_plugin_register *gpr[16];
    struct qemu_plugin_register *reg_cr0, *reg_cr3, *reg_cr4, *reg_efer;
    struct qemu_plugin_register *reg_fs_base, *reg_gs_base, *reg_rip;
    GByteArray *rbuf;       /* preallocated: register reads do not allocate */
    uint64_t cr3;           /* last CR3 written (or read) */
    uint64_t cr4;
    bool cr3_known;
    bool lm;                /* 4-level paging is on: walks are meaningful */
    bool started;
    uint64_t pc_delta;      /* run-time minus translation-time pc, this block */
    uint64_t seen, deduplicated;
    /*
     * Walk caches, valid for one epoch: within an epoch no table on a
     * walked path can change (that would be a TABLE_WRITE, which bumps
     * the epoch), and after a walk every frame on the path is tracked.
     */
    uint64_t walk_region;   /* (va >> 21) + 1 of the last tracking walk */
    uint64_t walk_epoch;
    FetchSlot fetch[FETCH_SLOTS];   /* page -> pa for FETCH */
    PcSlot pcs[PC_SLOTS];           /* block -> run-time address */
    DedupSlot mru[8];               /* last page per kind and mode */
    DedupSlot dedup[DEDUP_SLOTS];
} __attribute__((aligned(CACHE_LINE))) VCpu;

/* Options */
static const char *opt_out, *opt_ram;
static uint64_t opt_ramsize;
static bool opt_window_all;
static bool opt_window_none;   /* window=none: never open (benchmarks) */
static bool opt_dedup = true;
static int opt_level = 1;
static GPtrArray *opt_pairs;        /* key, value, key, value, ... */
static const char *hdr_scenario = "", *hdr_kernel = "", *hdr_qemu = "";
static int64_t hdr_vcpus = -1;

/* Plugin state */
static qemu_plugin_id_t plugin_id;
static const uint8_t *ram;          /* guest RAM, read-only */
static uint64_t ram_limit;          /* readable bytes of it */
static uint64_t *tracked;           /* bitmap of table frames */
static uint8_t *frame_level;        /* 4..1: level of a tracked frame */
static VCpu *vcpus;
static unsigned int n_vcpus;
static unsigned int n_boot_vcpus;   /* vCPUs that run from the start */

/*
 * Recording state, written by the vCPU thread(s) under trace_lock (with
 * the chunk being filled and the tracked bitmap). need_lock is decided at
 * install, before any vCPU thread exists, and never changes: the lock is
 * taken whenever the machine can have more than one vCPU, whether they
 * run on one thread (round-robin, the lock is then uncontended) or on
 * several (MTTCG). With one vCPU every callback is serialised already and
 * the lock is not taken at all. Kept on cache lines of its own so that the
 * writer thread's counters do not bounce them.
 */
typedef struct {
    bool need_lock;         /* more than one vCPU: set at install */
    bool window_open;       /* also read lock-free */
    bool finished;
    unsigned int n_started; /* also read lock-free */
    uint64_t window_no;     /* number of the current (or next) window */
    uint64_t epoch;         /* dedup epoch, also read lock-free */
    Chunk *cur;             /* chunk being filled */
} __attribute__((aligned(CACHE_LINE))) RecState;

static pthread_mutex_t trace_lock __attribute__((aligned(CACHE_LINE))) =
    PTHREAD_MUTEX_INITIALIZER;
static RecState rec = { .epoch = 1 };

/*
 * Which vCPU is executing. QEMU 10.0 folds the vcpu_index it passes to
 * callbacks into a constant, the index of the vCPU that translated the
 * block, whenever vCPUs do not run in parallel (CF_PARALLEL clear): with
 * -accel tcg,thread=single and -smp > 1 every vCPU runs blocks another one
 * translated, so the index is often wrong. In that case only, we ask QEMU
 * itself through two symbols its binary exports (not plugin API): the
 * thread's current_cpu and gdb_get_cpu_index() (cpu_index + 1).
 *
 * current_cpu is a __thread variable: dlsym returns the calling thread's
 * copy. It is looked up and checked only on the thread of the first vCPU
 * initialised, and used only when every vCPU runs on that thread
 * (round-robin TCG), so the pointer is always the running thread's. The
 * method is decided once the second vCPU is initialised and said on one
 * stderr line; with one vCPU it is said at install.
 */
static bool vcpu_index_from_qemu;   /* the work-around is in use */

/* vCPU init runs on each vCPU's thread: several at once under MTTCG. */
static pthread_mutex_t init_lock = PTHREAD_MUTEX_INITIALIZER;
static bool one_vcpu;               /* nothing to decide */
static unsigned int n_inits;
static pthread_t first_thread;      /* of the first vCPU initialised */
static bool shared_thread;          /* all vCPUs so far on first_thread */
static bool symbols_ok = true;      /* they agreed at every vCPU init */
static void **current_cpu_slot;
static int (*gdb_cpu_index)(void *cpu);

static inline unsigned int cur_vcpu(unsigned int vcpu_index)
{
    if (__atomic_load_n(&vcpu_index_from_qemu, __ATOMIC_RELAXED)) {
        return (unsigned int)gdb_cpu_index(*current_cpu_slot) - 1;
    }
    return vcpu_index;
}

/* Interned instruction and block descriptors */
static pthread_mutex_t desc_lock = PTHREAD_MUTEX_INITIALIZER;
static GHashTable *descs, *tb_descs;

/* QEMU's own mapping of the RAM file: a code host address gives its pa. */
static pthread_once_t qram_once = PTHREAD_ONCE_INIT;
static uintptr_t qram_host;
static size_t qram_len;
static uint64_t qram_off;

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

static ChunkQueue q = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .full_cond = PTHREAD_COND_INITIALIZER,
    .free_cond = PTHREAD_COND_INITIALIZER,
    .turn_cond = PTHREAD_COND_INITIALIZER,
};

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

static Encoder *encoders;
static unsigned int n_encoders;
static FILE *out_file;
static msgpack_packer pk;           /* header and footer, into out_file */

/* Output counts: updated by the encoder whose turn it is to write. */
typedef struct {
    bool failed;
    uint64_t chunks, events, dropped;
    uint64_t by_kind[256];
} __attribute__((aligned(CACHE_LINE))) OutState;

static OutState ws;

/* ---------------------------------------------------------------------- */
/* Small helpers                                                          */

static inline bool load_flag(const bool *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void store_flag(bool *p, bool v)
{
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

static inline uint64_t cur_epoch(void)
{
    return __atomic_load_n(&rec.epoch, __ATOMIC_RELAXED);
}

/*
 * Every caller holds trace_lock (or is the only vCPU), so a load and a
 * store would do; the atomic increment keeps that true without the lock.
 */
static inline void bump_epoch(void)
{
    __atomic_fetch_add(&rec.epoch, 1, __ATOMIC_RELAXED);
}

static inline void rec_lock(void)
{
    if (rec.need_lock) {
        pthread_mutex_lock(&trace_lock);
    }
}

static inline void rec_unlock(void)
{
    if (rec.need_lock) {
        pthread_mutex_unlock(&trace_lock);
    }
}

static inline bool frame_in_ram(uint64_t pa)
{
    return pa < ram_limit && pa + ST_PAGE_SIZE <= ram_limit;
}

/*
 * The bitmap is written under trace_lock but also read without it (from
 * vcpu_mem): its words are only accessed with __atomic operations.
 */
static inline bool is_tracked(uint64_t pa)
{
    uint64_t f = pa >> PAGE_SHIFT;

    return pa < ram_limit &&
           (__atomic_load_n(&tracked[f >> 6], __ATOMIC_RELAXED) >>
            (f & 63)) & 1;
}

static inline uint64_t ram_u64(uint64_t pa)
{
    uint64_t v;
    memcpy(&v, ram + pa, sizeof(v));
    return v;
}

/* Read a register of the current vCPU (needs an R_REGS callback). */
static uint64_t read_reg(VCpu *v, struct qemu_plugin_register *h)
{
    uint64_t x = 0;
    int n;

    if (!h) {
        return 0;
    }
    v->rbuf->len = 0;   /* cheaper than g_byte_array_set_size() */
    n = qemu_plugin_read_register(h, v->rbuf);
    if (n > 0) {
        memcpy(&x, v->rbuf->data, MIN((size_t)n, sizeof(x)));
    }
    return x;
}

/* ---------------------------------------------------------------------- */
/* Chunk buffer and writer thread                                         */

/* Hand the current chunk to the encoders and take a free one (may wait). */
static void chunk_submit(void)
{
    Chunk *c = rec.cur;

    pthread_mutex_lock(&q.lock);
    c->next = NULL;
    c->seq = q.next_seq++;
    if (q.tail) {
        q.tail->next = c;
    } else {
        q.head = c;
    }
    q.tail = c;
    pthread_cond_signal(&q.full_cond);
    /*
     * Block rather than drop when the encoders are behind. Under MTTCG the
     * caller holds trace_lock while it waits here, so every other vCPU that
     * records waits too; that cannot deadlock, because the encoders that
     * free chunk buffers only ever take q.lock (never trace_lock), and a
     * chunk in the queue is always taken by one of them: they run until
     * q.stop, which is set only after the last submit (plugin_exit).
     */
    while (!q.free) {
        pthread_cond_wait(&q.free_cond, &q.lock);
    }
    c = q.free;
    q.free = c->next;
    pthread_mutex_unlock(&q.lock);
    c->n = c->n_pages = c->n_markers = 0;
    rec.cur = c;
}

/* Append one event; the caller holds trace_lock. Always has room. */
static inline void emit(uint8_t kind, unsigned int vcpu, uint8_t info,
                        uint64_t va, uint64_t pa, uint64_t pc, uint64_t val)
{
    Chunk *c = rec.cur;
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
        chunk_submit();
    }
}

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
                                 opt_level);

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

/* Write an encoded chunk (our turn) and count it, or count it dropped. */
static void write_chunk(Encoder *e, const Chunk *c, bool encoded)
{
    if (!ws.failed &&
        (!encoded ||
         fwrite(e->sbuf.data, 1, e->sbuf.size, out_file) != e->sbuf.size)) {
        ws.failed = true;
        fprintf(stderr, "shadowtrace plugin: writing %s failed (%s): "
                "events from now on are dropped\n", opt_out,
                encoded ? strerror(errno) : "encoding error");
    }
    if (ws.failed) {
        ws.dropped += c->n;
        return;
    }
    ws.chunks++;
    ws.events += c->n;
    for (int k = 0; k < 256; k++) {
        ws.by_kind[k] += e->hist[k];
    }
}

static void *encoder_main(void *arg)
{
    Encoder *e = arg;

    for (;;) {
        Chunk *c;
        bool encoded;

        pthread_mutex_lock(&q.lock);
        while (!q.head && !q.stop) {
            pthread_cond_wait(&q.full_cond, &q.lock);
        }
        c = q.head;
        if (!c) {
            pthread_mutex_unlock(&q.lock);
            break;
        }
        q.head = c->next;
        if (!q.head) {
            q.tail = NULL;
        }
        pthread_mutex_unlock(&q.lock);

        encoded = encode_chunk(e, c);

        /* Chunks are taken in order; wait for the earlier ones' writes. */
        pthread_mutex_lock(&q.lock);
        while (q.next_write != c->seq) {
            pthread_cond_wait(&q.turn_cond, &q.lock);
        }
        pthread_mutex_unlock(&q.lock);

        write_chunk(e, c, encoded);

        pthread_mutex_lock(&q.lock);
        q.next_write++;
        pthread_cond_broadcast(&q.turn_cond);
        c->next = q.free;
        q.free = c;
        pthread_cond_signal(&q.free_cond);
        pthread_mutex_unlock(&q.lock);
    }
    return NULL;
}

/* ---------------------------------------------------------------------- */
/* Page tables: snapshots and walks (callers hold trace_lock)             */

/* Snapshot an untracked table frame and, below it, every present table. */
static void snapshot_tree(unsigned int vcpu, uint64_t frame, int level)
{
    uint64_t f = frame >> PAGE_SHIFT;
    uint64_t ents[ST_PAGE_SIZE / 8];
    uint32_t idx;

    if (!frame_in_ram(frame) || is_tracked(frame)) {
        return;
    }
    __atomic_fetch_or(&tracked[f >> 6], 1ULL << (f & 63), __ATOMIC_RELAXED);
    frame_level[f] = (uint8_t)level;
    if (rec.cur->n_pages == CHUNK_PAGES) {
        chunk_submit();
    }
    idx = rec.cur->n_pages++;
    memcpy(rec.cur->pages + (size_t)idx * ST_PAGE_SIZE, ram + frame, ST_PAGE_SIZE);
    /* Children are taken from the copy: the chunk may be handed off next. */
    memcpy(ents, rec.cur->pages + (size_t)idx * ST_PAGE_SIZE, ST_PAGE_SIZE);
    emit(ST_KIND_SNAPSHOT, vcpu, 0, 0, frame, 0, idx);
    if (level == 1) {
        return;
    }
    for (unsigned int i = 0; i < ST_PAGE_SIZE / 8; i++) {
        uint64_t e = ents[i];
        if (!(e & PTE_P) || (level < 4 && (e & PTE_PS))) {
            continue;
        }
        snapshot_tree(vcpu, e & PTE_ADDR, level - 1);
    }
}

/*
 * Translate va from the vCPU's current CR3. With `track`, snapshot any
 * untracked table on the way (with its subtree; the caller holds
 * trace_lock); without, read only (descriptors, guest reads). Returns
 * PA_UNKNOWN when va is not mapped; when the vCPU is not in 4-level paging,
 * PA_UNKNOWN with `track` and va itself (no paging) without.
 */
static uint64_t walk(VCpu *v, unsigned int vcpu, uint64_t va, bool track)
{
    uint64_t table;

    if (!v->lm || !v->cr3_known) {
        return track ? PA_UNKNOWN : va;
    }
    table = v->cr3 & PTE_ADDR;
    for (int level = 4; level >= 1; level--) {
        unsigned int shift = PAGE_SHIFT + 9 * (level - 1);
        uint64_t e;

        if (!frame_in_ram(table)) {
            return PA_UNKNOWN;
        }
        if (track && !is_tracked(table)) {
            snapshot_tree(vcpu, table, level);
        }
        e = ram_u64(table + ((va >> shift) & 511) * 8);
        if (!(e & PTE_P)) {
            return PA_UNKNOWN;
        }
        if (level == 1) {
            return (e & PTE_ADDR) | (va & 0xfff);
        }
        if (level == 3 && (e & PTE_PS)) {
            return (e & PTE_ADDR_1G) | (va & 0x3fffffff);
        }
        if (level == 2 && (e & PTE_PS)) {
            return (e & PTE_ADDR_2M) | (va & 0x1fffff);
        }
        table = e & PTE_ADDR;
    }
    return PA_UNKNOWN;
}

/* A root just became current on this vCPU: track its tree. */
static void track_root(VCpu *v, unsigned int vcpu)
{
    if (v->lm && v->cr3_known) {
        snapshot_tree(vcpu, v->cr3 & PTE_ADDR, 4);
    }
}

/* ---------------------------------------------------------------------- */
/* Window                                                                 */

/* Open a window; the caller holds trace_lock and is vCPU `self`. */
static void window_open_locked(unsigned int self)
{
    store_flag(&rec.window_open, true);
    emit(ST_KIND_WINDOW_OPEN, self, 0, 0, 0, 0, rec.window_no);
    /* What the replayer knew is stale: so is what we tracked. */
    for (size_t i = 0; i < ((ram_limit >> PAGE_SHIFT) + 63) / 64; i++) {
        __atomic_store_n(&tracked[i], 0, __ATOMIC_RELAXED);
    }
    bump_epoch();
    for (unsigned int i = 0; i < n_vcpus; i++) {
        if (vcpus[i].cr3_known) {
            emit(ST_KIND_CR3_CURRENT, i, 0, 0, 0, 0, vcpus[i].cr3);
        }
    }
    for (unsigned int i = 0; i < n_vcpus; i++) {
        track_root(&vcpus[i], i);
    }
}

static void plugin_reset_done(qemu_plugin_id_t id);

/* Re-instrument every block for the new window state. */
static void request_reset(void)
{
    qemu_plugin_reset(plugin_id, plugin_reset_done);
}

/* Refresh what we know of the executing vCPU from its registers. */
static void vcpu_refresh(VCpu *v)
{
    uint64_t cr3 = read_reg(v, v->reg_cr3);
    uint64_t efer = read_reg(v, v->reg_efer);

    rec_lock();
    if (v->reg_cr3) {
        v->cr3 = cr3;
        v->cr3_known = true;
    }
    v->lm = (efer & EFER_LMA) != 0;
    rec_unlock();
}

/* ---------------------------------------------------------------------- */
/* Execution callbacks                                                    */

/*
 * Dedup: true when this vCPU already made an access of this kind and mode
 * to this page within the current epoch (then the access is dropped).
 */
static inline bool dedup_hit(VCpu *v, uint64_t va, unsigned int kind,
                             bool user)
{
    uint64_t key = (va & PAGE_MASK) | (kind << 1) | user;
    uint64_t e = cur_epoch();
    DedupSlot *m = &v->mru[((kind << 1) | user) & 7];
    DedupSlot *s;

    /* Most accesses are to the page the last one of their kind used. */
    if (m->key == key && m->epoch == e) {
        return true;
    }
    m->key = key;
    m->epoch = e;
    s = &v->dedup[(key * 0x9E3779B97F4A7C15ULL) >> (64 - DEDUP_BITS)];
    if (s->key == key && s->epoch == e) {
        return true;
    }
    s->key = key;
    s->epoch = e;
    return false;
}

/*
 * One FETCH. pa is our walk's; where the walk finds no mapping (QEMU ran
 * the block from a stale translation), the block's own physical page,
 * known from QEMU's host address of its code (code_pa), if we have it.
 */
static void record_fetch(unsigned int vcpu_index, uint64_t page, uint64_t pc,
                         uint64_t code_page)
{
    VCpu *v = &vcpus[vcpu_index];
    bool user = pc < USER_TOP;
    uint64_t pa;

    v->seen++;
    if (opt_dedup && dedup_hit(v, page, ST_KIND_FETCH, user)) {
        v->deduplicated++;
        return;
    }
    rec_lock();
    if (rec.window_open && !rec.finished) {
        FetchSlot *f = &v->fetch[(page >> PAGE_SHIFT) & (FETCH_SLOTS - 1)];
        uint64_t e = cur_epoch();

        if (!v->lm) {
            pa = page;              /* paging is off */
        } else if (f->page == page + 1 && f->epoch == e) {
            pa = f->pa;
        } else {
            pa = walk(v, vcpu_index, page, true);
            if (pa == PA_UNKNOWN && code_page != PA_UNKNOWN) {
                pa = code_page & PAGE_MASK;
            }
            f->page = page + 1;
            f->epoch = e;
            f->pa = pa;
        }
        emit(ST_KIND_FETCH, vcpu_index, 1 | (user ? ST_INFO_USER : 0),
             page, pa, pc, 0);
    }
    rec_unlock();
}

/*
 * The address a block runs at. x86-64 blocks are position independent
 * (CF_PCREL): QEMU runs one translation for every virtual address of the
 * same physical code (a library mapped at other addresses by two
 * processes, kernel text run first through the boot identity map), and
 * the addresses the plugin API gives at translation are the first one's.
 * If the translation's address still maps to the block's physical page
 * it is the one running; otherwise RIP is (read through the gdb register
 * interface, which is slow: hence the per-vCPU cache, valid for an epoch).
 * Outside long mode the linear pc also has a segment base: use the
 * translation's.
 */
static inline uint64_t block_pc(VCpu *v, const TbDesc *t)
{
    PcSlot *c = &v->pcs[((uintptr_t)t >> 4) & (PC_SLOTS - 1)];
    uint64_t e = cur_epoch(), delta = 0;

    if (v->lm) {
        if (c->tb == t && c->epoch == e) {
            delta = c->delta;
        } else {
            uint64_t pa = walk(v, 0, t->va, false);

            if (t->pa == PA_UNKNOWN || pa == PA_UNKNOWN ||
                (pa & PAGE_MASK) != (t->pa & PAGE_MASK)) {
                delta = v->reg_rip ? read_reg(v, v->reg_rip) - t->va : 0;
            }
            c->tb = t;
            c->epoch = e;
            c->delta = delta;
        }
    }
    v->pc_delta = delta;
    return t->va + delta;
}

/* The run-time address of an instruction of the current block. */
static inline uint64_t insn_pc(const VCpu *v, uint64_t pc)
{
    return pc + v->pc_delta;
}

/* A block executes: fetch of its page (and of the next one it ends on). */
static void vcpu_tb_exec(unsigned int vcpu_index, void *udata)
{
    const TbDesc *t = udata;
    VCpu *v;
    uint64_t pc;

    if (!load_flag(&rec.window_open)) {
        return;
    }
    vcpu_index = cur_vcpu(vcpu_index);
    v = &vcpus[vcpu_index];
    pc = block_pc(v, t);
    record_fetch(vcpu_index, pc & PAGE_MASK, pc, t->pa);
    if (t->two_pages) {
        record_fetch(vcpu_index, (pc & PAGE_MASK) + ST_PAGE_SIZE, pc, t->pa2);
    }
}

/* Emit TABLE_WRITEs for a store into tracked frames (lock held). */
static void table_store(unsigned int vcpu, uint64_t va, uint64_t pa,
                        unsigned int size, uint64_t pc)
{
    uint64_t first = pa & ~7ULL, last = (pa + size - 1) & ~7ULL;
    bool any = false;

    for (uint64_t ea = first; ea <= last; ea += 8) {
        uint64_t frame = ea & PAGE_MASK, e;
        int level;

        if (!is_tracked(frame)) {
            continue;
        }
        e = ram_u64(ea);
        emit(ST_KIND_TABLE_WRITE, vcpu, 0, va, ea, pc, e);
        any = true;
        level = frame_level[frame >> PAGE_SHIFT];
        if (level > 1 && (e & PTE_P) && (level == 4 || !(e & PTE_PS))) {
            snapshot_tree(vcpu, e & PTE_ADDR, level - 1);
        }
    }
    if (any) {
        bump_epoch();
    }
}

/* Every load and store inside the window. */
static void vcpu_mem(unsigned int vcpu_index, qemu_plugin_meminfo_t info,
                     uint64_t vaddr, void *udata)
{
    VCpu *v;
    uint64_t pc = (uint64_t)(uintptr_t)udata;
    struct qemu_plugin_hwaddr *hw;
    bool store, user, io = false, table = false, hit = false;
    unsigned int size, kind;
    uint64_t pa = vaddr, val = 0;
    uint8_t einfo;

    if (!load_flag(&rec.window_open)) {
        return;
    }
    vcpu_index = cur_vcpu(vcpu_index);
    v = &vcpus[vcpu_index];
    pc = insn_pc(v, pc);
    v->seen++;
    store = qemu_plugin_mem_is_store(info);
    user = pc < USER_TOP;
    kind = store ? ST_KIND_WRITE : ST_KIND_READ;
    if (opt_dedup) {
        hit = dedup_hit(v, vaddr, kind, user);
        if (hit && !store) {
            v->deduplicated++;
            return;
        }
    }
    size = 1u << qemu_plugin_mem_size_shift(info);
    hw = qemu_plugin_get_hwaddr(info, vaddr);
    if (hw) {
        io = qemu_plugin_hwaddr_is_io(hw);
        pa = qemu_plugin_hwaddr_phys_addr(hw);
    }
    /* A store into a tracked table is never dropped. */
    if (store && !io) {
        table = is_tracked(pa) || is_tracked(pa + size - 1);
    }
    if (hit && !table) {
        v->deduplicated++;
        return;
    }
    if (table) {
        qemu_plugin_mem_value mv = qemu_plugin_mem_get_value(info);
        switch (mv.type) {
        case QEMU_PLUGIN_MEM_VALUE_U8:
            val = mv.data.u8;
            break;
        case QEMU_PLUGIN_MEM_VALUE_U16:
            val = mv.data.u16;
            break;
        case QEMU_PLUGIN_MEM_VALUE_U32:
            val = mv.data.u32;
            break;
        case QEMU_PLUGIN_MEM_VALUE_U64:
            val = mv.data.u64;
            break;
        case QEMU_PLUGIN_MEM_VALUE_U128:
            val = mv.data.u128.low;
            break;
        }
    }
    einfo = (uint8_t)((size & ST_INFO_SIZE_MASK) | (user ? ST_INFO_USER : 0) |
                      (io ? ST_INFO_IO : 0));

    rec_lock();
    if (rec.window_open && !rec.finished) {
        uint64_t region = (vaddr >> 21) + 1;

        if (v->walk_region != region || v->walk_epoch != cur_epoch()) {
            walk(v, vcpu_index, vaddr, true);
            v->walk_region = region;
            v->walk_epoch = cur_epoch();
        }
        emit(kind, vcpu_index, einfo, vaddr, pa, pc, val);
        if (table) {
            table_store(vcpu_index, vaddr, pa, size, pc);
        }
    }
    rec_unlock();
}

/* The run-time address of a followed instruction (R_REGS callbacks). */
static uint64_t exec_pc(VCpu *v, const InsnDesc *d)
{
    return v->lm && v->reg_rip ? read_reg(v, v->reg_rip) : d->pc;
}

/* Compute the linear address of a decoded memory operand. */
static uint64_t insn_ea(VCpu *v, const InsnDesc *d)
{
    uint64_t ea = (uint64_t)(int64_t)d->disp;

    if (d->base == BASE_RIP) {
        ea += exec_pc(v, d) + d->len;
    } else if (d->base != BASE_NONE) {
        ea += read_reg(v, v->gpr[d->base]);
    }
    if (d->index != BASE_NONE) {
        ea += read_reg(v, v->gpr[d->index]) << d->scale;
    }
    if (d->addr32) {
        ea &= 0xffffffffULL;
    }
    if (d->seg == SEG_FS) {
        ea += read_reg(v, v->reg_fs_base);
    } else if (d->seg == SEG_GS) {
        ea += read_reg(v, v->reg_gs_base);
    }
    return ea;
}

/* Read guest memory at a virtual address (our walk, else QEMU's MMU). */
static bool read_guest(VCpu *v, uint64_t va, void *dst, size_t len)
{
    uint8_t *out = dst;

    while (len) {
        size_t n = MIN(len, ST_PAGE_SIZE - (va & 0xfff));
        uint64_t pa = walk(v, 0, va, false); /* read only: no vCPU needed */

        if (pa == PA_UNKNOWN || pa + n > ram_limit) {
            break;
        }
        memcpy(out, ram + pa, n);
        out += n;
        va += n;
        len -= n;
    }
    if (len == 0) {
        return true;
    }
    g_byte_array_set_size(v->rbuf, 0);
    if (!qemu_plugin_read_memory_vaddr(va, v->rbuf, len) || v->rbuf->len < len) {
        return false;
    }
    memcpy(out, v->rbuf->data, len);
    return true;
}

/* mov to CR0 / CR3 / CR4: runs before the instruction. */
static void vcpu_cr_write(unsigned int vcpu_index, void *udata)
{
    const InsnDesc *d = udata;
    VCpu *v;
    uint64_t value, pc, prev = 0, efer = 0;
    bool lm_check;

    vcpu_index = cur_vcpu(vcpu_index);
    v = &vcpus[vcpu_index];
    value = read_reg(v, v->gpr[d->reg]);
    pc = exec_pc(v, d);
    lm_check = d->cr == 0 || (d->cr == 3 && !v->lm);
    if (lm_check) {
        efer = read_reg(v, v->reg_efer);
    }
    if (d->cr == 4) {
        /* CR4 before the write: the register, else the last one seen. */
        prev = v->reg_cr4 ? read_reg(v, v->reg_cr4) : v->cr4;
    }

    rec_lock();
    switch (d->cr) {
    case 0:
        /* Paging with EFER.LME set: long mode (4-level tables). */
        v->lm = (value & CR0_PG) && (efer & EFER_LME);
        bump_epoch();
        if (rec.window_open && !rec.finished) {
            track_root(v, vcpu_index);
        }
        break;
    case 3:
        if (lm_check) {
            v->lm = (efer & EFER_LMA) != 0;
        }
        v->cr3 = value;
        v->cr3_known = true;
        bump_epoch();
        if (rec.window_open && !rec.finished) {
            emit(ST_KIND_CR3_WRITE, vcpu_index, 0, 0, 0, pc, value);
            track_root(v, vcpu_index);
        }
        break;
    case 4:
        v->cr4 = value;
        bump_epoch();
        if (rec.window_open && !rec.finished) {
            emit(ST_KIND_CR4_WRITE, vcpu_index, 0, 0, prev, pc, value);
        }
        break;
    }
    rec_unlock();
}

static void vcpu_invlpg(unsigned int vcpu_index, void *udata)
{
    const InsnDesc *d = udata;
    VCpu *v;
    uint64_t va, pc;

    vcpu_index = cur_vcpu(vcpu_index);
    v = &vcpus[vcpu_index];
    va = insn_ea(v, d);
    pc = exec_pc(v, d);
    rec_lock();
    bump_epoch();
    if (rec.window_open && !rec.finished) {
        emit(ST_KIND_INVLPG, vcpu_index, 0, va, 0, pc, 0);
    }
    rec_unlock();
}

static void vcpu_invpcid(unsigned int vcpu_index, void *udata)
{
    const InsnDesc *d = udata;
    VCpu *v;
    uint64_t type, pc, desc[2] = { 0, 0 };

    vcpu_index = cur_vcpu(vcpu_index);
    v = &vcpus[vcpu_index];
    type = read_reg(v, v->gpr[d->reg]);
    pc = exec_pc(v, d);
    if (!read_guest(v, insn_ea(v, d), desc, sizeof(desc))) {
        desc[0] = desc[1] = 0;
    }
    rec_lock();
    bump_epoch();
    if (rec.window_open && !rec.finished) {
        emit(ST_KIND_INVPCID, vcpu_index, 0, desc[1], desc[0] & 0xfff,
             pc, type);
    }
    rec_unlock();
}

/* CPUID: a marker when EAX is the marker leaf. */
static void vcpu_cpuid(unsigned int vcpu_index, void *udata)
{
    const InsnDesc *d = udata;
    VCpu *v;
    char text[ST_MARKER_MAX_LEN + 1];
    uint64_t addr, len, pc;
    bool reset = false, start, stop;
    char *sp;

    vcpu_index = cur_vcpu(vcpu_index);
    v = &vcpus[vcpu_index];
    if ((uint32_t)read_reg(v, v->gpr[0]) != ST_MARKER_LEAF) {
        return;
    }
    addr = read_reg(v, v->gpr[3]);
    len = MIN(read_reg(v, v->gpr[1]), (uint64_t)ST_MARKER_MAX_LEN);
    vcpu_refresh(v);
    pc = exec_pc(v, d);
    memset(text, 0, sizeof(text));
    if (len && !read_guest(v, addr, text, len)) {
        g_strlcpy(text, "?unreadable", sizeof(text));
    }
    /* The list is stored as UTF-8 strings: keep printable ASCII only. */
    for (char *p = text; *p; p++) {
        if (*p < 0x20 || *p > 0x7e) {
            *p = '?';
        }
    }
    sp = strchr(text, ' ');
    len = sp ? (uint64_t)(sp - text) : strlen(text);
    start = len == strlen(ST_MARKER_START) &&
            !strncmp(text, ST_MARKER_START, len);
    stop = len == strlen(ST_MARKER_STOP) &&
           !strncmp(text, ST_MARKER_STOP, len);

    rec_lock();
    if (!rec.finished) {
        if (rec.cur->n_markers == CHUNK_MARKERS) {
            chunk_submit();
        }
        memcpy(rec.cur->markers[rec.cur->n_markers], text, sizeof(text));
        emit(ST_KIND_MARKER, vcpu_index, 0, 0, 0, pc, rec.cur->n_markers++);
        if (!opt_window_all && !opt_window_none && start && !rec.window_open) {
            window_open_locked(vcpu_index);
            reset = true;
        } else if (!opt_window_all && stop && rec.window_open) {
            emit(ST_KIND_WINDOW_CLOSE, vcpu_index, 0, 0, 0, 0, rec.window_no);
            rec.window_no++;
            store_flag(&rec.window_open, false);
            bump_epoch();
            reset = true;
        }
    }
    rec_unlock();
    if (reset) {
        request_reset();
    }
}

/*
 * window=all: on every block until each vCPU has run once, then dropped by
 * a reset. (A conditional callback on a per-vCPU flag would be cheaper, but
 * QEMU 10.0 passes it a wrong vcpu_index on vCPUs other than 0.)
 */
static void vcpu_first_run(unsigned int vcpu_index, void *udata)
{
    VCpu *v;
    uint64_t cr3, efer;
    bool all = false;

    (void)udata;
    vcpu_index = cur_vcpu(vcpu_index);
    v = &vcpus[vcpu_index];
    if (v->started) {
        return;
    }
    cr3 = read_reg(v, v->reg_cr3);
    efer = read_reg(v, v->reg_efer);
    rec_lock();
    if (!v->started && !rec.finished) {
        v->started = true;
        /* vcpu_tb_trans reads it without the lock */
        __atomic_fetch_add(&rec.n_started, 1, __ATOMIC_RELAXED);
        v->cr3 = cr3;
        v->cr3_known = true;
        v->lm = (efer & EFER_LMA) != 0;
        if (!rec.window_open) {
            window_open_locked(vcpu_index);
        } else {
            emit(ST_KIND_CR3_CURRENT, vcpu_index, 0, 0, 0, 0, v->cr3);
            track_root(v, vcpu_index);
        }
        all = rec.n_started == n_boot_vcpus;
    }
    rec_unlock();
    if (all) {
        request_reset();
    }
}

/* ---------------------------------------------------------------------- */
/* Translation: decode the instructions we follow, instrument the block   */

static guint desc_hash(gconstpointer p)
{
    const InsnDesc *d = p;
    return (guint)((d->pc * 0x9E3779B97F4A7C15ULL) >> 32) ^ d->op;
}

static gboolean desc_equal(gconstpointer a, gconstpointer b)
{
    return memcmp(a, b, sizeof(InsnDesc)) == 0;
}

/* One descriptor per distinct decoding, kept for the plugin's lifetime. */
static const InsnDesc *desc_intern(const InsnDesc *d)
{
    InsnDesc *found;

    pthread_mutex_lock(&desc_lock);
    found = g_hash_table_lookup(descs, d);
    if (!found) {
        found = g_memdup2(d, sizeof(*d));
        g_hash_table_add(descs, found);
    }
    pthread_mutex_unlock(&desc_lock);
    return found;
}

static guint tb_hash(gconstpointer p)
{
    const TbDesc *t = p;
    return (guint)(((t->va ^ (t->pa << 7)) * 0x9E3779B97F4A7C15ULL) >> 32);
}

static gboolean tb_equal(gconstpointer a, gconstpointer b)
{
    const TbDesc *x = a, *y = b;
    return x->va == y->va && x->pa == y->pa && x->pa2 == y->pa2 &&
           x->two_pages == y->two_pages;
}

/*
 * One descriptor per distinct block (not per translation: blocks are
 * translated again after every flush), kept for the plugin's lifetime.
 */
static const TbDesc *tb_intern(const TbDesc *t)
{
    TbDesc *found;

    pthread_mutex_lock(&desc_lock);
    found = g_hash_table_lookup(tb_descs, t);
    if (!found) {
        found = g_new0(TbDesc, 1);
        *found = *t;
        g_hash_table_add(tb_descs, found);
    }
    pthread_mutex_unlock(&desc_lock);
    return found;
}

/* Find QEMU's mapping of the RAM file in /proc/self/maps (not ours). */
static void find_qemu_ram(void)
{
    g_autofree char *want = realpath(opt_ram, NULL);
    g_autofree char *maps = NULL;
    g_auto(GStrv) lines = NULL;

    if (!want || !g_file_get_contents("/proc/self/maps", &maps, NULL, NULL)) {
        return;
    }
    lines = g_strsplit(maps, "\n", -1);
    for (char **l = lines; *l; l++) {
        unsigned long lo, hi, off;
        int path_at = 0;

        if (sscanf(*l, "%lx-%lx %*s %lx %*s %*s %n", &lo, &hi, &off,
                   &path_at) < 3 || path_at == 0) {
            continue;
        }
        if (strcmp(*l + path_at, want) == 0 && lo != (uintptr_t)ram &&
            hi - lo > qram_len) {
            qram_host = lo;
            qram_len = hi - lo;
            qram_off = off;
        }
    }
}

/* Guest-physical address of an instruction's first byte, if in RAM. */
static uint64_t code_pa(const struct qemu_plugin_insn *insn)
{
    uintptr_t h = (uintptr_t)qemu_plugin_insn_haddr(insn);

    /* Searched on first use: QEMU has mapped its RAM by the first block. */
    pthread_once(&qram_once, find_qemu_ram);
    if (qram_len && h >= qram_host && h - qram_host < qram_len) {
        return h - qram_host + qram_off;
    }
    return PA_UNKNOWN;
}

/* ModRM memory operand (64-bit addressing); false if malformed. */
static bool decode_mem(const uint8_t *b, size_t len, size_t i, uint8_t rex,
                       InsnDesc *d)
{
    uint8_t modrm, mod, rm;

    if (i >= len) {
        return false;
    }
    modrm = b[i++];
    mod = modrm >> 6;
    rm = modrm & 7;
    if (mod == 3) {
        return false;
    }
    d->base = BASE_NONE;
    d->index = BASE_NONE;
    if (rm == 4) {
        uint8_t sib, idx;

        if (i >= len) {
            return false;
        }
        sib = b[i++];
        idx = ((sib >> 3) & 7) | ((rex & 2) ? 8 : 0);
        if (idx != 4) {
            d->index = (int8_t)idx;
            d->scale = sib >> 6;
        }
        if ((sib & 7) == 5 && mod == 0) {
            mod = 2;    /* no base, disp32 */
        } else {
            d->base = (int8_t)((sib & 7) | ((rex & 1) ? 8 : 0));
        }
    } else if (rm == 5 && mod == 0) {
        d->base = BASE_RIP;
        mod = 2;
    } else {
        d->base = (int8_t)(rm | ((rex & 1) ? 8 : 0));
    }
    if (mod == 1) {
        if (i + 1 > len) {
            return false;
        }
        d->disp = (int8_t)b[i];
    } else if (mod == 2) {
        int32_t disp;
        if (i + 4 > len) {
            return false;
        }
        memcpy(&disp, b + i, 4);
        d->disp = disp;
    }
    return true;
}

/* Recognise CPUID, mov to CR0/3/4, INVLPG, INVPCID. */
static bool decode_special(const uint8_t *b, size_t len, uint64_t pc,
                           InsnDesc *d)
{
    size_t i = 0;
    bool opsize = false, lock = false;
    uint8_t rex = 0, op;

    memset(d, 0, sizeof(*d));
    d->pc = pc;
    d->len = (uint8_t)len;
    for (; i < len; i++) {
        switch (b[i]) {
        case 0x66:
            opsize = true;
            continue;
        case 0x67:
            d->addr32 = 1;
            continue;
        case 0xf0:
            lock = true;
            continue;
        case 0x64:
            d->seg = SEG_FS;
            continue;
        case 0x65:
            d->seg = SEG_GS;
            continue;
        case 0xf2: case 0xf3: case 0x2e: case 0x36: case 0x3e: case 0x26:
            continue;
        }
        break;
    }
    /* REX comes last; in 32-bit code 0x40..0x4f is a whole instruction. */
    if (i < len && (b[i] & 0xf0) == 0x40) {
        rex = b[i++];
    }
    if (i + 1 >= len || b[i] != 0x0f) {
        return false;
    }
    op = b[i + 1];
    i += 2;
    if (op == 0xa2) {
        d->op = OP_CPUID;
        return true;
    }
    if (op == 0x22 && i < len) {
        uint8_t modrm = b[i];
        d->cr = ((modrm >> 3) & 7) | ((rex & 4) ? 8 : 0) | (lock ? 8 : 0);
        d->reg = (int8_t)((modrm & 7) | ((rex & 1) ? 8 : 0));
        if (d->cr == 0 || d->cr == 3 || d->cr == 4) {
            d->op = OP_MOV_CR;
            return true;
        }
        return false;
    }
    if (op == 0x01 && i < len && ((b[i] >> 3) & 7) == 7 && (b[i] >> 6) != 3) {
        d->op = OP_INVLPG;
        return decode_mem(b, len, i, rex, d);
    }
    if (op == 0x38 && opsize && i + 1 < len && b[i] == 0x82) {
        d->op = OP_INVPCID;
        d->reg = (int8_t)(((b[i + 1] >> 3) & 7) | ((rex & 4) ? 8 : 0));
        return decode_mem(b, len, i + 1, rex, d);
    }
    return false;
}

static void vcpu_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    uint64_t tb_va = qemu_plugin_tb_vaddr(tb);
    bool mem = opt_window_all || load_flag(&rec.window_open);

    (void)id;
    if (n == 0) {
        return;
    }
    if (opt_window_all &&
        __atomic_load_n(&rec.n_started, __ATOMIC_RELAXED) < n_boot_vcpus) {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, vcpu_first_run,
                                             QEMU_PLUGIN_CB_R_REGS, NULL);
    }
    if (mem) {
        struct qemu_plugin_insn *last = qemu_plugin_tb_get_insn(tb, n - 1);
        uint64_t end = qemu_plugin_insn_vaddr(last) + qemu_plugin_insn_size(last) - 1;
        TbDesc t = {
            .va = tb_va,
            .pa = code_pa(qemu_plugin_tb_get_insn(tb, 0)),
            .pa2 = (qemu_plugin_insn_vaddr(last) & PAGE_MASK) !=
                   (tb_va & PAGE_MASK) ? code_pa(last) : PA_UNKNOWN,
            .two_pages = (end & PAGE_MASK) != (tb_va & PAGE_MASK),
        };

        /* R_REGS to read RIP: free at block entry, nothing to sync yet. */
        qemu_plugin_register_vcpu_tb_exec_cb(tb, vcpu_tb_exec,
                                             QEMU_PLUGIN_CB_R_REGS,
                                             (void *)tb_intern(&t));
    }
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t pc = qemu_plugin_insn_vaddr(insn);
        uint8_t bytes[16];
        size_t len = qemu_plugin_insn_data(insn, bytes, sizeof(bytes));
        InsnDesc d;

        if (len >= 2 && decode_special(bytes, len, pc, &d)) {
            static const qemu_plugin_vcpu_udata_cb_t cbs[] = {
                [OP_CPUID] = vcpu_cpuid,
                [OP_MOV_CR] = vcpu_cr_write,
                [OP_INVLPG] = vcpu_invlpg,
                [OP_INVPCID] = vcpu_invpcid,
            };
            qemu_plugin_register_vcpu_insn_exec_cb(
                insn, cbs[d.op], QEMU_PLUGIN_CB_R_REGS,
                (void *)desc_intern(&d));
        }
        if (mem) {
            qemu_plugin_register_vcpu_mem_cb(insn, vcpu_mem,
                                             QEMU_PLUGIN_CB_NO_REGS,
                                             QEMU_PLUGIN_MEM_RW,
                                             (void *)(uintptr_t)pc);
        }
    }
}

/* ---------------------------------------------------------------------- */
/* vCPU set-up, reset, exit                                               */

/* At install: the machine's maximum number of vCPUs. */
static void vcpu_index_setup(unsigned int max_vcpus)
{
    one_vcpu = max_vcpus == 1;
    if (one_vcpu) {
        fprintf(stderr, "shadowtrace plugin: vCPU index: as QEMU passes it "
                "(one vCPU)\n");
    }
}

/* On first_thread: do QEMU's symbols name this vCPU? */
static bool symbols_name(unsigned int vcpu_index)
{
    if (!current_cpu_slot || !gdb_cpu_index) {
        current_cpu_slot = dlsym(RTLD_DEFAULT, "current_cpu");
        *(void **)&gdb_cpu_index = dlsym(RTLD_DEFAULT, "gdb_get_cpu_index");
    }
    return current_cpu_slot && gdb_cpu_index && *current_cpu_slot &&
           gdb_cpu_index(*current_cpu_slot) - 1 == (int)vcpu_index;
}

/* At every vCPU's init, on its thread: choose cur_vcpu's method. */
static void vcpu_index_vcpu_init(unsigned int vcpu_index)
{
    bool was, now;

    if (one_vcpu) {
        return;
    }
    pthread_mutex_lock(&init_lock);
    was = vcpu_index_from_qemu;
    if (n_inits++ == 0) {
        first_thread = pthread_self();
        shared_thread = true;
    } else if (!pthread_equal(first_thread, pthread_self())) {
        shared_thread = false;  /* MTTCG: QEMU's index is right */
    }
    if (shared_thread && !symbols_name(vcpu_index)) {
        symbols_ok = false;
    }
    now = n_inits > 1 && shared_thread && symbols_ok;
    if (now != was) {
        __atomic_store_n(&vcpu_index_from_qemu, now, __ATOMIC_RELAXED);
    }
    if (n_inits == 2) {
        if (!shared_thread) {
            fprintf(stderr, "shadowtrace plugin: vCPU index: as QEMU passes "
                    "it (vCPUs on their own threads)\n");
        } else if (now) {
            fprintf(stderr, "shadowtrace plugin: vCPU index: from QEMU's "
                    "current_cpu and gdb_get_cpu_index (vCPUs share one "
                    "thread)\n");
        }
    }
    if (n_inits >= 2 && shared_thread && !now && (was || n_inits == 2)) {
        fprintf(stderr, "shadowtrace plugin: warning: vCPUs share one "
                "thread and QEMU's cpu index cannot be read: events may "
                "name the wrong vCPU (use -accel tcg,thread=multi)\n");
    }
    pthread_mutex_unlock(&init_lock);
}

static void vcpu_init(qemu_plugin_id_t id, unsigned int vcpu_index)
{
    static const char *const gpr_names[16] = {
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    };
    VCpu *v;
    g_autoptr(GArray) regs = NULL;

    (void)id;
    if (vcpu_index >= n_vcpus) {
        return;
    }
    v = &vcpus[vcpu_index];
    if (v->rbuf) {
        return;     /* called again after a reset re-registration */
    }
    /* Runs on the vCPU's own thread (several at once under MTTCG). */
    vcpu_index_vcpu_init(vcpu_index);
    v->rbuf = g_byte_array_sized_new(ST_PAGE_SIZE);
    regs = qemu_plugin_get_registers();
    for (guint i = 0; i < regs->len; i++) {
        qemu_plugin_reg_descriptor *rd =
            &g_array_index(regs, qemu_plugin_reg_descriptor, i);
        const char *name = rd->name;

        for (int r = 0; r < 16; r++) {
            if (!g_ascii_strcasecmp(name, gpr_names[r])) {
                v->gpr[r] = rd->handle;
            }
        }
        if (!g_ascii_strcasecmp(name, "cr0")) {
            v->reg_cr0 = rd->handle;
        } else if (!g_ascii_strcasecmp(name, "cr3")) {
            v->reg_cr3 = rd->handle;
        } else if (!g_ascii_strcasecmp(name, "cr4")) {
            v->reg_cr4 = rd->handle;
        } else if (!g_ascii_strcasecmp(name, "efer")) {
            v->reg_efer = rd->handle;
        } else if (!g_ascii_strcasecmp(name, "fs_base")) {
            v->reg_fs_base = rd->handle;
        } else if (!g_ascii_strcasecmp(name, "gs_base")) {
            v->reg_gs_base = rd->handle;
        } else if (!g_ascii_strcasecmp(name, "rip")) {
            v->reg_rip = rd->handle;
        }
    }
    if (!v->reg_cr3 || !v->reg_efer || !v->gpr[0] || !v->gpr[15]) {
        fprintf(stderr, "shadowtrace plugin: vCPU %u lacks cr3/efer/GPR "
                "registers: CR3 and markers cannot be followed\n", vcpu_index);
    }
}

static void plugin_exit(qemu_plugin_id_t id, void *udata);

static void register_base_callbacks(qemu_plugin_id_t id)
{
    qemu_plugin_register_vcpu_init_cb(id, vcpu_init);
    qemu_plugin_register_vcpu_tb_trans_cb(id, vcpu_tb_trans);
    qemu_plugin_register_atexit_cb(id, plugin_exit, NULL);
}

/* The reset unregistered everything and flushed the code cache. */
static void plugin_reset_done(qemu_plugin_id_t id)
{
    register_base_callbacks(id);
}

static bool write_footer(void)
{
    unsigned int kinds = 0;
    uint64_t seen = 0, dedup = 0, n_recorded, n_tables;

    for (unsigned int i = 0; i < n_vcpus; i++) {
        seen += vcpus[i].seen;
        dedup += vcpus[i].deduplicated;
    }
    n_recorded = ws.by_kind[ST_KIND_READ] + ws.by_kind[ST_KIND_WRITE] +
                 ws.by_kind[ST_KIND_FETCH];
    n_tables = ws.by_kind[ST_KIND_SNAPSHOT];
    for (unsigned int k = 0; k < 256; k++) {
        kinds += ws.by_kind[k] != 0;
    }
    bool ok = msgpack_pack_map(&pk, 9) == 0 &&
              pack_str(&pk, ST_KEY_TYPE) && pack_str(&pk, ST_TYPE_FOOTER) &&
              pack_str(&pk, "chunks") && msgpack_pack_uint64(&pk, ws.chunks) == 0 &&
              pack_str(&pk, "events") && msgpack_pack_uint64(&pk, ws.events) == 0 &&
              pack_str(&pk, "by_kind") && msgpack_pack_map(&pk, kinds) == 0;
    for (unsigned int k = 0; ok && k < 256; k++) {
        if (ws.by_kind[k]) {
            ok = msgpack_pack_uint64(&pk, k) == 0 &&
                 msgpack_pack_uint64(&pk, ws.by_kind[k]) == 0;
        }
    }
    ok = ok &&
         pack_str(&pk, "seen") && msgpack_pack_uint64(&pk, seen) == 0 &&
         pack_str(&pk, "recorded") && msgpack_pack_uint64(&pk, n_recorded) == 0 &&
         pack_str(&pk, "deduplicated") && msgpack_pack_uint64(&pk, dedup) == 0 &&
         pack_str(&pk, "dropped") && msgpack_pack_uint64(&pk, ws.dropped) == 0 &&
         pack_str(&pk, "tables") && msgpack_pack_uint64(&pk, n_tables) == 0;
    {
        g_autofree gchar *msg = g_strdup_printf(
            "shadowtrace: %" PRIu64 " events in %" PRIu64 " chunks, %" PRIu64
            " accesses seen, %" PRIu64 " recorded, %" PRIu64 " deduplicated, %"
            PRIu64 " dropped, %" PRIu64 " tables\n", ws.events, ws.chunks, seen,
            n_recorded, dedup, ws.dropped, n_tables);
        qemu_plugin_outs(msg);
    }
    return ok;
}

static void plugin_exit(qemu_plugin_id_t id, void *udata)
{
    (void)id;
    (void)udata;
    rec_lock();
    if (rec.finished) {
        rec_unlock();
        return;
    }
    rec.finished = true;
    store_flag(&rec.window_open, false);
    if (rec.cur->n) {
        chunk_submit();
    }
    rec_unlock();

    pthread_mutex_lock(&q.lock);
    q.stop = true;
    pthread_cond_broadcast(&q.full_cond);
    pthread_mutex_unlock(&q.lock);
    for (unsigned int i = 0; i < n_encoders; i++) {
        if (encoders[i].running) {
            pthread_join(encoders[i].thread, NULL);
            encoders[i].running = false;
        }
    }
    if (ws.failed) {
        fprintf(stderr, "shadowtrace plugin: %s has no footer (write error "
                "above): the trace is truncated\n", opt_out);
    } else if (!write_footer() || fflush(out_file) != 0) {
        fprintf(stderr, "shadowtrace plugin: writing the footer of %s "
                "failed: %s\n", opt_out, strerror(errno));
    }
    fclose(out_file);
    out_file = NULL;
}

/* ---------------------------------------------------------------------- */
/* Install: options, files, header                                        */

static int fail(const char *fmt, ...) G_GNUC_PRINTF(1, 2);

static int fail(const char *fmt, ...)
{
    va_list ap;

    fputs("shadowtrace plugin: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return -1;
}

static bool parse_u64(const char *s, uint64_t *out)
{
    char *end;

    if (!*s || !g_ascii_isdigit(*s)) {
        return false;
    }
    errno = 0;
    *out = g_ascii_strtoull(s, &end, 0);
    return errno == 0 && *end == '\0';
}

static int parse_options(int argc, char **argv)
{
    opt_pairs = g_ptr_array_new();
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        const char *eq = strchr(arg, '=');
        g_autofree char *key = NULL;
        const char *val;

        if (!eq) {
            return fail("option '%s' is not key=value", arg);
        }
        key = g_strndup(arg, eq - arg);
        val = eq + 1;
        if (!strcmp(key, "out")) {
            opt_out = val;
        } else if (!strcmp(key, "ram")) {
            opt_ram = val;
        } else if (!strcmp(key, "ramsize")) {
            if (!parse_u64(val, &opt_ramsize) || opt_ramsize == 0) {
                return fail("bad ramsize '%s' (bytes)", val);
            }
        } else if (!strcmp(key, "window")) {
            opt_window_none = false;
            if (!strcmp(val, "all")) {
                opt_window_all = true;
            } else if (!strcmp(val, "markers")) {
                opt_window_all = false;
            } else if (!strcmp(val, "none")) {
                opt_window_all = false;
                opt_window_none = true;
            } else {
                return fail("bad window '%s' (markers, all or none)", val);
            }
        } else if (!strcmp(key, "dedup")) {
            if (!qemu_plugin_bool_parse(key, val, &opt_dedup)) {
                return fail("bad dedup '%s' (on or off)", val);
            }
        } else if (!strcmp(key, "level")) {
            uint64_t lv;
            if (!parse_u64(val, &lv) || lv < 1 ||
                lv > (uint64_t)ZSTD_maxCLevel()) {
                return fail("bad level '%s' (1..%d)", val, ZSTD_maxCLevel());
            }
            opt_level = (int)lv;
        } else if (!strcmp(key, "scenario")) {
            hdr_scenario = val;
        } else if (!strcmp(key, "kernel")) {
            hdr_kernel = val;
        } else if (!strcmp(key, "qemu")) {
            hdr_qemu = val;
        } else if (!strcmp(key, "vcpus")) {
            uint64_t nv;
            if (!parse_u64(val, &nv) || nv == 0 || nv > 256) {
                return fail("bad vcpus '%s' (1..256)", val);
            }
            hdr_vcpus = (int64_t)nv;
        } else {
            return fail("unknown option '%s'", key);
        }
        /* Later values of a key replace earlier ones in the header map. */
        for (guint j = 0; j < opt_pairs->len; j += 2) {
            if (!strcmp(g_ptr_array_index(opt_pairs, j), key)) {
                g_ptr_array_remove_range(opt_pairs, j, 2);
                break;
            }
        }
        g_ptr_array_add(opt_pairs, g_steal_pointer(&key));
        g_ptr_array_add(opt_pairs, (gpointer)val);
    }
    if (!opt_out) {
        return fail("missing required option out=PATH");
    }
    if (!opt_ram) {
        return fail("missing required option ram=PATH");
    }
    if (!opt_ramsize) {
        return fail("missing required option ramsize=BYTES");
    }
    return 0;
}

static bool write_header(void)
{
    bool ok = msgpack_pack_map(&pk, 9) == 0 &&
              pack_str(&pk, ST_KEY_TYPE) && pack_str(&pk, ST_TYPE_HEADER) &&
              pack_str(&pk, "magic") && pack_str(&pk, ST_MAGIC) &&
              pack_str(&pk, "version") && msgpack_pack_uint64(&pk, ST_VERSION) == 0 &&
              pack_str(&pk, "qemu") && pack_str(&pk, hdr_qemu) &&
              pack_str(&pk, "options") &&
              msgpack_pack_map(&pk, opt_pairs->len / 2) == 0;
    for (guint j = 0; ok && j < opt_pairs->len; j++) {
        ok = pack_str(&pk, g_ptr_array_index(opt_pairs, j));
    }
    ok = ok &&
         pack_str(&pk, "kernel") && pack_str(&pk, hdr_kernel) &&
         pack_str(&pk, "ram_bytes") && msgpack_pack_uint64(&pk, opt_ramsize) == 0 &&
         pack_str(&pk, "vcpus") && msgpack_pack_int64(&pk, hdr_vcpus) == 0 &&
         pack_str(&pk, "scenario") && pack_str(&pk, hdr_scenario);
    return ok && fflush(out_file) == 0;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id,
                                           const qemu_info_t *info,
                                           int argc, char **argv)
{
    size_t frames, u64_cap;
    long ncpu;
    int fd;
    void *map;

    if (!info->system_emulation || strcmp(info->target_name, "x86_64") != 0) {
        return fail("needs qemu-system-x86_64 (got %s%s)", info->target_name,
                    info->system_emulation ? "" : ", user mode");
    }
    if (parse_options(argc, argv) < 0) {
        return -1;
    }
    n_vcpus = (unsigned int)MAX(info->system.max_vcpus, 1);
    n_boot_vcpus = (unsigned int)CLAMP(info->system.smp_vcpus, 1, (int)n_vcpus);
    if (n_vcpus > 256) {
        return fail("at most 256 vCPUs (the vcpu column is a byte)");
    }
    if (hdr_vcpus < 0) {
        hdr_vcpus = info->system.smp_vcpus;
    }
    /* Before any vCPU thread exists: see RecState. */
    rec.need_lock = n_vcpus > 1;

    fd = open(opt_ram, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return fail("cannot open ram=%s: %s", opt_ram, strerror(errno));
    }
    /* Read-only shared view of the backend file: file offset == pa. */
    map = mmap(NULL, opt_ramsize, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        return fail("cannot map ram=%s: %s", opt_ram, strerror(errno));
    }
    ram = map;
    ram_limit = MIN(opt_ramsize, LOW_RAM_LIMIT) & PAGE_MASK;

    out_file = fopen(opt_out, "wb");
    if (!out_file) {
        munmap(map, opt_ramsize);
        return fail("cannot open out=%s: %s", opt_out, strerror(errno));
    }
    msgpack_packer_init(&pk, out_file, msgpack_fbuffer_write);
    if (!write_header()) {
        fclose(out_file);
        munmap(map, opt_ramsize);
        return fail("cannot write out=%s: %s", opt_out, strerror(errno));
    }

    frames = ram_limit >> PAGE_SHIFT;
    tracked = g_new0(uint64_t, (frames + 63) / 64);
    frame_level = g_new0(uint8_t, frames);
    vcpus = g_new0(VCpu, n_vcpus);
    descs = g_hash_table_new(desc_hash, desc_equal);
    tb_descs = g_hash_table_new(tb_hash, tb_equal);

    /*
     * Output side: one encoder per CPU (2..MAX_ENCODERS: even on two CPUs a
     * second one uses the time the vCPU thread waits), two spare chunks.
     */
    ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    n_encoders = (unsigned int)CLAMP(ncpu, 2, MAX_ENCODERS);
    for (unsigned int i = 0; i < n_encoders + 2; i++) {
        Chunk *c = g_new(Chunk, 1);
        c->n = c->n_pages = c->n_markers = 0;
        c->next = q.free;
        q.free = c;
    }
    rec.cur = q.free;
    q.free = rec.cur->next;
    u64_cap = (size_t)ST_CHUNK_EVENTS * 8;
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
            fclose(out_file);
            munmap(map, opt_ramsize);
            return fail("cannot start the encoder threads");
        }
        e->running = true;
    }

    plugin_id = id;
    vcpu_index_setup(n_vcpus);
    register_base_callbacks(id);
    return 0;
}
