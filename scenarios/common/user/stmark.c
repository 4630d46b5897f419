/*
 * stmark: emit a shadowtrace marker from the guest's shell.
 *   stmark start | stop | NAME [ARG ...]
 * Joins its arguments with spaces, executes the marker CPUID, then prints
 * "stmark: TEXT" on its standard output (the console).
 */
#include <stdio.h>
#include <string.h>
#include "stmark.h"

int main(int argc, char **argv)
{
	char text[STMARK_MAX_LEN + 1];
	size_t used = 0;

	if (argc < 2) {
		fputs("usage: stmark start|stop|NAME [ARG...]\n", stderr);
		return 2;
	}
	for (int i = 1; i < argc; i++) {
		size_t len = strlen(argv[i]);

		if (used + len + (i > 1) > STMARK_MAX_LEN) {
			fputs("stmark: marker text too long\n", stderr);
			return 2;
		}
		if (i > 1)
			text[used++] = ' ';
		memcpy(text + used, argv[i], len);
		used += len;
	}
	text[used] = '\0';
	stmark_raw(text, used);
	/* Tell the host side too: it pauses the VM at "stmark: stop". */
	printf("stmark: %s\n", text);
	fflush(stdout);
	return 0;
}
