// SPDX-License-Identifier: GPL-2.0
/*
 * st_vmalloc: vmalloc area activity (shadowtrace scenario).
 *
 * vmalloc() maps freshly allocated pages at new kernel VAs: it writes L1
 * (PTE) entries in the vmalloc area, allocating an L1 frame (and linking it
 * into a shared kernel PMD) whenever the range reaches a 2 MiB region with
 * no L1 yet. Every root shares the kernel half, so these are table writes
 * into frames that every root reaches. The module touches every page
 * (shadow faults on first access, write faults for D), then vfree()s them
 * (the PTEs are cleared at once; the TLB flush is lazy) and forces the lazy
 * purge with vm_unmap_aliases() so the flush of the freed range happens
 * inside the capture window too. L1 frames of the vmalloc area are never
 * freed by the kernel, so what goes away is entries, not tables.
 *
 * Nothing is registered as secure: this is a neutral workload for the
 * shadow engine (shadow creation, table-write validation, entry removal).
 */
#include <linux/module.h>
#include <linux/vmalloc.h>
#include <linux/mm.h>

#define PR "vmalloc: "

/* A few sizes, 1..8 pages, so some allocations straddle L1 boundaries. */
static const unsigned int npages[] = { 1, 3, 8, 2 };
#define NALLOC ARRAY_SIZE(npages)

static int __init st_vmalloc_init(void)
{
	void *area[NALLOC];
	unsigned int i, j, bad = 0;

	for (i = 0; i < NALLOC; i++) {
		area[i] = vmalloc(npages[i] * PAGE_SIZE);
		if (!area[i]) {
			while (i--)
				vfree(area[i]);
			return -ENOMEM;
		}
	}
	for (i = 0; i < NALLOC; i++) {
		for (j = 0; j < npages[i]; j++) {
			u64 *p = area[i] + j * PAGE_SIZE;
			u64 value = 0x766d616c6c6f6300ULL | (i << 4) | j;

			WRITE_ONCE(*p, value);		/* "vmalloc" */
			if (READ_ONCE(*p) != value)
				bad++;
			pr_info(PR "area %u page %u va=%#lx pa=%#llx wrote %#llx\n",
				i, j, (unsigned long)p,
				(u64)vmalloc_to_pfn(p) << PAGE_SHIFT, value);
		}
	}
	for (i = 0; i < NALLOC; i++) {
		vfree(area[i]);
		pr_info(PR "area %u freed (%u pages at %#lx)\n",
			i, npages[i], (unsigned long)area[i]);
	}
	/* Purge the lazily freed ranges now: their TLB flush happens here. */
	vm_unmap_aliases();
	pr_info(PR "%zu areas, %u mismatches; lazy areas purged\n",
		NALLOC, bad);
	return bad ? -EIO : 0;
}

static void __exit st_vmalloc_exit(void)
{
}

module_init(st_vmalloc_init);
module_exit(st_vmalloc_exit);
MODULE_DESCRIPTION("shadowtrace scenario: vmalloc, touch, vfree");
MODULE_LICENSE("GPL");
