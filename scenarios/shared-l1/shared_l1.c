// SPDX-License-Identifier: GPL-2.0
/*
 * shared_l1: a private root whose secure page sits in a SHARED L1 frame
 * (shadowtrace scenario; the counter-example to private_root).
 *
 * Xen shadows guest page-table frames, not CR3 values: two roots that link
 * the same L1 frame get the same L1 shadow (seed thread: "if two guest
 * pagetables use the same L1 pagetable page they will get exactly the same
 * shadows"). This module builds the private root of private_root (own PGD
 * with the kernel half copied, own PUD and PMD) but the L1 (PTE) frame that
 * maps the secure page is ALSO linked from the normal root, the CR3 of the
 * process loading the module, through a second chain:
 *
 *   secure root  PGD'[256] -> PUD' -> PMD' -> L1 -> secure page
 *                (VA 0xffff800040201000)          ^
 *   normal root  PGD [257] -> PUD" -> PMD" -------'
 *                (VA 0xffff808040201000)
 *
 * Only the L1 frame is common: the two PGDs and the two PUD/PMD pairs are
 * distinct frames, so a checker that names shared table frames must name
 * exactly one with a secure leaf below it (C3 critical). Slots 256 and 257
 * lie in the kernel-half guard hole, which is empty in every root of this
 * guest (checked at load); the alias slot is set only in the loading
 * process's PGD, and only while the module's init runs.
 *
 * After every secure pass, one read through the alias VA from the normal
 * root (alias_read=1, the default) shows the consequence: the guest reads
 * the secret without entering the secure root, through the L1 shadow the
 * secure pass filled. Repeating it matters for the seed's proposal (refuse
 * secure leaves in _sh_propagate() while the vCPU is not secure): the first
 * alias read faults, since the normal root has no shadow path to the L1
 * yet, and a policy could refuse that one; but the path it builds links
 * the SHARED L1 shadow, which the next secure pass fills again, so from
 * the second round on the normal root reads the secret with no fault at
 * all and no policy check runs.
 *
 * Registration as in private_root: secure-root and secure-frame after the
 * tables are built, secure-end before the teardown. The secure page and
 * tables also stay in the kernel direct map (not removable from a module).
 */
#include <linux/module.h>
#include <linux/gfp.h>
#include <linux/mm.h>
#include <linux/sched.h>
#include <linux/irqflags.h>
#include <linux/preempt.h>
#include <linux/mem_encrypt.h>
#include <linux/io.h>
#include <asm/pgalloc.h>
#include <asm/special_insns.h>
#include <asm/tlbflush.h>
#include <asm/cpufeature.h>

#include "stmark.h"

#define PR "shared-l1: "
#include "stmark_module.h"

/* The secure root's VA (slot 256) and the normal root's alias (slot 257). */
#define PRIV_VA		0xffff800040201000UL
#define ALIAS_VA	(PRIV_VA + (1UL << 39))

/* 4-level indices (the tables built here belong to no mm). */
#define IDX(va, shift)	(((va) >> (shift)) & 511)
#define PGD_IDX(va)	IDX(va, 39)
#define PUD_IDX(va)	IDX(va, 30)
#define PMD_IDX(va)	IDX(va, 21)
#define PTE_IDX(va)	IDX(va, 12)

#define TABLE_FLAGS	(_PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED | _PAGE_DIRTY)
/* Supervisor, writable, no-execute, not global; A and D left to the CPU. */
#define LEAF_FLAGS	(_PAGE_PRESENT | _PAGE_RW | _PAGE_NX)

static unsigned int passes = 4;
module_param(passes, uint, 0444);
MODULE_PARM_DESC(passes, "CR3 switches into the private root (default 4)");

static bool alias_read = true;
module_param(alias_read, bool, 0444);
MODULE_PARM_DESC(alias_read,
		 "read the secret through the normal root's alias (default 1)");

static u64 table_entry(void *table)
{
	return __sme_pa(table) | TABLE_FLAGS;
}

static int __init shared_l1_init(void)
{
	u64 *cur = (u64 *)current->mm->pgd;
	u64 *pgd, *pud, *pmd, *pud2, *pmd2, *l1;
	unsigned long root, page_pa;
	struct page *page;
	unsigned int i, bad = 0;
	int ret = -ENOMEM;

	if (pgtable_l5_enabled()) {
		pr_err(PR "5-level paging is not supported\n");
		return -EOPNOTSUPP;
	}
	if (PGD_IDX(ALIAS_VA) >= KERNEL_PGD_BOUNDARY ||
	    cur[PGD_IDX(PRIV_VA)] || cur[PGD_IDX(ALIAS_VA)]) {
		pr_err(PR "PGD slot %lu or %lu is in use, refusing\n",
		       PGD_IDX(PRIV_VA), PGD_IDX(ALIAS_VA));
		return -EBUSY;
	}
	/* 8 KiB aligned like every kernel PGD (PTI masks CR3 bit 12). */
	pgd = (u64 *)__get_free_pages(GFP_KERNEL | __GFP_ZERO,
				      PGD_ALLOCATION_ORDER);
	pud = (u64 *)get_zeroed_page(GFP_KERNEL);
	pmd = (u64 *)get_zeroed_page(GFP_KERNEL);
	pud2 = (u64 *)get_zeroed_page(GFP_KERNEL);
	pmd2 = (u64 *)get_zeroed_page(GFP_KERNEL);
	l1 = (u64 *)get_zeroed_page(GFP_KERNEL);
	page = alloc_page(GFP_KERNEL | __GFP_ZERO);
	if (!pgd || !pud || !pmd || !pud2 || !pmd2 || !l1 || !page)
		goto out;

	page_pa = page_to_phys(page);
	l1[PTE_IDX(PRIV_VA)] = __sme_set(page_pa) |
			       (LEAF_FLAGS & __supported_pte_mask);
	/* Secure root: own PGD, PUD, PMD, down to the shared L1. */
	clone_pgd_range((pgd_t *)pgd + KERNEL_PGD_BOUNDARY,
			(pgd_t *)cur + KERNEL_PGD_BOUNDARY, KERNEL_PGD_PTRS);
	pmd[PMD_IDX(PRIV_VA)] = table_entry(l1);
	pud[PUD_IDX(PRIV_VA)] = table_entry(pmd);
	pgd[PGD_IDX(PRIV_VA)] = table_entry(pud);
	root = __sme_pa(pgd);
	/*
	 * Normal root: a second PUD/PMD pair down to the same L1. PTE_IDX is
	 * the same for both VAs, so the same L1 entry maps the secure page at
	 * both. The slot was empty, so no TLB flush is needed to add it.
	 */
	pmd2[PMD_IDX(ALIAS_VA)] = table_entry(l1);
	pud2[PUD_IDX(ALIAS_VA)] = table_entry(pmd2);

	pr_info(PR "pti=%d pcid=%d pcide=%d\n", boot_cpu_has(X86_FEATURE_PTI),
		boot_cpu_has(X86_FEATURE_PCID),
		!!(cr4_read_shadow() & X86_CR4_PCIDE));

	/*
	 * From here to the flush below, stay on this CPU: the alias and the
	 * PCID-0 translations are flushed on this CPU only.
	 */
	preempt_disable();
	WRITE_ONCE(cur[PGD_IDX(ALIAS_VA)], table_entry(pud2));
	pr_info(PR "secure page va=%#lx pa=%#lx root=%#lx\n",
		PRIV_VA, page_pa, root);
	pr_info(PR "secure page also in the direct map at va=%#lx (%s page)\n",
		(unsigned long)page_address(page),
		direct_map_size(page_address(page)));
	pr_info(PR "secure tables pgd=%#lx pud=%#lx pmd=%#lx shared-l1=%#lx\n",
		__pa(pgd), __pa(pud), __pa(pmd), __pa(l1));
	pr_info(PR "normal root=%#lx links shared-l1 at alias va=%#lx via pud=%#lx pmd=%#lx\n",
		__native_read_cr3(), ALIAS_VA, __pa(pud2), __pa(pmd2));
	mark("secure-root %#lx", root);
	mark("secure-frame %#lx 1", page_pa);
	for (i = 0; i < passes; i++) {
		u64 value = 0x53494d0000000000ULL | i;	/* "SIM" */
		u64 got = visit_root(root, (u64 *)PRIV_VA, value);

		pr_info(PR "pass %u: cr3 %#lx wrote %#llx read %#llx%s\n",
			i, root, value, got, got == value ? "" : " MISMATCH");
		bad += got != value;
		if (!alias_read)
			continue;
		/* The leak itself: no CR3 switch, the normal root reads it. */
		got = READ_ONCE(*(u64 *)ALIAS_VA);
		pr_info(PR "pass %u: normal root %#lx read %#llx at alias va=%#lx: %s\n",
			i, __native_read_cr3(), got, ALIAS_VA,
			got == value ? "the secret leaked" : "no secret");
	}
	mark("secure-end");
	/* Unlink the alias first (it is live in the normal root), then ours. */
	WRITE_ONCE(cur[PGD_IDX(ALIAS_VA)], 0);
	WRITE_ONCE(l1[PTE_IDX(PRIV_VA)], 0);
	WRITE_ONCE(pmd[PMD_IDX(PRIV_VA)], 0);
	WRITE_ONCE(pud[PUD_IDX(PRIV_VA)], 0);
	WRITE_ONCE(pgd[PGD_IDX(PRIV_VA)], 0);
	WRITE_ONCE(pmd2[PMD_IDX(ALIAS_VA)], 0);
	WRITE_ONCE(pud2[PUD_IDX(ALIAS_VA)], 0);
	__flush_tlb_all();
	preempt_enable();
	pr_info(PR "%u passes, %u mismatches; both chains torn down\n",
		passes, bad);
	ret = bad ? -EIO : 0;
out:
	if (page)
		__free_page(page);
	free_page((unsigned long)l1);
	free_page((unsigned long)pmd2);
	free_page((unsigned long)pud2);
	free_page((unsigned long)pmd);
	free_page((unsigned long)pud);
	free_pages((unsigned long)pgd, PGD_ALLOCATION_ORDER);
	return ret;
}

static void __exit shared_l1_exit(void)
{
}

module_init(shared_l1_init);
module_exit(shared_l1_exit);
MODULE_DESCRIPTION("shadowtrace scenario: secure page behind a shared L1 frame");
MODULE_LICENSE("GPL");
