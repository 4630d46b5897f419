/*
 * shadowtrace: which vCPU is executing (a QEMU 10.0 work-around)
 *
 * QEMU 10.0 folds the vcpu_index it passes to callbacks into a constant,
 * the index of the vCPU that translated the block, whenever vCPUs do not
 * run in parallel (CF_PARALLEL clear, accel/tcg/plugin-gen.c
 * gen_cpu_index): with -accel tcg,thread=single and -smp > 1 every vCPU
 * runs blocks another one translated, so the index is often wrong. Only
 * in that case cur_vcpu() asks QEMU itself, through two symbols its
 * binary exports although they are not plugin API: the thread's
 * current_cpu and gdb_get_cpu_index() (cpu_index + 1). Debian's QEMU
 * exports them because it is built with modules; a build without modules
 * does not, and then the plugin warns that vCPU numbers may be wrong.
 *
 * The method is decided once the second vCPU is initialised (same thread
 * as the first: round-robin TCG; another thread: MTTCG, where the index
 * QEMU passes is right) and said on one stderr line; with one vCPU it is
 * said at install.
 */

#ifndef SHADOWTRACE_VCPU_INDEX_H
#define SHADOWTRACE_VCPU_INDEX_H

#include <stdbool.h>

/* At install: the machine's maximum number of vCPUs. */
void vcpu_index_setup(unsigned int max_vcpus);

/* At every vCPU's init, on the thread that will run it. */
void vcpu_index_vcpu_init(unsigned int vcpu_index);

/* Internal to cur_vcpu(): the work-around is in use; the look-up. */
extern bool vcpu_index_from_qemu;
unsigned int vcpu_index_qemu(void);

/*
 * The index of the vCPU executing a callback, given the vcpu_index QEMU
 * passed to it. The one function the callbacks use.
 */
static inline unsigned int cur_vcpu(unsigned int vcpu_index)
{
    if (__atomic_load_n(&vcpu_index_from_qemu, __ATOMIC_RELAXED)) {
        return vcpu_index_qemu();
    }
    return vcpu_index;
}

#endif
