// SPDX-License-Identifier: GPL-2.0
/*
 * private_root: a SIM-like private address space (shadowtrace scenario).
 *
 * SIM ("Secure In-VM Monitoring Using Hardware Virtualization", CCS 2009)
 * runs a monitor inside the guest in an address space of its own: the
 * kernel half of the guest plus a secure region that no other address space
 * maps. This module builds the guest-side half of that, as the seed thread's
 * author would: its own top-level table (PGD), the kernel half copied from
 * the current one, and one secure page mapped at a private VA through its
 * OWN L3 (PUD), L2 (PMD) and L1 (PTE) frames, so that no table frame below
 * the kernel-half entries is shared with any other root. It then switches
 * CR3 to that root a few times with interrupts off, writes and reads the
 * page there, and switches back.
 *
 * The private VA is in PGD slot 256 (0xffff800000000000), the start of the
 * kernel-half "guard hole" that x86-64 Linux leaves empty (reserved for a
 * hypervisor; KASLR places the direct map at slot 273 or above). A
 * kernel-half slot was chosen over a user-half address because that slot is
 * empty in EVERY root of this guest, so any translation of the private VA
 * outside the private root is a leak by construction, whereas a user-half
 * VA is also used (with other frames) by processes and would blur reports.
 * The module refuses to run if the slot is not empty.
 *
 * What the module cannot do from outside the core kernel: take the secure
 * page and the private table frames out of the kernel direct map
 * (set_direct_map_*() and set_memory_np() are not exported in 6.1). They
 * stay reachable from every root at their direct-map address; a replay
 * should report that (see docs/scenarios.md).
 *
 * Registration (shadowtrace markers): "secure-root <CR3 of the private
 * PGD>" and "secure-frame <PA of the page>", after the tables are built
 * (building them is a write from a non-secure context, which is not a
 * leak), and "secure-end" before anything is torn down.
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

#define PR "private-root: "
#include "stmark_module.h"

/* Slot 256, PUD/PMD/PTE index 1 each: every level uses a non-zero index. */
#define PRIV_VA		0xffff800040201000UL

/*
 * 4-level indices of a VA. Written out rather than taken from pgd_index()
 * and friends because the tables built here belong to no mm and the code
 * only supports 4-level paging (checked at load).
 */
#define IDX(va, shift)	(((va) >> (shift)) & 511)
#define PGD_IDX(va)	IDX(va, 39)
#define PUD_IDX(va)	IDX(va, 30)
#define PMD_IDX(va)	IDX(va, 21)
#define PTE_IDX(va)	IDX(va, 12)

/* A table entry as Linux writes kernel ones: present, writable, supervisor. */
#define TABLE_FLAGS	(_PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED | _PAGE_DIRTY)
/*
 * The leaf: supervisor, writable, no-execute and NOT global (a global TLB
 * entry would survive the switch back to a non-secure root). A and D are
 * left clear so the first write sets them, as for any fresh mapping.
 */
#define LEAF_FLAGS	(_PAGE_PRESENT | _PAGE_RW | _PAGE_NX)

static unsigned int passes = 4;
module_param(passes, uint, 0444);
MODULE_PARM_DESC(passes, "CR3 switches into the private root (default 4)");

static u64 table_entry(void *table)
{
	return __sme_pa(table) | TABLE_FLAGS;
}

static int __init private_root_init(void)
{
	u64 *pgd, *pud, *pmd, *pte, *cur = (u64 *)current->mm->pgd;
	unsigned long root, page_pa;
	struct page *page;
	unsigned int i, bad = 0;
	int ret = -ENOMEM;

	if (pgtable_l5_enabled()) {
		pr_err(PR "5-level paging is not supported\n");
		return -EOPNOTSUPP;
	}
	if (PGD_IDX(PRIV_VA) >= KERNEL_PGD_BOUNDARY || cur[PGD_IDX(PRIV_VA)]) {
		pr_err(PR "PGD slot %lu is in use, refusing\n", PGD_IDX(PRIV_VA));
		return -EBUSY;
	}
	/*
	 * PTI: CR3 is only ever loaded here in kernel mode with interrupts
	 * off, so the private root needs no user-mode PGD; but NMI entry
	 * under PTI masks CR3 bit 12 (the user/kernel PGD selector), so the
	 * PGD must be 8 KiB aligned like every PGD the kernel allocates:
	 * PGD_ALLOCATION_ORDER is 1 when PTI is built in.
	 */
	pgd = (u64 *)__get_free_pages(GFP_KERNEL | __GFP_ZERO,
				      PGD_ALLOCATION_ORDER);
	pud = (u64 *)get_zeroed_page(GFP_KERNEL);
	pmd = (u64 *)get_zeroed_page(GFP_KERNEL);
	pte = (u64 *)get_zeroed_page(GFP_KERNEL);
	page = alloc_page(GFP_KERNEL | __GFP_ZERO);
	if (!pgd || !pud || !pmd || !pte || !page)
		goto out;

	/* The kernel half, as pgd_ctor() builds it for every new mm. */
	clone_pgd_range((pgd_t *)pgd + KERNEL_PGD_BOUNDARY,
			(pgd_t *)cur + KERNEL_PGD_BOUNDARY, KERNEL_PGD_PTRS);
	/* The private chain: PGD slot -> own PUD -> own PMD -> own PTE. */
	page_pa = page_to_phys(page);
	pte[PTE_IDX(PRIV_VA)] = __sme_set(page_pa) |
				(LEAF_FLAGS & __supported_pte_mask);
	pmd[PMD_IDX(PRIV_VA)] = table_entry(pte);
	pud[PUD_IDX(PRIV_VA)] = table_entry(pmd);
	pgd[PGD_IDX(PRIV_VA)] = table_entry(pud);
	root = __sme_pa(pgd);

	pr_info(PR "pti=%d pcid=%d pcide=%d invpcid=%d\n",
		boot_cpu_has(X86_FEATURE_PTI), boot_cpu_has(X86_FEATURE_PCID),
		!!(cr4_read_shadow() & X86_CR4_PCIDE),
		boot_cpu_has(X86_FEATURE_INVPCID));
	pr_info(PR "secure page va=%#lx pa=%#lx root=%#lx (normal root=%#lx)\n",
		PRIV_VA, page_pa, root, __native_read_cr3());
	pr_info(PR "private tables pgd=%#lx pud=%#lx pmd=%#lx pte=%#lx\n",
		__pa(pgd), __pa(pud), __pa(pmd), __pa(pte));
	pr_info(PR "secure page also in the direct map at va=%#lx (%s page; a module cannot unmap it)\n",
		(unsigned long)page_address(page),
		direct_map_size(page_address(page)));

	/* No migration: the TLB clean-up below is for this CPU only. */
	preempt_disable();
	mark("secure-root %#lx", root);
	mark("secure-frame %#lx 1", page_pa);
	for (i = 0; i < passes; i++) {
		u64 value = 0x53494d0000000000ULL | i;	/* "SIM" */
		u64 got = visit_root(root, (u64 *)PRIV_VA, value);

		pr_info(PR "pass %u: cr3 %#lx wrote %#llx read %#llx%s\n",
			i, root, value, got, got == value ? "" : " MISMATCH");
		bad += got != value;
	}
	mark("secure-end");
	/*
	 * Unlink bottom-up (each table is empty before its parent entry
	 * goes), then flush. With PCIDs, restoring the old CR3 did not drop
	 * the private VA's translation: it is tagged PCID 0 and would stay in
	 * this CPU's TLB after its frames are freed; __flush_tlb_all() drops
	 * every PCID's entries. Without PCIDs the restore already flushed it.
	 */
	WRITE_ONCE(pte[PTE_IDX(PRIV_VA)], 0);
	WRITE_ONCE(pmd[PMD_IDX(PRIV_VA)], 0);
	WRITE_ONCE(pud[PUD_IDX(PRIV_VA)], 0);
	WRITE_ONCE(pgd[PGD_IDX(PRIV_VA)], 0);
	__flush_tlb_all();
	preempt_enable();
	pr_info(PR "%u passes, %u mismatches; private root torn down\n",
		passes, bad);
	ret = bad ? -EIO : 0;
out:
	if (page)
		__free_page(page);
	free_page((unsigned long)pte);
	free_page((unsigned long)pmd);
	free_page((unsigned long)pud);
	free_pages((unsigned long)pgd, PGD_ALLOCATION_ORDER);
	return ret;
}

static void __exit private_root_exit(void)
{
}

module_init(private_root_init);
module_exit(private_root_exit);
MODULE_DESCRIPTION("shadowtrace scenario: SIM-like private root");
MODULE_LICENSE("GPL");
