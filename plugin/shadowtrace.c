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
 * snapshotted. A frame nothing can reach any more stops being tracked
 * (UNTRACK, tablerefs.h). The bitmap is cleared whenever a window opens,
 * since the replayer then forgets everything it knew. Walks are only made once a
 * vCPU runs in long mode (followed through CR0 writes and EFER), since
 * before that CR3 does not point at 4-level tables.
 *
 * Dedup. With dedup=on an access is dropped when the same vCPU already made
 * one of the same kind (READ/WRITE/FETCH, user/kernel) to the same 4 KiB
 * page within the current epoch. A global epoch is bumped by every event
 * that can change a translation: CR3 writes on any vCPU, TABLE_WRITEs,
 * UNTRACKs, INVLPG, INVPCID, CR0/CR4 writes and window changes. Each vCPU has a
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
 *    one running it. cur_vcpu() works around it (vcpu_index.h).
 *
 * Output. Events go into one global chunk buffer: one total order. Its
 * lock, trace_lock, is taken whenever the machine has more than one vCPU,
 * decided at install before any vCPU runs; with one vCPU callbacks are
 * serialised already. A full chunk is handed to encoder threads that
 * encode and compress it and append it to the file in order (output.h).
 * When no chunk buffer is free the vCPU waits rather than dropping events.
 * Execution callbacks never allocate.
 *
 * Files. This one is the plugin proper: options, the window, the
 * callbacks and qemu_plugin_install. decode.c is the x86 decoder of the
 * instructions we follow, pagetable.c guest RAM, table tracking and
 * walks, output.c the chunks, encoders and writer, vcpu_index.c the
 * vcpu_index work-around (the only use of QEMU internals).
 */

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <glib.h>
#include <zstd.h>

#include <qemu-plugin.h>

#include "trace_format.h"
#include "console.h"
#include "decode.h"
#include "output.h"
#include "pagetable.h"
#include "tablerefs.h"
#include "vcpu_index.h"

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

/* x86-64 control registers */
#define CR0_PG          (1ULL << 31)
#define EFER_LME        (1ULL << 8)
#define EFER_LMA        (1ULL << 10)
#define CR4_PGE         (1ULL << 7)
#define CR4_PCIDE       (1ULL << 17)
/* Linux puts user space in the lower half: our user-mode test. */
#define USER_TOP        0x0000800000000000ULL

/* Dedup cache per vCPU */
#define DEDUP_BITS      12
#define DEDUP_SLOTS     (1u << DEDUP_BITS)
#define FETCH_SLOTS     64
#define PC_SLOTS        256

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
    uint64_t cr_writes;     /* mov-to-CR count, to tell one exit_mmap from a repeat */
    uint64_t dying_key[3];  /* mm, rsp, cr_writes of the last exit_mmap recorded */
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
/*
 * dying=VA,mm_pgd=N,text=VA: the kernel's exit_mmap(mm) and _text at link
 * time, and offsetof(struct mm_struct, pgd). A Xen-aware Linux tells Xen at
 * the start of exit_mmap that mm's page tables are dying
 * (HVMOP_pagetable_dying with __pa(mm->pgd), arch/x86/xen/mmu_hvm.c); a
 * guest on bare QEMU makes no such call, so the plugin records the moment
 * as a marker "pagetable-dying 0xPA" when exit_mmap is entered while the
 * window is open (before it the replay starts empty anyway). Its address
 * moves with KASLR: dying_pc is the link-time one until the guest's
 * "kernel _text ADDR" marker gives the slide.
 */
static uint64_t opt_dying, opt_mm_pgd, opt_text;
static uint64_t dying_pc;       /* where exit_mmap runs (0: no hook) */
/*
 * console=VA: the kernel's serial8250_console_write(up, s, count) at
 * link time. Each call's text is recorded, window open or not, as markers
 * "console PAYLOAD" (console.h), moved with KASLR like dying_pc: before the
 * "kernel _text" marker only a kernel that was not moved is followed.
 */
static uint64_t opt_console;
static uint64_t console_pc;     /* where the console write runs (0: no hook) */

/* Plugin state */
static qemu_plugin_id_t plugin_id;
static VCpu *vcpus;
static unsigned int n_vcpus;
static unsigned int n_boot_vcpus;   /* vCPUs that run from the start */

/*
 * Recording state, written by the vCPU thread(s) under trace_lock (with
 * the output pipeline's chunk and the page-table bitmap). need_lock is
 * decided at install, before any vCPU thread exists, and never changes:
 * the lock is taken whenever the machine can have more than one vCPU,
 * whether they run on one thread (round-robin, the lock is then
 * uncontended) or on several (MTTCG). With one vCPU every callback is
 * serialised already and the lock is not taken at all. Measured on the
 * 2-CPU development VM: an uncontended lock/unlock pair costs 8-11 ns;
 * a 1-vCPU window=all dedup=on boot (51 M recorded accesses) used the
 * same CPU time with and without it (within the run-to-run noise), but a
 * dedup=off boot records 3.3 G accesses, some 30 s of locking on ~60 s.
 * Kept on cache lines of its own so that the writer thread's counters do
 * not bounce them.
 */
typedef struct {
    bool need_lock;         /* more than one vCPU: set at install */
    bool window_open;       /* also read lock-free */
    bool finished;
    unsigned int n_started; /* also read lock-free */
    uint64_t window_no;     /* number of the current (or next) window */
    uint64_t epoch;         /* dedup epoch, also read lock-free */
} __attribute__((aligned(CACHE_LINE))) RecState;

static pthread_mutex_t trace_lock __attribute__((aligned(CACHE_LINE))) =
    PTHREAD_MUTEX_INITIALIZER;
static RecState rec = { .epoch = 1 };

/* Interned instruction and block descriptors */
static pthread_mutex_t desc_lock = PTHREAD_MUTEX_INITIALIZER;
static GHashTable *descs, *tb_descs;

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
/* Page tables of a vCPU (tracking walks hold trace_lock)                 */

/*
 * Translate va from the vCPU's current CR3. With `track`, snapshot any
 * untracked table on the way (with its subtree; the caller holds
 * trace_lock); without, read only (descriptors, guest reads). Returns
 * PA_UNKNOWN when va is not mapped; when the vCPU is not in 4-level paging,
 * PA_UNKNOWN with `track` and va itself (no paging) without.
 */
static uint64_t walk(VCpu *v, unsigned int vcpu, uint64_t va, bool track)
{
    if (!v->lm || !v->cr3_known) {
        return track ? PA_UNKNOWN : va;
    }
    return pt_walk(v->cr3, vcpu, va, track);
}

/* A root just became current on this vCPU: track its tree. */
static void track_root(VCpu *v, unsigned int vcpu)
{
    if (v->lm && v->cr3_known) {
        pt_set_root(vcpu, v->cr3);
    }
}

/* ---------------------------------------------------------------------- */
/* Window                                                                 */

/* Open a window; the caller holds trace_lock and is vCPU `self`. */
static void window_open_locked(unsigned int self)
{
    store_flag(&rec.window_open, true);
    out_emit(ST_KIND_WINDOW_OPEN, self, 0, 0, 0, 0, rec.window_no);
    /* What the replayer knew is stale: so is what we tracked. */
    pt_forget_all();
    bump_epoch();
    for (unsigned int i = 0; i < n_vcpus; i++) {
        if (vcpus[i].cr3_known) {
            out_emit(ST_KIND_CR3_CURRENT, i, 0, 0, 0, 0, vcpus[i].cr3);
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
        out_emit(ST_KIND_FETCH, vcpu_index, 1 | (user ? ST_INFO_USER : 0),
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
        table = pt_is_tracked(pa) || pt_is_tracked(pa + size - 1);
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
        out_emit(kind, vcpu_index, einfo, vaddr, pa, pc, val);
        if (table && pt_table_store(vcpu_index, vaddr, pa, size, pc)) {
            bump_epoch();
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

        if (pa == PA_UNKNOWN || pa + n > pt_ram_limit) {
            break;
        }
        memcpy(out, pt_ram + pa, n);
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
    v->cr_writes++;
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
            out_emit(ST_KIND_CR3_WRITE, vcpu_index, 0, 0, 0, pc, value);
            pt_flushed(vcpu_index);     /* QEMU empties its TLB */
            track_root(v, vcpu_index);
        }
        break;
    case 4:
        v->cr4 = value;
        bump_epoch();
        if (rec.window_open && !rec.finished) {
            out_emit(ST_KIND_CR4_WRITE, vcpu_index, 0, 0, prev, pc, value);
            if ((prev ^ value) & (CR4_PGE | CR4_PCIDE)) {
                pt_flushed(vcpu_index);
            }
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
        out_emit(ST_KIND_INVLPG, vcpu_index, 0, va, 0, pc, 0);
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
        out_emit(ST_KIND_INVPCID, vcpu_index, 0, desc[1], desc[0] & 0xfff,
                 pc, type);
        if (type == 2 || type == 3) {   /* every context */
            pt_flushed(vcpu_index);
        }
    }
    rec_unlock();
}

/* exit_mmap(mm) entered: record the root a Xen-aware kernel would report. */
static void vcpu_dying(unsigned int vcpu_index, void *udata)
{
    VCpu *v;
    uint64_t mm, pgd_va = 0, pa;
    char text[ST_MARKER_MAX_LEN + 1] = { 0 };

    (void)udata;
    vcpu_index = cur_vcpu(vcpu_index);
    v = &vcpus[vcpu_index];
    vcpu_refresh(v);
    mm = read_reg(v, v->gpr[7]);    /* rdi: the first argument */
    {
        /*
         * QEMU may run the entry instruction's callback twice for one call
         * (seen under icount: the same mm and stack, no CR write between):
         * record one exit_mmap once.
         */
        uint64_t key[3] = { mm, read_reg(v, v->gpr[4]), v->cr_writes };

        if (!memcmp(key, v->dying_key, sizeof(key))) {
            return;
        }
        memcpy(v->dying_key, key, sizeof(key));
    }
    if (!read_guest(v, mm + opt_mm_pgd, &pgd_va, sizeof(pgd_va))) {
        return;
    }
    pa = walk(v, vcpu_index, pgd_va, false);
    if (pa == PA_UNKNOWN) {
        return;
    }
    g_snprintf(text, sizeof(text), "%s 0x%" PRIx64, ST_MARKER_DYING, (uint64_t)(pa & PTE_ADDR));
    rec_lock();
    /* Outside the window the replay forgets every shadow anyway. */
    if (!rec.finished && load_flag(&rec.window_open)) {
        out_emit(ST_KIND_MARKER, vcpu_index, 0, 0, 0, dying_pc, out_add_marker(text));
    }
    rec_unlock();
}

/* serial8250_console_write(up, s, count) entered: the kernel's text. */
static void vcpu_console(unsigned int vcpu_index, void *udata)
{
    VCpu *v;
    uint64_t s, n;
    uint8_t buf[CONSOLE_MAX_BYTES];
    char text[ST_MARKER_MAX_LEN + 1];

    (void)udata;
    vcpu_index = cur_vcpu(vcpu_index);
    v = &vcpus[vcpu_index];
    vcpu_refresh(v);
    s = read_reg(v, v->gpr[6]);     /* rsi, rdx: the second and third arguments */
    n = MIN(read_reg(v, v->gpr[2]), (uint64_t)sizeof(buf));
    if (n == 0 || !read_guest(v, s, buf, n)) {
        return;
    }
    rec_lock();
    if (!rec.finished) {
        for (size_t i = 0; i < n;) {
            i += console_marker(buf + i, n - i, text);
            out_emit(ST_KIND_MARKER, vcpu_index, 0, 0, 0, console_pc,
                     out_add_marker(text));
        }
    }
    rec_unlock();
}

/* Move one hook by the KASLR slide; true if it moved. */
static bool move_hook(uint64_t *hook_pc, uint64_t link_pc, uint64_t slide)
{
    uint64_t pc = link_pc + slide;

    if (!link_pc || pc == __atomic_load_n(hook_pc, __ATOMIC_RELAXED)) {
        return false;
    }
    __atomic_store_n(hook_pc, pc, __ATOMIC_RELAXED);
    return true;
}

/* The guest's "kernel _text ADDR" marker: move the hooks with KASLR. */
static bool kernel_marker(const char *text)
{
    uint64_t at, slide;
    const char *p = "kernel _text ";
    char *end;
    bool moved;

    if (!opt_text || strncmp(text, p, strlen(p))) {
        return false;
    }
    at = g_ascii_strtoull(text + strlen(p), &end, 16);   /* kallsyms: bare hex */
    if (*end != '\0' || at == 0) {
        return false;
    }
    slide = at - opt_text;
    moved = move_hook(&dying_pc, opt_dying, slide);
    moved |= move_hook(&console_pc, opt_console, slide);
    return moved;   /* translated blocks hold the old address: re-translate */
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

    reset = kernel_marker(text);
    rec_lock();
    if (!rec.finished) {
        uint32_t idx = out_add_marker(text);

        out_emit(ST_KIND_MARKER, vcpu_index, 0, 0, 0, pc, idx);
        if (!opt_window_all && !opt_window_none && start && !rec.window_open) {
            window_open_locked(vcpu_index);
            reset = true;
        } else if (!opt_window_all && stop && rec.window_open) {
            out_emit(ST_KIND_WINDOW_CLOSE, vcpu_index, 0, 0, 0, 0, rec.window_no);
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
            out_emit(ST_KIND_CR3_CURRENT, vcpu_index, 0, 0, 0, 0, v->cr3);
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

/* Guest-physical address of an instruction's first byte, if in RAM. */
static uint64_t code_pa(const struct qemu_plugin_insn *insn)
{
    return pt_host_to_pa((uintptr_t)qemu_plugin_insn_haddr(insn));
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

        if (pc == __atomic_load_n(&dying_pc, __ATOMIC_RELAXED) && dying_pc) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, vcpu_dying,
                                                   QEMU_PLUGIN_CB_R_REGS, NULL);
        }
        if (pc == __atomic_load_n(&console_pc, __ATOMIC_RELAXED) && console_pc) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, vcpu_console,
                                                   QEMU_PLUGIN_CB_R_REGS, NULL);
        }
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

/* The registers we read, by their names in QEMU's gdb description. */
#define REG(name, field)  { name, offsetof(VCpu, field) }
static const struct {
    const char *name;
    size_t offset;      /* of its handle in VCpu */
} vcpu_regs[] = {
    REG("rax", gpr[0]), REG("rcx", gpr[1]), REG("rdx", gpr[2]),
    REG("rbx", gpr[3]), REG("rsp", gpr[4]), REG("rbp", gpr[5]),
    REG("rsi", gpr[6]), REG("rdi", gpr[7]), REG("r8", gpr[8]),
    REG("r9", gpr[9]), REG("r10", gpr[10]), REG("r11", gpr[11]),
    REG("r12", gpr[12]), REG("r13", gpr[13]), REG("r14", gpr[14]),
    REG("r15", gpr[15]),
    REG("cr0", reg_cr0), REG("cr3", reg_cr3), REG("cr4", reg_cr4),
    REG("efer", reg_efer), REG("fs_base", reg_fs_base),
    REG("gs_base", reg_gs_base), REG("rip", reg_rip),
};
#undef REG

static void vcpu_init(qemu_plugin_id_t id, unsigned int vcpu_index)
{
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

        for (size_t r = 0; r < G_N_ELEMENTS(vcpu_regs); r++) {
            if (!g_ascii_strcasecmp(rd->name, vcpu_regs[r].name)) {
                *(struct qemu_plugin_register **)
                    ((char *)v + vcpu_regs[r].offset) = rd->handle;
            }
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

static void plugin_exit(qemu_plugin_id_t id, void *udata)
{
    uint64_t seen = 0, dedup = 0;

    (void)id;
    (void)udata;
    rec_lock();
    if (rec.finished) {
        rec_unlock();
        return;
    }
    rec.finished = true;
    store_flag(&rec.window_open, false);
    out_flush();
    rec_unlock();

    out_drain();
    for (unsigned int i = 0; i < n_vcpus; i++) {
        seen += vcpus[i].seen;
        dedup += vcpus[i].deduplicated;
    }
    out_close(seen, dedup);
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
        } else if (!strcmp(key, "untrack")) {
            bool on;
            if (!qemu_plugin_bool_parse(key, val, &on)) {
                return fail("bad untrack '%s' (on or off)", val);
            }
            tr_set_untrack(on);
        } else if (!strcmp(key, "level")) {
            uint64_t lv;
            if (!parse_u64(val, &lv) || lv < 1 ||
                lv > (uint64_t)ZSTD_maxCLevel()) {
                return fail("bad level '%s' (1..%d)", val, ZSTD_maxCLevel());
            }
            opt_level = (int)lv;
        } else if (!strcmp(key, "dying") || !strcmp(key, "mm_pgd") ||
                   !strcmp(key, "text") || !strcmp(key, ST_OPTION_CONSOLE)) {
            uint64_t x;
            if (!parse_u64(val, &x)) {
                return fail("bad %s '%s' (a number)", key, val);
            }
            *(!strcmp(key, "dying") ? &opt_dying :
              !strcmp(key, "text") ? &opt_text :
              !strcmp(key, ST_OPTION_CONSOLE) ? &opt_console : &opt_mm_pgd) = x;
        } else if (!strcmp(key, "scenario")) {
            hdr_scenario = val;
        } else if (!strcmp(key, "kernel")) {
            hdr_kernel = val;
        } else if (!strcmp(key, "qemu")) {
            hdr_qemu = val;
        } else if (!strcmp(key, "tcg")) {
            /* How QEMU runs the vCPUs (-accel tcg,thread=): only recorded
             * in the header; the lock is decided by the vCPU count. */
            if (strcmp(val, "single") && strcmp(val, "multi")) {
                return fail("bad tcg '%s' (single or multi)", val);
            }
        } else if (!strcmp(key, "vcpus")) {
            uint64_t nv;
            if (!parse_u64(val, &nv) || nv == 0 || nv > 256) {
                return fail("bad vcpus '%s' (1..256)", val);
            }
            hdr_vcpus = (int64_t)nv;
        } else {
            return fail("unknown option '%s'", key);
        }
        /* out= and ram= are host paths: kept out of the header, so that two
         * deterministic captures of one scenario are the same bytes. */
        if (!strcmp(key, "out") || !strcmp(key, "ram")) {
            continue;
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
    if (opt_dying && (!opt_text || !opt_mm_pgd)) {
        return fail("dying= needs text= and mm_pgd= too");
    }
    if (opt_console && !opt_text) {
        return fail("console= needs text= too");
    }
    dying_pc = opt_dying;
    console_pc = opt_console;
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

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id,
                                           const qemu_info_t *info,
                                           int argc, char **argv)
{
    TraceHeader hdr;
    char *err;

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

    err = pt_open_ram(opt_ram, opt_ramsize);
    if (err) {
        goto fail;
    }
    hdr = (TraceHeader) {
        .qemu = hdr_qemu,
        .kernel = hdr_kernel,
        .scenario = hdr_scenario,
        .vcpus = hdr_vcpus,
        .ram_bytes = opt_ramsize,
        .options = opt_pairs,
    };
    err = out_open(opt_out, opt_level, &hdr);
    if (err) {
        goto fail_ram;
    }
    vcpus = g_new0(VCpu, n_vcpus);
    descs = g_hash_table_new(desc_hash, desc_equal);
    tb_descs = g_hash_table_new(tb_hash, tb_equal);

    plugin_id = id;
    vcpu_index_setup(n_vcpus);
    register_base_callbacks(id);
    return 0;

fail_ram:
    pt_close_ram();
fail:
    fail("%s", err);
    g_free(err);
    return -1;
}
