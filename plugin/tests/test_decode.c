/*
 * shadowtrace: unit test of the x86 decoder (plugin/decode.c)
 *
 * Every form decode_special() recognises, on byte strings, with the
 * fields it must fill; near misses that must not match; and every
 * truncation of every recognised instruction, which must not match
 * either. Each buffer is copied into a heap block of exactly its length,
 * so that the ASan build (make plugin-test) catches a read past the end.
 * Failures are printed one per line; the last line is "N passed, M
 * failed" and the exit status is non-zero if M > 0.
 */

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"

#define PC      0xffffffff81000000ULL

typedef struct {
    const char *name;
    const char *hex;        /* the instruction's bytes */
    bool match;
    /* expected fields when match (those that apply to op are checked) */
    int op, cr, reg, base, index, scale, seg, addr32;
    int64_t disp;
} Case;

/* Shorthands for the expected fields */
#define CPUID(name, hex) \
    { name, hex, true, OP_CPUID, 0, 0, 0, 0, 0, SEG_NONE, 0, 0 }
#define MOVCR(name, hex, cr, reg) \
    { name, hex, true, OP_MOV_CR, cr, reg, 0, 0, 0, SEG_NONE, 0, 0 }
/* a memory operand: base, index, scale, disp; seg and addr32 separately */
#define MEM(name, hex, op, reg, base, index, scale, disp, seg, a32) \
    { name, hex, true, op, 0, reg, base, index, scale, seg, a32, disp }
#define INVLPG(name, hex, base, index, scale, disp) \
    MEM(name, hex, OP_INVLPG, 0, base, index, scale, disp, SEG_NONE, 0)
#define INVPCID(name, hex, reg, base, index, scale, disp) \
    MEM(name, hex, OP_INVPCID, reg, base, index, scale, disp, SEG_NONE, 0)
#define MISS(name, hex) \
    { name, hex, false, 0, 0, 0, 0, 0, 0, 0, 0, 0 }

#define NO BASE_NONE
#define RIP BASE_RIP

static const Case cases[] = {
    /* CPUID (markers); prefixes and REX do not change it */
    CPUID("cpuid", "0f a2"),
    CPUID("cpuid, REX.W", "48 0f a2"),
    CPUID("cpuid, 66 prefix", "66 0f a2"),
    CPUID("cpuid, rep and segment prefixes", "f3 2e 0f a2"),

    /* mov to CR0/CR3/CR4: 0f 22 /r, reg = CR, rm = GPR */
    MOVCR("mov %rax,%cr3", "0f 22 d8", 3, 0),
    MOVCR("mov %rdi,%cr3", "0f 22 df", 3, 7),
    MOVCR("mov %r8,%cr3 (REX.B)", "41 0f 22 d8", 3, 8),
    MOVCR("mov %r15,%cr3 (REX.B)", "41 0f 22 df", 3, 15),
    MOVCR("mov %r9,%cr3 (REX.WB)", "49 0f 22 d9", 3, 9),
    MOVCR("mov %rax,%cr3 (empty REX 40)", "40 0f 22 d8", 3, 0),
    MOVCR("mov %rax,%cr3 (REX.W)", "48 0f 22 d8", 3, 0),
    MOVCR("mov %rax,%cr0", "0f 22 c0", 0, 0),
    MOVCR("mov %rcx,%cr4", "0f 22 e1", 4, 1),
    MOVCR("mov %r12,%cr4 (REX.B)", "41 0f 22 e4", 4, 12),
    MOVCR("mov %rax,%cr3 (66 prefix)", "66 0f 22 d8", 3, 0),
    MOVCR("mov %rax,%cr3 (cs prefix)", "2e 0f 22 d8", 3, 0),
    /* the CPU ignores ModRM.mod for mov to CR: so does the decoder */
    MOVCR("mov %rax,%cr3 (mod 00)", "0f 22 18", 3, 0),
    MOVCR("mov %rsi,%cr3 (mod 01)", "0f 22 5e", 3, 6),

    /* INVLPG: 0f 01 /7, memory operand (mod != 11) */
    INVLPG("invlpg (%rax)", "0f 01 38", 0, NO, 0, 0),
    INVLPG("invlpg (%rdi)", "0f 01 3f", 7, NO, 0, 0),
    INVLPG("invlpg (%r8) (REX.B)", "41 0f 01 38", 8, NO, 0, 0),
    INVLPG("invlpg (%r15) (REX.WB)", "49 0f 01 3f", 15, NO, 0, 0),
    INVLPG("invlpg 0x10(%rax) (disp8)", "0f 01 78 10", 0, NO, 0, 16),
    INVLPG("invlpg -0x10(%rbp) (disp8 < 0)", "0f 01 7d f0", 5, NO, 0, -16),
    INVLPG("invlpg 0(%rbp) (mod 01, disp8 0)", "0f 01 7d 00", 5, NO, 0, 0),
    INVLPG("invlpg 0x12345678(%rcx) (disp32)", "0f 01 b9 78 56 34 12",
           1, NO, 0, 0x12345678),
    INVLPG("invlpg -0x80000000(%rcx) (disp32 < 0)", "0f 01 b9 00 00 00 80",
           1, NO, 0, INT32_MIN),
    INVLPG("invlpg 0x12345678(%rip)", "0f 01 3d 78 56 34 12",
           RIP, NO, 0, 0x12345678),
    INVLPG("invlpg -4(%rip)", "0f 01 3d fc ff ff ff", RIP, NO, 0, -4),
    /* rm=101 mod=00 is RIP-relative whatever REX.B says */
    INVLPG("invlpg 0x100(%rip) (REX.B)", "41 0f 01 3d 00 01 00 00",
           RIP, NO, 0, 0x100),
    /* rm=100: a SIB byte follows */
    INVLPG("invlpg (%rax,%rbx,4) (SIB)", "0f 01 3c 98", 0, 3, 2, 0),
    INVLPG("invlpg (%rsp) (SIB, no index)", "0f 01 3c 24", 4, NO, 0, 0),
    INVLPG("invlpg (%r12) (SIB, REX.B)", "41 0f 01 3c 24", 12, NO, 0, 0),
    INVLPG("invlpg (%rax,%r12,1) (SIB, REX.X)", "42 0f 01 3c 20",
           0, 12, 0, 0),
    INVLPG("invlpg (%r9,%r10,8) (SIB, REX.XB)", "43 0f 01 3c d1",
           9, 10, 3, 0),
    INVLPG("invlpg 0x8(%rsp,%rcx,2) (SIB, disp8)", "0f 01 7c 4c 08",
           4, 1, 1, 8),
    INVLPG("invlpg 0x12345678 (SIB, no base, no index)",
           "0f 01 3c 25 78 56 34 12", NO, NO, 0, 0x12345678),
    INVLPG("invlpg 0x1000(,%rcx,4) (SIB, no base)",
           "0f 01 3c 8d 00 10 00 00", NO, 1, 2, 0x1000),
    /* SIB base=101 with mod=00 has no base, also with REX.B (r13) */
    INVLPG("invlpg 0x10 (SIB, no base, REX.B)", "41 0f 01 3c 25 10 00 00 00",
           NO, NO, 0, 0x10),
    INVLPG("invlpg 0x8(%rbp) (SIB base 101, mod 01)", "0f 01 7c 25 08",
           5, NO, 0, 8),
    INVLPG("invlpg 0x8(%r13) (SIB base 101, mod 01, REX.B)",
           "41 0f 01 7c 25 08", 13, NO, 0, 8),
    INVLPG("invlpg 0x100(%rsp) (SIB, disp32)", "0f 01 bc 24 00 01 00 00",
           4, NO, 0, 0x100),
    INVLPG("invlpg (%rax) (66 prefix, ignored)", "66 0f 01 38",
           0, NO, 0, 0),
    MEM("invlpg %fs:(%rax)", "64 0f 01 38", OP_INVLPG, 0, 0, NO, 0, 0,
        SEG_FS, 0),
    MEM("invlpg %gs:0x10(%rdx)", "65 0f 01 7a 10", OP_INVLPG, 0, 2, NO, 0,
        16, SEG_GS, 0),
    MEM("invlpg (%eax) (67 prefix)", "67 0f 01 38", OP_INVLPG, 0, 0, NO, 0,
        0, SEG_NONE, 1),
    MEM("invlpg %gs:(%ecx) (65 67, REX.B)", "65 67 41 0f 01 39", OP_INVLPG,
        0, 9, NO, 0, 0, SEG_GS, 1),

    /* INVPCID: 66 0f 38 82 /r, reg = type GPR, memory = descriptor */
    INVPCID("invpcid (%rax),%rcx", "66 0f 38 82 08", 1, 0, NO, 0, 0),
    INVPCID("invpcid (%rax),%r9 (REX.R)", "66 44 0f 38 82 08",
            9, 0, NO, 0, 0),
    INVPCID("invpcid (%r8),%rcx (REX.B)", "66 41 0f 38 82 08",
            1, 8, NO, 0, 0),
    INVPCID("invpcid (%r8),%r9 (REX.WRB)", "66 4d 0f 38 82 08",
            9, 8, NO, 0, 0),
    INVPCID("invpcid 0x10(%rax),%rcx (disp8)", "66 0f 38 82 48 10",
            1, 0, NO, 0, 16),
    INVPCID("invpcid (%rax,%r12,1),%rcx (SIB, REX.X)",
            "66 42 0f 38 82 0c 20", 1, 0, 12, 0, 0),
    INVPCID("invpcid 0x100(%rip),%rcx", "66 0f 38 82 0d 00 01 00 00",
            1, RIP, NO, 0, 0x100),
    INVPCID("invpcid -0x20(%rsp),%rdx (SIB, disp8)", "66 0f 38 82 54 24 e0",
            2, 4, NO, 0, -32),
    MEM("invpcid %gs:(%rax),%rcx", "65 66 0f 38 82 08", OP_INVPCID, 1, 0,
        NO, 0, 0, SEG_GS, 0),

    /* Near misses: close to the above, and must not match */
    MISS("empty", ""),
    MISS("0f alone", "0f"),
    MISS("prefixes only", "66 67 f0"),
    MISS("REX only", "48"),
    MISS("a2 without 0f", "a2"),
    MISS("bt (0f a3)", "0f a3 c0"),
    MISS("mov %cr3,%rax (from CR3)", "0f 20 d8"),
    MISS("mov %cr3,%r8 (from CR3, REX.B)", "41 0f 20 d8"),
    MISS("mov %cr3,%rax (from CR3, REX.W)", "48 0f 20 d8"),
    MISS("mov %rax,%cr2", "0f 22 d0"),
    MISS("mov %rax,%cr8 (REX.R)", "44 0f 22 c0"),
    MISS("mov %rax,%cr11 (REX.R on cr3)", "44 0f 22 d8"),
    MISS("lock mov %rax,%cr0 (= mov to cr8)", "f0 0f 22 c0"),
    MISS("lock mov %rax,%cr3 (= cr11)", "f0 0f 22 d8"),
    MISS("lock mov %rax,%cr4 (= cr12)", "f0 0f 22 e0"),
    MISS("mov %rax,%dr3 (0f 23)", "0f 23 d8"),
    MISS("swapgs (0f 01 /7, mod 11)", "0f 01 f8"),
    MISS("rdtscp (0f 01 /7, mod 11)", "0f 01 f9"),
    MISS("lmsw (%rax) (0f 01 /6)", "0f 01 30"),
    MISS("lgdt (%rax) (0f 01 /2)", "0f 01 10"),
    MISS("invlpga (0f 01 df)", "0f 01 df"),
    MISS("invpcid without 66", "0f 38 82 08"),
    MISS("invpcid with f3 instead of 66", "f3 0f 38 82 08"),
    MISS("invvpid (66 0f 38 81)", "66 0f 38 81 08"),
    MISS("invept (66 0f 38 80)", "66 0f 38 80 08"),
    MISS("invpcid, register operand (mod 11)", "66 0f 38 82 c8"),
    MISS("invpcid, REX before 66", "48 66 0f 38 82 08"),
    /*
     * The decoder takes REX only right before 0f (where compilers put it).
     * A CPU ignores a REX followed by another prefix and still runs these;
     * the decoder does not recognise them.
     */
    MISS("mov %rax,%cr3, REX then 66", "48 66 0f 22 d8"),
    MISS("mov %r8,%cr3, two REX", "41 41 0f 22 d8"),
};

static int n_passed, n_failed;

static size_t parse_hex(const char *hex, uint8_t *out, size_t cap)
{
    size_t n = 0;

    while (*hex) {
        unsigned int byte;
        int used;

        if (*hex == ' ') {
            hex++;
            continue;
        }
        if (n == cap || sscanf(hex, "%2x%n", &byte, &used) != 1 || used != 2) {
            fprintf(stderr, "bad test bytes near '%s'\n", hex);
            exit(2);
        }
        out[n++] = (uint8_t)byte;
        hex += used;
    }
    return n;
}

static void check(bool ok, const char *name, const char *what)
{
    if (ok) {
        n_passed++;
    } else {
        n_failed++;
        printf("FAIL: %s: %s\n", name, what);
    }
}

/* Decode len bytes from a heap block of exactly that size. */
static bool decode(const uint8_t *bytes, size_t len, InsnDesc *d, int fill)
{
    uint8_t *b = malloc(len ? len : 1);
    bool r;

    memcpy(b, bytes, len);
    memset(d, fill, sizeof(*d));
    r = decode_special(len ? b : b + 1, len, PC, d);
    free(b);
    return r;
}

/* Compare one field; append to why when it differs. */
#define FIELD(got, want) do {                                            \
        if ((int64_t)(got) != (int64_t)(want)) {                          \
            snprintf(why + strlen(why), sizeof(why) - strlen(why),       \
                     " %s=%lld (want %lld)", #got, (long long)(got),     \
                     (long long)(want));                                  \
        }                                                                 \
    } while (0)

static void run_case(const Case *c)
{
    uint8_t bytes[32];
    size_t len = parse_hex(c->hex, bytes, sizeof(bytes));
    InsnDesc d, d2;
    char why[512] = "";
    bool r = decode(bytes, len, &d, 0xaa);

    if (!c->match) {
        check(!r, c->name, "decoded, should not be");
        return;
    }
    if (!r) {
        check(false, c->name, "not decoded");
        return;
    }
    FIELD(d.op, c->op);
    FIELD(d.pc, PC);
    FIELD(d.len, len);
    if (c->op == OP_MOV_CR) {
        FIELD(d.cr, c->cr);
    }
    if (c->op == OP_MOV_CR || c->op == OP_INVPCID) {
        FIELD(d.reg, c->reg);
    }
    if (c->op == OP_INVLPG || c->op == OP_INVPCID) {
        FIELD(d.base, c->base);
        FIELD(d.index, c->index);
        if (c->index != BASE_NONE) {
            FIELD(d.scale, c->scale);
        }
        FIELD(d.disp, c->disp);
    }
    FIELD(d.seg, c->seg);
    FIELD(d.addr32, c->addr32);
    /*
     * Descriptors are interned by memcmp: every byte, padding included,
     * must be the same whatever the memory held before.
     */
    decode(bytes, len, &d2, 0x55);
    if (memcmp(&d, &d2, sizeof(d)) != 0) {
        snprintf(why + strlen(why), sizeof(why) - strlen(why),
                 " descriptor depends on prior memory");
    }
    check(why[0] == '\0', c->name, why);

    /* Every proper prefix of a recognised instruction is truncated. */
    for (size_t n = 0; n < len; n++) {
        char name[160];

        snprintf(name, sizeof(name), "%s, truncated to %zu bytes", c->name, n);
        check(!decode(bytes, n, &d2, 0), name, "decoded, should not be");
    }
}

int main(void)
{
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        run_case(&cases[i]);
    }
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
