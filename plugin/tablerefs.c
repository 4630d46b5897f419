/*
 * shadowtrace: which guest frames are page tables (reference counts,
 * orphans, untracking). See tablerefs.h for the rule.
 */

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tablerefs.h"

typedef struct {
    uint64_t *ents;     /* levels 4-2: the entries as the trace has them */
    uint64_t at;        /* orphan: clock when it became unreachable (0: no vCPU can hold it) */
    uint64_t owner;     /* the PGD whose user half links it, or TR_OWNER_ANY */
    uint32_t refs;      /* links from live tracked tables */
    uint16_t roots;     /* vCPUs whose root it is */
    uint8_t level;      /* 4..1; 0: untracked */
    uint8_t writes;     /* orphan: stores still told before untracking */
    bool orphan;
} Frame;

uint64_t *tr_tracked;
uint64_t tr_limit;
static const uint8_t *ram;
static TrSink sink;
static Frame *frames;
static size_t n_frames;

/*
 * Flushes: a clock ticks at every orphaning and every flush, so "vCPU v
 * flushed after frame f became unreachable" is flushed[v] > f->at. Only
 * vCPUs that have had a root since the window opened count, and of those
 * only the ones that can hold a translation through f (can_hold).
 */
static uint64_t clock_now;
static uint64_t root_of[TR_MAX_VCPUS];
static uint64_t flushed[TR_MAX_VCPUS];
static bool active[TR_MAX_VCPUS];
static uint64_t min_flushed = UINT64_MAX;   /* over active vCPUs */
static unsigned int n_active_max;           /* 1 + the highest active vCPU */

static void acquire(unsigned int vcpu, uint64_t frame, int level, bool root,
                    uint64_t owner);
static void release(uint64_t frame, bool root);

static inline Frame *frame_of(uint64_t frame)
{
    return &frames[frame >> PAGE_SHIFT];
}

static inline uint64_t ram_u64(uint64_t pa)
{
    uint64_t v;

    memcpy(&v, ram + pa, sizeof(v));
    return v;
}

/* A present entry of a level-`level` table that points at a table. */
static inline bool is_link(uint64_t e, int level)
{
    return level > 1 && (e & PTE_P) && (level == 4 || !(e & PTE_PS));
}

static void bitmap_set(uint64_t frame, bool on)
{
    uint64_t f = frame >> PAGE_SHIFT, bit = 1ULL << (f & 63);

    if (on) {
        __atomic_fetch_or(&tr_tracked[f >> 6], bit, __ATOMIC_RELAXED);
    } else {
        __atomic_fetch_and(&tr_tracked[f >> 6], ~bit, __ATOMIC_RELAXED);
    }
}

static bool untrack_on = true;

void tr_set_untrack(bool on)
{
    untrack_on = on;
}

bool tr_open(const uint8_t *base, uint64_t limit, const TrSink *s)
{
    ram = base;
    tr_limit = limit & PAGE_MASK;
    sink = *s;
    n_frames = tr_limit >> PAGE_SHIFT;
    tr_tracked = calloc((n_frames + 63) / 64 + 1, sizeof(uint64_t));
    frames = calloc(n_frames + 1, sizeof(Frame));
    if (!tr_tracked || !frames) {
        tr_close();
        return false;
    }
    tr_forget_all();
    return true;
}

void tr_close(void)
{
    if (frames) {
        for (size_t i = 0; i < n_frames; i++) {
            free(frames[i].ents);
        }
    }
    free(frames);
    frames = NULL;
    free(tr_tracked);
    tr_tracked = NULL;
    tr_limit = 0;
    n_frames = 0;
}

void tr_forget_all(void)
{
    for (size_t i = 0; i < (n_frames + 63) / 64; i++) {
        __atomic_store_n(&tr_tracked[i], 0, __ATOMIC_RELAXED);
    }
    for (size_t i = 0; i < n_frames; i++) {
        free(frames[i].ents);
        memset(&frames[i], 0, sizeof(Frame));
    }
    for (unsigned int v = 0; v < TR_MAX_VCPUS; v++) {
        root_of[v] = TR_NO_ROOT;
        flushed[v] = 0;
        active[v] = false;
    }
    min_flushed = UINT64_MAX;
    n_active_max = 0;
    clock_now = 0;
}

static void update_min_flushed(void)
{
    min_flushed = UINT64_MAX;
    for (unsigned int v = 0; v < TR_MAX_VCPUS; v++) {
        if (active[v] && flushed[v] < min_flushed) {
            min_flushed = flushed[v];
        }
    }
}

/*
 * Whether vCPU v's TLB can hold a translation through f. Since v's last
 * flush its root has been root_of[v] (a CR3 load is a flush), so a frame
 * of another PGD's user half was never on one of its walks since: Linux
 * never links a user-half table from two PGDs, and TR_OWNER_ANY covers
 * the kernel half (every PGD shares it) and any frame whose links came
 * from more than one place. A vCPU that has lost its root is counted.
 */
static inline bool can_hold(unsigned int v, const Frame *f)
{
    return f->owner == TR_OWNER_ANY || root_of[v] == TR_NO_ROOT ||
           root_of[v] == f->owner;
}

/* Every vCPU that could hold a translation through f has flushed since. */
static bool flushed_since(const Frame *f)
{
    if (f->at == 0 || f->at < min_flushed) {
        return true;
    }
    for (unsigned int v = 0; v < n_active_max; v++) {
        if (active[v] && flushed[v] < f->at && can_hold(v, f)) {
            return false;
        }
    }
    return true;
}

/*
 * The owner a child linked by entry i of the level-`level` table f gets:
 * f itself for a PGD's user half (entries below TR_KERNEL_HALF), f's own
 * owner further down.
 */
static inline uint64_t child_owner(uint64_t frame, const Frame *f, int level,
                                   unsigned int i)
{
    if (level == 4) {
        return i < TR_KERNEL_HALF ? frame : TR_OWNER_ANY;
    }
    return f->owner;
}

/* The counts of every child of a live table f (frame). */
static void take_children(unsigned int vcpu, uint64_t frame, Frame *f)
{
    int level = f->level;

    if (!f->ents) {
        return;
    }
    for (unsigned int i = 0; i < TR_ENTRIES; i++) {
        if (is_link(f->ents[i], level)) {
            acquire(vcpu, f->ents[i] & PTE_ADDR, level - 1, false,
                    child_owner(frame, f, level, i));
        }
    }
}

static void drop_children(Frame *f)
{
    int level = f->level;

    if (!f->ents) {
        return;
    }
    for (unsigned int i = 0; i < TR_ENTRIES; i++) {
        if (is_link(f->ents[i], level)) {
            release(f->ents[i] & PTE_ADDR, false);
        }
    }
}

/* Nothing links f any more: it became unreachable at clock `at`. */
static void make_orphan(Frame *f, uint64_t at)
{
    f->orphan = true;
    f->at = at;
    f->writes = TR_ORPHAN_WRITES;
    drop_children(f);
}

/* Keep (levels 4-2) or drop (level 1) the copy of f's entries. */
static void keep_entries(Frame *f, const uint64_t *ents)
{
    if (f->level > 1) {
        if (!f->ents) {
            f->ents = malloc(PAGE_BYTES);
        }
        if (f->ents) {
            memcpy(f->ents, ents, PAGE_BYTES);
        }
        /* (out of memory: the frame's children are simply not counted) */
    } else {
        free(f->ents);
        f->ents = NULL;
    }
}

/*
 * The owner of a frame linked from `owner` now: the same, or TR_OWNER_ANY
 * once two differ in one tracked life (kept until the frame is untracked,
 * so a vCPU that walked it under an earlier owner is still counted).
 */
static inline void add_owner(Frame *f, uint64_t owner)
{
    if (f->owner != owner) {
        f->owner = TR_OWNER_ANY;
    }
}

/*
 * frame is linked at `level` (by an entry of a table `owner` says whose,
 * or as a root): track it with a SNAPSHOT if it is not, revive it if it is
 * an orphan, and take its children in both cases.
 */
static void acquire(unsigned int vcpu, uint64_t frame, int level, bool root,
                    uint64_t owner)
{
    uint64_t ents[TR_ENTRIES];
    Frame *f;

    if (!tr_frame_in_ram(frame)) {
        return;
    }
    f = frame_of(frame);
    if (root) {
        f->roots++;
    } else {
        f->refs++;
    }
    if (f->level == 0) {
        bitmap_set(frame, true);
        f->level = (uint8_t)level;
        f->orphan = false;
        f->owner = owner;
        sink.snapshot(vcpu, frame, ents);
        keep_entries(f, ents);
        take_children(vcpu, frame, f);
        return;
    }
    add_owner(f, owner);
    if (f->level != level) {
        /* Used at another level now (a freed L1 reused as an L2, say):
         * its entries mean something else. The trace told every store
         * into it, so RAM holds what the replayer has. */
        if (!f->orphan) {
            drop_children(f);
        }
        f->level = (uint8_t)level;
        f->orphan = false;
        memcpy(ents, ram + frame, PAGE_BYTES);
        keep_entries(f, ents);
        take_children(vcpu, frame, f);
    } else if (f->orphan) {
        f->orphan = false;
        take_children(vcpu, frame, f);
    }
}

static void release(uint64_t frame, bool root)
{
    Frame *f;

    if (!tr_frame_in_ram(frame)) {
        return;
    }
    f = frame_of(frame);
    if (f->level == 0) {
        return;
    }
    if (root && f->roots) {
        f->roots--;
    } else if (!root && f->refs) {
        f->refs--;
    }
    /* A root stays live while not current: its process may run again. */
    if (!f->orphan && f->level != 4 && f->refs == 0 && f->roots == 0) {
        make_orphan(f, ++clock_now);
    }
}

static void untrack(unsigned int vcpu, uint64_t frame, Frame *f, uint64_t pc)
{
    sink.untrack(vcpu, frame, f->level, pc);
    bitmap_set(frame, false);
    free(f->ents);
    memset(f, 0, sizeof(*f));
}

void tr_set_root(unsigned int vcpu, uint64_t frame)
{
    uint64_t old;

    if (vcpu >= TR_MAX_VCPUS || root_of[vcpu] == frame) {
        return;
    }
    old = root_of[vcpu];
    root_of[vcpu] = frame;
    if (frame != TR_NO_ROOT) {
        if (!active[vcpu]) {
            active[vcpu] = true;
            flushed[vcpu] = 0;
            if (vcpu >= n_active_max) {
                n_active_max = vcpu + 1;
            }
            update_min_flushed();
        }
        /* A PGD is its own user half's owner; its own owner is moot. */
        acquire(vcpu, frame, 4, true, TR_OWNER_ANY);
    }
    if (old != TR_NO_ROOT) {
        release(old, true);
    }
}

void tr_flushed(unsigned int vcpu)
{
    if (vcpu >= TR_MAX_VCPUS) {
        return;
    }
    flushed[vcpu] = ++clock_now;
    update_min_flushed();
}

void tr_reach(unsigned int vcpu, uint64_t frame, int level)
{
    Frame *f;

    if (!tr_frame_in_ram(frame)) {
        return;
    }
    f = frame_of(frame);
    /*
     * A walk follows live links only, which are counted: a frame it finds
     * untracked, orphaned or at another level was linked by a store the
     * plugin did not see (DMA, say). Count the walk as one more link: the
     * frame then never becomes an orphan, as before this unit existed.
     */
    if (f->level == 0 || f->orphan || f->level != level) {
        acquire(vcpu, frame, level, false, TR_OWNER_ANY);
    }
}

/*
 * A store into a root no vCPU has loaded, one Linux never makes to the
 * PGD of a live process: narrower than an entry (rep stosb / movsb of
 * clear_page or a copy), one that leaves the entry as it was (clear_page
 * over an empty user half), or one that changes a present kernel-half
 * entry (those are set when the PGD is made and never change after).
 */
static bool dying_store(const Frame *f, unsigned int i, uint64_t e,
                        uint64_t pa, unsigned int size)
{
    uint64_t old = f->ents ? f->ents[i] : e;

    return size < 8 || (pa & 7) || e == old ||
           (i >= TR_KERNEL_HALF && (old & PTE_P));
}

bool tr_store(unsigned int vcpu, uint64_t va, uint64_t pa, unsigned int size,
              uint64_t pc)
{
    uint64_t first = pa & ~7ULL, last = (pa + size - 1) & ~7ULL;
    bool any = false;

    for (uint64_t ea = first; ea <= last; ea += 8) {
        uint64_t frame = ea & PAGE_MASK, e, old;
        unsigned int i = (unsigned int)((ea >> 3) & (TR_ENTRIES - 1));
        Frame *f;
        int level;

        if (!tr_is_tracked(frame)) {
            continue;
        }
        f = frame_of(frame);
        e = ram_u64(ea);
        if (!f->orphan && f->level == 4 && f->roots == 0 &&
            dying_store(f, i, e, pa, size)) {
            /* Every vCPU that had it loaded has loaded another CR3 since. */
            make_orphan(f, 0);
        }
        any = true;
        if (f->orphan) {
            if (untrack_on && f->writes == 0 && flushed_since(f)) {
                untrack(vcpu, frame, f, pc);
                continue;
            }
            if (f->writes) {
                f->writes--;
            }
            sink.table_write(vcpu, va, ea, pc, e);
            if (f->ents) {
                f->ents[i] = e;
            }
            continue;
        }
        sink.table_write(vcpu, va, ea, pc, e);
        if (!f->ents) {
            continue;
        }
        level = f->level;
        old = f->ents[i];
        f->ents[i] = e;
        if (is_link(e, level) && is_link(old, level) &&
            (e & PTE_ADDR) == (old & PTE_ADDR)) {
            continue;   /* same child (flags changed) */
        }
        /* Take the new child before dropping the old: never 0 in between. */
        if (is_link(e, level)) {
            acquire(vcpu, e & PTE_ADDR, level - 1, false,
                    child_owner(frame, f, level, i));
        }
        if (is_link(old, level)) {
            release(old & PTE_ADDR, false);
        }
    }
    return any;
}

TrFrameInfo tr_info(uint64_t frame)
{
    TrFrameInfo info = { 0, false, 0, 0 };

    if (tr_frame_in_ram(frame) && frame_of(frame)->level) {
        const Frame *f = frame_of(frame);

        info = (TrFrameInfo){ f->level, f->orphan, f->refs, f->roots };
    }
    return info;
}
