/*
 * shadowtrace: guest RAM and page-table tracking (snapshots, walks)
 *
 * A root is snapshotted with its whole reachable tree (every present
 * non-leaf entry at levels 4, 3, 2) the first time it is seen; each
 * tracking walk makes sure every frame on its path is tracked; a store
 * into a tracked frame becomes one TABLE_WRITE per entry it touched. When
 * a frame stops being tracked is tablerefs.c's rule; this unit maps RAM,
 * walks, and turns tablerefs' events into trace events. Only 4-level
 * paging is walked. See pagetable.h.
 */

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <glib.h>

#include "trace_format.h"
#include "output.h"
#include "pagetable.h"

const uint8_t *pt_ram;
uint64_t pt_ram_limit;
static const char *ram_path;
static uint64_t ram_size;

/* QEMU's own mapping of the RAM file: a code host address gives its pa. */
static pthread_once_t qram_once = PTHREAD_ONCE_INIT;
static uintptr_t qram_host;
static size_t qram_len;
static uint64_t qram_off;

static void emit_snapshot(unsigned int vcpu, uint64_t frame, uint64_t *ents)
{
    uint32_t idx;

    /* The entries are taken from the copy: the chunk may be handed off next. */
    memcpy(ents, out_add_page(pt_ram + frame, &idx), ST_PAGE_SIZE);
    out_emit(ST_KIND_SNAPSHOT, vcpu, 0, 0, frame, 0, idx);
}

static void emit_table_write(unsigned int vcpu, uint64_t va, uint64_t ea,
                             uint64_t pc, uint64_t val)
{
    out_emit(ST_KIND_TABLE_WRITE, vcpu, 0, va, ea, pc, val);
}

static void emit_untrack(unsigned int vcpu, uint64_t frame, int level,
                         uint64_t pc)
{
    out_emit(ST_KIND_UNTRACK, vcpu, 0, 0, frame, pc, (uint64_t)level);
}

static const TrSink sink = {
    .snapshot = emit_snapshot,
    .table_write = emit_table_write,
    .untrack = emit_untrack,
};

char *pt_open_ram(const char *path, uint64_t size)
{
    void *map;
    int fd;

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return g_strdup_printf("cannot open ram=%s: %s", path, strerror(errno));
    }
    /* Read-only shared view of the backend file: file offset == pa. */
    map = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        return g_strdup_printf("cannot map ram=%s: %s", path, strerror(errno));
    }
    ram_path = path;
    ram_size = size;
    pt_ram = map;
    pt_ram_limit = MIN(size, LOW_RAM_LIMIT) & PAGE_MASK;
    if (!tr_open(pt_ram, pt_ram_limit, &sink)) {
        munmap(map, size);
        pt_ram = NULL;
        pt_ram_limit = 0;
        return g_strdup("out of memory for the table-frame state");
    }
    return NULL;
}

void pt_close_ram(void)
{
    munmap((void *)pt_ram, ram_size);
    pt_ram = NULL;
    pt_ram_limit = 0;
    tr_close();
}

/* Find QEMU's mapping of the RAM file in /proc/self/maps (not ours). */
static void find_qemu_ram(void)
{
    g_autofree char *want = realpath(ram_path, NULL);
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
        if (strcmp(*l + path_at, want) == 0 && lo != (uintptr_t)pt_ram &&
            hi - lo > qram_len) {
            qram_host = lo;
            qram_len = hi - lo;
            qram_off = off;
        }
    }
}

uint64_t pt_host_to_pa(uintptr_t h)
{
    /* Searched on first use: QEMU has mapped its RAM by the first block. */
    pthread_once(&qram_once, find_qemu_ram);
    if (qram_len && h >= qram_host && h - qram_host < qram_len) {
        return h - qram_host + qram_off;
    }
    return PA_UNKNOWN;
}

void pt_forget_all(void)
{
    tr_forget_all();
}

void pt_set_root(unsigned int vcpu, uint64_t cr3)
{
    tr_set_root(vcpu, cr3 == TR_NO_ROOT ? TR_NO_ROOT : cr3 & PTE_ADDR);
}

void pt_flushed(unsigned int vcpu)
{
    tr_flushed(vcpu);
}

uint64_t pt_walk(uint64_t cr3, unsigned int vcpu, uint64_t va, bool track)
{
    uint64_t table = cr3 & PTE_ADDR;

    if (track) {
        tr_set_root(vcpu, table);
    }
    for (int level = 4; level >= 1; level--) {
        unsigned int shift = PAGE_SHIFT + 9 * (level - 1);
        uint64_t e;

        if (!pt_frame_in_ram(table)) {
            return PA_UNKNOWN;
        }
        if (track && level < 4) {
            tr_reach(vcpu, table, level);
        }
        e = pt_ram_u64(table + ((va >> shift) & 511) * 8);
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

bool pt_table_store(unsigned int vcpu, uint64_t va, uint64_t pa,
                    unsigned int size, uint64_t pc)
{
    return tr_store(vcpu, va, pa, size, pc);
}
