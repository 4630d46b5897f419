# _symbols (a build step, not a scenario): copy the kernel's text symbols to
# the host over the second serial port. Debian's System.map is a stub (the
# real one is in the -dbg package), so the build takes /proc/kallsyms from a
# guest booted with nokaslr instead.
grep -E '^[0-9a-f]+ [tTwW] ' /proc/kallsyms > /dev/ttyS1
