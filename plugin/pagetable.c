/*
 * shadowtrace: guest RAM and page-table tracking (snapshots, walks)
 *
 * A root is snapshotted with its whole reachable tree (every present
 * non-leaf entry at levels 4, 3, 2) the first time it is seen; each
 * tracking walk snapshots any untracked frame on its path, with its
 * subtree; a store into a tracked frame becomes one TABLE_WRITE per entry
 * it touched. Only 4-level paging is walked. See pagetable.h.
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
uint64_t *pt_tracked;
static uint8_t *frame_level;        /* 4..1: level of a tracked frame */
static const char *ram_path;
static uint64_t ram_size;

/* QEMU's own mapping of the RAM file: a code host address gives its pa. */
static pthread_once_t qram_once = PTHREAD_ONCE_INIT;
static uintptr_t qram_host;
static size_t qram_len;
static uint64_t qram_off;

char *pt_open_ram(const char *path, uint64_t size)
{
    size_t frames;
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
    frames = pt_ram_limit >> PAGE_SHIFT;
    pt_tracked = g_new0(uint64_t, (frames + 63) / 64);
    frame_level = g_new0(uint8_t, frames);
    return NULL;
}

void pt_close_ram(void)
{
    munmap((void *)pt_ram, ram_size);
    pt_ram = NULL;
    pt_ram_limit = 0;
    g_free(pt_tracked);
    pt_tracked = NULL;
    g_free(frame_level);
    frame_level = NULL;
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
    size_t words = ((pt_ram_limit >> PAGE_SHIFT) + 63) / 64;

    for (size_t i = 0; i < words; i++) {
        __atomic_store_n(&pt_tracked[i], 0, __ATOMIC_RELAXED);
    }
}

void pt_snapshot_tree(unsigned int vcpu, uint64_t frame, int level)
{
    uint64_t f = frame >> PAGE_SHIFT;
    uint64_t ents[ST_PAGE_SIZE / 8];
    uint32_t idx;

    if (!pt_frame_in_ram(frame) || pt_is_tracked(frame)) {
        return;
    }
    __atomic_fetch_or(&pt_tracked[f >> 6], 1ULL << (f & 63), __ATOMIC_RELAXED);
    frame_level[f] = (uint8_t)level;
    /* Children are taken from the copy: the chunk may be handed off next. */
    memcpy(ents, out_add_page(pt_ram + frame, &idx), ST_PAGE_SIZE);
    out_emit(ST_KIND_SNAPSHOT, vcpu, 0, 0, frame, 0, idx);
    if (level == 1) {
        return;
    }
    for (unsigned int i = 0; i < ST_PAGE_SIZE / 8; i++) {
        uint64_t e = ents[i];
        if (!(e & PTE_P) || (level < 4 && (e & PTE_PS))) {
            continue;
        }
        pt_snapshot_tree(vcpu, e & PTE_ADDR, level - 1);
    }
}

uint64_t pt_walk(uint64_t cr3, unsigned int vcpu, uint64_t va, bool track)
{
    uint64_t table = cr3 & PTE_ADDR;

    for (int level = 4; level >= 1; level--) {
        unsigned int shift = PAGE_SHIFT + 9 * (level - 1);
        uint64_t e;

        if (!pt_frame_in_ram(table)) {
            return PA_UNKNOWN;
        }
        if (track && !pt_is_tracked(table)) {
            pt_snapshot_tree(vcpu, table, level);
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
    uint64_t first = pa & ~7ULL, last = (pa + size - 1) & ~7ULL;
    bool any = false;

    for (uint64_t ea = first; ea <= last; ea += 8) {
        uint64_t frame = ea & PAGE_MASK, e;
        int level;

        if (!pt_is_tracked(frame)) {
            continue;
        }
        e = pt_ram_u64(ea);
        out_emit(ST_KIND_TABLE_WRITE, vcpu, 0, va, ea, pc, e);
        any = true;
        level = frame_level[frame >> PAGE_SHIFT];
        if (level > 1 && (e & PTE_P) && (level == 4 || !(e & PTE_PS))) {
            pt_snapshot_tree(vcpu, e & PTE_ADDR, level - 1);
        }
    }
    return any;
}
