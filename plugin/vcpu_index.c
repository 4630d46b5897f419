/*
 * shadowtrace: which vCPU is executing (a QEMU 10.0 work-around)
 *
 * The only file that touches QEMU internals (see vcpu_index.h).
 * current_cpu is a __thread variable: dlsym returns the calling thread's
 * copy. It is looked up and checked only on the thread of the first vCPU
 * initialised, and used only when every vCPU runs on that thread
 * (round-robin TCG), so the pointer is always the running thread's.
 */

#include <dlfcn.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>

#include "vcpu_index.h"

bool vcpu_index_from_qemu;

/* vCPU init runs on each vCPU's thread: several at once under MTTCG. */
static pthread_mutex_t init_lock = PTHREAD_MUTEX_INITIALIZER;
static bool one_vcpu;               /* nothing to decide */
static unsigned int n_inits;
static pthread_t first_thread;      /* of the first vCPU initialised */
static bool shared_thread;          /* all vCPUs so far on first_thread */
static bool symbols_ok = true;      /* they agreed at every vCPU init */
static void **current_cpu_slot;
static int (*gdb_cpu_index)(void *cpu);

unsigned int vcpu_index_qemu(void)
{
    return (unsigned int)gdb_cpu_index(*current_cpu_slot) - 1;
}

void vcpu_index_setup(unsigned int max_vcpus)
{
    one_vcpu = max_vcpus == 1;
    if (one_vcpu) {
        fprintf(stderr, "shadowtrace plugin: vCPU index: as QEMU passes it "
                "(one vCPU)\n");
    }
}

/* On first_thread: do QEMU's symbols name this vCPU? */
static bool symbols_name(unsigned int vcpu_index)
{
    if (!current_cpu_slot || !gdb_cpu_index) {
        current_cpu_slot = dlsym(RTLD_DEFAULT, "current_cpu");
        *(void **)&gdb_cpu_index = dlsym(RTLD_DEFAULT, "gdb_get_cpu_index");
    }
    return current_cpu_slot && gdb_cpu_index && *current_cpu_slot &&
           gdb_cpu_index(*current_cpu_slot) - 1 == (int)vcpu_index;
}

void vcpu_index_vcpu_init(unsigned int vcpu_index)
{
    bool was, now;

    if (one_vcpu) {
        return;
    }
    pthread_mutex_lock(&init_lock);
    was = vcpu_index_from_qemu;
    if (n_inits++ == 0) {
        first_thread = pthread_self();
        shared_thread = true;
    } else if (!pthread_equal(first_thread, pthread_self())) {
        shared_thread = false;  /* MTTCG: QEMU's index is right */
    }
    if (shared_thread && !symbols_name(vcpu_index)) {
        symbols_ok = false;
    }
    now = n_inits > 1 && shared_thread && symbols_ok;
    if (now != was) {
        __atomic_store_n(&vcpu_index_from_qemu, now, __ATOMIC_RELAXED);
    }
    if (n_inits == 2) {
        if (!shared_thread) {
            fprintf(stderr, "shadowtrace plugin: vCPU index: as QEMU passes "
                    "it (vCPUs on their own threads)\n");
        } else if (now) {
            fprintf(stderr, "shadowtrace plugin: vCPU index: from QEMU's "
                    "current_cpu and gdb_get_cpu_index (vCPUs share one "
                    "thread)\n");
        }
    }
    if (n_inits >= 2 && shared_thread && !now && (was || n_inits == 2)) {
        fprintf(stderr, "shadowtrace plugin: warning: vCPUs share one "
                "thread and QEMU's cpu index cannot be read: events may "
                "name the wrong vCPU (use -accel tcg,thread=multi)\n");
    }
    pthread_mutex_unlock(&init_lock);
}
