/*
 * shadowtrace: guest RAM and page-table tracking
 *
 * Guest RAM is a memory-backend-file that we map read-only: a file offset
 * is a guest-physical address, so the plugin walks the guest's 4-level
 * tables itself. Which frames are tracked as tables, and until when, is
 * tablerefs.h's job; this unit feeds it (roots, flushes, walks, stores)
 * and sends its SNAPSHOT, TABLE_WRITE and UNTRACK events into the output
 * pipeline (output.h).
 *
 * Threads: every function that may snapshot or emit (pt_set_root,
 * pt_flushed, pt_walk with track, pt_table_store, pt_forget_all) is called
 * with the recording side serialised (trace_lock under MTTCG). The bitmap
 * is also read lock-free (pt_is_tracked, from vcpu_mem), with __atomic
 * loads.
 */

#ifndef SHADOWTRACE_PAGETABLE_H
#define SHADOWTRACE_PAGETABLE_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "trace_format.h"
#include "tablerefs.h"     /* also the x86-64 paging constants */
/* Guest RAM readable through the backend file: the pc machine keeps it
 * below 3 GiB (file offset == guest-physical address). */
#define LOW_RAM_LIMIT   0xc0000000ULL
/* pa of an address our walk could not translate */
#define PA_UNKNOWN      UINT64_MAX

extern const uint8_t *pt_ram;       /* guest RAM, read-only */
extern uint64_t pt_ram_limit;       /* readable bytes of it */

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

/*
 * vcpu's root is now cr3 (4-level paging on), or none (TR_NO_ROOT): a root
 * seen for the first time is snapshotted with its whole tree.
 */
void pt_set_root(unsigned int vcpu, uint64_t cr3);

/* vcpu emptied its TLB (CR3 load, INVPCID 2/3, CR4.PGE/PCIDE change). */
void pt_flushed(unsigned int vcpu);

/*
 * Translate va from the 4-level root cr3. With `track`, make sure every
 * table on the way is tracked (snapshotting one that is not, with its
 * subtree) and that cr3 is vcpu's root; without, read only. PA_UNKNOWN
 * when va is not mapped.
 */
uint64_t pt_walk(uint64_t cr3, unsigned int vcpu, uint64_t va, bool track);

/*
 * After a store of size bytes at pa: one TABLE_WRITE per 8-byte entry it
 * touched in a tracked frame (its new value, read back from RAM), or the
 * UNTRACK of an orphan (tablerefs.h), and the subtree of an entry that now
 * points to an untracked table snapshotted. True if it emitted any (the
 * caller bumps the dedup epoch).
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
    return tr_is_tracked(pa);
}

static inline uint64_t pt_ram_u64(uint64_t pa)
{
    uint64_t v;

    memcpy(&v, pt_ram + pa, sizeof(v));
    return v;
}

#endif
