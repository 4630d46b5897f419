/*
 * forktouch: many roots sharing the kernel half, copy-on-write user L1s.
 *
 * The parent maps a private anonymous buffer and writes every page, then
 * forks NCHILD children. fork() write-protects the parent's user PTEs and
 * copies them into each child's fresh tables (new PGD with the kernel half
 * cloned; user L3/L2/L1 frames of its own). Each child writes CHILD_PAGES
 * pages of the buffer (copy-on-write faults: a new frame and an L1 entry
 * rewritten), reads one page it did not write (still shared), touches a
 * fresh 2-page mapping of its own, and exits (its tables are torn down).
 * The parent waits for each, then writes its buffer once more (breaking
 * COW where it is now the only user) and exits.
 *
 * Nothing is registered as secure: a workload for root churn and for
 * out-of-sync L1 activity in the shadow engine.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define NCHILD		4
#define BUF_PAGES	16
#define CHILD_PAGES	4
#define PAGE		4096

static int child(int n, volatile uint64_t *buf)
{
	volatile uint64_t *own;
	int j, bad = 0;
	uint64_t seen;

	for (j = 0; j < CHILD_PAGES; j++) {
		int pg = n * CHILD_PAGES + j;
		volatile uint64_t *p = buf + pg * (PAGE / 8);

		bad += *p != (uint64_t)pg;	/* the parent's value, shared */
		*p = 0xc0c0000000000000ULL | (n << 8) | pg;	/* COW */
		bad += *p != (0xc0c0000000000000ULL | (n << 8) | pg);
	}
	/* A page another child writes: still the parent's frame here. */
	seen = buf[((n + 1) % NCHILD) * CHILD_PAGES * (PAGE / 8)];
	own = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (own == MAP_FAILED)
		return 1;
	own[0] = n;
	own[PAGE / 8] = n;
	printf("fork: child %d pid=%d wrote pages %d-%d of buf=%p, read %#" PRIx64
	       " from page %d, own pages at %p\n",
	       n, getpid(), n * CHILD_PAGES, n * CHILD_PAGES + CHILD_PAGES - 1,
	       (void *)buf, seen, ((n + 1) % NCHILD) * CHILD_PAGES,
	       (void *)own);
	return bad != 0;
}

int main(void)
{
	volatile uint64_t *buf;
	pid_t pid[NCHILD];
	int i, status, failed = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	buf = mmap(NULL, BUF_PAGES * PAGE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		perror("fork: mmap");
		return 1;
	}
	for (i = 0; i < BUF_PAGES; i++)
		buf[i * (PAGE / 8)] = i;
	printf("fork: parent pid=%d buf=%p pages=%d children=%d\n",
	       getpid(), (void *)buf, BUF_PAGES, NCHILD);

	for (i = 0; i < NCHILD; i++) {
		fflush(stdout);
		pid[i] = fork();
		if (pid[i] < 0) {
			perror("fork: fork");
			return 1;
		}
		if (pid[i] == 0)
			_exit(child(i, buf));
	}
	for (i = 0; i < NCHILD; i++) {
		if (waitpid(pid[i], &status, 0) < 0 ||
		    !WIFEXITED(status) || WEXITSTATUS(status)) {
			printf("fork: child %d pid=%d failed (status %#x)\n",
			       i, pid[i], status);
			failed++;
		}
	}
	for (i = 0; i < BUF_PAGES; i++) {
		failed += buf[i * (PAGE / 8)] != (uint64_t)i;
		buf[i * (PAGE / 8)] = 0xaa00 | i;
	}
	printf("fork: parent rewrote %d pages after %d children, %d failures\n",
	       BUF_PAGES, NCHILD, failed);
	return failed != 0;
}
