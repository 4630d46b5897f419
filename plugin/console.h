/*
 * shadowtrace: the guest's console text as markers
 *
 * The plugin hooks the kernel's console write (serial8250_console_write) and
 * records what the kernel wrote as MARKER events "console PAYLOAD" at
 * their place in the total order (replay/trace/format.py MARKER_CONSOLE).
 * A marker is split on spaces and holds at most ST_MARKER_MAX_LEN
 * characters, so the bytes are escaped: printable ASCII other than space
 * and '%' stands for itself, every other byte is "%xx" (two lowercase hex
 * digits). One write longer than a marker becomes several markers, in
 * order; lines are assembled by the reader (a line ends at '\n').
 * A pure function: tested on byte strings (tests/test_console.c).
 */

#ifndef SHADOWTRACE_CONSOLE_H
#define SHADOWTRACE_CONSOLE_H

#include <stddef.h>
#include <stdint.h>

#include "trace_format.h"

/* Most bytes read from one console write (a printk record is ~1 KiB). */
#define CONSOLE_MAX_BYTES 4096

/*
 * Write into `out` the marker text "console PAYLOAD" for as many bytes of
 * s[0..n) as fit in ST_MARKER_MAX_LEN characters (an escape is never cut)
 * and return how many bytes it took: at least 1 when n > 0, 0 when n == 0
 * (then `out` is left empty).
 */
size_t console_marker(const uint8_t *s, size_t n,
                      char out[ST_MARKER_MAX_LEN + 1]);

#endif
