/*
 * shadowtrace: which guest frames are page tables, and for how long
 *
 * A frame is *tracked* while the trace tells every store into it (after a
 * SNAPSHOT). This unit decides when a frame starts and stops being
 * tracked, from reference counts:
 *
 *  - refs: present non-leaf entries of *live* tracked tables that point at
 *    the frame (levels 4, 3, 2; an L1 entry maps data, never a table);
 *  - roots: vCPUs whose current CR3 is the frame.
 *
 * A tracked frame is live or an orphan. A frame below level 4 becomes an
 * orphan when both counts reach 0; a level-4 frame (a root) only when it is
 * the root of no vCPU and a store into it is one no live root receives
 * (clear_page or a copy over a freed PGD, see tr_store). An orphan's own
 * entries make nothing reachable, so becoming one releases its children
 * (the cascade), and a link to it again (a store, a CR3 load, a walk)
 * revives it and takes them back.
 *
 * An orphan is untracked (the sink's untrack, then it is forgotten) at a
 * store into it once (a) the trace has told TR_ORPHAN_WRITES stores into
 * it since it became one (the replayer's model of Xen keys its early
 * unshadow on those) and (b) every vCPU that has had a root since the
 * window opened and can hold a translation through the frame has flushed
 * its TLB since the frame became unreachable (tr_flushed: a CR3 load,
 * INVPCID type 2/3, a CR4.PGE/PCIDE change; QEMU empties its whole TLB at
 * every CR3 load). Each tracked frame has an owner: the PGD whose user
 * half (entries below TR_KERNEL_HALF) links it, passed down the levels,
 * or TR_OWNER_ANY for the kernel half, a walk's unexpected find, and a
 * frame linked from two owners in one tracked life. A vCPU can hold a
 * translation through a frame of another PGD's user half only if it had
 * that PGD loaded since its last flush, and a CR3 load is a flush: so
 * only vCPUs whose current root is the owner (or that have no root now)
 * hold it back; an idle vCPU on the kernel's own PGD (init_mm) holds back
 * only kernel-half tables. A frame that becomes reachable again
 * afterwards is untracked, so it gets a fresh SNAPSHOT.
 *
 * Pure: no QEMU, no output. Events go to the TrSink given to tr_open, RAM
 * is read through the pointer given there. Threads: every function but
 * tr_is_tracked is called with the recording side serialised (trace_lock
 * under MTTCG); tr_is_tracked reads the bitmap lock-free, so its words are
 * only accessed with __atomic operations.
 */

#ifndef SHADOWTRACE_TABLEREFS_H
#define SHADOWTRACE_TABLEREFS_H

#include <stdbool.h>
#include <stdint.h>

/* x86-64 paging */
#define PTE_P           0x1ULL
#define PTE_PS          0x80ULL
#define PTE_ADDR        0x000ffffffffff000ULL
#define PTE_ADDR_1G     0x000fffffc0000000ULL
#define PTE_ADDR_2M     0x000fffffffe00000ULL
#define PAGE_SHIFT      12
#define PAGE_BYTES      4096u
#define PAGE_MASK       (~(uint64_t)(PAGE_BYTES - 1))
#define TR_ENTRIES      512u
/* The first entry of a PGD's kernel half (va >= 0xffff800000000000). */
#define TR_KERNEL_HALF  256u

#define TR_MAX_VCPUS    256u
#define TR_NO_ROOT      UINT64_MAX
/* A frame any vCPU can hold a translation through (see above). */
#define TR_OWNER_ANY    UINT64_MAX
/* Stores into an orphan the trace still tells before untracking it. */
#define TR_ORPHAN_WRITES 2

typedef struct {
    /* Emit the frame's SNAPSHOT; copy the 512 entries it holds to ents. */
    void (*snapshot)(unsigned int vcpu, uint64_t frame, uint64_t *ents);
    /* Emit a TABLE_WRITE of the 8-byte entry at ea (val: its new value). */
    void (*table_write)(unsigned int vcpu, uint64_t va, uint64_t ea,
                        uint64_t pc, uint64_t val);
    /* Emit an UNTRACK of frame, which was tracked at level. */
    void (*untrack)(unsigned int vcpu, uint64_t frame, int level,
                    uint64_t pc);
} TrSink;

extern uint64_t *tr_tracked;        /* bitmap of tracked frames */
extern uint64_t tr_limit;           /* bytes of RAM covered */

/* Track frames of ram[0, limit) (limit page-aligned). False: no memory. */
bool tr_open(const uint8_t *ram, uint64_t limit, const TrSink *sink);
/*
 * Whether orphans are ever untracked (default yes). With no, every store
 * into an orphan stays a TABLE_WRITE, as before the rule: traces for
 * comparing with a Xen that keeps emulating stores into a freed frame it
 * still shadows.
 */
void tr_set_untrack(bool on);
void tr_close(void);

/* Forget every frame, root and flush (a window opens). */
void tr_forget_all(void);

/* vcpu's root is now frame (CR3 & PTE_ADDR), or TR_NO_ROOT. */
void tr_set_root(unsigned int vcpu, uint64_t frame);

/* vcpu emptied its TLB. */
void tr_flushed(unsigned int vcpu);

/* A walk from a root reached frame as a level-`level` table. */
void tr_reach(unsigned int vcpu, uint64_t frame, int level);

/*
 * After a store of size bytes at pa: for each 8-byte entry it touched in a
 * tracked frame, a TABLE_WRITE (or the frame's UNTRACK, see above), and the
 * counts updated. True if it emitted anything (an epoch point for dedup).
 */
bool tr_store(unsigned int vcpu, uint64_t va, uint64_t pa, unsigned int size,
              uint64_t pc);

/* State of a frame, for tests: level 0 = untracked. */
typedef struct {
    int level;
    bool orphan;
    uint32_t refs;
    uint32_t roots;
} TrFrameInfo;
TrFrameInfo tr_info(uint64_t frame);

static inline bool tr_frame_in_ram(uint64_t frame)
{
    return frame < tr_limit && frame + PAGE_BYTES <= tr_limit;
}

/* Lock-free: an atomic load of the bitmap word. */
static inline bool tr_is_tracked(uint64_t pa)
{
    uint64_t f = pa >> PAGE_SHIFT;

    return pa < tr_limit &&
           (__atomic_load_n(&tr_tracked[f >> 6], __ATOMIC_RELAXED) >>
            (f & 63)) & 1;
}

#endif
