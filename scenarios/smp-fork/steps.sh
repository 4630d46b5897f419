# smp-fork: two vCPUs. A static program pins itself to CPU 0, writes a
# private buffer and forks children alternately pinned to CPU 0 and CPU 1;
# each copy-on-write faults pages, maps fresh ones, and exits on its CPU.
# Page tables are built, written and freed on both vCPUs; the parent waits
# on CPU 0. Nothing registered as secure. Captured with --smp 2.
stmark start
smpfork
stmark stop
