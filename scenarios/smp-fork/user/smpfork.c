/*
 * smpfork: page-table work on two CPUs.
 *
 * The parent pins itself to CPU 0, maps a private anonymous buffer and
 * writes each page, then forks NCHILD children, child n pinned to CPU
 * n % 2 (sched_setaffinity before it touches anything). A child on CPU 1
 * migrates there at its first affinity call, so its CR3 is loaded on CPU 1
 * and its copy-on-write faults, fresh mapping and exit (its tables torn
 * down) happen there. The parent waits for each child on CPU 0 and writes
 * its buffer once more.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define NCHILD		4
#define BUF_PAGES	16
#define CHILD_PAGES	4
#define PAGE		4096

static int pin(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return sched_setaffinity(0, sizeof(set), &set);
}

static int child(int n, volatile uint64_t *buf)
{
	volatile uint64_t *own;
	int j, bad = 0;

	if (pin(n % 2) < 0)
		return 1;
	for (j = 0; j < CHILD_PAGES; j++) {
		int pg = n * CHILD_PAGES + j;
		volatile uint64_t *p = buf + pg * (PAGE / 8);

		bad += *p != (uint64_t)pg;
		*p = 0x5a5a000000000000ULL | (n << 8) | pg;	/* COW */
	}
	own = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (own == MAP_FAILED)
		return 1;
	own[0] = n;
	own[PAGE / 8] = n;
	printf("smpfork: child %d pid=%d on cpu %d wrote pages %d-%d\n",
	       n, getpid(), sched_getcpu(), n * CHILD_PAGES,
	       n * CHILD_PAGES + CHILD_PAGES - 1);
	return bad != 0;
}

int main(void)
{
	volatile uint64_t *buf;
	int i, status, failed = 0;
	pid_t pid;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (pin(0) < 0) {
		perror("smpfork: sched_setaffinity");
		return 1;
	}
	buf = mmap(NULL, BUF_PAGES * PAGE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		perror("smpfork: mmap");
		return 1;
	}
	for (i = 0; i < BUF_PAGES; i++)
		buf[i * (PAGE / 8)] = i;
	printf("smpfork: parent pid=%d on cpu %d buf=%p pages=%d, %d children\n",
	       getpid(), sched_getcpu(), (void *)buf, BUF_PAGES, NCHILD);
	for (i = 0; i < NCHILD; i++) {
		pid = fork();
		if (pid < 0) {
			perror("smpfork: fork");
			return 1;
		}
		if (pid == 0)
			_exit(child(i, buf));
		/* One at a time: each child's tables live and die on its CPU. */
		if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) ||
		    WEXITSTATUS(status)) {
			printf("smpfork: child %d failed (status %#x)\n", i, status);
			failed++;
		}
	}
	for (i = 0; i < BUF_PAGES; i++) {
		failed += buf[i * (PAGE / 8)] != (uint64_t)i;
		buf[i * (PAGE / 8)] = 0xaa00 | i;
	}
	printf("smpfork: parent rewrote %d pages, %d failures\n", BUF_PAGES, failed);
	return failed != 0;
}
