/*
 * shadowtrace: guest RAM and page-table tracking
 *
 * Guest RAM is a memory-backend-file that we map read-only: a file offset
 * is a guest-physical address, so the plugin walks the guest's 4-level
 * tables itself. A bitmap marks the frames tracked as tables, and a byte
 * per frame their level. Snapshots (SNAPSHOT events with a copy of the
 * frame) and TABLE_WRITEs go into the output pipeline (output.h).
 *
 * Threads: every function that may snapshot or emit (pt_snapshot_tree,
 * pt_walk with track, pt_table_store, pt_forget_all) is called with the
 * recording side serialised (trace_lock under MTTCG). The bitmap is also
 * read lock-free (pt_is_tracked, from vcpu_mem), so its words are only
 * accessed with __atomic operations.
 */

#ifndef SHADOWTRACE_PAGETABLE_H
#define SHADOWTRACE_PAGETABLE_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "trace_format.h"

/* x86-64 paging */
#define PTE_P           0x1ULL
#define PTE_PS          0x80ULL
#define PTE_ADDR        0x000ffffffffff000ULL
#define PTE_ADDR_1G     0x000fffffc0000000ULL
#define PTE_ADDR_2M     0x000fffffffe00000ULL
#define PAGE_SHIFT      12
#define PAGE_MASK       (~(uint64_t)(ST_PAGE_SIZE - 1))
/* Guest RAM readable through the backend file: the pc machine keeps it
 * below 3 GiB (file offset == guest-physical address). */
#define LOW_RAM_LIMIT   0xc0000000ULL
/* pa of an address our walk could not translate */
#define PA_UNKNOWN      UINT64_MAX

extern const uint8_t *pt_ram;       /* guest RAM, read-only */
extern uint64_t pt_ram_limit;       /* readable bytes of it */
extern uint64_t *pt_tracked;        /* bitmap of table frames */

/*
 * Map the RAM file (size bytes) and allocate the bitmap. NULL on success,
 * else a message (g_free it).
 */
char *pt_open_ram(const char *path, uint64_t size);

/* Unmap it again (install failed later). */
void pt_close_ram(void);

/*
 * Guest-physical address of a host address in QEMU's own mapping of the
 * RAM file (found once in /proc/self/maps), PA_UNKNOWN if outside it.
 * (QEMU 10.0's plugin API v4 cannot translate a code address; with v5's
 * qemu_plugin_translate_vaddr this goes away.)
 */
uint64_t pt_host_to_pa(uintptr_t host);

/* Forget every tracked frame (a window opens). */
void pt_forget_all(void);

/* Snapshot an untracked table frame and, below it, every present table. */
void pt_snapshot_tree(unsigned int vcpu, uint64_t frame, int level);

/*
 * Translate va from the 4-level root cr3. With `track`, snapshot any
 * untracked table on the way (with its subtree); without, read only.
 * PA_UNKNOWN when va is not mapped.
 */
uint64_t pt_walk(uint64_t cr3, unsigned int vcpu, uint64_t va, bool track);

/*
 * After a store of size bytes at pa: one TABLE_WRITE per 8-byte entry it
 * touched in a tracked frame (its new value, read back from RAM), and the
 * subtree of an entry that now points to an untracked table snapshotted.
 * True if it emitted any (the caller bumps the dedup epoch).
 */
bool pt_table_store(unsigned int vcpu, uint64_t va, uint64_t pa,
                    unsigned int size, uint64_t pc);

static inline bool pt_frame_in_ram(uint64_t pa)
{
    return pa < pt_ram_limit && pa + ST_PAGE_SIZE <= pt_ram_limit;
}

/* Lock-free: an atomic load of the bitmap word. */
static inline bool pt_is_tracked(uint64_t pa)
{
    uint64_t f = pa >> PAGE_SHIFT;

    return pa < pt_ram_limit &&
           (__atomic_load_n(&pt_tracked[f >> 6], __ATOMIC_RELAXED) >>
            (f & 63)) & 1;
}

static inline uint64_t pt_ram_u64(uint64_t pa)
{
    uint64_t v;

    memcpy(&v, pt_ram + pa, sizeof(v));
    return v;
}

#endif
