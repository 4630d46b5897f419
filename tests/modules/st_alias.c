/*
 * st_alias: one page frame, three lives (tests/test_module_capture.py).
 *
 * Not a scenario: the test builds it with `shadowtrace capture --module`.
 * Each life allocates a page, maps it a second time with vmap (the alias),
 * writes through the alias, unmaps the alias and frees the page. The
 * per-CPU free list hands the freed page straight back, so all three lives
 * use the same frame (checked, and printed as "same frame: N lives").
 * Only the second life is announced: "ALLOCATED <va>" with the page's
 * direct-map address right after the allocation, "ALIAS <va>" with the
 * alias, "RELEASING <va>" just before the free. A secure registration from
 * the first line to the last must see the second life's alias only.
 */
#include <linux/gfp.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/vmalloc.h>

static noinline struct page *st_alias_life(bool announce)
{
	struct page *pg = alloc_page(GFP_KERNEL);
	unsigned long *alias;

	if (!pg)
		return NULL;
	if (announce)
		pr_info("st_alias: ALLOCATED %lx\n", (unsigned long)page_address(pg));
	alias = vmap(&pg, 1, VM_MAP, PAGE_KERNEL);
	if (alias) {
		if (announce)
			pr_info("st_alias: ALIAS %lx\n", (unsigned long)alias);
		WRITE_ONCE(*alias, 0x5ec0de);
		vunmap(alias);
	}
	if (announce)
		pr_info("st_alias: RELEASING %lx\n", (unsigned long)page_address(pg));
	__free_page(pg);
	return pg;
}

static int __init st_alias_init(void)
{
	struct page *before = st_alias_life(false);
	struct page *during = st_alias_life(true);
	struct page *after = st_alias_life(false);

	pr_info("st_alias: same frame: %d lives\n",
		1 + (before && before == during) + (after && after == during));
	return 0;
}

static void __exit st_alias_exit(void)
{
}

module_init(st_alias_init);
module_exit(st_alias_exit);
MODULE_LICENSE("GPL");
