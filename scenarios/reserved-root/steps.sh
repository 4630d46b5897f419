# reserved-root: the clean negative of private-root. The kernel is booted
# with memmap=2M$0x1e000000 (the scenario's append file), so that range is
# E820-reserved: outside the page allocator AND outside the kernel direct map.
# The module builds its private root (PGD, PUD, PMD, PTE) and the secure page
# in that range, through a temporary memremap() mapping that it removes
# before registering them (flush=1: and flushes the TLB then), then switches
# CR3 there 4 times (write+read) as private-root does. Expected: no root but
# the private one maps the secure page or any of its table frames: only C3
# info (the copied kernel half). reserved-root-lazy leaves out the flush.
stmark start
insmod /scenario/reserved_root.ko flush=1
stmark stop
module_marker reserved_root
rmmod reserved_root
