/* shadowtrace: the guest's console text as markers (see console.h). */

#include <string.h>

#include "console.h"

static int kept(uint8_t b)
{
    return b > 0x20 && b < 0x7f && b != '%';
}

size_t console_marker(const uint8_t *s, size_t n,
                      char out[ST_MARKER_MAX_LEN + 1])
{
    static const char hex[] = "0123456789abcdef";
    size_t len = strlen(ST_MARKER_CONSOLE) + 1, used = 0;

    out[0] = '\0';
    if (n == 0) {
        return 0;
    }
    memcpy(out, ST_MARKER_CONSOLE " ", len);
    while (used < n) {
        uint8_t b = s[used];
        size_t need = kept(b) ? 1 : 3;

        if (len + need > ST_MARKER_MAX_LEN) {
            break;
        }
        if (need == 1) {
            out[len++] = (char)b;
        } else {
            out[len++] = '%';
            out[len++] = hex[b >> 4];
            out[len++] = hex[b & 15];
        }
        used++;
    }
    out[len] = '\0';
    return used;
}
