/*
 * stmark.h: shadowtrace guest markers, for kernel modules and user programs.
 *
 * A marker is a CPUID with EAX = STMARK_LEAF, RBX = address of a
 * NUL-terminated string "NAME ARG ..." and RCX = its length. Under QEMU the
 * shadowtrace plugin sees it and records a marker event; on real hardware it
 * is an ordinary (harmless) CPUID. The constant must match
 * replay/format.py MARKER_LEAF (a test checks it).
 */
#ifndef STMARK_H
#define STMARK_H

#define STMARK_LEAF 0x53544d4bu /* "STMK" */
#define STMARK_MAX_LEN 255

static inline void stmark_raw(const char *text, unsigned long len)
{
	unsigned int a = STMARK_LEAF, d;
	unsigned long b = (unsigned long)text, c = len;

	asm volatile("cpuid"
		     : "+a"(a), "+b"(b), "+c"(c), "=d"(d)
		     :
		     : "memory");
}

#ifdef __KERNEL__
#include <linux/string.h>
#define stmark(text) stmark_raw((text), strnlen((text), STMARK_MAX_LEN))
#else
#include <string.h>
#define stmark(text) stmark_raw((text), strnlen((text), STMARK_MAX_LEN))
#endif

#endif
