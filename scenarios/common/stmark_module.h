/*
 * stmark_module.h: helpers the scenario kernel modules share.
 *
 * Include after stmark.h, with PR defined as the module's log prefix
 * (e.g. #define PR "private-root: ").
 *
 *  mark(fmt, ...)        a marker (see stmark.h), also printed to the log
 *  visit_root(root, va, value)
 *                        with interrupts off, run on CR3 `root`, store
 *                        `value` at `va` and read it back, go back to the
 *                        old CR3; returns what was read
 *  direct_map_size(va)   "1G", "2M" or "4K": the kernel mapping covering va
 */
#ifndef STMARK_MODULE_H
#define STMARK_MODULE_H

#include <linux/kernel.h>
#include <linux/printk.h>
#include <linux/irqflags.h>
#include <asm/pgtable.h>
#include <asm/special_insns.h>

#ifndef PR
#error "define PR (the module's log prefix) before including stmark_module.h"
#endif

static void mark(const char *fmt, ...) __printf(1, 2);
static void __maybe_unused mark(const char *fmt, ...)
{
	char text[STMARK_MAX_LEN + 1];
	va_list ap;
	int len;

	va_start(ap, fmt);
	len = vscnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	stmark_raw(text, len);
	pr_info(PR "marker \"%s\"\n", text);
}

/*
 * The CR3 values: `root` as given (the scenarios pass PCID 0 with bit 63,
 * no-flush, clear: Linux never gives PCID 0 to an mm, so loading it flushes
 * whatever an earlier visit left there); the old value read back from CR3
 * never has bit 63 set, so going back flushes that PCID's non-global
 * entries too (slower, never wrong). Without PCID both are full flushes.
 */
static u64 __maybe_unused visit_root(unsigned long root, u64 *va, u64 value)
{
	unsigned long flags, old;
	u64 got;

	local_irq_save(flags);
	old = __native_read_cr3();
	native_write_cr3(root);
	WRITE_ONCE(*va, value);
	got = READ_ONCE(*va);
	native_write_cr3(old);
	local_irq_restore(flags);
	return got;
}

static const char *__maybe_unused direct_map_size(void *va)
{
	unsigned int level;

	if (!lookup_address((unsigned long)va, &level))
		return "no";
	return level == PG_LEVEL_1G ? "1G" : level == PG_LEVEL_2M ? "2M" : "4K";
}

#endif
