/*
 * shadowtrace: x86 decoder of the instructions the plugin follows
 *
 * Only what the plugin needs: legacy prefixes (operand size, address
 * size, lock, segment overrides; the others are skipped), one REX prefix,
 * the 0x0f opcode map, a ModRM memory operand with SIB, disp8/disp32 and
 * RIP-relative addressing, in 64-bit addressing (0x67 only truncates the
 * computed address to 32 bits). See decode.h.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "decode.h"

/* ModRM memory operand (64-bit addressing); false if malformed. */
static bool decode_mem(const uint8_t *b, size_t len, size_t i, uint8_t rex,
                       InsnDesc *d)
{
    uint8_t modrm, mod, rm;

    if (i >= len) {
        return false;
    }
    modrm = b[i++];
    mod = modrm >> 6;
    rm = modrm & 7;
    if (mod == 3) {
        return false;
    }
    d->base = BASE_NONE;
    d->index = BASE_NONE;
    if (rm == 4) {
        uint8_t sib, idx;

        if (i >= len) {
            return false;
        }
        sib = b[i++];
        idx = ((sib >> 3) & 7) | ((rex & 2) ? 8 : 0);
        if (idx != 4) {
            d->index = (int8_t)idx;
            d->scale = sib >> 6;
        }
        if ((sib & 7) == 5 && mod == 0) {
            mod = 2;    /* no base, disp32 */
        } else {
            d->base = (int8_t)((sib & 7) | ((rex & 1) ? 8 : 0));
        }
    } else if (rm == 5 && mod == 0) {
        d->base = BASE_RIP;
        mod = 2;
    } else {
        d->base = (int8_t)(rm | ((rex & 1) ? 8 : 0));
    }
    if (mod == 1) {
        if (i + 1 > len) {
            return false;
        }
        d->disp = (int8_t)b[i];
    } else if (mod == 2) {
        int32_t disp;
        if (i + 4 > len) {
            return false;
        }
        memcpy(&disp, b + i, 4);
        d->disp = disp;
    }
    return true;
}

/* Recognise CPUID, mov to CR0/3/4, INVLPG, INVPCID. */
bool decode_special(const uint8_t *b, size_t len, uint64_t pc,
                    InsnDesc *d)
{
    size_t i = 0;
    bool opsize = false, lock = false;
    uint8_t rex = 0, op;

    memset(d, 0, sizeof(*d));
    d->pc = pc;
    d->len = (uint8_t)len;
    for (; i < len; i++) {
        switch (b[i]) {
        case 0x66:
            opsize = true;
            continue;
        case 0x67:
            d->addr32 = 1;
            continue;
        case 0xf0:
            lock = true;
            continue;
        case 0x64:
            d->seg = SEG_FS;
            continue;
        case 0x65:
            d->seg = SEG_GS;
            continue;
        case 0xf2: case 0xf3: case 0x2e: case 0x36: case 0x3e: case 0x26:
            continue;
        }
        break;
    }
    /* REX comes last; in 32-bit code 0x40..0x4f is a whole instruction. */
    if (i < len && (b[i] & 0xf0) == 0x40) {
        rex = b[i++];
    }
    if (i + 1 >= len || b[i] != 0x0f) {
        return false;
    }
    op = b[i + 1];
    i += 2;
    if (op == 0xa2) {
        d->op = OP_CPUID;
        return true;
    }
    if (op == 0x22 && i < len) {
        uint8_t modrm = b[i];
        d->cr = ((modrm >> 3) & 7) | ((rex & 4) ? 8 : 0) | (lock ? 8 : 0);
        d->reg = (int8_t)((modrm & 7) | ((rex & 1) ? 8 : 0));
        if (d->cr == 0 || d->cr == 3 || d->cr == 4) {
            d->op = OP_MOV_CR;
            return true;
        }
        return false;
    }
    if (op == 0x01 && i < len && ((b[i] >> 3) & 7) == 7 && (b[i] >> 6) != 3) {
        d->op = OP_INVLPG;
        return decode_mem(b, len, i, rex, d);
    }
    if (op == 0x38 && opsize && i + 1 < len && b[i] == 0x82) {
        d->op = OP_INVPCID;
        d->reg = (int8_t)(((b[i + 1] >> 3) & 7) | ((rex & 4) ? 8 : 0));
        return decode_mem(b, len, i + 1, rex, d);
    }
    return false;
}
