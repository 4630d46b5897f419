/*
 * shadowtrace: unit test of the table-frame rule (plugin/tablerefs.c)
 *
 * A small fake RAM holds hand-made 4-level tables; the test stores into
 * it as the guest would (the RAM first, then tr_store, as the plugin's
 * memory callback runs after the store) and checks the events the unit
 * sends to its sink and the state it keeps: snapshots of a new root's
 * tree, counts, orphans, the cascade, revival, two told stores then an
 * UNTRACK once every vCPU that can hold the frame has flushed (the owner
 * rule: a user-half table is held back only by vCPUs on its PGD), the
 * death of a PGD no vCPU has loaded, a frame reused at another level. Failures are printed one per
 * line; the last line is "N passed, M failed" and the exit status is
 * non-zero if M > 0.
 */

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tablerefs.h"

#define FRAMES  64
#define F(n)    ((uint64_t)(n) * PAGE_BYTES)
#define LINK(n) (F(n) | 0x67)   /* present, writable, user, accessed, dirty */
#define PC      0xffffffff81234567ULL

enum { EV_SNAPSHOT, EV_WRITE, EV_UNTRACK };

typedef struct {
    int kind;
    unsigned int vcpu;
    uint64_t pa;        /* frame (SNAPSHOT, UNTRACK) or entry (WRITE) */
    uint64_t val;       /* new value (WRITE), level (UNTRACK) */
} Event;

static uint8_t *ram;
static Event evs[4096];
static int n_evs;
static int n_passed, n_failed;

static void on_snapshot(unsigned int vcpu, uint64_t frame, uint64_t *ents)
{
    memcpy(ents, ram + frame, PAGE_BYTES);
    evs[n_evs++] = (Event){ EV_SNAPSHOT, vcpu, frame, 0 };
}

static void on_write(unsigned int vcpu, uint64_t va, uint64_t ea, uint64_t pc,
                     uint64_t val)
{
    (void)va;
    (void)pc;
    evs[n_evs++] = (Event){ EV_WRITE, vcpu, ea, val };
}

static void on_untrack(unsigned int vcpu, uint64_t frame, int level,
                       uint64_t pc)
{
    (void)pc;
    evs[n_evs++] = (Event){ EV_UNTRACK, vcpu, frame, (uint64_t)level };
}

static const TrSink sink = { on_snapshot, on_write, on_untrack };

static void check(bool ok, const char *what, int line)
{
    if (ok) {
        n_passed++;
    } else {
        n_failed++;
        printf("FAIL line %d: %s\n", line, what);
    }
}
#define CHECK(cond) check((cond), #cond, __LINE__)

static void set(uint64_t frame, unsigned int i, uint64_t e)
{
    memcpy(ram + frame + i * 8, &e, 8);
}

/* The guest stores e into entry i of frame; returns tr_store's answer. */
static bool store(unsigned int vcpu, uint64_t frame, unsigned int i,
                  uint64_t e)
{
    set(frame, i, e);
    return tr_store(vcpu, 0, frame + i * 8, 8, PC);
}

/* A byte store (rep stosb of clear_page). */
static bool store_byte(unsigned int vcpu, uint64_t pa, uint8_t b)
{
    ram[pa] = b;
    return tr_store(vcpu, 0, pa, 1, PC);
}

/* Events since the last call: count of a kind, and the frames involved. */
static int count(int kind, int from)
{
    int n = 0;

    for (int i = from; i < n_evs; i++) {
        n += evs[i].kind == kind;
    }
    return n;
}

static bool has(int kind, uint64_t pa, int from)
{
    for (int i = from; i < n_evs; i++) {
        if (evs[i].kind == kind && evs[i].pa == pa) {
            return true;
        }
    }
    return false;
}

static int level(uint64_t frame)
{
    return tr_info(frame).level;
}

static bool orphan(uint64_t frame)
{
    return tr_info(frame).orphan;
}

/*
 * PGD A = F1: entry 0 -> L3 F2 -> L2 F3 -> L1 F4 -> data F20; F3 entry 1
 * is a 2 MiB page at F32 (a leaf, not a table); entry 256 -> the kernel's
 * L3 F10 -> L2 F11 (entry 1 of F10 is a 1 GiB page). PGD B = F5 and PGD
 * C = F6 share the kernel half.
 */
static void build(void)
{
    memset(ram, 0, (size_t)FRAMES * PAGE_BYTES);
    set(F(1), 0, LINK(2));
    set(F(1), 256, LINK(10));
    set(F(2), 0, LINK(3));
    set(F(3), 0, LINK(4));
    set(F(3), 1, F(32) | 0xe7);         /* PS */
    set(F(4), 0, LINK(20));
    set(F(10), 0, LINK(11));
    set(F(10), 1, F(0) | 0xe7);         /* PS at level 3 */
    set(F(5), 256, LINK(10));
    set(F(6), 256, LINK(10));
}

static void test_root_tree(void)
{
    int at;

    build();
    tr_forget_all();
    n_evs = 0;
    tr_set_root(0, F(1));
    /* the whole tree below A: A, its user L3, L2, L1, the kernel L3, L2 */
    CHECK(count(EV_SNAPSHOT, 0) == 6 && n_evs == 6);
    CHECK(level(F(1)) == 4 && level(F(2)) == 3 && level(F(3)) == 2);
    CHECK(level(F(4)) == 1 && level(F(10)) == 3 && level(F(11)) == 2);
    /* leaves and data are no tables */
    CHECK(level(F(32)) == 0 && level(F(20)) == 0 && level(F(0)) == 0);
    CHECK(tr_info(F(1)).roots == 1 && tr_info(F(10)).refs == 1);
    CHECK(tr_is_tracked(F(4) + 100) && !tr_is_tracked(F(20)));

    /* a store into a live L1: one TABLE_WRITE with the new value */
    at = n_evs;
    CHECK(store(0, F(4), 1, LINK(21)));
    CHECK(n_evs == at + 1 && evs[at].kind == EV_WRITE &&
          evs[at].pa == F(4) + 8 && evs[at].val == LINK(21));
    /* a store into data: nothing */
    CHECK(!store(0, F(20), 0, 1234) && n_evs == at + 1);

    /* a second root on vCPU 1 shares the kernel L3: counted twice */
    at = n_evs;
    tr_set_root(1, F(5));
    CHECK(count(EV_SNAPSHOT, at) == 1 && has(EV_SNAPSHOT, F(5), at));
    CHECK(tr_info(F(10)).refs == 2);

    /* flags of a link change (same child): no count changes */
    CHECK(store(0, F(3), 0, LINK(4) & ~0x20ULL));
    CHECK(tr_info(F(4)).refs == 1 && !orphan(F(4)));

    /* a 16-byte store over two entries: two TABLE_WRITEs */
    at = n_evs;
    set(F(4), 2, LINK(22));
    set(F(4), 3, LINK(23));
    CHECK(tr_store(0, 0, F(4) + 16, 16, PC) && count(EV_WRITE, at) == 2);
}

static void test_orphan_untrack(void)
{
    int at;

    /* vCPU 1 runs A too (a thread of the process): it loads A's CR3 */
    tr_flushed(1);
    tr_set_root(1, F(1));
    CHECK(tr_info(F(1)).roots == 2 && tr_info(F(10)).refs == 2);
    /* unlink the L1 from its L2: an orphan */
    at = n_evs;
    CHECK(store(0, F(3), 0, 0));
    CHECK(count(EV_WRITE, at) == 1 && orphan(F(4)) && level(F(4)) == 1);
    /* the first two stores are told; then, with no flush since, more */
    at = n_evs;
    store(0, F(4), 0, 0);
    store(0, F(4), 1, 0);
    store(0, F(4), 2, 0);
    CHECK(count(EV_WRITE, at) == 3 && count(EV_UNTRACK, at) == 0);
    /* vCPU 0 flushed, vCPU 1 (which has A loaded) not: still told */
    tr_flushed(0);
    at = n_evs;
    store(0, F(4), 3, 0);
    CHECK(count(EV_WRITE, at) == 1 && count(EV_UNTRACK, at) == 0);
    /* both flushed: the next store untracks it (an epoch point) */
    tr_flushed(1);
    at = n_evs;
    CHECK(store(0, F(4), 4, 0));
    CHECK(n_evs == at + 1 && evs[at].kind == EV_UNTRACK &&
          evs[at].pa == F(4) && evs[at].val == 1);
    CHECK(level(F(4)) == 0 && !tr_is_tracked(F(4)));
    /* stores into it are data now */
    at = n_evs;
    CHECK(!store(0, F(4), 5, 77) && n_evs == at);

    /* linked again: a fresh SNAPSHOT */
    at = n_evs;
    store(0, F(3), 0, LINK(4));
    CHECK(count(EV_WRITE, at) == 1 && has(EV_SNAPSHOT, F(4), at));
    CHECK(level(F(4)) == 1 && tr_info(F(4)).refs == 1);
    /* vCPU 1 back on B */
    tr_flushed(1);
    tr_set_root(1, F(5));
    CHECK(tr_info(F(1)).roots == 1 && tr_info(F(5)).roots == 1);
}

static void test_revive_and_cascade(void)
{
    int at;

    /* unlinked and linked again before untracking: no new SNAPSHOT */
    store(0, F(3), 0, 0);
    CHECK(orphan(F(4)));
    at = n_evs;
    store(0, F(3), 0, LINK(4));
    CHECK(!orphan(F(4)) && count(EV_SNAPSHOT, at) == 0);

    /* a frame two tables link stays live until both drop it */
    store(0, F(3), 7, LINK(4));
    CHECK(tr_info(F(4)).refs == 2);
    store(0, F(3), 7, 0);
    CHECK(!orphan(F(4)) && tr_info(F(4)).refs == 1);

    /* unlink the L2 from the L3: the L2 and, below it, the L1 orphan */
    store(0, F(2), 0, 0);
    CHECK(orphan(F(3)) && orphan(F(4)) && tr_info(F(4)).refs == 0);
    /* a store into the orphaned L2 links nothing */
    at = n_evs;
    store(0, F(3), 9, LINK(40));
    CHECK(count(EV_SNAPSHOT, at) == 0 && level(F(40)) == 0);
    /* linked again: both revive and the new child is taken */
    at = n_evs;
    store(0, F(2), 0, LINK(3));
    CHECK(!orphan(F(3)) && !orphan(F(4)) && tr_info(F(4)).refs == 1);
    CHECK(count(EV_SNAPSHOT, at) == 1 && has(EV_SNAPSHOT, F(40), at));
}

static void test_root_death(void)
{
    int at;

    /* vCPU 0 loads B: A is the root of no vCPU but stays live */
    tr_flushed(0);
    tr_set_root(0, F(5));
    CHECK(tr_info(F(1)).roots == 0 && !orphan(F(1)) && level(F(1)) == 4);
    /* fork-like: a new user L3 linked into A while not loaded */
    at = n_evs;
    store(0, F(1), 1, LINK(12));
    CHECK(!orphan(F(1)) && has(EV_SNAPSHOT, F(12), at));
    /* clear_page of the freed A: byte stores. Two are told, then UNTRACK
     * (every vCPU that had A loaded has loaded another CR3 since) */
    at = n_evs;
    store_byte(0, F(1) + 0, 0);
    store_byte(0, F(1) + 1, 0);
    CHECK(count(EV_WRITE, at) == 2 && orphan(F(1)));
    CHECK(store_byte(0, F(1) + 2, 0));
    CHECK(count(EV_UNTRACK, at) == 1 && has(EV_UNTRACK, F(1), at));
    CHECK(level(F(1)) == 0);
    /* its user tables orphaned with it; the kernel L3 B and C share stays */
    CHECK(orphan(F(2)) && orphan(F(12)));
    CHECK(!orphan(F(10)) && tr_info(F(10)).refs == 1);

    /* C, loaded then left: a store that clears a kernel-half entry kills it */
    tr_set_root(0, F(6));
    tr_set_root(0, F(5));
    CHECK(tr_info(F(10)).refs == 2 && !orphan(F(6)));
    store(0, F(6), 256, 0);
    CHECK(orphan(F(6)) && tr_info(F(10)).refs == 1);

    /* a root that is loaded does not die of any store */
    store_byte(0, F(5) + 2048, 0);
    CHECK(!orphan(F(5)) && level(F(5)) == 4);
    store(0, F(5), 256, LINK(10));
    CHECK(!orphan(F(5)) && tr_info(F(10)).refs == 1);
}

static void test_new_level_and_walks(void)
{
    int at;

    /* (A died above, and its tree with it:) a new L3 F13 and L2 F14 under B */
    store(0, F(5), 0, LINK(13));
    store(0, F(13), 0, LINK(14));
    CHECK(level(F(13)) == 3 && level(F(14)) == 2);

    /* an L1 that maps F8, orphaned, then linked from an L3 as an L2 */
    set(F(7), 0, LINK(8));
    store(0, F(14), 2, LINK(7));
    CHECK(level(F(7)) == 1 && level(F(8)) == 0);
    store(0, F(14), 2, 0);
    CHECK(orphan(F(7)));
    at = n_evs;
    store(0, F(13), 5, LINK(7));
    CHECK(level(F(7)) == 2 && !orphan(F(7)));
    CHECK(has(EV_SNAPSHOT, F(8), at) && level(F(8)) == 1);

    /* a walk that finds a frame untracked tracks it (and keeps it) */
    at = n_evs;
    tr_reach(0, F(30), 1);
    CHECK(has(EV_SNAPSHOT, F(30), at) && level(F(30)) == 1);
    CHECK(tr_info(F(30)).refs == 1);
    /* one found tracked and live at its level: nothing */
    at = n_evs;
    tr_reach(0, F(14), 2);
    CHECK(n_evs == at && tr_info(F(14)).refs == 1);
    /* one found orphaned: revived */
    CHECK(orphan(F(3)));
    tr_reach(0, F(3), 2);
    CHECK(!orphan(F(3)) && tr_info(F(3)).refs == 1);

    /* out of RAM: never tracked */
    at = n_evs;
    tr_reach(0, F(FRAMES + 3), 1);
    CHECK(n_evs == at);

    /* a window opens: everything is forgotten, the root snapshotted again */
    tr_forget_all();
    CHECK(level(F(5)) == 0 && !tr_is_tracked(F(10)));
    at = n_evs;
    tr_set_root(0, F(5));
    CHECK(has(EV_SNAPSHOT, F(5), at) && has(EV_SNAPSHOT, F(10), at));
    /* and a vCPU with no root does not hold orphans back */
    store(0, F(10), 0, 0);
    CHECK(orphan(F(11)));
    tr_flushed(0);
    store(0, F(11), 0, 0);
    store(0, F(11), 1, 0);
    at = n_evs;
    store(0, F(11), 2, 0);
    CHECK(has(EV_UNTRACK, F(11), at));
}

/* Stores into an orphan until it is untracked; how many were told. */
static int told_until_untrack(uint64_t frame, int max)
{
    int at = n_evs;

    for (int i = 0; i < max; i++) {
        store(0, frame, (unsigned int)(100 + i), 0);
        if (has(EV_UNTRACK, frame, at)) {
            return count(EV_WRITE, at);
        }
    }
    return -1;
}

/*
 * Which vCPUs hold an orphan back: those whose root is the PGD that owns
 * it (its user half links it) and, for kernel-half tables and frames two
 * PGDs linked, every vCPU with a root. vCPU 1 sits on C, a PGD with only
 * the kernel half (an idle CPU on init_mm), and never flushes unless told.
 */
static void test_owners(void)
{
    build();
    tr_forget_all();
    n_evs = 0;
    tr_set_root(0, F(1));
    tr_set_root(1, F(6));

    /* A's user L1 (owner A): vCPU 1 on C cannot hold it; vCPU 0's flush
     * is enough, so the third store is the UNTRACK (two told first) */
    store(0, F(3), 0, 0);
    CHECK(orphan(F(4)));
    tr_flushed(0);
    CHECK(told_until_untrack(F(4), 5) == TR_ORPHAN_WRITES);

    /* the kernel half's L2 (every PGD links it): vCPU 1 holds it back;
     * four stores told (more than two), then vCPU 1 flushes: UNTRACK */
    store(0, F(10), 0, 0);
    CHECK(orphan(F(11)));
    tr_flushed(0);
    CHECK(told_until_untrack(F(11), 4) == -1 && level(F(11)) == 2);
    tr_flushed(1);
    CHECK(told_until_untrack(F(11), 5) == 0);

    /* vCPU 1 loads A (a thread): A's L2 (owner A) is held back by it */
    tr_flushed(1);
    tr_set_root(1, F(1));
    store(0, F(2), 0, 0);
    CHECK(orphan(F(3)));
    tr_flushed(0);
    CHECK(told_until_untrack(F(3), 4) == -1 && level(F(3)) == 2);
    tr_flushed(1);
    CHECK(told_until_untrack(F(3), 5) == 0);

    /* an L3 linked from A's and B's user halves: owned by no one PGD, so
     * vCPU 1, back on C, holds it back too */
    tr_flushed(1);
    tr_set_root(1, F(6));
    tr_flushed(0);
    tr_set_root(0, F(5));       /* B tracked (a process that ran) */
    tr_flushed(0);
    tr_set_root(0, F(1));
    store(0, F(1), 1, LINK(15));
    store(0, F(5), 1, LINK(15));
    CHECK(tr_info(F(15)).refs == 2);
    store(0, F(1), 1, 0);
    store(0, F(5), 1, 0);
    CHECK(orphan(F(15)));
    tr_flushed(0);
    CHECK(told_until_untrack(F(15), 4) == -1 && level(F(15)) == 3);
    tr_flushed(1);
    CHECK(told_until_untrack(F(15), 5) == 0);
}

int main(void)
{
    ram = aligned_alloc(PAGE_BYTES, (size_t)FRAMES * PAGE_BYTES);
    if (!ram || !tr_open(ram, (uint64_t)FRAMES * PAGE_BYTES, &sink)) {
        printf("cannot allocate\n0 passed, 1 failed\n");
        return 1;
    }
    test_root_tree();
    test_orphan_untrack();
    test_revive_and_cascade();
    test_root_death();
    test_new_level_and_walks();
    test_owners();
    tr_close();
    free(ram);
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed > 0;
}
