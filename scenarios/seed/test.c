/*
 * The module from the seed thread (xen-devel, "create shadow pages",
 * Nov 2010), unmodified in what it does: allocate two pages, take their
 * kernel address, print it and the first word there, free them.
 */
#include <linux/module.h>
#include <linux/gfp.h>
#include <linux/mm.h>

static int __init test_init(void)
{
	struct page *pg;
	unsigned long *vaddr;

	pg = alloc_pages(GFP_HIGHUSER, 1);
	if (!pg)
		return 0;
	vaddr = page_address(pg);
	if (!vaddr)
		return 0;
	printk("The address allocated is %lx\n", (unsigned long)vaddr);
	printk("The value at the address is %lx\n", *vaddr);
	__free_pages(pg, 1);
	return 1;
}

static void __exit test_exit(void)
{
}

module_init(test_init);
module_exit(test_exit);
MODULE_LICENSE("GPL");
