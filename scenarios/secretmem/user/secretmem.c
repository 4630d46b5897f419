/*
 * secretmem: one memfd_secret(2) page, registered as secure by its VA.
 *
 * memfd_secret pages are taken out of the kernel direct map when they are
 * faulted in (set_direct_map_invalid_noflush + a kernel TLB flush), so the
 * only mapping of the frame is this process's own VA: the kernel's own
 * answer to "keep a page out of every other address space". The program
 * writes a secret, reads it back, registers the frame behind the VA with
 * "secure-va VA 1" (after the first touch, so the marker's walk finds a
 * present leaf), touches it again, ends the registration and unmaps it.
 *
 * The 6.1 kernel only offers the syscall with secretmem.enable=1 on the
 * command line (scenarios/secretmem/append).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "stmark.h"

#ifndef SYS_memfd_secret
#define SYS_memfd_secret 447	/* x86_64 */
#endif

#define SECRET "shadowtrace secret 5ec2e7"

static void mark(const char *text)
{
	stmark_raw(text, strlen(text));
	printf("secretmem: marker \"%s\"\n", text);
}

/* The frame behind VA from /proc/self/pagemap (bits 0-54, if present). */
static uint64_t frame_of(const void *va)
{
	uint64_t entry = 0;
	off_t off = (uintptr_t)va / 4096 * sizeof(entry);
	int fd = open("/proc/self/pagemap", O_RDONLY);

	if (fd < 0)
		return 0;
	if (pread(fd, &entry, sizeof(entry), off) != sizeof(entry))
		entry = 0;
	close(fd);
	if (!(entry >> 63))
		return 0;
	return (entry & ((1ULL << 55) - 1)) * 4096;
}

int main(void)
{
	char text[STMARK_MAX_LEN + 1];
	volatile char *page;
	char back[sizeof(SECRET)];
	int fd, i, bad = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	fd = syscall(SYS_memfd_secret, 0);
	if (fd < 0) {
		printf("secretmem: memfd_secret failed: %s%s\n", strerror(errno),
		       errno == ENOSYS ? " (boot with secretmem.enable=1)" : "");
		return 1;
	}
	if (ftruncate(fd, 4096) < 0) {
		printf("secretmem: ftruncate failed: %s\n", strerror(errno));
		return 1;
	}
	page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (page == MAP_FAILED) {
		printf("secretmem: mmap failed: %s\n", strerror(errno));
		return 1;
	}
	/* First touch: the fault allocates the frame, drops its direct map. */
	memcpy((char *)page, SECRET, sizeof(SECRET));
	memcpy(back, (char *)page, sizeof(SECRET));
	bad += memcmp(back, SECRET, sizeof(SECRET)) != 0;
	printf("secretmem: secret page va=%p pa=%#" PRIx64 " fd=%d wrote \"%s\" read \"%s\"\n",
	       (void *)page, frame_of((void *)page), fd, SECRET, back);

	snprintf(text, sizeof(text), "secure-va %#lx 1", (unsigned long)page);
	mark(text);
	/* Touches by the owner while registered (write, then read). */
	for (i = 0; i < 4; i++) {
		page[64 + i] = 'A' + i;
		bad += page[64 + i] != 'A' + i;
	}
	printf("secretmem: owner touched the page 4 more times\n");
	mark("secure-end");

	munmap((void *)page, 4096);
	close(fd);
	printf("secretmem: unmapped and closed, %d mismatches\n", bad);
	return bad != 0;
}
