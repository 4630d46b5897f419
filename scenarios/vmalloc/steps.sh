# vmalloc: a module vmalloc()s 4 areas (1, 3, 8, 2 pages), writes and reads
# every page, vfree()s them and purges the lazy TLB flush. New L1 entries (and
# maybe L1 frames) in the shared vmalloc area; nothing registered as secure.
stmark start
insmod /scenario/st_vmalloc.ko
stmark stop
module_marker st_vmalloc
rmmod st_vmalloc
