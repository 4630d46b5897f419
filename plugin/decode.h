/*
 * shadowtrace: x86 decoder of the instructions the plugin follows
 *
 * decode_special() recognises, from an instruction's bytes, the few
 * instructions the plugin must follow whether the capture window is open
 * or not: CPUID (markers), mov to CR0/CR3/CR4 (and "lock mov cr" for CR8,
 * which it decodes but does not accept), INVLPG and INVPCID with their
 * memory operand. It is a pure function of the bytes: no QEMU, no glib,
 * so that it is unit-tested on byte strings (plugin/tests/test_decode.c).
 */

#ifndef SHADOWTRACE_DECODE_H
#define SHADOWTRACE_DECODE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Instruction kinds that get an execution callback */
enum { OP_CPUID = 1, OP_MOV_CR, OP_INVLPG, OP_INVPCID };
#define BASE_NONE       (-1)
#define BASE_RIP        16
enum { SEG_NONE = 0, SEG_FS, SEG_GS };

/* Decoded special instruction (interned, passed as callback userdata). */
typedef struct {
    uint64_t pc;        /* the instruction */
    int32_t disp;
    uint8_t len;        /* instruction length, for RIP-relative operands */
    uint8_t op;
    uint8_t cr;         /* OP_MOV_CR: control register number */
    int8_t reg;         /* GPR: mov source, INVPCID type */
    int8_t base;        /* memory operand: GPR, BASE_RIP or BASE_NONE */
    int8_t index;       /* GPR or BASE_NONE */
    uint8_t scale;
    uint8_t addr32;
    uint8_t seg;
} InsnDesc;

/*
 * Decode the len bytes of one instruction at pc (len is the instruction's
 * length as QEMU gives it; RIP-relative operands count from pc + len).
 * True, with *d filled (every byte of it, padding included, so that
 * descriptors compare with memcmp), for CPUID, mov to CR0/CR3/CR4, INVLPG
 * and INVPCID; false for anything else or a truncated/malformed encoding.
 */
bool decode_special(const uint8_t *b, size_t len, uint64_t pc, InsnDesc *d);

#endif
