/*
 * shadowtrace: unit test of the console text encoder (plugin/console.c)
 *
 * console_marker() on byte strings: what is kept and what is escaped, that
 * a marker never exceeds ST_MARKER_MAX_LEN characters nor cuts an escape,
 * and that splitting a long write and decoding the pieces gives the bytes
 * back. Each input is copied into a heap block of exactly its length, so
 * that the ASan build (make plugin-test) catches a read past the end.
 * Failures are printed one per line; the last line is "N passed, M
 * failed" and the exit status is non-zero if M > 0.
 */

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "console.h"

static int n_passed, n_failed;

static void check(bool ok, const char *name, const char *what)
{
    if (ok) {
        n_passed++;
    } else {
        n_failed++;
        printf("FAIL %s: %s\n", name, what);
    }
}

/* Encode all of s[0..n) as the plugin does; return the markers joined by newlines (never raw in a marker). */
static char *encode_all(const uint8_t *s, size_t n, int *markers, bool *fits)
{
    uint8_t *copy = malloc(n ? n : 1);
    char *out = calloc(n * 4 + 64 * (n / 64 + 2), 1);
    char text[ST_MARKER_MAX_LEN + 1];

    memcpy(copy, s, n);
    *markers = 0;
    *fits = true;
    for (size_t i = 0; i < n;) {
        size_t used = console_marker(copy + i, n - i, text);

        if (used == 0) {
            break;
        }
        *fits = *fits && strlen(text) <= ST_MARKER_MAX_LEN;
        if (*markers) {
            strcat(out, "\n");
        }
        strcat(out, text);
        (*markers)++;
        i += used;
    }
    free(copy);
    return out;
}

/* Decode the payloads of joined markers back to bytes; -1 on a bad one. */
static long decode_all(const char *joined, uint8_t *dst)
{
    const char *prefix = ST_MARKER_CONSOLE " ";
    long n = 0;
    const char *p = joined;

    while (*p) {
        if (strncmp(p, prefix, strlen(prefix))) {
            return -1;
        }
        p += strlen(prefix);
        while (*p && *p != '\n') {
            if (*p == '%') {
                unsigned int b;
                if (sscanf(p + 1, "%2x", &b) != 1 || !p[1] || !p[2]) {
                    return -1;
                }
                dst[n++] = (uint8_t)b;
                p += 3;
            } else {
                if (*p <= 0x20 || *p >= 0x7f) {
                    return -1;  /* a space or control byte left raw */
                }
                dst[n++] = (uint8_t)*p++;
            }
        }
        if (*p == '\n') {
            p++;
        }
    }
    return n;
}

static void exact(const char *name, const char *in, const char *want)
{
    int markers;
    bool fits;
    char *got = encode_all((const uint8_t *)in, strlen(in), &markers, &fits);

    check(!strcmp(got, want), name, got);
    free(got);
}

static void round_trip(const char *name, const uint8_t *in, size_t n, int want_markers)
{
    int markers;
    bool fits;
    char *got = encode_all(in, n, &markers, &fits);
    uint8_t *back = malloc(n + 1);
    long m = decode_all(got, back);

    check(fits, name, "a marker is longer than ST_MARKER_MAX_LEN");
    check(m == (long)n && !memcmp(back, in, n), name, "decoding does not give the bytes back");
    check(want_markers < 0 || markers == want_markers, name, "unexpected number of markers");
    free(got);
    free(back);
}

int main(void)
{
    char text[ST_MARKER_MAX_LEN + 1] = "x";
    uint8_t buf[CONSOLE_MAX_BYTES];
    size_t payload = ST_MARKER_MAX_LEN - strlen(ST_MARKER_CONSOLE " ");

    /* nothing to write: no marker, empty text */
    check(console_marker((const uint8_t *)"", 0, text) == 0 && text[0] == '\0',
          "empty", "n == 0 must write nothing");
    exact("plain", "abc", "console abc");
    exact("space and newline", "a b\n", "console a%20b%0a");
    exact("percent", "100%", "console 100%25");
    exact("controls", "\r\t\x7f", "console %0d%09%7f");
    exact("high bytes", "\xc3\xa9", "console %c3%a9");
    exact("timestamp", "[    2.9] x\n", "console [%20%20%20%202.9]%20x%0a");

    /* exactly one full marker of kept bytes, then one byte more */
    memset(buf, 'k', sizeof(buf));
    round_trip("one full marker", buf, payload, 1);
    round_trip("one byte over", buf, payload + 1, 2);
    /* escapes near the end of a marker are never cut */
    for (size_t i = 0; i < sizeof(buf); i++) {
        buf[i] = (uint8_t)(i % 3 == 0 ? ' ' : 'a' + i % 26);
    }
    round_trip("mixed, every length near the limit", buf, payload + 2, -1);
    for (size_t n = payload - 4; n <= payload + 4; n++) {
        round_trip("mixed, near the limit", buf, n, -1);
    }
    /* every byte value, and the largest write read */
    for (size_t i = 0; i < sizeof(buf); i++) {
        buf[i] = (uint8_t)i;
    }
    round_trip("all byte values", buf, 256, -1);
    round_trip("largest write", buf, sizeof(buf), -1);
    /* all escaped: 3 characters a byte, so payload / 3 bytes per marker */
    memset(buf, '\n', sizeof(buf));
    round_trip("all escaped", buf, 3 * (payload / 3), 3);

    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed != 0;
}
