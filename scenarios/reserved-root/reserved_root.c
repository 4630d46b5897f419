// SPDX-License-Identifier: GPL-2.0
/*
 * reserved_root: private-root's clean negative (shadowtrace scenario).
 *
 * private-root cannot keep its secure page and private tables out of the
 * kernel direct map (a module cannot unmap them), so every root reaches
 * them and the checks fire. This module shows what happens when the seed's
 * condition does hold: it takes all of its frames from a physical range the
 * kernel was told to leave alone (memmap=2M$0x1e000000 on the command line
 * makes it E820-reserved: the page allocator never hands it out and the
 * direct map does not cover it).
 *
 * Frames, from BASE: PGD (2 frames: 8 KiB like every kernel PGD, because
 * NMI entry under PTI masks CR3 bit 12), PUD, PMD, PTE, and the secure page.
 * They are written through a temporary memremap() window (vmalloc-area
 * PTEs in the kernel half every root shares), which is removed again before
 * anything is registered: from then on the only mapping of any of these
 * frames is the private root's own PTE for the secure page, at the private
 * VA 0xffff800040201000 (PGD slot 256, empty in every root of this guest;
 * see private_root.c for why that slot).
 *
 * memunmap() clears the window's PTEs but, like every vunmap, leaves the
 * TLB flush for later (lazy purge). A guest kernel may do that; under Xen's
 * out-of-sync shadows it means the shadow entries of the window outlive
 * the PTEs until Xen next resyncs. flush=1 flushes the TLB right after
 * memunmap(), which makes Xen resync before anything is registered.
 *
 * Registration: "secure-root <CR3>" and "secure-frame <PA of the page> 1"
 * (the table frames are the secure root's tables, which the checks guard
 * as such), then four CR3 visits with interrupts off (write and read the
 * page), "secure-end". The range stays reserved after the module is gone;
 * nothing is freed.
 */
#include <linux/module.h>
#include <linux/io.h>
#include <linux/ioport.h>
#include <linux/mm.h>
#include <linux/sched.h>
#include <linux/irqflags.h>
#include <linux/preempt.h>
#include <asm/pgalloc.h>
#include <asm/special_insns.h>
#include <asm/tlbflush.h>

#include "stmark.h"

#define PR "reserved-root: "
#include "stmark_module.h"

#define PRIV_VA		0xffff800040201000UL
#define SLOT(va, shift)	(((va) >> (shift)) & 511)
/* Kernel table entries: present, writable, supervisor, accessed, dirty. */
#define TABLE_FLAGS	(_PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED | _PAGE_DIRTY)
/* The leaf: supervisor, writable, NX, not global; A and D left to the CPU. */
#define LEAF_FLAGS	(_PAGE_PRESENT | _PAGE_RW | _PAGE_NX)

enum { F_PGD = 0, F_PUD = 2, F_PMD, F_PTE, F_PAGE, NFRAMES };

static unsigned long base = 0x1e000000UL;
module_param(base, ulong, 0444);
MODULE_PARM_DESC(base, "physical start of the memmap-reserved range");
static bool flush;
module_param(flush, bool, 0444);
MODULE_PARM_DESC(flush, "flush the TLB right after removing the window");
static unsigned int passes = 4;
module_param(passes, uint, 0444);
MODULE_PARM_DESC(passes, "CR3 switches into the private root (default 4)");

static unsigned long frame_pa(int f)
{
	return base + (unsigned long)f * PAGE_SIZE;
}

/* Is VA mapped in the kernel's own tables (the direct map check)? */
static bool kernel_maps(unsigned long va)
{
	unsigned int level;
	pte_t *pte = lookup_address(va, &level);

	return pte && pte_present(*pte);
}

static int __init reserved_root_init(void)
{
	const size_t size = NFRAMES * PAGE_SIZE;
	u64 *cur = (u64 *)current->mm->pgd;
	u64 *pgd, *pud, *pmd, *pte;
	unsigned int i, bad = 0;
	void *win;

	if (pgtable_l5_enabled()) {
		pr_err(PR "5-level paging is not supported\n");
		return -EOPNOTSUPP;
	}
	if (cur[SLOT(PRIV_VA, 39)]) {
		pr_err(PR "PGD slot %lu is in use, refusing\n", SLOT(PRIV_VA, 39));
		return -EBUSY;
	}
	if (base & (2 * PAGE_SIZE - 1) ||
	    region_intersects(base, size, IORESOURCE_SYSTEM_RAM,
			      IORES_DESC_NONE) != REGION_DISJOINT ||
	    region_intersects(base, size, IORESOURCE_MEM,
			      IORES_DESC_RESERVED) != REGION_INTERSECTS) {
		pr_err(PR "%#lx..%#lx is not an 8 KiB aligned reserved range (boot with memmap=2M$%#lx)\n",
		       base, base + size, base);
		return -EINVAL;
	}
	for (i = 0; i < NFRAMES; i++) {
		if (kernel_maps((unsigned long)__va(frame_pa(i)))) {
			pr_err(PR "frame %#lx is in the direct map, refusing\n",
			       frame_pa(i));
			return -EINVAL;
		}
	}

	win = memremap(base, size, MEMREMAP_WB);
	if (!win) {
		pr_err(PR "memremap(%#lx) failed\n", base);
		return -ENOMEM;
	}
	memset(win, 0, size);
	pgd = win + F_PGD * PAGE_SIZE;
	pud = win + F_PUD * PAGE_SIZE;
	pmd = win + F_PMD * PAGE_SIZE;
	pte = win + F_PTE * PAGE_SIZE;
	/* The kernel half, as pgd_ctor() builds it for every new mm. */
	clone_pgd_range((pgd_t *)pgd + KERNEL_PGD_BOUNDARY,
			(pgd_t *)cur + KERNEL_PGD_BOUNDARY, KERNEL_PGD_PTRS);
	pte[SLOT(PRIV_VA, 12)] = frame_pa(F_PAGE) |
				 (LEAF_FLAGS & __supported_pte_mask);
	pmd[SLOT(PRIV_VA, 21)] = frame_pa(F_PTE) | TABLE_FLAGS;
	pud[SLOT(PRIV_VA, 30)] = frame_pa(F_PMD) | TABLE_FLAGS;
	pgd[SLOT(PRIV_VA, 39)] = frame_pa(F_PUD) | TABLE_FLAGS;
	/* Gone before registration: its PTEs are cleared here (vunmap). */
	memunmap(win);
	if (flush)
		__flush_tlb_all();

	pr_info(PR "secure page va=%#lx pa=%#lx root=%#lx (normal root=%#lx)\n",
		PRIV_VA, frame_pa(F_PAGE), frame_pa(F_PGD), __native_read_cr3());
	pr_info(PR "private tables pgd=%#lx pud=%#lx pmd=%#lx pte=%#lx, none in the direct map\n",
		frame_pa(F_PGD), frame_pa(F_PUD), frame_pa(F_PMD),
		frame_pa(F_PTE));

	preempt_disable();
	mark("secure-root %#lx", frame_pa(F_PGD));
	mark("secure-frame %#lx 1", frame_pa(F_PAGE));
	for (i = 0; i < passes; i++) {
		u64 value = 0x5245530000000000ULL | i;	/* "RES" */
		u64 got = visit_root(frame_pa(F_PGD), (u64 *)PRIV_VA, value);

		pr_info(PR "pass %u: wrote %#llx read %#llx%s\n", i, value, got,
			got == value ? "" : " MISMATCH");
		bad += got != value;
	}
	mark("secure-end");
	/* With PCIDs the PCID-0 translation of PRIV_VA would outlive us. */
	__flush_tlb_all();
	preempt_enable();
	pr_info(PR "%u passes, %u mismatches\n", passes, bad);
	return bad ? -EIO : 0;
}

static void __exit reserved_root_exit(void)
{
}

module_init(reserved_root_init);
module_exit(reserved_root_exit);
MODULE_DESCRIPTION("shadowtrace scenario: private root in reserved memory");
MODULE_LICENSE("GPL");
